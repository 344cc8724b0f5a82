"""The host scheduler: it owns time during a rollout, and trains the drafter in the bubbles.

TLT (Hu et al., 2025, "Taming the Long Tail"): a step's rollout is split over R rollout groups
(tlt/groups.py). Groups finish at different times; a group whose sequences have all finished is
IDLE until the last one finishes. The scheduler fills that bubble with drafter training:

  loop on ONE host thread (JAX async dispatch keeps every group busy; every group always has a
  chunk in flight, and the host polls which one is done):
    for each decoding group g whose chunk is done:
                                session_g.drafter_params <- newest published drafter
                                session_g.advance()       (collect g's chunk, dispatch g's next)
                                finished rows -> drafter buffer (their features, tlt/buffer.py)
    drafter: completed train steps are published; while some group still decodes and some are
             idle, keep up to `max_in_flight` `drafter_train_step`s queued on the idle groups'
             devices (data-parallel over them), batches drawn from the buffer
  when the last group finishes: no new train step is dispatched (preemption at a step boundary);
  the queued ones complete and are published, and the rollout returns.

Atomic publication. A train step never mutates params that a rollout reads: after dispatching
step k the trainer dispatches a copy of its params (the step donates its input state, so the
next step cannot overwrite the copy), and once that copy is ready it is placed on every group
and published as ONE immutable `PublishedDrafter(version, params_per_group)`, swapped in with a
single assignment. The version grows by exactly one per completed step. Sessions pick the
newest version up at their next chunk (the drafter's KV cache of earlier tokens keeps the
older version's entries; acceptance is target-only, so this costs accept length, never
correctness). A preempted step is never half-published: it either completed (and is published)
or was never dispatched.

Accounting (per group, host clock, exact sums): a group is DECODING from the rollout's start
(prefill included) until its session is done, TRAINING while a drafter step it takes part in is
queued or running, IDLE otherwise; decode + train + idle = the rollout's wall time, per group.
The bubble is the idle time there was before training filled it: Σ_g (end - done_g);
bubble utilisation = Σ train / Σ bubble. Times are observed when the host notices them: a
train step's completion at the next poll (every `poll_s` while all groups decode, or at the
next chunk boundary), so "train" may include a little idle time.

What "idle" means on a CPU: the groups are fake devices over the same cores, so an idle group's
"device" is not free compute: its training runs on cores the decoding group could have used.
A small-batch tail decodes on about one core, which leaves roughly one core of two for
training; on accelerators an idle group's chips are truly free.

With R = 1 nothing is ever idle: `single_group` = "between_steps" trains `between_steps`
drafter steps after each policy update (`train_between_steps`), "off" never trains.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from tlt_jax.drafter.train import TargetHead
from tlt_jax.rollout.records import (BetweenSteps, GroupAccount, RolloutResult, StepAccount,
                                     merge_stats)
from tlt_jax.tlt.drafter_trainer import DrafterTrainer, PublishedDrafter, target_head  # noqa: F401
from tlt_jax.tlt.groups import RolloutGroup, place_params, split_rows, union_mesh

SINGLE_GROUP_MODES = ("between_steps", "off")
PHASES = ("decode", "train", "idle")


# ------------------------------------------------------------------------------ accounting


class Timeline:
  """Per-group phase clock: `set(g, phase, t)` closes g's current phase at t and opens `phase`;
  `close(t)` ends all. Each group's phase totals then sum to (close - start) exactly."""

  def __init__(self, num_groups: int, t0: float, phases: Sequence[str]):
    self.t0 = t0
    self.totals = [dict.fromkeys(PHASES, 0.0) for _ in range(num_groups)]
    self.current = [(p, t0) for p in phases]

  def set(self, g: int, phase: str, t: float) -> None:
    old, since = self.current[g]
    self.totals[g][old] += t - since
    self.current[g] = (phase, t)

  def phase(self, g: int) -> str:
    return self.current[g][0]

  def close(self, t: float) -> None:
    for g in range(len(self.current)):
      self.set(g, self.current[g][0], t)


