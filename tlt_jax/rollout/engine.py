"""Rollout engine: prefill, jitted decode chunks, host-side batch compaction.

Per call of `generate`:
  1. prefill the right-padded prompts into a KV cache and sample the first token;
  2. decode in jitted chunks (`lax.while_loop` of up to K steps, state donated);
  3. between chunks, on the host, copy out finished rows and compact the active ones into the
     next smaller batch bucket, so the long tail never pays for finished rows. Shapes are
     static per bucket, so each bucket compiles once;
  4. once the active batch is at or below `spec_threshold` and a speculative decoder is given,
     decode the tail with `speculative_chunk` instead (see rollout/speculative.py).

Placement (explicit in/out shardings when a session runs on a mesh, e.g. its rollout group's):
the KV cache, tokens, features and logprobs are split over the batch axes (and the cache's KV
heads over 'tensor') by the sampling rules; the per-row vectors (lengths, done flags, counts) and
the chunk statistics are replicated, so the host reads only replicated values (the done flags,
the statistics, and the finished rows, which a jitted gather returns replicated): multi-host
safe, since a group may span several hosts.

Live window: a chunk attends to cache slots [0, W) only, W a static multiple of `window_block`
that bounds every row's length by the end of the chunk (the host knows the bound without reading
the device: prompt width + tokens a chunk can add). A decode step then reads the live part of
the cache rather than its whole capacity; W = capacity when `window_block` is 0.

State invariant: the cache holds every token of a row except the last one, `pending`, which
sits at `seq[b, cache.lengths[b]]`; `feat[b, t]` is the target's final normed hidden state at
position t (EAGLE's f_t, which produced token t + 1).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.models.transformer import KVCache
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.sampling import SamplingParams, policy_logprobs, sample_from, target_logprobs
from tlt_jax.rollout.strategy import PLAIN, strategy_name

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class FixedSelector:
  """A strategy selector that always answers `strategy` (the bandit's interface, no learning)."""

  def __init__(self, strategy):
    self.strategy = strategy

  def select(self, batch_size):
    return self.strategy

  def update(self, *outcome):
    pass


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


@dataclasses.dataclass
class RolloutResult:
  """Generated tokens [N, M] (PAD after the end), lengths [N], float32 logprobs [N, M], finished
  flags (EOS reached) [N], and statistics."""

  tokens: np.ndarray
  lengths: np.ndarray
  logprobs: np.ndarray
  finished: np.ndarray
  stats: dict[str, Any]


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
                embedder=None) -> DecodeState:
  """One plain decoding step for the whole batch (attending to cache slots < `window`)."""
  pos = state.pending_pos_B
  tok_B = _rows(state.seq_BxS, pos)
  x = None if embedder is None else embedder.embed_positions(model, state.seq_BxS, pos[:, None])
  logits, hidden, cache = model(tok_B[:, None], pos[:, None], cache=state.cache, kv_window=window,
                                input_embeds_BxTxD=x)
  rng, key = jax.random.split(state.rng)
  next_B = sample_from(target_logprobs(logits[:, 0], sp), key, sp)
  logp_B = jnp.take_along_axis(policy_logprobs(logits[:, 0], sp), next_B[:, None], axis=-1)[:, 0]
  return advance(state.replace(rng=rng), next_B, logp_B, hidden[:, 0], cache, eos_ids)


def decode_chunk(graphdef, params, state: DecodeState, *, num_steps: int, sp: SamplingParams,
                 eos_ids: tuple[int, ...], window: int | None = None, embedder=None):
  """Up to `num_steps` plain decoding steps in one `lax.while_loop`; stops early when all done.
  Attention reads cache slots [0, window) (None: all). Returns (state, (steps, tokens,
  row_steps)) with the statistics as device scalars."""
  model = nnx.merge(graphdef, params)

  def cond(carry):
    i, st = carry
    return (i < num_steps) & ~jnp.all(st.done_B)

  def body(carry):
    i, st = carry
    return i + 1, decode_step(model, st, sp, eos_ids, window, embedder)

  before = jnp.sum(state.num_gen_B)
  steps, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
  tokens = jnp.sum(state.num_gen_B) - before
  return state, (steps, tokens, tokens)


