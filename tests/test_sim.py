"""The TLT step simulator on hand-computable cases: known lengths and costs give exact times."""

import dataclasses

import numpy as np
import pytest

from tlt_jax.analysis.costs import ConstantCosts
from tlt_jax.analysis.sim import VARIANTS, AcceptModel, RolloutSpec, Simulation, simulate_rollout, simulate_run
from tlt_jax.tlt.scheduler import HostScheduler

PLAIN_V, STATIC_V, TLT_V = VARIANTS
MS = 1e-3


def _costs(**kw):
  base = dict(decode_s=1 * MS, prefill_s=2 * MS, train_s=2 * MS, chunk_overhead=0.5 * MS,
              update_s_per_token=0.1 * MS, spec_s={"d2k1n2": 1.5 * MS})
  base.update(kw)
  return ConstantCosts(**base)


SPEC = RolloutSpec(chunk_size=4, buckets=(1, 2, 4), spec_threshold=0, prompt_len=8)
GROUPS = [np.array([5]), np.array([11])]  # the prefill samples each row's first token


def test_two_groups_plain_and_tlt_exact():
  """The host starts the sessions one after another and blocks on each prefill, which waits for
  the running chunks. A: prefill 0-2, its one chunk (4 + 0.5) 2-6.5; B's prefill then 6.5-8.5
  (the host is blocked: A's copy-out waits to 8.5); B's chunks 4.5 + 4.5 + (2 + 0.5): done at 20.
  TLT trains 2 ms steps on A from 8.5: 6 steps, the last ends at 20.5 (0.5 past B: the
  preemption wait); bubble = (20.5 - 8.5) + (20.5 - 20) = 12.5 ms, trained 12 ms."""
  plain = simulate_rollout(GROUPS, SPEC, _costs(), AcceptModel(), PLAIN_V)
  assert plain["group_done_s"] == pytest.approx([8.5 * MS, 20 * MS])
  assert plain["rollout_s"] == pytest.approx(20 * MS)
  assert plain["bubble_s"] == pytest.approx(11.5 * MS) and plain["drafter_steps"] == 0
  tlt = simulate_rollout(GROUPS, SPEC, _costs(), AcceptModel(), TLT_V)
  assert tlt["drafter_steps"] == 6
  assert tlt["rollout_s"] == pytest.approx(20.5 * MS)
  assert tlt["preempt_wait_s"] == pytest.approx(0.5 * MS)
  assert tlt["bubble_s"] == pytest.approx(12.5 * MS)
  assert tlt["bubble_utilisation"] == pytest.approx(12 / 12.5)
  # the step adds the update: (5 + 11 responses + 2 x 8 prompt tokens) x 0.1 ms
  rec = simulate_run([GROUPS], SPEC, _costs(), AcceptModel(), PLAIN_V)[0]
  assert rec["step_time_s"] == pytest.approx(20 * MS + 32 * 0.1 * MS)


def test_the_runtimes_scheduler_queues_the_drafter_steps():
  """The simulator runs tlt/scheduler.HostScheduler, queue included: with max_in_flight=2 it keeps
  two drafter steps queued on A from 8.5, so when B finishes (20) one step runs (to 20.5) and one
  waits (to 22.5); the preemption completes both. 7 steps, A training 8.5-22.5; bubble (22.5 -
  8.5) + (22.5 - 20) = 16.5 ms."""
  spec = dataclasses.replace(SPEC, max_in_flight=2)
  assert isinstance(Simulation(spec, _costs(), AcceptModel(), TLT_V, 2).scheduler, HostScheduler)
  tlt = simulate_rollout(GROUPS, spec, _costs(), AcceptModel(), TLT_V)
  assert tlt["drafter_steps"] == 7 and tlt["rollout_s"] == pytest.approx(22.5 * MS)
  assert tlt["preempt_wait_s"] == pytest.approx(2.5 * MS) and tlt["bubble_s"] == pytest.approx(16.5 * MS)
  assert tlt["bubble_utilisation"] == pytest.approx(14 / 16.5)

  # Three groups: A (done at its prefill, 2), B (prefill 2-4, a chunk 4-8.5, read at 10.5 after C's
  # prefill 8.5-10.5), C (chunks 10.5-15, 15-19.5, 19.5-24). The first step (10.5) runs on A; once
  # B is idle too the scheduler waits for the queue to drain (12.5) and trains on A and B when
  # their split divides the drafter batch (2), on A alone when it does not (3): 7 steps to 24.5.
  three = [np.array([1]), np.array([5]), np.array([13])]
  for batch, trained in ((2, 14 + 12), (3, 14)):
    r = simulate_rollout(three, dataclasses.replace(SPEC, drafter_batch_size=batch), _costs(), AcceptModel(), TLT_V)
    assert r["drafter_steps"] == 7 and r["rollout_s"] == pytest.approx(24.5 * MS)
    assert r["group_done_s"] == pytest.approx([2 * MS, 10.5 * MS, 24 * MS])
    assert r["bubble_s"] == pytest.approx((22.5 + 14 + 0.5) * MS)
    assert r["drafter_train_s"] == pytest.approx(trained * MS)


