"""EAGLE-1 drafter: one decoder layer that extrapolates the target's feature sequence.

EAGLE (Li et al., 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty")
drafts in feature space. With `f_t` the target's final normed hidden state at position t (the
vector its head maps to the distribution of x_{t+1}), the drafter predicts

    f̂_{t+1} = Layer(fc([embed(x_{t+1}); f_t]))        fc: R^{2H} -> R^H (with bias),

where Layer is one pre-norm decoder block without its input norm, and drafts x_{t+2} from
`head(f̂_{t+1})`. Feeding the sampled token x_{t+1} next to f_t resolves the feature's
uncertainty about which token was actually drawn. TLT (Hu et al., 2025, "Taming the Long
Tail") uses this drafter and trains it on the policy's own hidden states.

Index convention (shared with the trainer and the speculative decoder):
  drafter input index t holds the pair (x_{t+1}, f_t), runs at RoPE position t, and its output
  at index t is f̂_{t+1}, so `target.logits(out[:, t])` is the draft distribution of x_{t+2}.
  E.g. after a prompt x_0..x_{P-1} and the target's first sampled token x_P, the drafter's
  prefill is the P pairs (x_1, f_0) .. (x_P, f_{P-1}) at positions 0..P-1.

The drafter owns no embedding and no head: callers pass `target.embed(tokens)` and read logits
with `target.logits(feat)`. Both stay the target's (frozen, shared), never copied or trained.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import DecoderLayer, KVCache, Linear, causal_mask, rope_inv_freq

Array = jax.Array


def drafter_config(target_cfg: ModelConfig) -> ModelConfig:
  """The drafter's own config: the target's, with one layer (its KV cache has one layer too)."""
  return target_cfg.replace(num_layers=1)


def check_compatible(drafter: "EagleDrafter | ModelConfig", target_cfg: ModelConfig) -> None:
  """Raises ValueError unless the drafter reads and writes the target's feature size.

  The drafter consumes and predicts the target's features f_t in R^H and shares its embedding
  (also R^H), so its hidden size must equal the target's.
  """
  cfg = drafter.cfg if isinstance(drafter, EagleDrafter) else drafter
  if cfg.hidden_size != target_cfg.hidden_size:
    raise ValueError(
        f"drafter hidden_size={cfg.hidden_size} does not match the target's "
        f"hidden_size={target_cfg.hidden_size}; the drafter consumes and predicts the target's "
        "features, so build it from the target's ModelConfig (EagleDrafter(target_cfg, ...))")


class EagleDrafter(nnx.Module):
  """f̂_{t+1} = DecoderLayer(fc([embed(x_{t+1}); f_t])), one layer, no input norm (EAGLE-1).

  Built from the TARGET's ModelConfig (its width, heads, MLP, RoPE). See the module docstring
  for the index convention.
  """

  def __init__(self, target_cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = drafter_config(target_cfg)
    h, pd = self.cfg.hidden_size, self.cfg.jnp_param_dtype
    self.fc = Linear(2 * h, h, ("embed", None), pd, bias=True, rngs=rngs)
    self.layer = DecoderLayer(self.cfg, rngs=rngs, input_norm=False)

  def __call__(self, emb_BxTxD: Array, feat_BxTxD: Array, positions_BxT: Array | None = None,
               cache: KVCache | None = None, attn_mask_BxTxT: Array | None = None,
               kv_mask_BxTxS: Array | None = None, segment_ids_BxT: Array | None = None,
               attn_spec=None, kv_window: int | None = None):
    """One drafter pass over T pairs (x_{t+1}, f_t).

    Args:
      emb_BxTxD: `target.embed(x_{t+1})` for each input index t.
      feat_BxTxD: the target's features f_t (or the drafter's own f̂_t when drafting ahead).
      positions_BxT: RoPE positions, default `cache.lengths + arange(T)` (0.. without a cache),
        i.e. index t runs at position t.
      cache: the drafter's 1-layer KVCache (`KVCache.init(drafter.cfg, B, S)`), with the same
        semantics as the Transformer's: keys/values are written at slots lengths .. lengths+T-1,
        query i sees every committed slot plus the new slots allowed by `attn_mask_BxTxT[b, i]`,
        and the returned cache has lengths + T (the caller may reset lengths).
      attn_mask_BxTxT: attention among the T new inputs (default causal); a tree mask lets the
        speculative decoder expand several draft branches in one call.
      kv_mask_BxTxS: with a cache, the exact cache slots each query sees (overrides the
        committed-prefix + block rule): tree levels attend to ancestors written by earlier calls.
      segment_ids_BxT: without a cache, causal attention within segments computed without a
        dense [T, T] mask (models/attention.py, kernel chosen by `attn_spec`), e.g. all ones for
        the long rows of drafter training.
      kv_window: with a cache, attend to slots [0, kv_window) only (static; the caller guarantees
        every slot a query must see lies below it): the live window, not the whole capacity.

    Returns:
      (feat_pred_BxTxD, new_cache): f̂_{t+1} for each index t (no further norm: it feeds the
      target's head directly, like f_{t+1}), and the updated cache (None without one).
    """
    h = self.cfg.hidden_size
    if emb_BxTxD.shape[-1] != h or feat_BxTxD.shape[-1] != h:
      raise ValueError(f"drafter hidden_size={h} does not match its inputs: embedding width "
                       f"{emb_BxTxD.shape[-1]}, feature width {feat_BxTxD.shape[-1]}")
    b, t, _ = emb_BxTxD.shape
    if positions_BxT is None:
      start_B = cache.lengths if cache is not None else jnp.zeros((b,), jnp.int32)
      positions_BxT = start_B[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    use_segments = segment_ids_BxT is not None and cache is None
    mask = None if use_segments else causal_mask(b, t) if attn_mask_BxTxT is None else attn_mask_BxTxT
    dt = self.cfg.jnp_dtype
    x_BxTxD = self.fc(jnp.concatenate([emb_BxTxD.astype(dt), feat_BxTxD.astype(dt)], axis=-1))
    kv = None if cache is None else (cache.k[0], cache.v[0])
    start = None if cache is None else cache.lengths
    feat_pred_BxTxD, kv = self.layer(x_BxTxD, positions_BxT, rope_inv_freq(self.cfg), mask, kv, start,
                                     kv_mask_BxTxS, segment_ids_BxT if use_segments else None, attn_spec,
                                     kv_window)
    new_cache = None if cache is None else KVCache((kv[0],), (kv[1],), cache.lengths + t)
    return feat_pred_BxTxD, new_cache


def init_drafter(target_cfg: ModelConfig, seed: int = 0) -> EagleDrafter:
  return EagleDrafter(target_cfg, rngs=nnx.Rngs(seed))
