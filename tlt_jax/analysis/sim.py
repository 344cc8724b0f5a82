"""A step simulator for TLT: replays RL steps for R rollout groups at given costs.

Why: TLT pays off where decoding is memory-bound (a step costs about the same at any batch) and
the rollout is most of an RL step; on this CPU neither holds. The simulator runs the runtime's
own host scheduler (tlt/scheduler.HostScheduler) over simulated groups, sessions and drafter
trainer on a virtual clock, at costs that were measured (analysis/costs.MeasuredCosts, on this
CPU or a GPU) or compiled for a TPU pod (CompiledCosts / RooflineCosts), so the two regimes are
compared with the same scheduling code, and a change to the scheduler is a change to the
simulator:

  the scheduler (unchanged): starts one session per group, one after another; advances the
    groups whose chunk is done; trains the drafter on the idle groups while others decode
    (`max_in_flight` steps queued, data-parallel over the idle groups whose split divides the
    drafter batch); preempts at a step boundary; accounts decode / train / idle per group;
    with one group or `train_in_bubbles=False` trains `between_steps` drafter steps after the
    update. Its `clock` is the virtual device's, and its `sleep` returns at the next completion.
  a simulated session (`SimSession`, one group's rows; a row generates exactly its recorded or
    drawn response length): its prefill blocks the host, and a prefill dispatched while other
    groups' work runs completes after it (measured: cost_bench's session_prefill beside_s), so
    it waits for every queued job, then runs; `advance()` reads the chunk in flight, compacts the
    state to the live rows' bucket (costs.compact per bucket level, a job of its own before the
    chunk), dispatches the next chunk and emits the same ChunkRecords as the real session; at
    or below `spec_threshold` active rows (speculative variants) the chunk's strategy is the
    runtime's BEG-MAB selector's choice (tlt/runtime.rollout_selector), scored as the real
    session scores it (accept length per live row-round over the time from dispatch to the
    read, per round); a speculative chunk is up to `rounds_per_chunk` rounds in which every
    live row emits an accept length drawn from the AcceptModel, a plain one `chunk_size` steps
    (fewer when every row finishes sooner); the final copy-out (costs.copy_out) blocks the host.
  the virtual device (`VirtualDevice`): jobs queue per group (and one queue for the drafter's
    steps) and progress at costs.throughput(k) / k when k jobs run at once (1 each on
    accelerators: disjoint chips; less on a CPU whose fake devices share the cores), except jobs
    on at most costs.light_batch rows, which a CPU runs beside the others at full speed
    (measured: a latency-bound small batch takes a core the large batch leaves idle);
  drafter staleness: a static drafter's accept length decays with the RL steps since it was
    trained (AcceptModel.decay per step); TLT's is refreshed by `refresh_steps` drafter steps in
    a step (in the bubbles, or between steps);
  step time = rollout + costs.update(tokens) + the between-steps drafter training + a fixed
    per-step host time.

Outputs per step: step / rollout time, bubble (group-seconds idle before training fills it),
bubble utilisation (train / bubble), drafter steps, preemption wait, tokens and their share
decoded speculatively.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from tlt_jax.analysis.costs import CostModel, Strategy, strategy_name
from tlt_jax.analysis.virtual import SimDrafterTrainer, SimGroup, SimSession, VirtualDevice
from tlt_jax.rollout.records import BetweenSteps
from tlt_jax.tlt.config import TLTConfig
from tlt_jax.tlt.runtime import rollout_selector
from tlt_jax.tlt.scheduler import HostScheduler


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
  """The rollout's scheduling parameters (config sections `rollout` and `tlt`)."""

  chunk_size: int = 16
  buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)
  spec_threshold: int = 0
  rounds_per_chunk: int = 8
  arms: tuple[Strategy, ...] = ((3, 1, 3),)  # bandit arms; PLAIN = (0, 0, 0) may be one
  prompt_len: int = 64
  compact: bool = True
  bandit_epsilon: float = 0.1
  bandit_window: int = 16
  max_drafter_steps: int = 0  # per rollout (0: as many as the bubbles fit)
  between_steps: int = 0  # drafter steps after the update when not training in bubbles
  train_in_bubbles: bool = True  # False: TLT trains between steps (one group, or shared CPU cores)
  drafter_batch_size: int = 8  # the idle groups a drafter step runs on split it evenly
  max_in_flight: int = 1  # drafter steps queued at once
  seed: int = 0
  arm_ladder: tuple[int, ...] = ()  # tlt.arm_ladder: per-bucket verify-token ladder (tlt/bandit.arm_ladder)

  @classmethod
  def from_config(cls, config, prompt_len: int) -> "RolloutSpec":
    c = TLTConfig.from_config(config)
    return cls(chunk_size=c.chunk_size, buckets=c.buckets, spec_threshold=c.spec_threshold,
               rounds_per_chunk=c.rounds_per_chunk, arms=c.strategies, prompt_len=int(prompt_len),
               bandit_epsilon=c.bandit_epsilon, bandit_window=c.bandit_window,
               max_drafter_steps=c.max_drafter_steps, between_steps=c.between_steps,
               drafter_batch_size=c.drafter_batch_size, max_in_flight=c.max_in_flight, seed=c.seed,
               arm_ladder=c.arm_ladder)


