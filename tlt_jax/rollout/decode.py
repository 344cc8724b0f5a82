"""Pure decoding: the decode state, prefill, one plain step and a chunk of steps, the row
gather and the state's shardings. Functions of arrays only (jitted by rollout/programs.py);
no host work, no clock.

Placement: the KV cache, tokens, features and logprobs are split over the batch axes (and the
cache's KV heads over 'tensor') by the sampling rules; the per-row vectors (lengths, done flags,
counts) and the chunk statistics are replicated, so the host reads only replicated values (the
done flags, the statistics, and the finished rows, which a jitted gather returns replicated):
multi-host safe, since a group may span several hosts.

Live window: a chunk attends to cache slots [0, W) only, W a static multiple of `window_block`
that bounds every row's length by the end of the chunk (the host knows the bound without reading
the device: prompt width + tokens a chunk can add). A decode step then reads the live part of
the cache rather than its whole capacity; W = capacity when `window_block` is 0.

State invariant: the cache holds every token of a row except the last one, `pending`, which
sits at `seq[b, cache.lengths[b]]`; `feat[b, t]` is the target's final normed hidden state at
position t (EAGLE's f_t, which produced token t + 1).
"""

from __future__ import annotations

from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from tlt_jax.models.attention import AttentionSpec
from tlt_jax.models.transformer import KVCache
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.sampling import SamplingParams, policy_logprobs, sample_from, target_logprobs

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@flax.struct.dataclass
class DecodeState:
  cache: KVCache
  seq_BxS: jax.Array  # int32: prompt, generated tokens, pending token
  feat_BxSxD: jax.Array  # target features f_t (zeros-shaped [B, 0, D] when not kept)
  logprobs_BxM: jax.Array  # float32 policy logprobs of generated tokens
  prompt_len_B: jax.Array
  num_gen_B: jax.Array
  done_B: jax.Array
  rng: jax.Array
  max_new_B: jax.Array  # per-row max new tokens
  draft_cache: KVCache | None = None  # the drafter's cache, made when speculation starts

  @property
  def pending_pos_B(self):
    return self.cache.lengths

  def take(self, idx_B) -> "DecodeState":
    rows = jax.tree.map(lambda x: jnp.take(x, idx_B, axis=0), self.replace(rng=None))
    return rows.replace(rng=self.rng)

  def compact(self, idx_B, num_valid) -> "DecodeState":
    """Rows `idx_B`, of which the first `num_valid` (traced: one compile per bucket pair, not per
    count) are live and the rest padding, marked done."""
    rows = self.take(idx_B)
    return rows.replace(done_B=mark_done_from(rows.done_B, num_valid))


def mark_done_from(done_B, num_valid):
  """`done_B` with every row at index >= `num_valid` (a traced scalar) set."""
  return done_B | (jnp.arange(done_B.shape[0]) >= num_valid)


def _rows(x_BxN, idx_B):
  return x_BxN[jnp.arange(x_BxN.shape[0]), idx_B]


def _set_rows(x_BxN, idx_B, val_B, where_B):
  b = jnp.arange(x_BxN.shape[0])
  return x_BxN.at[b, idx_B].set(jnp.where(where_B, val_B, x_BxN[b, idx_B]))


def is_eos(tokens_B, eos_ids: Sequence[int]):
  return jnp.isin(tokens_B, jnp.asarray(eos_ids, jnp.int32))


def advance(state: DecodeState, next_B, logp_B, feat_BxD, new_cache: KVCache, eos_ids) -> DecodeState:
  """Appends one sampled token per active row and updates done flags."""
  active = ~state.done_B
  pos = state.pending_pos_B
  seq = _set_rows(state.seq_BxS, pos + 1, next_B, active)
  feat = state.feat_BxSxD
  if feat.shape[1]:
    b = jnp.arange(feat.shape[0])
    feat = feat.at[b, pos].set(jnp.where(active[:, None], feat_BxD.astype(feat.dtype), feat[b, pos]))
  logprobs = _set_rows(state.logprobs_BxM, state.num_gen_B, logp_B, active)
  num_gen = state.num_gen_B + active
  cache = new_cache.replace(lengths=jnp.where(active, pos + 1, pos))
  done = state.done_B | (active & (is_eos(next_B, eos_ids) | (num_gen >= state.max_new_B)))
  return state.replace(cache=cache, seq_BxS=seq, feat_BxSxD=feat, logprobs_BxM=logprobs,
                       num_gen_B=num_gen, done_B=done)


