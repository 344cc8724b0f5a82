"""One rollout group's host loop: a `RolloutSession` prefills, then `advance()` finishes the
chunk in flight, copies out finished rows, compacts the live ones into their bucket and
dispatches the next chunk (plain, or speculative at or below the engine's `spec_threshold`),
asking the engine's program cache (rollout/programs.py) for every program. Chunk statistics are
read from replicated device scalars only (multi-host safe).
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.decode import DecodeState, bucket_for, compacted_rows, live_window
from tlt_jax.rollout.programs import ProgramKey
from tlt_jax.rollout.records import ChunkRecord, RolloutResult, RolloutStats
from tlt_jax.rollout.strategy import PLAIN, strategy_name


class FixedSelector:
  """A strategy selector that always answers `strategy` (the bandit's interface, no learning)."""

  def __init__(self, strategy):
    self.strategy = strategy

  def select(self, batch_size):
    return self.strategy

  def update(self, *outcome):
    pass


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

  def __init__(self, engine, params, prompt_BxP, prompt_len_B, max_new_tokens, rng,
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
    state = engine.jits.prefill(mesh, params, prompts.shape, capacity)(
        params, put(prompts), mesh_lib.put_global(plens, rep), mesh_lib.put_global(max_new, rep),
        mesh_lib.put_global(rng, rep))
    self.row_ids = np.concatenate([np.arange(n), -np.ones(pad, np.int64)])
    if pad:
      state = state.replace(done_B=engine.jits.mark_done(mesh, b0)(
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
    self.chunks: list[ChunkRecord] = []
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
    gather = self.engine.jits.gather(self.mesh, st, len(idx), self.collect_features)
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
    chunk = ChunkRecord(batch=active, rows=rows, strategy=None if strategy is None else strategy_name(strategy),
                        tokens=tokens, rounds=rounds, row_rounds=row_rounds, time_s=dt, cold=cold)
    if (self.selector is not None and not cold
        and (strategy is not None or active <= self.engine.spec_threshold)):
      # Keyed by the rows the chunk computed (what an arm's cost follows; with compaction the
      # active batch's bucket); scored by how fast a live row advances: tokens per live row per
      # round (accept_len) over the time of a round.
      r = max(rounds, 1)
      self.selector.update(rows, PLAIN if strategy is None else tuple(strategy), chunk.accept_len, dt / r)
    self.chunks.append(chunk)

  def _compact_to(self, state: DecodeState, active: np.ndarray, bucket: int) -> DecodeState:
    """Rows `active` of `state` (padded with done rows) in a state of `bucket` rows. Down the
    bucket ladder one level at a time (the live rows first, then a prefix of them): one program
    per pair of adjacent buckets instead of one per (from, to) pair."""
    eng = self.engine
    n_live, order = np.int32(active.size), np.asarray(active)
    for level in [x for x in eng.buckets if bucket <= x < state.done_B.shape[0]][::-1]:
      idx = np.concatenate([order, np.repeat(order[:1], level - order.size)]).astype(np.int32)
      rep = mesh_lib.replicated(self.mesh)
      state = eng.jits.compact(self.mesh, state, level)(
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
    state, stats = eng.jits.chunk(self.mesh, self.params, state, window)(self.params, state)
    return state.replace(draft_cache=draft_cache), stats

  def _program(self, seq_shape: tuple, strategy, window) -> ProgramKey:
    """The key of a chunk's program (plain or speculative) in the engine's program cache."""
    kind = "chunk" if strategy is None else ("spec_chunk", tuple(strategy))
    return ProgramKey.of(kind, self.mesh, tuple(seq_shape), window)

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
        if eng.jits.cache.is_warm(program):
          continue
        small = self._compact_to(self.state, live[:b], b)
        # its own RNG: the chunk donates its input, and `small` shares the session's RNG array
        small = small.replace(rng=jax.random.fold_in(small.rng, 1))
        if strategy is not None:  # the drafter catch-up a speculative chunk after plain ones runs first
          small = eng.speculative.dispatch_sync(self.params, self.drafter_params, small, mesh=self.mesh)
        _, stats = self._dispatch(small, strategy, None)
        jax.block_until_ready(stats)
        self.engine.jits.cache.warm([program])

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
    cold = not eng.jits.cache.is_warm(program)
    self.engine.jits.cache.warm([program])
    self._in_flight = _InFlight(phase, strategy, int(active.size), int(self.state.done_B.shape[0]), t0, stats,
                                cold)
    return True

  def result(self) -> RolloutResult:
    if not self.is_done:
      raise RuntimeError("RolloutSession.result() before all rows are done; call advance() until False")
    stats = RolloutStats(time_s=dict(self.times), num_tokens=int(self.lengths.sum()), chunks=tuple(self.chunks),
                         active_trace=tuple(self.trace))
    return RolloutResult(self.tokens, self.lengths, self.logprobs, self.finished, stats)