@dataclasses.dataclass
class AcceptModel:
  """Tokens emitted per row per speculative round (the bonus token included), per strategy.

  `samples[name]`: recorded accept lengths (e.g. per chunk, from traces) drawn from uniformly;
  a strategy without samples uses the parametric chain model: each draft token is accepted with
  probability `alpha` (1 - (1 - alpha)^topk for a tree level of top-k), the first rejection ends
  the round, at most `depth` accepted. Staleness s (RL steps since the drafter was trained)
  multiplies the drafted part, accept - 1, by `decay`**s. Fractional draws round stochastically.
  """

  samples: Mapping[str, Sequence[float]] = dataclasses.field(default_factory=dict)
  alpha: float = 0.7
  decay: float = 1.0

  def draw(self, rng: np.random.Generator, strategy: Strategy, n: int, staleness: float = 0.0) -> np.ndarray:
    d, k, _ = strategy
    pool = self.samples.get(strategy_name(strategy))
    if pool is not None and len(pool):
      x = rng.choice(np.asarray(pool, float), n)
    else:
      a = 1.0 - (1.0 - self.alpha) ** k
      x = 1.0 + (np.minimum(rng.geometric(1.0 - a, n) - 1, d) if a < 1 else np.full(n, d))
    if staleness > 0 and self.decay < 1:
      x = 1.0 + (x - 1.0) * self.decay ** staleness
    whole = np.floor(x)
    x = whole + (rng.random(n) < (x - whole))
    return np.clip(x, 1, d + 1).astype(np.int64)

  def mean(self, strategy: Strategy, staleness: float = 0.0) -> float:
    d, k, _ = strategy
    pool = self.samples.get(strategy_name(strategy))
    if pool is not None and len(pool):
      m = float(np.mean(pool))
    else:
      a = 1.0 - (1.0 - self.alpha) ** k
      m = float(sum(a ** j for j in range(d + 1)))
    return 1.0 + (m - 1.0) * (self.decay ** staleness if self.decay < 1 else 1.0)


@dataclasses.dataclass(frozen=True)
class Variant:
  name: str
  speculative: bool
  train: bool


VARIANTS = (Variant("plain", False, False), Variant("static", True, False), Variant("tlt", True, True))


# ------------------------------------------------------------------------------ the simulation


@dataclasses.dataclass(frozen=True)
class _Engine:
  pad_id: int = 0


