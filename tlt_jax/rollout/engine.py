"""Rollout engine: prefill, jitted decode chunks, host-side batch compaction.

Per call of `generate`:
  1. prefill the right-padded prompts into a KV cache and sample the first token;
  2. decode in jitted chunks (`lax.while_loop` of up to K steps, state donated);
  3. between chunks, on the host, copy out finished rows and compact the active ones into the
     next smaller batch bucket, so the long tail never pays for finished rows. Shapes are
     static per bucket, so each bucket compiles once;
  4. once the active batch is at or below `spec_threshold` and a speculative decoder is given,
     decode the tail with `speculative_chunk` instead (see rollout/speculative.py).

State invariant: the cache holds every token of a row except the last one, `pending`, which
sits at `seq[b, cache.lengths[b]]`; `feat[b, t]` is the target's final normed hidden state at
position t (EAGLE's f_t, which produced token t + 1).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.models.transformer import KVCache
from tlt_jax.rollout.sampling import SamplingParams, policy_logprobs, sample_from, target_logprobs

DEFAULT_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PLAIN = (0, 0, 0)  # the "strategy" of a plain decoding chunk


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
            sp: SamplingParams, eos_ids: tuple[int, ...], keep_features: bool) -> DecodeState:
  """Runs the prompts through the target, fills the cache and samples the first token."""
  model = nnx.merge(graphdef, params)
  b, p = prompt_BxP.shape
  cache = KVCache.init(model.cfg, b, capacity)
  logits, hidden, cache = model(prompt_BxP, cache=cache)
  last = prompt_len_B - 1
  logits_BxV = logits[jnp.arange(b), last]
  rng, key = jax.random.split(rng)
  next_B = sample_from(target_logprobs(logits_BxV, sp), key, sp)
  logp_B = jnp.take_along_axis(policy_logprobs(logits_BxV, sp), next_B[:, None], axis=-1)[:, 0]
  seq = jnp.zeros((b, capacity), jnp.int32).at[:, :p].set(prompt_BxP)
  d = model.cfg.hidden_size
  feat = jnp.zeros((b, capacity if keep_features else 0, d), jnp.float32)
  if keep_features:
    feat = feat.at[:, :p].set(hidden.astype(jnp.float32))
  m = int(capacity)  # logprobs buffer wide enough for any row
  state = DecodeState(
      cache=cache.replace(lengths=last), seq_BxS=seq, feat_BxSxD=feat,
      logprobs_BxM=jnp.zeros((b, m), jnp.float32), prompt_len_B=prompt_len_B,
      num_gen_B=jnp.zeros((b,), jnp.int32), done_B=jnp.zeros((b,), bool), rng=rng,
      max_new_B=max_new_B)
  # The last prompt token is the "pending" one: its cache slot is rewritten by `advance`.
  return advance(state, next_B, logp_B, hidden[jnp.arange(b), last], state.cache, eos_ids)


def decode_step(model, state: DecodeState, sp: SamplingParams, eos_ids) -> DecodeState:
  """One plain decoding step for the whole batch."""
  pos = state.pending_pos_B
  tok_B = _rows(state.seq_BxS, pos)
  logits, hidden, cache = model(tok_B[:, None], pos[:, None], cache=state.cache)
  rng, key = jax.random.split(state.rng)
  next_B = sample_from(target_logprobs(logits[:, 0], sp), key, sp)
  logp_B = jnp.take_along_axis(policy_logprobs(logits[:, 0], sp), next_B[:, None], axis=-1)[:, 0]
  return advance(state.replace(rng=rng), next_B, logp_B, hidden[:, 0], cache, eos_ids)


def decode_chunk(graphdef, params, state: DecodeState, *, num_steps: int, sp: SamplingParams,
                 eos_ids: tuple[int, ...]):
  """Up to `num_steps` plain decoding steps in one `lax.while_loop`; stops early when all done.
  Returns (state, (steps, tokens, row_steps)) with the statistics as device scalars."""
  model = nnx.merge(graphdef, params)

  def cond(carry):
    i, st = carry
    return (i < num_steps) & ~jnp.all(st.done_B)

  def body(carry):
    i, st = carry
    return i + 1, decode_step(model, st, sp, eos_ids)

  before = jnp.sum(state.num_gen_B)
  steps, state = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
  tokens = jnp.sum(state.num_gen_B) - before
  return state, (steps, tokens, tokens)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
  for b in buckets:
    if b >= n:
      return b
  return n


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

  def __post_init__(self):
    if self.chunk_size <= 0:
      raise ValueError(f"rollout.chunk_size={self.chunk_size} must be > 0")
    self.eos_ids = tuple(int(e) for e in self.eos_ids)
    if not self.eos_ids:
      raise ValueError("rollout needs at least one EOS id")
    keep = self.speculative is not None
    self._prefill = jax.jit(functools.partial(
        prefill, self.graphdef, sp=self.sampling, eos_ids=self.eos_ids, keep_features=keep),
        static_argnames=("capacity",))
    self._chunk = jax.jit(functools.partial(
        decode_chunk, self.graphdef, num_steps=self.chunk_size, sp=self.sampling,
        eos_ids=self.eos_ids), donate_argnums=(1,))
    self._take = jax.jit(lambda st, idx: st.take(idx))

  def capacity_for(self, prompt_len: int, max_new_tokens: int) -> int:
    margin = 1
    if self.speculative is not None:
      margin = max(self.speculative.max_verify_tokens, self.speculative.max_depth + 1) + 1
    cap = prompt_len + max_new_tokens + margin
    return int(-(-cap // 16) * 16)

  def start(self, params, prompt_BxP: np.ndarray, prompt_len_B: np.ndarray, max_new_tokens,
            rng: jax.Array, drafter_params=None, selector=None, *,
            place_batch: Callable[[np.ndarray], jax.Array] | None = None,
            collect_features: bool = False) -> "RolloutSession":
    """Prefills and returns a session that decodes chunk by chunk (`session.advance()`); a host
    scheduler interleaves the sessions of several rollout groups this way.

    `place_batch(x)` puts the session's [B, ...] host inputs on devices (e.g. batch-sharded over a
    rollout group's sub-mesh; default: `jnp.asarray`, which follows the params). With
    `collect_features` (and a speculative decoder, which keeps the features), every row copied out
    is also appended to `session.finished_features` as (row, tokens_T, feat_TxD, prompt_len): the
    target's own features f_t of prompt + response, for the drafter buffer (tlt/buffer.py).
    """
    return RolloutSession(self, params, prompt_BxP, prompt_len_B, max_new_tokens, rng, drafter_params,
                          selector, place_batch=place_batch, collect_features=collect_features)

  def generate(self, params, prompt_BxP: np.ndarray, prompt_len_B: np.ndarray, max_new_tokens,
               rng: jax.Array, drafter_params=None, selector=None) -> RolloutResult:
    """Generates up to `max_new_tokens` (an int, or one per row) for each right-padded prompt.

    At or below `spec_threshold` active rows (and with `drafter_params`), each chunk's strategy
    comes from `selector.select(active_batch)` (e.g. the BEG-MAB bandit, tlt/bandit.py; the
    decoder's default strategy without one); the selector may answer PLAIN = (0, 0, 0) for a plain
    chunk, and is told each chunk's outcome through `selector.update(active_batch, strategy,
    accept_len, batch, time_per_round)`.
    """
    session = self.start(params, prompt_BxP, prompt_len_B, max_new_tokens, rng, drafter_params, selector)
    while session.advance():
      pass
    return session.result()


class RolloutSession:
  """One batch being generated. `advance()` waits for the chunk in flight (if any), copies out
  finished rows, compacts, and dispatches the next chunk without waiting for it (JAX async
  dispatch); it returns False once every row is done. `drafter_params` may be swapped between
  calls (a newly published drafter version)."""

  def __init__(self, engine: RolloutEngine, params, prompt_BxP, prompt_len_B, max_new_tokens, rng,
               drafter_params=None, selector=None, *, place_batch=None, collect_features=False):
    self.engine, self.params, self.drafter_params, self.selector = engine, params, drafter_params, selector
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
    state = engine._prefill(params, put(prompts), put(plens), put(max_new), rng, capacity=capacity)
    self.row_ids = np.concatenate([np.arange(n), -np.ones(pad, np.int64)])
    if pad:
      state = state.replace(done_B=state.done_B.at[n:].set(True))
    jax.block_until_ready(state.done_B)
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
    self._in_flight = None  # (phase, strategy, active, t_dispatch, device stats)
    self.is_done = False

  @property
  def num_active(self) -> int:
    return 0 if self.is_done else int(self.trace[-1]) if self.trace else len(self.row_ids)

  def chunk_ready(self) -> bool:
    """True when `advance()` will not wait: no chunk in flight, or its statistics (its last
    outputs) are ready. A scheduler of several sessions advances the ready ones first, so that a
    chunk's measured time (the selector's score) is its own, not a wait on another session's."""
    return self._in_flight is None or all(x.is_ready() for x in self._in_flight[4])

  def _copy_out(self, rows):
    st, row_ids = self.state, self.row_ids
    rows = [r for r in rows if row_ids[r] >= 0]
    if not rows:
      return
    idx = np.asarray(rows)
    seq, lp, ng, pl = jax.device_get((st.seq_BxS[idx], st.logprobs_BxM[idx], st.num_gen_B[idx],
                                      st.prompt_len_B[idx]))
    feat = jax.device_get(st.feat_BxSxD[idx]) if self.collect_features else None
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
    phase, strategy, active, t0, stats = self._in_flight
    self._in_flight = None
    rounds, tokens, row_rounds = (int(x) for x in jax.device_get(stats))
    dt = time.perf_counter() - t0
    self.times[phase] += dt
    if phase == "speculative":
      self.spec_tokens += tokens
      self.spec_row_rounds += row_rounds
    accept_len = tokens / max(row_rounds, 1)
    if self.selector is not None and (strategy is not None or active <= self.engine.spec_threshold):
      r = max(rounds, 1)
      self.selector.update(active, PLAIN if strategy is None else tuple(strategy), accept_len,
                           row_rounds / r, dt / r)
    self.chunks.append(dict(batch=active, strategy=None if strategy is None else str(strategy),
                            accept_len=accept_len, time_s=dt, rounds=rounds, tokens=tokens,
                            row_rounds=row_rounds))

  def advance(self) -> bool:
    """Finishes the chunk in flight and dispatches the next; False when all rows are done."""
    if self.is_done:
      return False
    eng = self.engine
    if self._in_flight is not None:
      self._finish_chunk()
    done = np.asarray(self.state.done_B) | (self.row_ids < 0)
    active = np.flatnonzero(~done)
    if active.size == 0:
      self._copy_out(list(range(len(self.row_ids))))
      self.is_done = True
      self.times["total"] = time.perf_counter() - self.t_start
      return False
    b = bucket_for(active.size, eng.buckets)
    if eng.compact and b < len(self.row_ids):
      t0 = time.perf_counter()
      self._copy_out(list(np.flatnonzero(done)))
      idx = np.concatenate([active, np.repeat(active[:1], b - active.size)])
      state = eng._take(self.state, jnp.asarray(idx))
      if b > active.size:
        state = state.replace(done_B=state.done_B.at[active.size:].set(True))
      self.state = state
      self.row_ids = np.concatenate([self.row_ids[active], -np.ones(b - active.size, np.int64)])
      self.times["compact"] += time.perf_counter() - t0
    self.trace.append(int(active.size))
    strategy = None
    if (eng.speculative is not None and self.drafter_params is not None
        and active.size <= eng.spec_threshold):
      strategy = (self.selector.select(int(active.size)) if self.selector is not None
                  else eng.speculative.default_strategy)
      strategy = None if tuple(strategy) == PLAIN else strategy
    t0 = time.perf_counter()
    if strategy is not None:
      self.state, stats = eng.speculative.dispatch_chunk(self.params, self.drafter_params, self.state, strategy)
      phase = "speculative"
    else:
      self.state, stats = eng._chunk(self.params, self.state)
      phase = "decode"
    self._in_flight = (phase, strategy, int(active.size), t0, stats)
    return True

  def result(self) -> RolloutResult:
    if not self.is_done:
      raise RuntimeError("RolloutSession.result() before all rows are done; call advance() until False")
    stats = dict(active_trace=self.trace, time_s=self.times, num_tokens=int(self.lengths.sum()),
                 spec_accept_len=(self.spec_tokens / self.spec_row_rounds) if self.spec_row_rounds else None,
                 chunks=self.chunks, spec_chunks=[c for c in self.chunks if c["strategy"] is not None])
    return RolloutResult(self.tokens, self.lengths, self.logprobs, self.finished, stats)