def prefill(graphdef, params, prompt_BxP, prompt_len_B, max_new_B, rng, *, capacity: int,
            sp: SamplingParams, eos_ids: tuple[int, ...], keep_features: bool,
            live_window: bool = False, embedder=None) -> DecodeState:
  """Runs the prompts through the target, fills the cache and samples the first token (the head
  runs at each row's last prompt position only). `live_window`: the prompt attends to the P
  slots it writes rather than the whole cache. `embedder` (e.g. SCONE's `HostTable`, None for
  the plain model): the input embeddings come from `embedder.embed_positions`."""
  model = nnx.merge(graphdef, params)
  b, p = prompt_BxP.shape
  cache = KVCache.init(model.cfg, b, capacity)
  x = None if embedder is None else embedder.embed_positions(
      model, prompt_BxP, jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p)))
  _, hidden, cache = model(prompt_BxP, cache=cache, return_logits=False,
                           kv_window=p if live_window else None, input_embeds_BxTxD=x)
  last = prompt_len_B - 1
  logits_BxV = model.logits(hidden[jnp.arange(b), last])  # the head at one position per row
  rng, key = jax.random.split(rng)
  next_B = sample_from(target_logprobs(logits_BxV, sp), key, sp)
  logp_B = jnp.take_along_axis(policy_logprobs(logits_BxV, sp), next_B[:, None], axis=-1)[:, 0]
  seq = jnp.zeros((b, capacity), jnp.int32).at[:, :p].set(prompt_BxP)
  d = model.cfg.hidden_size
  feat = jnp.zeros((b, capacity if keep_features else 0, d), feature_dtype(model.cfg))
  if keep_features:
    feat = feat.at[:, :p].set(hidden.astype(feat.dtype))
  m = int(capacity)  # logprobs buffer wide enough for any row
  state = DecodeState(
      cache=cache.replace(lengths=last), seq_BxS=seq, feat_BxSxD=feat,
      logprobs_BxM=jnp.zeros((b, m), jnp.float32), prompt_len_B=prompt_len_B,
      num_gen_B=jnp.zeros((b,), jnp.int32), done_B=jnp.zeros((b,), bool), rng=rng,
      max_new_B=max_new_B)
  # The last prompt token is the "pending" one: its cache slot is rewritten by `advance`.
  return advance(state, next_B, logp_B, hidden[jnp.arange(b), last], state.cache, eos_ids)


def feature_dtype(cfg):
  """The kept features' dtype: float32 for float32 models, the compute dtype otherwise (a 7B's
  bfloat16 features take half the memory, and are what its head sees)."""
  return jnp.float32 if cfg.dtype == "float32" else cfg.jnp_dtype


def decode_step(model, state: DecodeState, sp: SamplingParams, eos_ids, window: int | None = None,
                embedder=None, attn_spec=None) -> DecodeState:
  """One plain decoding step for the whole batch (attending to cache slots < `window`; `attn_spec`:
  how, `AttentionSpec.for_cache`, None: XLA ops)."""
  pos = state.pending_pos_B
  tok_B = _rows(state.seq_BxS, pos)
  x = None if embedder is None else embedder.embed_positions(model, state.seq_BxS, pos[:, None])
  logits, hidden, cache = model(tok_B[:, None], pos[:, None], cache=state.cache, kv_window=window,
                                input_embeds_BxTxD=x, attn_spec=attn_spec)
  rng, key = jax.random.split(state.rng)
  next_B = sample_from(target_logprobs(logits[:, 0], sp), key, sp)
  logp_B = jnp.take_along_axis(policy_logprobs(logits[:, 0], sp), next_B[:, None], axis=-1)[:, 0]
  return advance(state.replace(rng=rng), next_B, logp_B, hidden[:, 0], cache, eos_ids)