class Simulation:
  """The runtime's HostScheduler over `num_groups` simulated groups on one virtual device, for
  one variant; one per run (the bandit and the drafter's version carry over between steps).
  `staleness` is the drafter's age in RL steps for the next rollout's accept lengths."""

  def __init__(self, spec: RolloutSpec, costs: CostModel, accept: AcceptModel, variant: "Variant",
               num_groups: int, *, selector=None, rng: np.random.Generator | None = None):
    self.spec, self.costs, self.accept, self.variant = spec, costs, accept, variant
    self.rng = rng if rng is not None else np.random.default_rng(spec.seed)
    self.staleness = 0.0
    self.selector = selector if variant.speculative and spec.spec_threshold > 0 else None
    self.device = VirtualDevice(costs)
    groups = [SimGroup.make(g) for g in range(num_groups)]
    self.trainer = (SimDrafterTrainer(self.device, costs, num_groups, spec.drafter_batch_size)
                    if variant.train else None)
    static = "static drafter" if variant.speculative and not variant.train else None
    self.scheduler = HostScheduler(
        _Engine(), groups, trainer=self.trainer, drafter_params=static, selector=self.selector,
        train_in_bubbles=spec.train_in_bubbles, between_steps=spec.between_steps,
        max_in_flight=spec.max_in_flight, max_train_steps=spec.max_drafter_steps,
        clock=self.device.clock, sleep=self.device.sleep, start_session=self._start)
    self._key = jax.random.key(spec.seed)

  def _start(self, group, params, prompt_BxP, prompt_len_B, max_new_B, rng, drafter_params) -> SimSession:
    del params, prompt_BxP, rng
    return SimSession(self, group.index, max_new_B, int(np.max(prompt_len_B)), drafter_params)

  def rollout(self, group_lengths: Sequence[np.ndarray]) -> dict[str, Any]:
    """One rollout whose group g's rows generate `group_lengths[g]` tokens each."""
    sizes = [len(x) for x in group_lengths]
    rows = np.split(np.arange(sum(sizes)), np.cumsum(sizes)[:-1])
    lengths = np.concatenate([np.asarray(x, np.int64) for x in group_lengths])
    n = len(lengths)
    result, acc = self.scheduler.rollout({}, np.zeros((n, 1), np.int32), np.full(n, self.spec.prompt_len),
                                         lengths, self._key, head=(), rows=rows)
    stats = result.stats
    tokens = sum(c.tokens for c in stats.chunks)
    spec_tokens = sum(c.tokens for c in stats.spec_chunks)
    by_bucket: dict[str, dict[str, list]] = {}  # bucket -> arm -> [tokens, seconds summed over groups]
    for c in stats.chunks:
      cell = by_bucket.setdefault(str(c.rows), {}).setdefault(c.strategy or "plain", [0, 0.0])
      cell[0] += int(c.tokens)
      cell[1] += float(c.time_s)
    return dict(bucket_arms=by_bucket, rollout_s=acc.wall_s, last_group_s=acc.wall_s - acc.preempt_wait_s,
                preempt_wait_s=acc.preempt_wait_s, group_done_s=[g.done_s for g in acc.groups],
                bubble_s=acc.bubble_s, drafter_train_s=acc.train_s,
                bubble_utilisation=acc.bubble_utilisation, drafter_steps=acc.drafter_steps,
                tokens=tokens, spec_frac=spec_tokens / max(tokens, 1),
                tail_frac=sum(c.tokens for c in stats.tail(self.spec.spec_threshold)) / max(tokens, 1),
                accept_len=stats.spec_accept_len if spec_tokens else None, chunks=list(stats.chunks))

  def between_steps(self) -> BetweenSteps:
    """The scheduler's drafter training after the update (nothing when it trains in bubbles)."""
    return self.scheduler.train_between_steps(())


def make_selector(spec: RolloutSpec):
  """The runtime's BEG-MAB selector for `spec`'s arms and buckets."""
  return rollout_selector(tuple(spec.arms) or ((3, 1, 3),), spec.buckets, spec.spec_threshold,
                          spec.bandit_epsilon, spec.bandit_window, spec.seed, spec.arm_ladder)


