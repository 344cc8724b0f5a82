"""SCONE: contextual f-gram input embeddings, learned by a separate model, served from host memory.

Yu et al., 2025, "Scaling Embedding Layers in Language Models" (arXiv:2502.01637). What we follow:

  * The token vocabulary and the output head stay as they are. A set V_f of frequent n-grams
    ("f-grams", 2 <= n <= max_n, the top |V_f| by corpus count; data/fgram.py) gets embeddings.
  * At each position the input embedding is that of the LONGEST f-gram ending at the current
    token; with no match it is the ordinary token embedding.
  * Training: a separate f-gram model (a small causal transformer over the f-gram's own tokens;
    its final normed hidden state at the last token, projected to the main width) produces the
    embedding of every f-gram present in the batch, jointly trained with the main model
    (gradients reach both through the replaced embeddings).
  * Inference: the f-gram model is run once over all of V_f and its outputs are stored as a
    table (safetensors) in host memory. The accelerator runs only the main model: its FLOPs and
    memory do not depend on |V_f| or on the f-gram model's size. Each device step receives the
    looked-up embeddings [B, T, D] of the tokens in flight (a host callback that matches the
    longest suffix and gathers table rows), in prefill and in every plain or speculative decode
    step (rollout/engine.py, rollout/speculative.py take a `HostTable` as `input_embedder`).

Our choices where the paper leaves room or where we work at tiny scale: the f-gram model has its
own token embedding at its own width (the main model's is untouched, so SCONE off is exactly the
plain model); f-grams are counted over the training corpus with a bounded-memory Misra-Gries
summary; the table is float32. The drafter of speculative decoding keeps reading plain token
embeddings (it only proposes; acceptance against the SCONE target keeps sampling exact).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.data.fgram import NO_TOKEN, FgramVocab, sequence_contexts
from tlt_jax.errors import CheckpointError, ConfigError
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import Linear, Transformer

Array = jax.Array
TABLE_FORMAT = "tlt_jax.scone.table.v1"


@dataclasses.dataclass(frozen=True)
class SconeConfig:
  """The SCONE part of a model. `fgram_vocab_size` = |V_f| (0: SCONE off, the plain model)."""

  fgram_vocab_size: int = 0
  max_n: int = 4
  fgram_layers: int = 1
  fgram_hidden: int = 64
  fgram_heads: int = 4
  fgram_intermediate: int = 0  # 0: 3 * fgram_hidden
  count_capacity: int = 1 << 20  # n-grams held while counting (Misra-Gries summary size)

  def __post_init__(self):
    ints = dict(fgram_vocab_size=0, max_n=2, fgram_layers=1, fgram_hidden=2, fgram_heads=1,
                fgram_intermediate=0, count_capacity=1)
    for name, low in ints.items():
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"scone.{name}={value!r} must be an int >= {low}")
    if self.fgram_hidden % self.fgram_heads or (self.fgram_hidden // self.fgram_heads) % 2:
      raise ConfigError(f"scone.fgram_hidden={self.fgram_hidden} must split into scone.fgram_heads="
                        f"{self.fgram_heads} heads of an even size")

  @property
  def enabled(self) -> bool:
    return self.fgram_vocab_size > 0

  @classmethod
  def from_mapping(cls, d: Mapping[str, Any]) -> "SconeConfig":
    d = dict(d)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - allowed)
    if unknown:
      raise ConfigError(f"unknown scone config keys {unknown}; allowed: {sorted(allowed)}")
    return cls(**d)

  def fgram_model_config(self, main: ModelConfig) -> ModelConfig:
    """The f-gram encoder: the main family at width `fgram_hidden`, `fgram_layers` deep."""
    return ModelConfig(vocab_size=main.vocab_size, hidden_size=self.fgram_hidden,
                       intermediate_size=self.fgram_intermediate or 3 * self.fgram_hidden,
                       num_layers=self.fgram_layers, num_heads=self.fgram_heads,
                       num_kv_heads=self.fgram_heads, max_position_embeddings=self.max_n,
                       rms_norm_eps=main.rms_norm_eps, param_dtype=main.param_dtype, dtype=main.dtype)

  def fgram_params(self, main: ModelConfig) -> int:
    return self.fgram_model_config(main).num_params + self.fgram_hidden * main.hidden_size


class FgramModel(nnx.Module):
  """e(g) = W_out · h_last(g): the f-gram's tokens (right-aligned, NO_TOKEN on the left) through a
  causal transformer at positions 0..n-1, its final normed state at the last token, projected."""

  def __init__(self, scfg: SconeConfig, main_cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = scfg.fgram_model_config(main_cfg)
    self.encoder = Transformer(self.cfg, rngs=rngs)
    self.out_proj = Linear(scfg.fgram_hidden, main_cfg.hidden_size, (None, "embed"),
                           main_cfg.jnp_param_dtype, rngs=rngs, scale=0.02 / math.sqrt(scfg.fgram_hidden))

  def __call__(self, tokens_FxN: Array) -> Array:
    f, n = tokens_FxN.shape
    valid_FxN = tokens_FxN != NO_TOKEN
    start_F = n - jnp.sum(valid_FxN, axis=1)
    positions = jnp.maximum(jnp.arange(n)[None] - start_F[:, None], 0).astype(jnp.int32)
    causal = jnp.tril(jnp.ones((n, n), bool))[None]
    mask = (causal & valid_FxN[:, None, :]) | jnp.eye(n, dtype=bool)[None]
    _, hidden, _ = self.encoder(jnp.where(valid_FxN, tokens_FxN, 0), positions,
                                attn_mask_BxTxT=mask, return_logits=False)
    return self.out_proj(hidden[:, -1])


class SconeLM(nnx.Module):
  """The main transformer (`main`, a plain `Transformer`) and its f-gram model (`fgram`). The main
  model's params are those of `Transformer(cfg, rngs=nnx.Rngs(seed))`: the f-gram model is made
  after it from the same RNG stream."""

  def __init__(self, cfg: ModelConfig, scfg: SconeConfig, *, rngs: nnx.Rngs):
    self.cfg, self.scone = cfg, scfg
    self.main = Transformer(cfg, rngs=rngs)
    self.fgram = FgramModel(scfg, cfg, rngs=rngs)

  def input_embeddings(self, tokens_BxT: Array, fgram_tokens_UxN: Array, fgram_index_BxT: Array) -> Array:
    """x[b, t] = fgram(fgram_tokens[index[b, t]]) where index >= 0, else embed(tokens[b, t]); the
    f-gram model runs once per distinct f-gram of the batch (`fgram_batch`)."""
    x = self.main.embed(tokens_BxT)
    e_UxD = self.fgram(fgram_tokens_UxN).astype(x.dtype)
    matched = fgram_index_BxT >= 0
    return jnp.where(matched[..., None], e_UxD[jnp.maximum(fgram_index_BxT, 0)], x)

  def __call__(self, tokens_BxT, fgram_tokens_UxN, fgram_index_BxT, **kwargs):
    x = self.input_embeddings(tokens_BxT, fgram_tokens_UxN, fgram_index_BxT)
    return self.main(tokens_BxT, input_embeds_BxTxD=x, **kwargs)


def build_model(cfg: ModelConfig, scfg: SconeConfig | None, seed: int = 0):
  """A plain `Transformer` when SCONE is off (exactly `init_model(cfg, seed)`), else a `SconeLM`."""
  if scfg is None or not scfg.enabled:
    return Transformer(cfg, rngs=nnx.Rngs(seed))
  return SconeLM(cfg, scfg, rngs=nnx.Rngs(seed))


def fgram_batch(vocab: FgramVocab, tokens_BxT: np.ndarray, min_rows: int = 8) -> tuple[np.ndarray, np.ndarray]:
  """Host side of a training batch: (fgram_tokens_UxN, fgram_index_BxT). U distinct f-grams end
  somewhere in the batch; U is padded to a power of two (>= `min_rows`) so that few shapes compile;
  index is -1 where no f-gram matches."""
  ids = vocab.match_sequences(tokens_BxT)
  hit = ids >= 0
  uniq, inv = np.unique(ids[hit], return_inverse=True)
  u = max(int(min_rows), 1 << max(int(uniq.size) - 1, 0).bit_length())
  rows = np.zeros((u,), np.int64)
  rows[:uniq.size] = uniq
  index = np.full(ids.shape, -1, np.int32)
  index[hit] = inv.reshape(-1)
  tokens = vocab.tokens_FxN[rows] if vocab.size else np.full((u, vocab.max_n), NO_TOKEN, np.int32)
  return tokens.astype(np.int32), index


@functools.partial(jax.jit, static_argnums=0)
def _fgram_rows(graphdef, state, tokens_FxN):
  return nnx.merge(graphdef, state)(tokens_FxN).astype(jnp.float32)


def export_table(fgram: FgramModel, vocab: FgramVocab, rows_per_call: int = 4096) -> np.ndarray:
  """The inference table [|V_f|, D] (float32): the f-gram model over every f-gram, in fixed-size
  calls (one compile)."""
  graphdef, state = nnx.split(fgram)
  rows = min(rows_per_call, max(vocab.size, 1))
  out = []
  for s in range(0, vocab.size, rows):
    block = vocab.tokens_FxN[s:s + rows]
    pad = rows - block.shape[0]
    if pad:
      block = np.concatenate([block, np.repeat(vocab.tokens_FxN[:1], pad, 0)])
    out.append(np.asarray(_fgram_rows(graphdef, state, jnp.asarray(block)))[:rows - pad])
  d = fgram.out_proj.kernel[...].shape[1]
  return np.concatenate(out) if out else np.zeros((0, d), np.float32)


def positions_contexts(seq_BxS: Array, positions_BxT: Array, max_n: int) -> Array:
  """[B, T, max_n] f-gram contexts of the tokens at `positions` of each row of `seq` (traced):
  the tokens at positions p - max_n + 1 .. p, NO_TOKEN before position 0."""
  back = jnp.arange(max_n - 1, -1, -1, dtype=jnp.int32)
  idx_BxTxN = positions_BxT[..., None] - back
  b, t, n = idx_BxTxN.shape
  tok = jnp.take_along_axis(seq_BxS, jnp.clip(idx_BxTxN, 0, seq_BxS.shape[1] - 1).reshape(b, t * n), axis=1)
  return jnp.where(idx_BxTxN >= 0, tok.reshape(b, t, n), NO_TOKEN).astype(jnp.int32)


def tree_contexts(seq_BxS: Array, blk_tok_BxJ: Array, blk_pos_BxJ: Array, par_blk_BxJ: Array,
                  max_n: int) -> Array:
  """[B, J, max_n] contexts of a speculative verification block: entry j's tokens are its own,
  then its ancestors' in the draft tree (parent pointers `par_blk`, -1 above the root), then the
  committed sequence before the root's position."""
  b, j = blk_tok_BxJ.shape
  rows = jnp.arange(b)[:, None]
  cur = jnp.broadcast_to(jnp.arange(j, dtype=jnp.int32), (b, j))
  cols = []
  for m in range(max_n):
    q = blk_pos_BxJ - m  # position of the m-th token back
    from_seq = seq_BxS[rows, jnp.clip(q, 0, seq_BxS.shape[1] - 1)]
    in_blk = cur >= 0
    tok = jnp.where(in_blk, blk_tok_BxJ[rows, jnp.maximum(cur, 0)], jnp.where(q >= 0, from_seq, NO_TOKEN))
    cols.append(tok)
    cur = jnp.where(in_blk, par_blk_BxJ[rows, jnp.maximum(cur, 0)], -1)
  return jnp.stack(cols[::-1], axis=-1).astype(jnp.int32)


