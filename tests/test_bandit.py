"""BEG-MAB strategy bandit on a synthetic, noisy reward table."""

import json

import numpy as np
import pytest

from tlt_jax.tlt.bandit import BegMab

ARMS = [(2, 1, 2), (4, 2, 4), (6, 4, 8)]
BUCKETS = (1, 4, 16)
# Tokens/s of each arm per bucket: deep trees win at tiny batches, shallow ones at larger ones.
TABLE = {1: [100.0, 150.0, 220.0], 4: [300.0, 420.0, 380.0], 16: [900.0, 700.0, 500.0]}


def play(bandit, table, rounds, noise_rng, record=None):
  """Runs `rounds` select/update steps per bucket with 10% multiplicative noise."""
  for _ in range(rounds):
    for b in BUCKETS:
      arm = bandit.select(b)
      tokens_per_s = table[b][ARMS.index(arm)] * (1 + 0.1 * noise_rng.standard_normal())
      # Split the per-row score into its factors: accept_len / time.
      accept_len, time_s = 2.0, 2.0 * b / tokens_per_s
      bandit.update(b, arm, accept_len, time_s)
      if record is not None:
        record.append((b, arm))


def test_tries_every_arm_first_then_converges_per_bucket():
  bandit = BegMab(ARMS, BUCKETS, epsilon=0.1, window=16, seed=0)
  record = []
  play(bandit, TABLE, len(ARMS), np.random.default_rng(1), record)
  for b in BUCKETS:
    assert [arm for bb, arm in record if bb == b] == ARMS  # untried first, in order
  record = []
  play(bandit, TABLE, 400, np.random.default_rng(2), record)
  for b in BUCKETS:
    best = ARMS[int(np.argmax(TABLE[b]))]
    assert bandit.best(b) == best
    picks = [arm for bb, arm in record[-300 * len(BUCKETS):] if bb == b]
    share = picks.count(best) / len(picks)
    assert 0.85 < share < 0.99, (b, share)  # greedy most of the time, still exploring
    assert all(n > 0 for n in (bandit.summary()[str(b)][f"{d}-{k}-{n}"]["pulls"]
                               for d, k, n in ARMS))


def test_min_samples_round_robin_before_greedy():
  """Every arm gets min_samples scores (round robin, in order) before the greedy choice: one
  unlucky first score (here the best arm's) does not shut an arm out."""
  bandit = BegMab(ARMS, (1,), epsilon=0.0, window=8, seed=0, min_samples=3)
  rates = {ARMS[0]: 100.0, ARMS[1]: 150.0, ARMS[2]: 120.0}
  picks = []
  for i in range(12):
    arm = bandit.select(1)
    picks.append(arm)
    unlucky = arm == ARMS[1] and i < len(ARMS)  # the best arm's first chunk was slow
    bandit.update(1, arm, 1.0, 1.0 / (rates[arm] * (0.2 if unlucky else 1.0)))
  assert picks[:9] == ARMS * 3
  assert picks[9:] == [ARMS[1]] * 3  # median of (30, 150, 150) beats 100 and 120
  assert BegMab(ARMS, (1,), window=2, min_samples=5).min_samples == 2  # capped at the window
  with pytest.raises(ValueError, match="min_samples"):
    BegMab(ARMS, (1,), min_samples=0)


def test_exploration_in_proportion_to_score():
  """Exploring an arm at r x the best happens at about epsilon / K x r: a hopeless arm is rarely
  paid for, a close one still often checked (uniform exploration: epsilon / K each)."""
  arms = [(0, 0, 0), (2, 1, 2), (4, 1, 4)]
  rates = [100.0, 90.0, 20.0]
  bandit = BegMab(arms, (1,), epsilon=0.3, window=8, seed=5)
  noise = np.random.default_rng(6)
  picks = []
  for _ in range(6000):
    arm = bandit.select(1)
    picks.append(arms.index(arm))
    bandit.update(1, arm, 1.0, 1.0 / (rates[arms.index(arm)] * (1 + 0.02 * noise.standard_normal())))
  share = np.bincount(picks[100:], minlength=3) / len(picks[100:])
  assert share[2] == pytest.approx(0.3 / 3 * 0.2, abs=0.01), share  # uniform would be 0.1
  assert share[1] == pytest.approx(0.3 / 3 * 0.9, abs=0.02), share
  assert bandit.best(1) == arms[0]


