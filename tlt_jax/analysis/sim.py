"""A step simulator for TLT: replays RL steps for R rollout groups at given costs.

Why: TLT pays off where decoding is memory-bound (a step costs about the same at any batch) and
the rollout is most of an RL step; on this CPU neither holds. The simulator runs the same
scheduling logic as the real rollout over costs that were measured (analysis/costs.MeasuredCosts, on
this CPU or a GPU) or compiled for a TPU pod (CompiledCosts / RooflineCosts), so the two regimes
can be compared with the same code paths:

  per group (rows split over groups by whole prompt groups, as tlt/groups.split_rows):
    prefill (it samples each row's first token; the host starts the sessions one after another
    and blocks on each prefill, which waits for the chunks running on the other groups: see
    simulate_rollout); then chunks: while rows remain, the active rows are padded to their batch bucket
    (compaction: costs.compact per bucket level the batch goes down, before the next chunk; the final
    copy-out of the rows: costs.copy_out); at or below `spec_threshold` active rows (speculative variants) the strategy of
    the chunk is the BEG-MAB bandit's choice (tlt/bandit.BegMab, the runtime's own class, fed the
    simulated chunk's accept length and its observed time), a speculative chunk being up to
    `rounds_per_chunk` rounds in which each active row emits an accept length drawn from the
    AcceptModel; else `chunk_size` plain steps (fewer when every row finishes sooner).
  across groups: jobs progress at costs.throughput(k) / k when k jobs run at once (1 each on
    accelerators: disjoint chips; less on a CPU whose fake devices share the cores), except
    items of at most costs.light_batch rows, which a CPU runs beside the others at full speed
    (measured: a latency-bound small batch takes a core the large batch leaves idle);
  drafter training (TLT): while some group decodes and some are idle, one drafter step at a time
    runs data-parallel over the idle groups; when the last group finishes, the step in flight
    completes (preemption at a step boundary) and its remainder is the preemption wait;
  drafter staleness: a static drafter's accept length decays with the RL steps since it was
    trained (AcceptModel.decay per step); TLT's is refreshed by `refresh_steps` drafter steps in a
    step's bubbles (or between steps: one group, or `train_in_bubbles=False` as on shared CPU
    cores, where `between_steps` drafter steps follow each update);
  step time = rollout + costs.update(tokens) + a fixed per-step host time.

Outputs per step: step / rollout time, bubble (group-seconds idle before training fills it),
bubble utilisation (train / bubble), drafter steps, preemption wait, tokens and their share
decoded speculatively.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from tlt_jax.rollout.engine import bucket_for, compacted_rows
from tlt_jax.tlt.bandit import PLAIN, BegMab, arm_ladder
from tlt_jax.analysis.costs import CostModel, Strategy, parse_strategy, strategy_name


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
  seed: int = 0
  arm_ladder: tuple[int, ...] = ()  # tlt.arm_ladder: per-bucket verify-token ladder (tlt/bandit.arm_ladder)

  @classmethod
  def from_config(cls, config, prompt_len: int) -> "RolloutSpec":
    r, t = config.rollout, config.tlt
    return cls(chunk_size=int(r.chunk_size), buckets=tuple(int(b) for b in r.buckets),
               spec_threshold=int(r.spec_threshold), rounds_per_chunk=int(r.rounds_per_chunk),
               arms=tuple(parse_strategy(str(s).strip()) for s in t.strategies), prompt_len=int(prompt_len),
               bandit_epsilon=float(t.bandit_epsilon), bandit_window=int(t.bandit_window),
               max_drafter_steps=int(t.max_drafter_steps), between_steps=int(t.between_steps),
               seed=int(config.seed), arm_ladder=tuple(int(x) for x in t.get("arm_ladder", ())))


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


def _group_chunks(lengths: np.ndarray, spec: RolloutSpec, costs: CostModel, accept: AcceptModel,
                  bandit: BegMab | None, rng: np.random.Generator, staleness: float,
                  log: list[dict], features: bool = False) -> Iterator[float]:
  """One group's rollout as a generator of pieces of work (seconds at full speed, the rows it
  processes: costs.light_batch decides whether it contends for shared cores); each `send` passes
  back the item's observed wall time (the bandit scores chunks by it)."""
  remaining = np.asarray(lengths, np.int64).copy()
  n = len(remaining)
  b0 = bucket_for(n, spec.buckets) if spec.compact else n
  yield costs.session_prefill(b0, spec.prompt_len), b0  # the session's prefill (it runs alone)
  gen = (remaining > 0).astype(np.int64)  # the prefill samples each row's first token
  remaining = remaining - gen
  held = bucket_for(n, spec.buckets) if spec.compact else n  # rows the device state holds
  while (remaining > 0).any():
    act = remaining > 0
    active = int(act.sum())
    b = compacted_rows(active, held, spec.buckets) if spec.compact else n
    ctx = spec.prompt_len + int(gen.max())
    if b < held:  # a piece of work of its own: the real engine times a chunk from its dispatch
      levels = [held] + [x for x in spec.buckets if b <= x < held][::-1]  # one level at a time
      yield sum(costs.compact(x, ctx) for x in levels[:-1]), held
    held = b
    strategy = None
    in_tail = bandit is not None and active <= spec.spec_threshold
    if in_tail:
      s = tuple(bandit.select(b))  # keyed by the state's rows, as RolloutSession does
      strategy = None if s == PLAIN else s
    if strategy is None:
      steps = int(min(spec.chunk_size, remaining.max()))
      cost = steps * costs.decode_step(b, ctx + steps // 2) + costs.chunk_overhead
      emitted = np.minimum(remaining, steps) * act
      rounds, row_rounds = steps, int(emitted.sum())
    else:
      cost, emitted, rounds, row_rounds = costs.chunk_overhead, np.zeros(n, np.int64), 0, 0
      left = remaining.copy()
      for _ in range(spec.rounds_per_chunk):
        live = left > 0
        if not live.any():
          break
        e = np.zeros(n, np.int64)
        e[live] = np.minimum(accept.draw(rng, strategy, int(live.sum()), staleness), left[live])
        cost += costs.spec_round(b, strategy, ctx + int((gen + emitted).max()))
        emitted += e
        left -= e
        rounds += 1
        row_rounds += int(live.sum())
    tokens = int(emitted.sum())
    observed = yield cost, b
    remaining -= emitted
    gen += emitted
    if in_tail:
      r = max(rounds, 1)
      bandit.update(b, PLAIN if strategy is None else strategy, tokens / max(row_rounds, 1),
                    max(observed, 1e-12) / r)  # as RolloutSession scores a chunk
    log.append(dict(batch=active, bucket=b, strategy=None if strategy is None else strategy_name(strategy),
                    tokens=tokens, rounds=rounds, row_rounds=row_rounds, time_s=observed))
  yield costs.copy_out(held, spec.prompt_len + int(gen.max()), features), held  # the final copy-out


def simulate_rollout(group_lengths: Sequence[np.ndarray], spec: RolloutSpec, costs: CostModel,
                     accept: AcceptModel, variant: Variant, *, bandit: BegMab | None = None,
                     staleness: float = 0.0, rng: np.random.Generator | None = None) -> dict[str, Any]:
  """One rollout over the groups (module docstring). Returns its timings and accounting."""
  rng = rng if rng is not None else np.random.default_rng(spec.seed)
  num_groups = len(group_lengths)
  logs: list[list[dict]] = [[] for _ in range(num_groups)]
  use_bandit = bandit if variant.speculative and spec.spec_threshold > 0 else None
  gens, work, rows, started = {}, {}, {}, {}
  done_at: dict[int, float] = {}
  t = 0.0
  waiting = []  # groups whose session has not started: the host starts them one after another
  for g, lengths in enumerate(group_lengths):
    if len(lengths) == 0:
      done_at[g] = 0.0
      continue
    waiting.append(g)
  # The host starts the sessions one after another and blocks on each prefill (RolloutSession),
  # and a prefill dispatched while another group's chunk runs completes after that chunk (measured:
  # cost_bench's session_prefill beside_s): so a session's prefill waits for the running items,
  # then runs alone, and while the host is blocked no group gets its next item ("stalled") until
  # every session has started.
  pending = None  # (group, seconds, rows): a session's prefill waiting for the running items
  prefilling: set[int] = set()
  stalled: set[int] = set()

  def start_next():
    nonlocal pending
    if waiting:
      g = waiting.pop(0)
      gens[g] = _group_chunks(np.asarray(group_lengths[g]), spec, costs, accept, use_bandit, rng, staleness,
                              logs[g], features=variant.train)
      pending = (g, *next(gens[g]))

  def maybe_start_pending():
    nonlocal pending
    if pending is not None and not work:
      g, seconds, n_rows = pending
      pending = None
      work[g], rows[g], started[g] = seconds, n_rows, t
      prefilling.add(g)

  def resume(g):
    try:
      work[g], rows[g] = gens[g].send(t - started[g])
      started[g] = t
    except StopIteration:
      del gens[g]
      done_at[g] = t

  start_next()
  maybe_start_pending()
  train_left, train_groups, train_gs, steps = None, 0, 0.0, 0
  can_train = variant.train and num_groups > 1 and spec.train_in_bubbles

  def maybe_start_training():
    nonlocal train_left, train_groups
    idle = [g for g in range(num_groups) if g in done_at]
    if (can_train and train_left is None and gens and idle
        and not (spec.max_drafter_steps and steps >= spec.max_drafter_steps)):
      train_groups = len(idle)
      train_left = costs.drafter_train_step(train_groups)

  maybe_start_training()
  while gens:
    assert work or train_left is not None, "simulator: nothing runs while groups remain"
    # light items (<= costs.light_batch rows) run at full speed beside the rest; the others (and
    # a drafter step) share the cores: each at throughput(k) / k
    heavy = [g for g in work if rows[g] > costs.light_batch] + (["train"] if train_left is not None else [])
    shared = costs.throughput(len(heavy)) / len(heavy) if heavy else 1.0
    rate = {g: (shared if g in heavy else 1.0) for g in work}
    dt = min([work[g] / rate[g] for g in work] + ([train_left / shared] if train_left is not None else []))
    t += dt
    for g in work:
      work[g] -= dt * rate[g]
    if train_left is not None:
      train_left -= dt * shared
      train_gs += dt * train_groups
      if train_left <= 1e-15:
        steps, train_left = steps + 1, None
    for g in [g for g, w in work.items() if w <= 1e-15]:
      del work[g], rows[g]
      if g in prefilling:  # the host dispatches the group's first chunk, then starts the next one
        prefilling.discard(g)
        resume(g)
        start_next()
      elif pending is not None or prefilling or waiting:
        stalled.add(g)
      else:
        resume(g)
    if pending is None and not prefilling and not waiting and stalled:
      for g in sorted(stalled):
        resume(g)
      stalled.clear()
    maybe_start_pending()
    maybe_start_training()
  t_last = t
  if train_left is not None:  # preemption: the step in flight completes, alone
    wait = train_left / costs.throughput(1)
    train_gs += wait * train_groups
    t += wait
    steps += 1
  bubble = sum(t - d for d in done_at.values())
  chunks = [c for log in logs for c in log]
  tokens = sum(c["tokens"] for c in chunks)
  spec_tokens = sum(c["tokens"] for c in chunks if c["strategy"] is not None)
  tail = [c for c in chunks if c["batch"] <= spec.spec_threshold]
  return dict(rollout_s=t, last_group_s=t_last, preempt_wait_s=t - t_last,
              group_done_s=[done_at[g] for g in range(num_groups)], bubble_s=bubble,
              drafter_train_s=train_gs, bubble_utilisation=(train_gs / bubble) if bubble > 0 else None,
              drafter_steps=steps, tokens=tokens, spec_frac=spec_tokens / max(tokens, 1),
              tail_frac=sum(c["tokens"] for c in tail) / max(tokens, 1),
              accept_len=(spec_tokens / max(sum(c["row_rounds"] for c in chunks if c["strategy"]), 1))
              if spec_tokens else None, chunks=chunks)


def simulate_run(steps: Sequence[Sequence[np.ndarray]], spec: RolloutSpec, costs: CostModel,
                 accept: AcceptModel, variant: Variant, *, update_tokens: Sequence[int] | None = None,
                 other_s: float = 0.0, refresh_steps: int = 1, staleness0: float = 0.0,
                 seed: int = 0) -> list[dict[str, Any]]:
  """RL steps in order, one bandit across them (as the runtime keeps one). `steps[i]` = step i's
  response lengths per group. Staleness: a static drafter ages one unit per step from
  `staleness0`; TLT's returns to 0 after a step with >= `refresh_steps` drafter steps.
  `update_tokens[i]`: tokens the update processes (default: prompt + responses of every row)."""
  rng = np.random.default_rng(seed)
  arms = tuple(spec.arms) or ((3, 1, 3),)
  bandit = None
  if variant.speculative and spec.spec_threshold > 0:
    buckets = tuple(b for b in spec.buckets if b <= spec.spec_threshold) or (spec.spec_threshold,)
    ladder = arm_ladder(arms, buckets, spec.arm_ladder) if spec.arm_ladder else arms
    bandit = BegMab(ladder, buckets=buckets, epsilon=spec.bandit_epsilon, window=spec.bandit_window,
                    seed=spec.seed)
  staleness = float(staleness0)
  records = []
  for i, groups in enumerate(steps):
    ro = simulate_rollout(groups, spec, costs, accept, variant, bandit=bandit, staleness=staleness, rng=rng)
    n_rows = sum(len(g) for g in groups)
    tokens = (int(update_tokens[i]) if update_tokens is not None
              else int(sum(int(np.sum(g)) for g in groups) + n_rows * spec.prompt_len))
    between = 0.0
    if variant.train and (len(groups) == 1 or not spec.train_in_bubbles) and spec.between_steps:
      between = spec.between_steps * costs.drafter_train_step(1)
      ro["drafter_steps"] += spec.between_steps
    update_s = costs.update(tokens)
    rec = dict(variant=variant.name, step=i + 1, step_time_s=ro["rollout_s"] + update_s + between + other_s,
               rollout_time_s=ro["rollout_s"], update_time_s=update_s, between_steps_train_s=between,
               staleness=staleness, **{k: v for k, v in ro.items() if k not in ("rollout_s", "chunks")})
    records.append(rec)
    if variant.train:
      staleness = 0.0 if ro["drafter_steps"] >= refresh_steps else staleness + 1.0
    elif variant.speculative:
      staleness += 1.0
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