def decode_chunk(graphdef, params, state: DecodeState, *, num_steps: int, sp: SamplingParams,
                 eos_ids: tuple[int, ...], window: int | None = None, embedder=None, mesh=None):
  """Up to `num_steps` plain decoding steps in one `lax.while_loop`; stops early when all done.
  Attention reads cache slots [0, window) (None: all), by the model's `cache_attention` on `mesh`
  (the program's mesh; None: one device). Returns (state, (steps, tokens, row_steps)) with the
  statistics as device scalars."""
  model = nnx.merge(graphdef, params)
  spec = AttentionSpec.for_cache(model.cfg, mesh)

  def cond(carry):
    i, st = carry
    return (i < num_steps) & ~jnp.all(st.done_B)

  def body(carry):
    i, st = carry
    return i + 1, decode_step(model, st, sp, eos_ids, window, embedder, spec)

  before = jnp.sum(state.num_gen_B)
  steps, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
  tokens = jnp.sum(state.num_gen_B) - before
  return state, (steps, tokens, tokens)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
  """The smallest bucket that holds `n` rows; `n` itself above the ladder (a batch of its own size)."""
  for b in buckets:
    if b >= n:
      return b
  return n


def compacted_rows(active: int, rows: int, buckets: Sequence[int]) -> int:
  """Rows a state of `rows` rows holds once compacted to `active` live rows: the smallest bucket
  that holds them when that is smaller than `rows`, else `rows` (no compaction). Above the ladder
  a state keeps its own size until its live rows fit the largest bucket; then it compacts down
  the ladder like any other."""
  b = bucket_for(active, buckets)
  return b if b < rows and b in buckets else rows


def state_shardings(state: DecodeState, mesh, rules=None) -> DecodeState:
  """NamedShardings of a DecodeState on `mesh` by the sampling rules: [B, ...] arrays split over
  'batch' (the caches' KV heads over 'kv_heads'), per-row vectors and the RNG replicated (see the
  module docstring)."""
  rules = mesh_lib.SAMPLE_RULES if rules is None else rules
  rep = mesh_lib.replicated(mesh)

  def named(axes, x):
    return jax.sharding.NamedSharding(mesh, mesh_lib.logical_to_spec(axes, rules, x.shape, mesh))

  def cache(c):
    if c is None:
      return None
    kv = lambda xs: tuple(named(("batch", "kv_heads", None, None), x) for x in xs)  # noqa: E731
    return KVCache(kv(c.k), kv(c.v), rep)

  return DecodeState(
      cache=cache(state.cache), seq_BxS=named(("batch", None), state.seq_BxS),
      feat_BxSxD=named(("batch", None, None), state.feat_BxSxD),
      logprobs_BxM=named(("batch", None), state.logprobs_BxM), prompt_len_B=rep, num_gen_B=rep,
      done_B=rep, rng=rep, max_new_B=rep, draft_cache=cache(state.draft_cache))


def gather_rows(state: DecodeState, idx_R, with_features: bool):
  """Rows `idx_R` of what the host copies out: (seq, logprobs, num_gen, prompt_len[, feat])."""
  out = (state.seq_BxS[idx_R], state.logprobs_BxM[idx_R], state.num_gen_B[idx_R],
         state.prompt_len_B[idx_R])
  return out + ((state.feat_BxSxD[idx_R],) if with_features else ())


def live_window(bound: int, capacity: int, block: int) -> int | None:
  """The static attention window of a chunk whose rows stay below `bound` slots: `bound` rounded
  up to a multiple of `block`, at most `capacity` (None when block is 0: the whole cache)."""
  if block <= 0:
    return None
  w = -(-int(bound) // block) * block
  return None if w >= capacity else w