def test_plain_wins_within_its_margin():
  """A speculative arm must beat plain decoding by more than plain_margin to be chosen."""
  arms = [(0, 0, 0), (3, 1, 3)]
  for spec_rate, expect in [(103.0, (0, 0, 0)), (110.0, (3, 1, 3)), (90.0, (0, 0, 0))]:
    bandit = BegMab(arms, (1,), epsilon=0.0, window=4, seed=0)
    for arm, rate in zip(arms, [100.0, spec_rate]):
      for _ in range(4):
        bandit.update(1, arm, 1.0, 1.0 / rate)
    assert bandit.best(1) == expect and bandit.select(1) == expect, spec_rate
  # without a plain arm, the plain margin does not apply
  bandit = BegMab([(2, 1, 2), (3, 1, 3)], (1,), epsilon=0.0, window=4)
  bandit.update(1, (2, 1, 2), 1.0, 1 / 100.0)
  bandit.update(1, (3, 1, 3), 1.0, 1 / 103.0)
  assert bandit.best(1) == (3, 1, 3)


def test_bucketing():
  bandit = BegMab(ARMS, BUCKETS)
  assert [bandit.bucket(n) for n in (1, 2, 4, 5, 16, 40)] == [1, 4, 4, 16, 16, 16]
  with pytest.raises(ValueError):
    bandit.bucket(0)
  with pytest.raises(ValueError, match="not one of bucket"):
    bandit.update(3, (9, 9, 9), 1.0, 1.0)


def test_window_forgets_when_table_changes():
  changed = {b: list(reversed(row)) for b, row in TABLE.items()}

  def run(window):
    bandit = BegMab(ARMS, BUCKETS, epsilon=0.1, window=window, seed=3)
    noise = np.random.default_rng(4)
    play(bandit, TABLE, 1000, noise)
    play(bandit, changed, 400, noise)
    return bandit

  short = run(window=8)
  for b in BUCKETS:
    assert short.best(b) == ARMS[int(np.argmax(changed[b]))]
  # Without forgetting, the old winner's long history keeps it on top in the bucket where
  # the winner changed (bucket 1: arm 2 was best, now arm 0 is).
  unbounded = run(window=100_000)
  assert unbounded.best(1) == ARMS[2]


def test_state_round_trip_is_exact():
  bandit = BegMab({1: ARMS, 4: ARMS[:2], 16: ARMS}, BUCKETS, epsilon=0.3, window=5, seed=7)
  play(bandit, {1: TABLE[1], 4: TABLE[4][:2], 16: TABLE[16]}, 20, np.random.default_rng(5))
  saved = json.loads(json.dumps(bandit.state_dict()))
  restored = BegMab({1: ARMS, 4: ARMS[:2], 16: ARMS}, BUCKETS, epsilon=0.3, window=5, seed=99)
  restored.load_state_dict(saved)
  assert restored.state_dict() == bandit.state_dict()
  table = {1: TABLE[1], 4: TABLE[4][:2], 16: TABLE[16]}
  a, b = [], []
  play(bandit, table, 30, np.random.default_rng(6), a)
  play(restored, table, 30, np.random.default_rng(6), b)
  assert a == b and restored.state_dict() == bandit.state_dict()
  with pytest.raises(ValueError, match="saved strategies"):
    BegMab(ARMS, BUCKETS).load_state_dict(saved)


def test_arm_ladder_gives_more_verify_tokens_at_small_batches():
  """The paper's ladder: 48/32/16/8 verified tokens from batch 1, 2, 5, 21; plain in every bucket."""
  from tlt_jax.tlt.bandit import PLAIN, BegMab, arm_ladder
  arms = [(8, 4, 8), (8, 4, 48), (8, 4, 16), (8, 4, 32), PLAIN]
  ladder = arm_ladder(arms, (1, 2, 4, 8, 16, 32), (1, 2, 5, 21))
  assert {b: [a[2] for a in v if a != PLAIN] for b, v in ladder.items()} == {
      1: [48], 2: [32], 4: [32], 8: [16], 16: [16], 32: [8]}
  assert all(v[-1] == PLAIN for v in ladder.values())
  bandit = BegMab(ladder, buckets=(1, 2, 4, 8, 16, 32), seed=0)
  seen = set()
  for _ in range(2):  # round robin over the bucket's two arms
    seen.add(bandit.select(1))
    bandit.update(1, bandit.select(1), 1.0, 1.0)
  assert seen == {(8, 4, 48), PLAIN}
  assert bandit.select(32) == (8, 4, 8)
  for bad in [(1, 2, 5), (2, 3, 5, 21), (1, 5, 2, 21)]:
    with pytest.raises(ValueError, match="arm ladder thresholds"):
      arm_ladder(arms, (1, 2), bad)