def _mean_metrics(metrics: Sequence[dict]) -> dict[str, float]:
  """drafter_loss / drafter_accuracy: the mean over the completed drafter steps that report them."""
  return {f"drafter_{k}": float(np.mean([m[k] for m in metrics])) for k in ("loss", "accuracy")
          if metrics and k in metrics[0]}


# ------------------------------------------------------------------------------ the scheduler


class HostScheduler:
  """Runs a step's rollout over the rollout groups and trains the drafter in their bubbles.

  Args:
    engine: the RolloutEngine (its speculative decoder, if any, decodes each group's tail once its
      active batch is <= engine.spec_threshold).
    groups: the rollout groups (tlt/groups.split_mesh).
    trainer: the DrafterTrainer, or None (no drafter training, and the engine's drafter params
      come from `drafter_params`).
    drafter_params: a static drafter (used when `trainer` is None); None and no trainer: plain.
    selector: the strategy selector of every group's speculative chunks (BEG-MAB, shared).
    train_in_bubbles: train in idle groups' bubbles (needs a trainer and R > 1).
    single_group: with R = 1, "between_steps" or "off" (see `train_between_steps`).
    between_steps: drafter steps per `train_between_steps` call.
    max_in_flight: drafter steps queued at once (2 keeps the device fed between polls).
    max_train_steps: cap on drafter steps per rollout (0: as many as the bubbles fit).
    poll_s: sleep between polls while every group's chunk is still running.
    clock: the time source (a fake one in tests, the simulator's virtual one).
    sleep: `sleep(seconds)`, the host's wait between polls (the simulator's returns at the next
      completion on its virtual clock).
    start_session: `(group, params, prompts, prompt_lens, max_new, rng, drafter_params) -> session`;
      default `engine.start` on the group's devices. A session has `advance()`, `result()`,
      `drafter_params` and `finished_features`.
  """

  def __init__(self, engine, groups: Sequence[RolloutGroup], *, trainer: DrafterTrainer | None = None,
               drafter_params=None, selector=None, train_in_bubbles: bool = True,
               single_group: str = "between_steps", between_steps: int = 0, max_in_flight: int = 2,
               max_train_steps: int = 0, poll_s: float = 2e-4,
               clock: Callable[[], float] = time.perf_counter, sleep: Callable[[float], None] = time.sleep,
               start_session: Callable | None = None):
    if single_group not in SINGLE_GROUP_MODES:
      raise ValueError(f"tlt.single_group={single_group!r} is not allowed; allowed: one of {SINGLE_GROUP_MODES}")
    if max_in_flight < 1:
      raise ValueError(f"max_in_flight={max_in_flight}; must be >= 1")
    self.engine, self.groups, self.trainer, self.selector = engine, list(groups), trainer, selector
    self.static_drafter = None
    if drafter_params is not None:
      self.set_static_drafter(drafter_params)
    self.train_in_bubbles = bool(train_in_bubbles) and trainer is not None and len(self.groups) > 1
    self.single_group, self.between_steps = single_group, int(between_steps)
    self.max_in_flight, self.max_train_steps = int(max_in_flight), int(max_train_steps)
    self.clock, self.sleep, self.poll_s = clock, sleep, float(poll_s)
    self._start_session = start_session or self._engine_session
    self.collect_features = trainer is not None
    self._collect_now = self.collect_features

  def set_static_drafter(self, params) -> None:
    """The drafter of every speculative chunk when there is no trainer (e.g. after a restore)."""
    self.static_drafter = tuple(g.place_drafter(params) for g in self.groups)

  # --- sessions ----------------------------------------------------------------------------

  def _engine_session(self, group: RolloutGroup, params, prompt_BxP, prompt_len_B, max_new_B, rng,
                      drafter_params):
    return self.engine.start(params, prompt_BxP, prompt_len_B, max_new_B, rng, drafter_params,
                             self.selector, place_batch=group.place_batch,
                             collect_features=self._collect_now, mesh=group.mesh)

  def drafter_for(self, g: int):
    """(version, params on group g) of the drafter a speculative chunk uses now."""
    if self.trainer is not None:
      pub = self.trainer.published
      return pub.version, pub.params[g]
    if self.static_drafter is not None:
      return 0, self.static_drafter[g]
    return None, None

  def _train_groups(self, idle: Sequence[int]) -> list[int]:
    """The idle groups the drafter trains on, data-parallel: the most (first) of them whose batch
    split divides the drafter batch (the others stay idle)."""
    for k in range(len(idle), 0, -1):
      mesh = union_mesh([self.groups[g] for g in idle[:k]])
      if self.trainer.batch_size % self.trainer.batch_shards(mesh) == 0:
        return list(idle[:k])
    raise ValueError(f"tlt.drafter_batch_size={self.trainer.batch_size} is not divisible by one rollout "
                     f"group's batch shards ({self.trainer.batch_shards(self.groups[idle[0]].mesh)})")

  # --- one rollout -------------------------------------------------------------------------

  def rollout(self, params, prompt_BxP: np.ndarray, prompt_len_B: np.ndarray, max_new_tokens,
              rng: jax.Array, *, step: int = 0, group_size: int = 1, head: TargetHead | None = None,
              train: bool = True, rows: Sequence[np.ndarray] | None = None) -> tuple[RolloutResult, StepAccount]:
    """Generates for every row (as RolloutEngine.generate), rows split over the groups by whole
    prompt groups of `group_size` (or as `rows`: each group's row indices). With `train` (and a trainer), finished rows' features go to
    the trainer's buffer (tagged with RL `step`) and the drafter trains in the bubbles against
    `head` (default: the head of `params`); `train=False` only decodes (e.g. an evaluation).

    Returns (result, account): result merged in the input row order; account the step's
    StepAccount (module docstring), `buffered_rows` the rows whose features went to the buffer.
    """
    rows = split_rows(len(prompt_BxP), group_size, len(self.groups)) if rows is None else list(rows)
    run = _Rollout(self, params, len(prompt_BxP), rows, step, head, train)
    run.start(params, prompt_BxP, prompt_len_B, max_new_tokens, rng)
    run.decode()
    return run.finish()

  # --- between steps (R = 1) ---------------------------------------------------------------

  def train_between_steps(self, head: TargetHead, num_steps: int | None = None) -> BetweenSteps:
    """When the drafter does not train in bubbles (one rollout group with `single_group=
    "between_steps"`, or several groups that share cores, tlt/runtime.resolve_train_where):
    `num_steps` (default `between_steps`) drafter steps on all groups' devices, synchronously,
    after the policy update. Nothing runs when the drafter trains in bubbles, with one group in
    mode "off", or with too few buffered rows."""
    trainer = self.trainer
    num_steps = self.between_steps if num_steps is None else int(num_steps)
    if (trainer is None or self.train_in_bubbles
        or (len(self.groups) == 1 and self.single_group != "between_steps")
        or num_steps <= 0 or len(trainer.buffer) < trainer.batch_size):
      return BetweenSteps(0.0, 0, None if trainer is None else trainer.version)
    t0 = self.clock()
    mesh = union_mesh([self.groups[g] for g in self._train_groups(list(range(len(self.groups))))])
    metrics = []
    for _ in range(num_steps):
      if trainer.in_flight >= self.max_in_flight:
        metrics.append(trainer.complete_one())
      trainer.dispatch(mesh, head)
    metrics += trainer.complete_all()
    return BetweenSteps(self.clock() - t0, len(metrics), trainer.version,
                        _mean_metrics(metrics).get("drafter_loss"))