def simulate_rollout(group_lengths: Sequence[np.ndarray], spec: RolloutSpec, costs: CostModel,
                     accept: AcceptModel, variant: "Variant", *, bandit=None, staleness: float = 0.0,
                     rng: np.random.Generator | None = None) -> dict[str, Any]:
  """One rollout over the groups (module docstring). Returns its timings and accounting; with
  `bandit` None a speculative variant gets a fresh selector."""
  if bandit is None and variant.speculative and spec.spec_threshold > 0:
    bandit = make_selector(spec)
  sim = Simulation(spec, costs, accept, variant, len(group_lengths), selector=bandit, rng=rng)
  sim.staleness = float(staleness)
  return sim.rollout(group_lengths)


def simulate_run(steps: Sequence[Sequence[np.ndarray]], spec: RolloutSpec, costs: CostModel,
                 accept: AcceptModel, variant: "Variant", *, update_tokens: Sequence[int] | None = None,
                 other_s: float = 0.0, refresh_steps: int = 1, staleness0: float = 0.0,
                 seed: int = 0) -> list[dict[str, Any]]:
  """RL steps in order, one scheduler, selector and drafter across them (as the runtime keeps
  them). `steps[i]` = step i's response lengths per group. Staleness: a static drafter ages one
  unit per step from `staleness0`; TLT's returns to 0 after a step with >= `refresh_steps`
  drafter steps. `update_tokens[i]`: tokens the update processes (default: prompt + responses
  of every row)."""
  selector = make_selector(spec) if variant.speculative and spec.spec_threshold > 0 else None
  sim = Simulation(spec, costs, accept, variant, len(steps[0]) if steps else 1, selector=selector,
                   rng=np.random.default_rng(seed))
  sim.staleness = float(staleness0)
  records = []
  for i, groups in enumerate(steps):
    ro = sim.rollout(groups)
    n_rows = sum(len(g) for g in groups)
    tokens = (int(update_tokens[i]) if update_tokens is not None
              else int(sum(int(np.sum(g)) for g in groups) + n_rows * spec.prompt_len))
    between = sim.between_steps()
    ro["drafter_steps"] += between.drafter_steps
    update_s = costs.update(tokens)
    rec = dict(variant=variant.name, step=i + 1,
               step_time_s=ro["rollout_s"] + update_s + between.train_s + other_s,
               rollout_time_s=ro["rollout_s"], update_time_s=update_s, between_steps_train_s=between.train_s,
               staleness=sim.staleness, **{k: v for k, v in ro.items() if k not in ("rollout_s", "chunks")})
    records.append(rec)
    if variant.train:
      sim.staleness = 0.0 if ro["drafter_steps"] >= refresh_steps else sim.staleness + 1.0
    elif variant.speculative:
      sim.staleness += 1.0
  return records


def summarize(records: Sequence[Mapping[str, Any]], skip: int = 0) -> dict[str, Any]:
  """Medians over the steps after the first `skip`."""
  rs = list(records[skip:]) or list(records)
  med = lambda k: float(np.median([r[k] for r in rs if r.get(k) is not None])) if any(  # noqa: E731
      r.get(k) is not None for r in rs) else None
  keys = ("step_time_s", "rollout_time_s", "update_time_s", "bubble_s", "bubble_utilisation",
          "drafter_steps", "preempt_wait_s", "spec_frac", "tail_frac", "accept_len")
  return {k: med(k) for k in keys} | {"steps": len(rs)}


# ------------------------------------------------------------------------------ length traces


@dataclasses.dataclass(frozen=True)
class LogNormalLengths:
  """A parametric long-tailed response-length distribution: lognormal with `median` and
  log-scale `sigma`, cut at `max_len` (a response that reaches it stops there, as a capped
  generation does)."""

  median: float
  sigma: float
  max_len: int
  min_len: int = 1

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.lognormal(np.log(self.median), self.sigma, n)
    return np.clip(np.round(x), self.min_len, self.max_len).astype(np.int64)


def split_groups(lengths: np.ndarray, num_groups: int, group_size: int = 1) -> list[np.ndarray]:
  """Rows over rollout groups by whole prompt groups, contiguous (the runtime's split_rows)."""
  from tlt_jax.tlt.groups import split_rows
  lengths = np.asarray(lengths)
  return [lengths[r] for r in split_rows(len(lengths), group_size, num_groups)]