class HostTable:
  """The exported f-gram embedding table in host memory, and the lookup that device steps call.

  `lookup(ctx)` (numpy) returns the table rows of the longest matching f-grams (zeros where none)
  and the match flags. `embed(model, ctx)` (inside jit) gets them through `jax.pure_callback` and
  uses the model's token embedding where nothing matched: the device receives [B, T, D] rows
  only. The engine calls `embed_positions` (prefill, plain decode) and `embed_tree` (speculative
  verification).
  """

  def __init__(self, vocab: FgramVocab, table_FxD: np.ndarray):
    table_FxD = np.asarray(table_FxD)
    if table_FxD.ndim != 2 or table_FxD.shape[0] != vocab.size:
      raise CheckpointError(f"f-gram table shape {table_FxD.shape} does not match the vocabulary's "
                            f"{vocab.size} f-grams")
    self.vocab, self.table_FxD = vocab, table_FxD
    self.max_n, self.dim = vocab.max_n, int(table_FxD.shape[1])
    self.lookups = 0  # host calls (statistics)

  @property
  def nbytes(self) -> int:
    """Host memory of the table and the matcher's arrays."""
    return int(self.table_FxD.nbytes + self.vocab.nbytes)

  def lookup(self, ctx_xN: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids = self.vocab.match(np.asarray(ctx_xN))
    matched = ids >= 0
    rows = self.table_FxD[np.maximum(ids, 0)].astype(np.float32, copy=False)
    rows = np.where(matched[..., None], rows, np.float32(0))
    return rows, matched

  def _host(self, ctx):
    self.lookups += 1
    rows, matched = self.lookup(np.asarray(ctx))
    return rows.astype(np.float32), matched

  def embed(self, model: Transformer, ctx_BxTxN: Array) -> Array:
    shape = ctx_BxTxN.shape[:-1]
    rows, matched = jax.pure_callback(
        self._host, (jax.ShapeDtypeStruct(shape + (self.dim,), jnp.float32),
                     jax.ShapeDtypeStruct(shape, jnp.bool_)),
        ctx_BxTxN.astype(jnp.int32), vmap_method="sequential")
    x = model.embed(ctx_BxTxN[..., -1])
    return jnp.where(matched[..., None], rows.astype(x.dtype), x)

  def embed_positions(self, model: Transformer, seq_BxS: Array, positions_BxT: Array) -> Array:
    return self.embed(model, positions_contexts(seq_BxS, positions_BxT, self.max_n))

  def embed_tree(self, model: Transformer, seq_BxS: Array, blk_tok_BxJ: Array, blk_pos_BxJ: Array,
                 par_blk_BxJ: Array) -> Array:
    return self.embed(model, tree_contexts(seq_BxS, blk_tok_BxJ, blk_pos_BxJ, par_blk_BxJ, self.max_n))

  def embed_packed(self, model: Transformer, tokens_BxL: Array, positions_BxL: Array) -> Array:
    """Input embeddings of training rows that pack several sequences (traced; the RL trainer's
    forward): token t's context is tokens t-max_n+1 .. t of its own sequence, where a sequence's
    positions count 0, 1, ... over consecutive slots, so a slot back is in the sequence iff its
    position stays >= 0. These are the contexts the engine looked up when it generated them."""
    back = jnp.arange(self.max_n - 1, -1, -1, dtype=jnp.int32)
    b, length = tokens_BxL.shape
    idx_LxN = jnp.arange(length, dtype=jnp.int32)[:, None] - back
    tok = jnp.take_along_axis(tokens_BxL, jnp.broadcast_to(jnp.clip(idx_LxN, 0, length - 1).reshape(-1),
                                                           (b, length * self.max_n)), axis=1)
    inside = (positions_BxL[..., None] - back >= 0) & (idx_LxN >= 0)
    ctx = jnp.where(inside, tok.reshape(b, length, self.max_n), NO_TOKEN)
    return self.embed(model, ctx.astype(jnp.int32))

  def embed_sequences(self, model: Transformer, tokens_BxT) -> Array:
    """Full-forward input embeddings of whole rows (no cache), e.g. for evaluation."""
    return self.embed(model, jnp.asarray(sequence_contexts(np.asarray(tokens_BxT), self.max_n), jnp.int32))

  # --- storage -------------------------------------------------------------------------------

  def save(self, path: str) -> str:
    """safetensors: `embeddings` [F, D], `fgram_tokens` [F, max_n], `fgram_counts` [F]."""
    from safetensors.numpy import save_file
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({"embeddings": np.ascontiguousarray(self.table_FxD, np.float32),
               **{k: np.ascontiguousarray(v) for k, v in self.vocab.to_arrays().items()}},
              path, metadata={"format": TABLE_FORMAT, "max_n": str(self.max_n)})
    return path

  @classmethod
  def load(cls, path: str) -> "HostTable":
    from safetensors import safe_open
    if not os.path.exists(path):
      raise CheckpointError(f"{path}: no SCONE table there (write one with HostTable.save)")
    try:
      with safe_open(path, framework="numpy") as f:
        if (f.metadata() or {}).get("format") != TABLE_FORMAT:
          raise CheckpointError(f"{path}: not a SCONE table (format {TABLE_FORMAT!r} expected)")
        arrays = {k: f.get_tensor(k) for k in f.keys()}
    except CheckpointError:
      raise
    except Exception as e:  # noqa: BLE001 - any read failure names the file
      raise CheckpointError(f"{path}: unreadable SCONE table ({type(e).__name__}: {e})") from None
    return cls(FgramVocab.from_arrays(arrays), arrays["embeddings"])


def build_table(model: SconeLM, vocab: FgramVocab) -> HostTable:
  return HostTable(vocab, export_table(model.fgram, vocab))


def rl_policy(model: SconeLM, vocab: FgramVocab) -> tuple[Transformer, HostTable]:
  """A SCONE policy as the RL trainer takes it: (the main transformer, the f-gram table exported
  from the f-gram model). RL updates the main model; the table stays frozen, as it is served at
  inference (the f-gram model is not on the device). Pass the table to `RLTrainer` as
  `input_embedder`: rollouts, speculative verification and the trainer's forwards read it."""
  if not isinstance(model, SconeLM):
    raise ConfigError(f"scone.rl_policy: a SconeLM is needed (SCONE on, scone.fgram_vocab_size > 0), "
                      f"got {type(model).__name__}")
  return model.main, build_table(model, vocab)


# --- checkpoints: main model, f-gram model and vocabulary together ------------------------------

def save_checkpoint(directory: str, step: int, model: SconeLM, vocab: FgramVocab,
                    meta: Mapping[str, Any] | None = None) -> None:
  """One orbax step holding the params of both models and the f-gram vocabulary (tokens, counts),
  with the configs in the JSON meta: the inference table can be rebuilt from it alone."""
  from tlt_jax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(directory, max_to_keep=1)
  tree = {"params": nnx.state(model, nnx.Param), "vocab": vocab.to_arrays()}
  ckpt.save(step, tree, {"model": model.cfg.to_dict(), "scone": dataclasses.asdict(model.scone),
                         "fgram_rows": vocab.size, **dict(meta or {})})
  ckpt.close()


def load_checkpoint(directory: str) -> tuple[SconeLM, FgramVocab, dict]:
  """(model, vocab, meta) of the newest step in `directory` (written by `save_checkpoint`)."""
  import json
  from tlt_jax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(directory, max_to_keep=1)
  try:
    steps = ckpt.steps()
    if not steps:
      raise CheckpointError(f"{directory}: no SCONE checkpoint there")
    meta_file = os.path.join(directory, str(steps[-1]), "meta", "metadata")
    with open(meta_file) as f:
      meta0 = json.load(f)
    cfg = ModelConfig.from_dict(meta0["model"])
    scfg = SconeConfig.from_mapping(meta0["scone"])
    model = SconeLM(cfg, scfg, rngs=nnx.Rngs(0))
    n, rows = scfg.max_n, int(meta0["fgram_rows"])
    abstract = {"params": nnx.state(model, nnx.Param),
                "vocab": {"fgram_tokens": np.zeros((rows, n), np.int32),
                          "fgram_counts": np.zeros((rows,), np.int64)}}
    _, tree, meta = ckpt.restore_latest(abstract)
  finally:
    ckpt.close()
  nnx.update(model, tree["params"])
  return model, FgramVocab.from_arrays(tree["vocab"]), meta