def test_compaction_and_copy_out_costs():
  """Rows of 3, 3, 3 and 12 tokens (buckets 1, 2, 4; chunks of 4): prefill 2; chunk 1 (all four
  rows, 4 steps) 4.5; the bucket shrinks 4 -> 1 one level at a time, as the engine does:
  compactions out of 4 rows (0.25) and out of 2 (0.125); chunks 2 and 3 of row D 4.5 + (3 + 0.5);
  the final copy-out 0.125. With features (TLT collects the drafter's data) the copy-out costs
  what copy_out(features=True) says."""

  class Costs(type(_costs())):
    def compact(self, batch, ctx):
      return {4: 0.25, 2: 0.125}[batch] * MS

    def copy_out(self, batch, ctx, features=False):
      assert batch == 1
      return (1.0 if features else 0.125) * MS

  base = {k: v for k, v in vars(_costs()).items()}
  costs = Costs(**base)
  group = [np.array([3, 3, 3, 12])]
  plain = simulate_rollout(group, SPEC, costs, AcceptModel(), PLAIN_V)
  assert plain["rollout_s"] == pytest.approx((2 + 4.5 + 0.375 + 4.5 + 3.5 + 0.125) * MS)
  assert [c.rows for c in plain["chunks"]] == [4, 1, 1]
  tlt = simulate_rollout(group, SPEC, costs, AcceptModel(), TLT_V)
  assert tlt["rollout_s"] == pytest.approx((2 + 4.5 + 0.375 + 4.5 + 3.5 + 1.0) * MS)


def test_shared_cores_serialise():
  """A = [9] (prefill, two chunks), B = [11]: A's prefill 0-2 and first chunk 2-6.5 run alone
  (B's prefill waits for it), B's prefill 6.5-8.5; then A's second chunk and B's first share the
  cores. With no gain they serialise (the rollout is the sum of all work, 11 + 13.5 ms); with a
  gain of 0.5 both run at 0.75 for 6 ms."""
  groups = [np.array([9]), np.array([11])]
  r = simulate_rollout(groups, SPEC, _costs(shared_gain=0.0), AcceptModel(), PLAIN_V)
  assert r["rollout_s"] == pytest.approx((11 + 13.5) * MS)
  assert r["group_done_s"][0] == pytest.approx((8.5 + 9) * MS)
  r = simulate_rollout(groups, SPEC, _costs(shared_gain=0.5), AcceptModel(), PLAIN_V)
  assert r["group_done_s"] == pytest.approx([14.5 * MS, (14.5 + 4.5 + 2.5) * MS])
  # items on at most light_batch rows (here every chunk: one row each) do not contend
  r = simulate_rollout(groups, SPEC, _costs(shared_gain=0.0, light_batch=1), AcceptModel(), PLAIN_V)
  assert r["group_done_s"] == pytest.approx([13 * MS, (13 + 4.5 + 2.5) * MS])
  # a light group beside a heavy one (2 rows): neither slows the other
  r = simulate_rollout([np.array([9]), np.array([11, 11])], SPEC, _costs(shared_gain=0.0, light_batch=1),
                       AcceptModel(), PLAIN_V)
  assert r["group_done_s"] == pytest.approx([13 * MS, (13 + 4.5 + 2.5) * MS])