class _Rollout:
  """The state of one `HostScheduler.rollout`: the groups' sessions and results, when each went
  idle, the drafter versions its speculative chunks used, the buffered rows, the queued drafter
  steps and the timeline. Its methods are the steps of the rollout: start the sessions, advance
  the ready groups while training the drafter in the bubbles, merge and account."""

  def __init__(self, sched: "HostScheduler", params, n: int, rows: Sequence[np.ndarray], step: int,
               head: TargetHead | None, train: bool):
    self.sched, self.clock, self.trainer = sched, sched.clock, sched.trainer
    self.t0 = self.clock()
    num_groups = len(sched.groups)
    self.n, self.step, self.train = n, step, train
    self.rows = rows
    self.training = sched.train_in_bubbles and train
    sched._collect_now = sched.collect_features and train
    self.head = target_head(sched.engine.graphdef, params) if self.training and head is None else head
    self.timeline = Timeline(num_groups, self.t0, ["decode" if len(r) else "idle" for r in self.rows])
    self.sessions: list[Any] = [None] * num_groups
    self.results: list[RolloutResult | None] = [None] * num_groups
    self.done_at = [self.t0 if not len(r) else None for r in self.rows]
    self.versions_used: set[int] = set()  # drafter versions of the speculative chunks
    self.dispatched: list[int | None] = [None] * num_groups  # version given to each group's chunk in flight
    self.buffered = np.zeros((n,), bool)
    self.train_metrics: list[dict] = []
    self.steps_dispatched = 0
    self.train_groups: list[int] = []  # the groups the queued train steps run on
    self.host_s = [0.0] * num_groups  # time inside each session.advance() (copy-out, compaction, dispatch)
    self.start_s = [[0.0, 0.0] for _ in range(num_groups)]  # each session's start and first dispatch, from t0
    self.active: list[int] = []

  def start(self, params, prompt_BxP, prompt_len_B, max_new_tokens, rng) -> None:
    """Starts every group's session (each group's prefill overlaps the others' first chunks)."""
    sched = self.sched
    max_new_N = np.broadcast_to(np.asarray(max_new_tokens, np.int32), (self.n,))
    group_params = place_params(params, sched.groups)  # sampling layout, one reshard for all groups
    for g, group in enumerate(sched.groups):
      r = self.rows[g]
      if not len(r):
        continue
      _, dparams = sched.drafter_for(g)
      self.start_s[g][0] = self.clock() - self.t0
      self.sessions[g] = sched._start_session(group, group_params[g], prompt_BxP[r], prompt_len_B[r],
                                              max_new_N[r], group.replicate(jax.random.fold_in(rng, g)),
                                              dparams)
      if self.advance(g):
        self.active.append(g)
      self.start_s[g][1] = self.clock() - self.t0
      self.host_s[g] = 0.0  # from the first chunk on

  def drain_features(self, g: int) -> None:
    feats = getattr(self.sessions[g], "finished_features", None)
    if not feats:
      return
    if self.trainer is not None and self.train:
      self.trainer.buffer.add_sequences([(tok, feat, plen) for _, tok, feat, plen in feats], self.step)
      self.buffered[self.rows[g][[r for r, _, _, _ in feats]]] = True
    feats.clear()

  def advance(self, g: int) -> bool:
    """One `advance()` of group g's session with the newest drafter; False once it is done."""
    s = self.sessions[g]
    version, dparams = self.sched.drafter_for(g)
    if dparams is not None:
      s.drafter_params = dparams
    chunks = getattr(s, "chunks", ())
    seen = len(chunks)
    begin = self.clock()
    more = s.advance()
    self.host_s[g] += self.clock() - begin
    # the chunk that just finished was dispatched by the previous call, with that call's version
    if any(c.speculative for c in chunks[seen:]) and self.dispatched[g] is not None:
      self.versions_used.add(self.dispatched[g])
    self.dispatched[g] = version
    self.drain_features(g)
    if not more:
      self.results[g] = s.result()
      self.done_at[g] = self.clock()
      self.timeline.set(g, "idle", self.done_at[g])
    return more

  def train_tick(self) -> None:
    """Publishes completed drafter steps; keeps the queue full on the idle groups' devices."""
    trainer, now = self.trainer, self.clock()
    done = trainer.complete_ready()
    self.train_metrics.extend(done)
    if done and not trainer.in_flight:
      for g in self.train_groups:
        self.timeline.set(g, "idle", now)
      self.train_groups = []
    idle = [g for g in range(len(self.done_at)) if self.done_at[g] is not None]
    if not (self.active and idle) or len(trainer.buffer) < trainer.batch_size:
      return
    idle = self.sched._train_groups(idle)
    if trainer.in_flight and set(idle) != set(self.train_groups):
      return  # more groups went idle: they join once the queue drains
    mesh = union_mesh([self.sched.groups[g] for g in idle])
    limit = self.sched.max_train_steps
    while trainer.in_flight < self.sched.max_in_flight and not (limit and self.steps_dispatched >= limit):
      trainer.dispatch(mesh, self.head)
      self.steps_dispatched += 1
    if trainer.in_flight:
      for g in idle:
        if self.timeline.phase(g) != "train":
          self.timeline.set(g, "train", now)
      self.train_groups = idle

  def decode(self) -> None:
    """Advances the groups whose chunk is done (a session without `chunk_ready` counts as ready),
    so that each chunk's time is its own and a finished group goes idle at once; polls the
    drafter before each, so that every chunk gets the newest version."""
    while self.active:
      ready = [g for g in self.active if getattr(self.sessions[g], "chunk_ready", lambda: True)()]
      if not ready:
        if self.training:
          self.train_tick()
        self.sched.sleep(self.sched.poll_s)
        continue
      for g in ready:
        if self.training:
          self.train_tick()
        if not self.advance(g):
          self.active.remove(g)

  def finish(self) -> tuple[RolloutResult, StepAccount]:
    """Completes the queued drafter steps (preemption), merges the results, accounts."""
    finished = [d for d in self.done_at if d is not None]
    t_last = max(finished) if finished else self.t0
    if self.training and self.trainer.in_flight:  # preemption: finish (and publish) the queued steps
      self.train_metrics += self.trainer.complete_all()
    t_end = self.clock()
    for g in self.train_groups:
      self.timeline.set(g, "idle", t_end)
    self.timeline.close(t_end)
    result = merge_results(self.results, self.rows, self.n, getattr(self.sched.engine, "pad_id", 0))
    groups = [GroupAccount(decode_s=tot["decode"], train_s=tot["train"], idle_s=tot["idle"],
                           bubble_s=t_end - self.done_at[g], done_s=self.done_at[g] - self.t0,
                           start_s=self.start_s[g][0], first_dispatch_s=self.start_s[g][1], host_s=self.host_s[g])
              for g, tot in enumerate(self.timeline.totals)]
    trainer = self.trainer
    account = StepAccount.of_groups(
        groups, wall_s=t_end - self.t0, preempt_wait_s=t_end - t_last, drafter_steps=len(self.train_metrics),
        drafter_version=None if trainer is None else trainer.version,
        drafter_versions_used=tuple(sorted(self.versions_used)), buffered_rows=self.buffered,
        **_mean_metrics(self.train_metrics))
    return result, account

def merge_results(results: Sequence[RolloutResult | None], rows: Sequence[np.ndarray], n: int,
                  pad_id: int = 0) -> RolloutResult:
  """The groups' results in the original row order, their statistics merged (records.merge_stats,
  each chunk tagged with its group)."""
  present = [(r, idx) for r, idx in zip(results, rows) if r is not None]
  width = max(r.tokens.shape[1] for r, _ in present)
  tokens = np.full((n, width), pad_id, np.int32)
  logprobs = np.zeros((n, width), np.float32)
  lengths = np.zeros((n,), np.int32)
  finished = np.zeros((n,), bool)
  for r, idx in present:
    w = r.tokens.shape[1]
    tokens[idx, :w], logprobs[idx, :w] = r.tokens, r.logprobs
    lengths[idx], finished[idx] = r.lengths, r.finished
  stats = merge_stats([r.stats for r, _ in present], tag_groups=True, num_tokens=int(lengths.sum()))
  return RolloutResult(tokens, lengths, logprobs, finished, stats)
