"""Tiny target/drafter pairs for speculative-decoding tests.

`nearly_context_free_target` has normalised embeddings (so f_t ≈ embed(x_t)), a random untied
head and attention/MLP outputs scaled down by `mix`: the next-token distribution depends mostly
on the current token, a little on the context (so the KV cache still matters).
`copying_drafter` predicts f̂_{t+1} = embed(x_{t+1}): near-perfect for that target.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.drafter.eagle import EagleDrafter
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import Transformer

VOCAB = 32
EOS = (2,)


def target_config(**kw) -> ModelConfig:
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, tie_word_embeddings=False)
  base.update(kw)
  return ModelConfig(**base)


def nearly_context_free_target(cfg: ModelConfig, mix: float = 0.05, head_scale: float = 0.6,
                               seed: int = 0) -> Transformer:
  model = Transformer(cfg, rngs=nnx.Rngs(seed))
  k1, k2 = jax.random.split(jax.random.key(seed + 100))
  emb = jax.random.normal(k1, (cfg.vocab_size, cfg.hidden_size))
  emb = emb / jnp.sqrt(jnp.mean(emb**2, axis=-1, keepdims=True))
  model.embed_tokens[...] = emb
  model.lm_head[...] = head_scale * jax.random.normal(k2, (cfg.hidden_size, cfg.vocab_size))
  for layer in model.layers:
    layer.self_attn.o_proj.kernel[...] = layer.self_attn.o_proj.kernel[...] * mix / 0.02
    layer.mlp.down_proj.kernel[...] = layer.mlp.down_proj.kernel[...] * mix / 0.02
  return model


def copying_drafter(cfg: ModelConfig, seed: int = 1) -> EagleDrafter:
  drafter = EagleDrafter(cfg, rngs=nnx.Rngs(seed))
  h = cfg.hidden_size
  drafter.fc.kernel[...] = jnp.concatenate([jnp.eye(h), jnp.zeros((h, h))], axis=0)
  drafter.fc.bias[...] = jnp.zeros((h,))
  drafter.layer.self_attn.o_proj.kernel[...] = jnp.zeros_like(drafter.layer.self_attn.o_proj.kernel[...])
  drafter.layer.mlp.down_proj.kernel[...] = jnp.zeros_like(drafter.layer.mlp.down_proj.kernel[...])
  return drafter


def random_drafter(cfg: ModelConfig, seed: int = 2) -> EagleDrafter:
  return EagleDrafter(cfg, rngs=nnx.Rngs(seed))


def random_prompts(n: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """`n` prompts of 2..`width` tokens drawn from ids 3..VOCAB-1, right-padded with 0 to `width`:
  (tokens [n, width], lengths [n])."""
  rng = np.random.default_rng(seed)
  plen = rng.integers(2, width + 1, n).astype(np.int32)
  toks = rng.integers(3, VOCAB, (n, width)).astype(np.int32)
  toks[np.arange(width)[None, :] >= plen[:, None]] = 0
  return toks, plen
