"""The simulated parts the step simulator (analysis/sim.py) runs the runtime's HostScheduler
with: the groups' devices on a virtual clock (`VirtualDevice`: processor sharing, jobs queued per
group), simulated rollout groups, a simulated drafter trainer and simulated sessions, each with
the interface of the real one (tlt/groups.RolloutGroup, tlt/drafter_trainer.DrafterTrainer,
rollout/session.RolloutSession). The rules they follow are in sim.py's module docstring.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np
from jax.sharding import Mesh

from tlt_jax.analysis.costs import CostModel, Strategy, strategy_name
from tlt_jax.rollout.decode import bucket_for, compacted_rows
from tlt_jax.rollout.records import ChunkRecord, RolloutResult, RolloutStats
from tlt_jax.rollout.strategy import PLAIN
from tlt_jax.tlt.drafter_trainer import PublishedDrafter


# ------------------------------------------------------------------------------ the virtual device


@dataclasses.dataclass(eq=False)
class _Job:
  """Work on the virtual device: `left` seconds at full speed, on `rows` rows (None: a drafter
  step, which always contends), started once every job of `after` is done."""

  left: float
  rows: int | None
  after: tuple["_Job", ...]
  done: bool = False


class VirtualDevice:
  """The rollout groups' devices on a virtual clock (processor sharing, analysis/sim.py).
  `clock()` and `sleep(s)` are the scheduler's; `submit` queues a job behind its queue's last
  one (or behind every queued job: `barrier`); `wait(job)` blocks the host until it is done."""

  EPS = 1e-15

  def __init__(self, costs: CostModel):
    self.costs, self.t = costs, 0.0
    self._jobs: list[_Job] = []  # queued or running, in submission order
    self._last: dict[Any, _Job] = {}  # queue -> its last job

  def clock(self) -> float:
    return self.t

  def submit(self, queue, seconds: float, rows: int | None, *, barrier: bool = False) -> _Job:
    last = self._last.get(queue)
    after = tuple(self._jobs) if barrier else (last,) if last is not None and not last.done else ()
    job = _Job(float(seconds), rows, after)
    self._jobs.append(job)
    self._last[queue] = job
    return job

  def _advance(self) -> None:
    """Runs the device to its next completion (every job finishing then is done)."""
    running = [j for j in self._jobs if all(a.done for a in j.after)]
    if not running:
      raise RuntimeError("virtual device: the host waits, but no job is queued")
    heavy = [j for j in running if j.rows is None or j.rows > self.costs.light_batch]
    shared = self.costs.throughput(len(heavy)) / len(heavy) if heavy else 1.0
    rate = {id(j): shared if (j.rows is None or j.rows > self.costs.light_batch) else 1.0 for j in running}
    dt = min(j.left / rate[id(j)] for j in running)
    self.t += dt
    for j in running:
      j.left -= dt * rate[id(j)]
      if j.left <= self.EPS:
        j.done = True
    self._jobs = [j for j in self._jobs if not j.done]

  def wait(self, job: _Job) -> None:
    while not job.done:
      self._advance()

  def sleep(self, seconds: float) -> None:
    """The host's wait between polls: nothing changes before the next completion, so it wakes
    there."""
    del seconds
    self._advance()


# ------------------------------------------------------------------------------ simulated parts


@dataclasses.dataclass(frozen=True, eq=False)
class SimGroup:
  """A rollout group of the simulation: its index and a one-"device" mesh (the device is its
  index), enough for the scheduler to form the idle groups' union (tlt/groups.union_mesh)."""

  index: int
  mesh: Mesh
  parent: None = None
  rules: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @classmethod
  def make(cls, index: int) -> "SimGroup":
    return cls(index, Mesh(np.array([[[index]]]), ("data", "fsdp", "tensor")))

  def replicate(self, tree: Any) -> Any:
    return tree

  def place_drafter(self, params: Any) -> Any:
    """The drafter as the simulation holds it: a stand-in, never placed."""
    return params


class _Rows:
  """The drafter buffer of the simulation: always a batch's worth of rows (the model assumes the
  drafter has data from its warm-up on)."""

  def __init__(self, batch_size: int):
    self.batch_size = batch_size

  def __len__(self) -> int:
    return self.batch_size

  def add_sequences(self, *args, **kwargs) -> None:
    pass


class SimDrafterTrainer:
  """The DrafterTrainer's interface on the virtual device: a step on the idle groups' union mesh
  costs costs.drafter_train_step(its groups) on the drafter's own queue; each completed step
  is published as the next version."""

  def __init__(self, device: VirtualDevice, costs: CostModel, num_groups: int, batch_size: int):
    self.device, self.costs, self.num_groups = device, costs, num_groups
    self.batch_size = int(batch_size)
    self.buffer = _Rows(self.batch_size)
    self.published = PublishedDrafter(0, (0,) * num_groups)
    self._queue: list[_Job] = []

  @property
  def version(self) -> int:
    return self.published.version

  @property
  def in_flight(self) -> int:
    return len(self._queue)

  def batch_shards(self, mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]

  def dispatch(self, mesh: Mesh, head) -> None:
    del head
    self._queue.append(self.device.submit("drafter", self.costs.drafter_train_step(mesh.shape["data"]), None))

  def complete_one(self) -> dict[str, float]:
    self.device.wait(self._queue.pop(0))
    v = self.published.version + 1
    self.published = PublishedDrafter(v, (v,) * self.num_groups)
    return {}

  def complete_ready(self) -> list[dict[str, float]]:
    out = []
    while self._queue and self._queue[0].done:
      out.append(self.complete_one())
    return out

  def complete_all(self) -> list[dict[str, float]]:
    return [self.complete_one() for _ in range(len(self._queue))]