def _shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


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


@dataclasses.dataclass
class RolloutEngine:
  """Host driver for batched generation. One engine per (model graph, sampling params)."""

  graphdef: Any
  sampling: SamplingParams
  eos_ids: tuple[int, ...]
  pad_id: int = 0
  chunk_size: int = 16
  buckets: tuple[int, ...] = DEFAULT_BUCKETS
  max_context: int = 2048  # cache capacity limit (model max positions)
  speculative: Any = None  # a SpeculativeDecoder (rollout/speculative.py) or None
  spec_threshold: int = 0  # switch to speculative decoding at or below this active batch size
  compact: bool = True
  window_block: int = 0  # live attention window granularity (0: attend to the whole cache)
  # Input embeddings from outside the params (SCONE's host-side f-gram table, models/scone.py:
  # HostTable); None: the model's own token embeddings (the plain programs, unchanged).
  input_embedder: Any = None

  def __post_init__(self):
    if self.chunk_size <= 0:
      raise ValueError(f"rollout.chunk_size={self.chunk_size} must be > 0")
    self.eos_ids = tuple(int(e) for e in self.eos_ids)
    if not self.eos_ids:
      raise ValueError("rollout needs at least one EOS id")
    keep = self.speculative is not None
    self._prefill_fn = functools.partial(prefill, self.graphdef, sp=self.sampling,
                                         eos_ids=self.eos_ids, keep_features=keep,
                                         live_window=self.window_block > 0,
                                         embedder=self.input_embedder)
    self._chunk_partial = functools.partial(decode_chunk, self.graphdef, num_steps=self.chunk_size,
                                            sp=self.sampling, eos_ids=self.eos_ids,
                                            embedder=self.input_embedder)
    self._jits: dict[tuple, Any] = {}  # (what, mesh devices, static args) -> sharded jit
    # Chunk programs dispatched before: a chunk whose program is new pays its compilation inside
    # its measured time, so its time is not a score for the selector (RolloutSession).
    self._warm: set[tuple] = set()

  # --- jits with explicit shardings on a mesh (one device is a 1x1x1 mesh) -------------------

  @staticmethod
  def _mesh_key(mesh) -> tuple:
    return (tuple(d.id for d in mesh.devices.flat), mesh.devices.shape)

  def _sharded(self, what: str, mesh, key: tuple, build: Callable[[], Any]):
    k = (what, self._mesh_key(mesh)) + key
    if k not in self._jits:
      self._jits[k] = build()
    return self._jits[k]

  def programs(self, what: str) -> list:
    """The jitted programs of one kind ("prefill", "chunk", "compact", "gather", "mark_done")
    built so far, one per mesh and static shape (each compiles once: `f._cache_size()`)."""
    return [f for k, f in self._jits.items() if k[0] == what]

  def prefill_jit(self, mesh, params, prompt_shape: tuple[int, int], capacity: int):
    """The prefill jitted with explicit shardings on `mesh` (params as placed, prompts split over
    'batch', per-row vectors and the RNG replicated, the state by `state_shardings`)."""
    b = prompt_shape[0]

    def build():
      fn = functools.partial(self._prefill_fn, capacity=capacity)
      rep = mesh_lib.replicated(mesh)
      prompts = mesh_lib.batch_sharding(mesh, 2, mesh_lib.SAMPLE_RULES, b)
      abstract = jax.eval_shape(fn, params, jax.ShapeDtypeStruct(prompt_shape, jnp.int32),
                                jax.ShapeDtypeStruct((b,), jnp.int32), jax.ShapeDtypeStruct((b,), jnp.int32),
                                jax.random.PRNGKey(0))
      return jax.jit(fn, in_shardings=(_shardings_of(params), prompts, rep, rep, rep),
                     out_shardings=state_shardings(abstract, mesh))
    return self._sharded("prefill", mesh, (prompt_shape, capacity), build)

  def chunk_jit(self, mesh, params, state: DecodeState, window: int | None):
    """`decode_chunk` jitted with explicit in/out shardings on `mesh`; the state is donated."""

    def build():
      st = state_shardings(state, mesh)
      rep = mesh_lib.replicated(mesh)
      return jax.jit(functools.partial(self._chunk_partial, window=window),
                     in_shardings=(_shardings_of(params), st), out_shardings=(st, (rep, rep, rep)),
                     donate_argnums=(1,))
    return self._sharded("chunk", mesh, (state.done_B.shape[0], state.seq_BxS.shape[1], window), build)

  def compact_jit(self, mesh, state: DecodeState, bucket: int):
    """Batch compaction to `bucket` rows (`DecodeState.compact`), shardings explicit (the new
    bucket's batch split)."""

    def build():
      out = jax.eval_shape(lambda st: st.take(jnp.zeros((bucket,), jnp.int32)), state)
      rep = mesh_lib.replicated(mesh)
      return jax.jit(lambda st, idx, n: st.compact(idx, n),
                     in_shardings=(state_shardings(state, mesh), rep, rep),
                     out_shardings=state_shardings(out, mesh))
    has_draft = state.draft_cache is not None
    return self._sharded("compact", mesh, (state.done_B.shape[0], state.seq_BxS.shape[1], bucket, has_draft),
                         build)

  def gather_jit(self, mesh, state: DecodeState, num_rows: int, with_features: bool):
    """`gather_rows` with replicated outputs: every host can read the rows it copies out."""

    def build():
      rep = mesh_lib.replicated(mesh)
      return jax.jit(functools.partial(gather_rows, with_features=with_features),
                     in_shardings=(state_shardings(state, mesh), rep), out_shardings=rep)
    has_draft = state.draft_cache is not None
    return self._sharded("gather", mesh, (state.done_B.shape[0], state.seq_BxS.shape[1], num_rows,
                                          with_features, has_draft), build)

  def mark_done_jit(self, mesh, rows: int):
    """`mark_done_from` on the replicated done flags of a state of `rows` rows."""
    build = lambda: jax.jit(mark_done_from, in_shardings=(mesh_lib.replicated(mesh),) * 2,  # noqa: E731
                            out_shardings=mesh_lib.replicated(mesh))
    return self._sharded("mark_done", mesh, (rows,), build)

  def capacity_for(self, prompt_len: int, max_new_tokens: int) -> int:
    margin = 1
    if self.speculative is not None:
      margin = max(self.speculative.max_verify_tokens, self.speculative.max_depth + 1) + 1
    cap = prompt_len + max_new_tokens + margin
    return int(-(-cap // 16) * 16)

  def start(self, params, prompt_BxP: np.ndarray, prompt_len_B: np.ndarray, max_new_tokens,
            rng: jax.Array, drafter_params=None, selector=None, *,
            place_batch: Callable[[np.ndarray], jax.Array] | None = None,
            collect_features: bool = False, mesh=None) -> "RolloutSession":
    """Prefills and returns a session that decodes chunk by chunk (`session.advance()`); a host
    scheduler interleaves the sessions of several rollout groups this way.

    `place_batch(x)` puts the session's [B, ...] host inputs on devices (e.g. batch-sharded over a
    rollout group's sub-mesh; default: `jnp.asarray`, which follows the params). With
    `collect_features` (and a speculative decoder, which keeps the features), every row copied out
    is also appended to `session.finished_features` as (row, tokens_T, feat_TxD, prompt_len): the
    target's own features f_t of prompt + response, for the drafter buffer (tlt/buffer.py).
    Every jit has explicit in/out shardings on `mesh` (the group's; default: the mesh the params
    live on, `mesh_lib.mesh_of`, a 1x1x1 mesh for one device) and the host reads only replicated
    values (module docstring).
    """
    return RolloutSession(self, params, prompt_BxP, prompt_len_B, max_new_tokens, rng, drafter_params,
                          selector, place_batch=place_batch, collect_features=collect_features,
                          mesh=mesh or mesh_lib.mesh_of(params))

  def generate(self, params, prompt_BxP: np.ndarray, prompt_len_B: np.ndarray, max_new_tokens,
               rng: jax.Array, drafter_params=None, selector=None, *, mesh=None) -> RolloutResult:
    """Generates up to `max_new_tokens` (an int, or one per row) for each right-padded prompt.

    At or below `spec_threshold` active rows (and with `drafter_params`), each chunk's strategy
    comes from `selector.select(rows)` (e.g. the BEG-MAB bandit, tlt/bandit.py; the decoder's
    default strategy without one), `rows` the state's rows (the active batch's bucket with
    compaction); the selector may answer PLAIN = (0, 0, 0) for a plain chunk, and is told each
    chunk's outcome through `selector.update(rows, strategy, accept_len, time_per_round)`.
    """
    session = self.start(params, prompt_BxP, prompt_len_B, max_new_tokens, rng, drafter_params, selector,
                         mesh=mesh)
    while session.advance():
      pass
    return session.result()


class _InFlight(NamedTuple):
  """A dispatched chunk whose statistics the session has not read yet."""
  phase: str  # "decode" or "speculative"
  strategy: Any  # None: plain
  active: int  # live rows when dispatched
  rows: int  # the state's rows (what the chunk computes)
  t0: float  # dispatch time (perf_counter)
  stats: Any  # device scalars (rounds, tokens, row_rounds)
  cold: bool  # its program compiled inside it


class RolloutSession:
  """One batch being generated. `advance()` waits for the chunk in flight (if any), copies out
  finished rows, compacts, and dispatches the next chunk without waiting for it (JAX async
  dispatch); it returns False once every row is done. `drafter_params` may be swapped between
  calls (a newly published drafter version)."""

  def __init__(self, engine: RolloutEngine, params, prompt_BxP, prompt_len_B, max_new_tokens, rng,
               drafter_params=None, selector=None, *, place_batch=None, collect_features=False,
               mesh):
    self.engine, self.params, self.drafter_params, self.selector = engine, params, drafter_params, selector
    self.mesh = mesh
    self.collect_features = bool(collect_features) and engine.speculative is not None
    self.finished_features: list[tuple[int, np.ndarray, np.ndarray, int]] = []
    put = jnp.asarray if place_batch is None else place_batch
    prompt_BxP = np.asarray(prompt_BxP, np.int32)
    prompt_len_B = np.asarray(prompt_len_B, np.int32)
    n, p = prompt_BxP.shape
    max_new_N = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (n,))
    if max_new_N.min() <= 0:
      raise ValueError(f"max_new_tokens={max_new_tokens} must be > 0")
    max_new_tokens = int(max_new_N.max())
    if prompt_len_B.min() < 1:
      raise ValueError("every prompt needs at least one token (BOS)")
    longest = int(prompt_len_B.max())
    capacity = engine.capacity_for(p, max_new_tokens)
    if longest + max_new_tokens > engine.max_context or capacity > engine.max_context + 64:
      raise ValueError(
          f"prompt length {longest} + max_new_tokens {max_new_tokens} exceeds the context "
          f"{engine.max_context}; shorten the prompt or lower max_new_tokens")
    self.t_start = time.perf_counter()
    b0 = bucket_for(n, engine.buckets) if engine.compact else n
    pad = b0 - n
    prompts = np.concatenate([prompt_BxP, np.repeat(prompt_BxP[:1], pad, 0)]) if pad else prompt_BxP
    plens = np.concatenate([prompt_len_B, np.repeat(prompt_len_B[:1], pad)]) if pad else prompt_len_B
    max_new = np.concatenate([max_new_N, np.ones(pad, np.int32)])
    # Explicit out_shardings commit the state (jit keys its programs on whether the arguments are
    # committed: a mix compiled each chunk program twice, inside a timed, scored chunk).
    rep = mesh_lib.replicated(mesh)
    state = engine.prefill_jit(mesh, params, prompts.shape, capacity)(
        params, put(prompts), mesh_lib.put_global(plens, rep), mesh_lib.put_global(max_new, rep),
        mesh_lib.put_global(rng, rep))
    self.row_ids = np.concatenate([np.arange(n), -np.ones(pad, np.int64)])
    if pad:
      state = state.replace(done_B=engine.mark_done_jit(mesh, b0)(
          state.done_B, mesh_lib.put_global(np.int32(n), rep)))
    jax.block_until_ready(state.done_B)
    self.capacity = capacity
    self.live_bound = p  # every row's cache length stays below this (host-side bound)
    self.state = state
    self.tokens = np.full((n, max_new_tokens), engine.pad_id, np.int32)
    self.logprobs = np.zeros((n, max_new_tokens), np.float32)
    self.lengths = np.zeros((n,), np.int32)
    self.finished = np.zeros((n,), bool)
    self.trace: list[int] = []
    self.times = {"prefill": time.perf_counter() - self.t_start, "decode": 0.0, "speculative": 0.0,
                  "compact": 0.0}
    self.chunks: list[dict] = []
    self.spec_tokens = self.spec_row_rounds = 0
    self._in_flight: _InFlight | None = None
    self._drafter_behind = True  # the drafter's cache lags the sequence (start, or plain chunks since)
    self.is_done = False
    if (engine.speculative is not None and drafter_params is not None and engine.spec_threshold > 0
        and engine.compact):
      self._warm_tail()
      self.times["prefill"] = time.perf_counter() - self.t_start  # warm-up compiles count here

  @property
  def num_active(self) -> int:
    return 0 if self.is_done else int(self.trace[-1]) if self.trace else len(self.row_ids)

  def chunk_ready(self) -> bool:
    """True when `advance()` will not wait: no chunk in flight, or its statistics (its last
    outputs) are ready. A scheduler of several sessions advances the ready ones first, so that a
    chunk's measured time (the selector's score) is its own, not a wait on another session's."""
    return self._in_flight is None or all(x.is_ready() for x in self._in_flight.stats)

  def _copy_out(self, rows):
    st, row_ids = self.state, self.row_ids
    rows = [r for r in rows if row_ids[r] >= 0]
    if not rows:
      return
    # Padded to the state's rows (repeats of the first, ignored below): one program per state
    # bucket, not one per number of finished rows.
    idx = np.asarray(rows + rows[:1] * (len(row_ids) - len(rows)))
    gather = self.engine.gather_jit(self.mesh, st, len(idx), self.collect_features)
    out = mesh_lib.to_host(gather(st, mesh_lib.put_global(idx.astype(np.int32), mesh_lib.replicated(self.mesh))))
    seq, lp, ng, pl = out[:4]
    feat = out[4] if self.collect_features else None
    for j, r in enumerate(rows):
      k = int(ng[j])
      out = seq[j, pl[j]:pl[j] + k]
      self.tokens[row_ids[r], :k] = out
      self.logprobs[row_ids[r], :k] = lp[j, :k]
      self.lengths[row_ids[r]] = k
      self.finished[row_ids[r]] = bool(np.isin(out[k - 1], self.engine.eos_ids)) if k else False
      if feat is not None:  # f_t is valid for t < prompt_len + k - 1 (the last token's is never used)
        self.finished_features.append((int(row_ids[r]), seq[j, :pl[j] + k], feat[j, :pl[j] + k], int(pl[j])))

  def _finish_chunk(self):
    phase, strategy, active, rows, t0, stats, cold = self._in_flight  # an _InFlight
    self._in_flight = None
    rounds, tokens, row_rounds = (int(x) for x in mesh_lib.to_host(stats))
    dt = time.perf_counter() - t0
    self.times[phase] += dt
    if phase == "speculative":
      self.spec_tokens += tokens
      self.spec_row_rounds += row_rounds
    accept_len = tokens / max(row_rounds, 1)
    if (self.selector is not None and not cold
        and (strategy is not None or active <= self.engine.spec_threshold)):
      # Keyed by the rows the chunk computed (what an arm's cost follows; with compaction the
      # active batch's bucket); scored by how fast a live row advances: tokens per live row per
      # round (accept_len) over the time of a round.
      r = max(rounds, 1)
      self.selector.update(rows, PLAIN if strategy is None else tuple(strategy), accept_len, dt / r)
    self.chunks.append(dict(batch=active, strategy=None if strategy is None else strategy_name(strategy),
                            accept_len=accept_len, time_s=dt, rounds=rounds, tokens=tokens,
                            row_rounds=row_rounds, cold=cold))

  def _compact_to(self, state: DecodeState, active: np.ndarray, bucket: int) -> DecodeState:
    """Rows `active` of `state` (padded with done rows) in a state of `bucket` rows. Down the
    bucket ladder one level at a time (the live rows first, then a prefix of them): one program
    per pair of adjacent buckets instead of one per (from, to) pair."""
    eng = self.engine
    n_live, order = np.int32(active.size), np.asarray(active)
    for level in [x for x in eng.buckets if bucket <= x < state.done_B.shape[0]][::-1]:
      idx = np.concatenate([order, np.repeat(order[:1], level - order.size)]).astype(np.int32)
      rep = mesh_lib.replicated(self.mesh)
      state = eng.compact_jit(self.mesh, state, level)(
          state, mesh_lib.put_global(idx, rep), mesh_lib.put_global(n_live, rep))
      order = np.arange(active.size)
    return state

  def _dispatch(self, state: DecodeState, strategy, window):
    """One chunk (plain when `strategy` is None) on `state`, which it donates. A plain chunk runs
    without the drafter's cache (one program whether or not speculation has started; the next
    speculative chunk catches the cache up) and hands it back untouched."""
    eng = self.engine
    if strategy is not None:
      return eng.speculative.dispatch_chunk(self.params, self.drafter_params, state, strategy,
                                            window=window, mesh=self.mesh)
    draft_cache, state = state.draft_cache, state.replace(draft_cache=None)
    state, stats = eng.chunk_jit(self.mesh, self.params, state, window)(self.params, state)
    return state.replace(draft_cache=draft_cache), stats

  def _program(self, seq_shape: tuple, strategy, window) -> tuple:
    """What a chunk's compiled program depends on (RolloutEngine._warm)."""
    return ("decode" if strategy is None else tuple(strategy), tuple(seq_shape), window,
            self.engine._mesh_key(self.mesh))

  def _warm_tail(self):
    """Compiles the tail's programs before the first timed chunk: at each bucket at or below
    `spec_threshold`, a plain chunk and every strategy's chunk (its drafter sync included), run
    once on a throwaway copy of a few of this state's rows (the session's state, RNG and outputs
    are untouched). Otherwise the first use of each compiles inside a chunk of some later step,
    stalling every group the host drives, and the selector would see a compile as a slow arm."""
    eng = self.engine
    if eng.window_block > 0:  # windows vary with the position: nothing fixed to warm
      return
    rows = self.state.done_B.shape[0]
    live = np.flatnonzero(self.row_ids >= 0)
    for b in [x for x in eng.buckets if x <= eng.spec_threshold and x < rows]:
      for strategy in (None,) + tuple(eng.speculative.strategies):
        program = self._program((b, self.state.seq_BxS.shape[1]), strategy, None)
        if program in eng._warm:
          continue
        small = self._compact_to(self.state, live[:b], b)
        # its own RNG: the chunk donates its input, and `small` shares the session's RNG array
        small = small.replace(rng=jax.random.fold_in(small.rng, 1))
        if strategy is not None:  # the drafter catch-up a speculative chunk after plain ones runs first
          small = eng.speculative.dispatch_sync(self.params, self.drafter_params, small, mesh=self.mesh)
        _, stats = self._dispatch(small, strategy, None)
        jax.block_until_ready(stats)
        self.engine._warm.add(program)

  def advance(self) -> bool:
    """Finishes the chunk in flight and dispatches the next; False when all rows are done."""
    if self.is_done:
      return False
    eng = self.engine
    if self._in_flight is not None:
      self._finish_chunk()
    done = mesh_lib.host_value(self.state.done_B) | (self.row_ids < 0)  # replicated: any host may read it
    active = np.flatnonzero(~done)
    if active.size == 0:
      self._copy_out(list(range(len(self.row_ids))))
      self.is_done = True
      self.times["total"] = time.perf_counter() - self.t_start
      return False
    b = compacted_rows(active.size, len(self.row_ids), eng.buckets)
    if eng.compact and b < len(self.row_ids):
      t0 = time.perf_counter()
      self._copy_out(list(np.flatnonzero(done)))
      self.state = self._compact_to(self.state, active, b)
      self.row_ids = np.concatenate([self.row_ids[active], -np.ones(b - active.size, np.int64)])
      self.times["compact"] += time.perf_counter() - t0
    self.trace.append(int(active.size))
    strategy = None
    if (eng.speculative is not None and self.drafter_params is not None
        and active.size <= eng.spec_threshold):
      strategy = (self.selector.select(int(self.state.done_B.shape[0])) if self.selector is not None
                  else eng.speculative.default_strategy)
      strategy = None if tuple(strategy) == PLAIN else strategy
    if strategy is not None:
      grow = eng.speculative.max_tokens_per_chunk(strategy)
      window = live_window(self.live_bound + grow + eng.speculative.max_verify_tokens + 1,
                           self.capacity, eng.window_block)
      phase = "speculative"
    else:
      grow = eng.chunk_size
      window = live_window(self.live_bound + grow + 1, self.capacity, eng.window_block)
      # A plain chunk leaves the drafter's cache behind; the next speculative chunk catches up
      # exactly the gap first (speculative.drafter_sync).
      phase = "decode"
    program = self._program(self.state.seq_BxS.shape, strategy, window)
    if strategy is not None and self._drafter_behind:
      # Catch the drafter up on its own, outside the chunk's time (SpeculativeDecoder.dispatch_sync):
      # the selector then scores speculation by its rounds, not by the one-off pass over the
      # positions it skipped, which would bias every exploring chunk amid plain ones.
      t_sync = time.perf_counter()
      self.state = eng.speculative.dispatch_sync(self.params, self.drafter_params, self.state, mesh=self.mesh)
      jax.block_until_ready(self.state.draft_cache.lengths)
      self.times["speculative"] += time.perf_counter() - t_sync
    self._drafter_behind = strategy is None
    t0 = time.perf_counter()
    self.state, stats = self._dispatch(self.state, strategy, window)
    self.live_bound += grow
    cold = program not in eng._warm
    self.engine._warm.add(program)
    self._in_flight = _InFlight(phase, strategy, int(active.size), int(self.state.done_B.shape[0]), t0, stats,
                                cold)
    return True

  def result(self) -> RolloutResult:
    if not self.is_done:
      raise RuntimeError("RolloutSession.result() before all rows are done; call advance() until False")
    stats = dict(active_trace=self.trace, time_s=self.times, num_tokens=int(self.lengths.sum()),
                 spec_accept_len=(self.spec_tokens / self.spec_row_rounds) if self.spec_row_rounds else None,
                 chunks=self.chunks, spec_chunks=[c for c in self.chunks if c["strategy"] is not None])
    return RolloutResult(self.tokens, self.lengths, self.logprobs, self.finished, stats)