def test_speculative_chunk_and_bandit_order():
  """One row of 10 tokens (the prefill samples the first), every round emits 3: one chunk of 3
  rounds. With a plain arm first (untried arms go in order): a plain chunk of 4 steps, then 2
  rounds (3, then the last 2)."""
  accept = AcceptModel(samples={"d2k1n2": [3.0]})
  spec = RolloutSpec(chunk_size=4, buckets=(1, 2, 4), spec_threshold=1, prompt_len=8, arms=((2, 1, 2),))
  run = simulate_run([[np.array([10])]], spec, _costs(), accept, STATIC_V)[0]
  assert run["rollout_time_s"] == pytest.approx(2 * MS + 0.5 * MS + 3 * 1.5 * MS)
  assert run["spec_frac"] == 1.0 and run["accept_len"] == pytest.approx(3.0)
  spec2 = RolloutSpec(chunk_size=4, buckets=(1, 2, 4), spec_threshold=1, prompt_len=8,
                      arms=((0, 0, 0), (2, 1, 2)))
  run = simulate_run([[np.array([10])]], spec2, _costs(), accept, STATIC_V)[0]
  assert run["rollout_time_s"] == pytest.approx(2 * MS + (4 * 1 + 0.5) * MS + (0.5 + 2 * 1.5) * MS)
  assert run["spec_frac"] == pytest.approx(5 / 9)


def test_accept_model_mean_and_staleness():
  rng = np.random.default_rng(0)
  m = AcceptModel(alpha=0.6)
  for s in [(3, 1, 3), (4, 2, 6)]:
    draws = m.draw(rng, s, 200_000)
    assert draws.min() >= 1 and draws.max() <= s[0] + 1
    assert draws.mean() == pytest.approx(m.mean(s), rel=0.01)
  stale = AcceptModel(samples={"d2k1n2": [3.0]}, decay=0.5)
  assert stale.mean((2, 1, 2), staleness=1) == pytest.approx(2.0)
  assert stale.draw(rng, (2, 1, 2), 1000, staleness=1).tolist() == [2] * 1000
  # a static drafter ages, TLT's is refreshed by its bubble steps
  accept = AcceptModel(samples={"d2k1n2": [3.0]}, decay=0.5)
  spec = RolloutSpec(chunk_size=4, buckets=(1, 2, 4), spec_threshold=1, prompt_len=8, arms=((2, 1, 2),))
  steps = [[np.array([4]), np.array([31])]] * 3
  static = simulate_run(steps, spec, _costs(), accept, STATIC_V)
  tlt = simulate_run(steps, spec, _costs(), accept, TLT_V)
  assert [r["staleness"] for r in static] == [0, 1, 2]
  assert [r["staleness"] for r in tlt] == [0, 0, 0]
  assert static[2]["accept_len"] < tlt[2]["accept_len"] == pytest.approx(3.0)


def test_between_steps_mode_trains_after_the_update():
  """Shared CPU cores (train_in_bubbles=False): the rollout is plain's, then 3 drafter steps of
  2 ms follow the update, and they keep the drafter fresh."""
  spec = RolloutSpec(chunk_size=4, buckets=(1, 2, 4), spec_threshold=0, prompt_len=8,
                     train_in_bubbles=False, between_steps=3)
  rec = simulate_run([GROUPS], spec, _costs(), AcceptModel(), TLT_V, refresh_steps=3)[0]
  assert rec["rollout_time_s"] == pytest.approx(20 * MS) and rec["bubble_utilisation"] == 0.0
  assert rec["between_steps_train_s"] == pytest.approx(6 * MS) and rec["drafter_steps"] == 3
  assert rec["step_time_s"] == pytest.approx(20 * MS + 3.2 * MS + 6 * MS)


def test_rounds_are_charged_at_the_live_context():
  """A round's context is the prompt + the row's tokens so far (counted once): one row of 10
  tokens after an 8-token prompt, 3 tokens a round. Plain first (untried arms go in order): a
  chunk of 4 steps at the middle of 9..13, then rounds at 8 + 5 = 13 and 8 + 5 + 3 = 16."""
  seen = []

  @dataclasses.dataclass
  class Recording(ConstantCosts):
    def spec_round(self, batch, strategy, ctx):
      seen.append(("round", ctx))
      return super().spec_round(batch, strategy, ctx)

    def decode_step(self, batch, ctx):
      seen.append(("decode", ctx))
      return super().decode_step(batch, ctx)

  accept = AcceptModel(samples={"d2k1n2": [3.0]})
  spec = RolloutSpec(chunk_size=4, buckets=(1, 2, 4), spec_threshold=1, prompt_len=8, arms=((0, 0, 0), (2, 1, 2)))
  base = _costs()
  simulate_run([[np.array([10])]], spec, Recording(**{f.name: getattr(base, f.name)
                                                     for f in dataclasses.fields(base)}), accept, STATIC_V)
  assert seen == [("decode", 9 + 2), ("round", 13), ("round", 16)]