class SimSession:
  """One group's rows on the virtual device, with RolloutSession's interface (`advance`,
  `chunk_ready`, `result`, `drafter_params`, `chunks`, `finished_features`); row i generates
  exactly `lengths[i]` tokens (analysis/sim.py)."""

  def __init__(self, sim, group: int, lengths: np.ndarray, prompt_len: int, drafter_params):
    self.sim, self.queue, spec = sim, group, sim.spec
    self.drafter_params = drafter_params
    self.prompt_len = int(prompt_len)
    self.chunks: list[ChunkRecord] = []
    self.finished_features: list = []
    self.n = n = len(lengths)
    self.lengths = np.asarray(lengths, np.int64)
    self.held = bucket_for(n, spec.buckets) if spec.compact else n  # rows the device state holds
    t0 = sim.device.t
    sim.device.wait(sim.device.submit(group, sim.costs.session_prefill(self.held, self.prompt_len), self.held,
                                      barrier=True))
    self.times = {"prefill": sim.device.t - t0, "decode": 0.0, "speculative": 0.0, "compact": 0.0}
    self.gen = (self.lengths > 0).astype(np.int64)  # the prefill samples each row's first token
    self.remaining = self.lengths - self.gen
    self.trace: list[int] = []
    self._in_flight = None  # (job, dispatch time, strategy, active, rows, emitted, rounds, row_rounds)
    self.is_done = False

  def chunk_ready(self) -> bool:
    return self._in_flight is None or self._in_flight[0].done

  def _finish_chunk(self) -> None:
    job, t0, strategy, active, rows, emitted, rounds, row_rounds = self._in_flight
    self._in_flight = None
    self.sim.device.wait(job)
    dt = self.sim.device.t - t0
    self.times["decode" if strategy is None else "speculative"] += dt
    self.remaining -= emitted
    self.gen += emitted
    chunk = ChunkRecord(batch=active, rows=rows, strategy=None if strategy is None else strategy_name(strategy),
                        tokens=int(emitted.sum()), rounds=rounds, row_rounds=row_rounds, time_s=dt)
    selector = self.sim.selector
    if selector is not None and (strategy is not None or active <= self.sim.spec.spec_threshold):
      selector.update(rows, PLAIN if strategy is None else strategy, chunk.accept_len,
                      max(dt, 1e-12) / max(rounds, 1))  # as RolloutSession scores a chunk
    self.chunks.append(chunk)

  def _plain(self, b: int, ctx: int):
    steps = int(min(self.sim.spec.chunk_size, self.remaining.max()))
    emitted = np.minimum(self.remaining, steps)
    cost = steps * self.sim.costs.decode_step(b, ctx + steps // 2) + self.sim.costs.chunk_overhead
    return cost, emitted, steps, int(emitted.sum())

  def _speculative(self, b: int, ctx: int, strategy: Strategy):
    sim = self.sim
    cost, emitted, rounds, row_rounds = sim.costs.chunk_overhead, np.zeros(self.n, np.int64), 0, 0
    left = self.remaining.copy()
    for _ in range(sim.spec.rounds_per_chunk):
      live = left > 0
      if not live.any():
        break
      e = np.zeros(self.n, np.int64)
      e[live] = np.minimum(sim.accept.draw(sim.rng, strategy, int(live.sum()), sim.staleness), left[live])
      # the round's live context: `ctx` (prompt + the tokens before this chunk) + this chunk's so far
      cost += sim.costs.spec_round(b, strategy, ctx + int(emitted.max()))
      emitted += e
      left -= e
      rounds += 1
      row_rounds += int(live.sum())
    return cost, emitted, rounds, row_rounds

  def advance(self) -> bool:
    if self.is_done:
      return False
    sim, spec = self.sim, self.sim.spec
    if self._in_flight is not None:
      self._finish_chunk()
    active = int((self.remaining > 0).sum())
    ctx = self.prompt_len + int(self.gen.max())
    if active == 0:  # the final copy-out: the host reads every row
      sim.device.wait(sim.device.submit(self.queue, sim.costs.copy_out(self.held, ctx, sim.variant.train),
                                        self.held))
      self.is_done = True
      return False
    b = compacted_rows(active, self.held, spec.buckets) if spec.compact else self.n
    if b < self.held:  # down the bucket ladder one level at a time, as the engine compacts
      levels = [self.held] + [x for x in spec.buckets if b <= x < self.held][::-1]
      sim.device.submit(self.queue, sum(sim.costs.compact(x, ctx) for x in levels[:-1]), self.held)
      self.held = b
    self.trace.append(active)
    strategy = None
    if sim.selector is not None and self.drafter_params is not None and active <= spec.spec_threshold:
      strategy = tuple(sim.selector.select(b))
      strategy = None if strategy == PLAIN else strategy
    cost, emitted, rounds, row_rounds = (self._plain(b, ctx) if strategy is None
                                         else self._speculative(b, ctx, strategy))
    job = sim.device.submit(self.queue, cost, b)
    self._in_flight = (job, sim.device.t, strategy, active, b, emitted, rounds, row_rounds)
    return True

  def result(self) -> RolloutResult:
    lengths = self.lengths.astype(np.int32)
    stats = RolloutStats(time_s=self.times, num_tokens=int(lengths.sum()), chunks=tuple(self.chunks),
                         active_trace=tuple(self.trace))
    empty = np.zeros((self.n, 0), np.int32)
    return RolloutResult(empty, lengths, empty.astype(np.float32), np.ones(self.n, bool), stats)
