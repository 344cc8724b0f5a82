"""BEG-MAB: the bucketed epsilon-greedy bandit that picks TLT's speculative-decoding strategy.

A strategy is a draft-tree shape `(depth, topk, num_verify)`. Which one is fastest depends on
the batch (a large batch leaves less compute for verifying big trees) and drifts as the drafter
and the policy change. So the bandit keeps, per bucket of the rows a chunk computes (the rollout
state's rows: with compaction, the active batch's bucket; without, the whole batch, finished rows
included, since they are computed all the same), a sliding window of the last W scores of every
strategy,

  score = accept_len / time_s      (tokens per live row per second),

the paper's accept_len * batch / time_s divided by the batch: how fast a live row advances. At a
given batch the throughput is batch x score, so the best arm is the same, but a bucket holds
chunks of several live batch sizes (rows finish), and per-row scores from 3 and from 4 live rows
of a 4-row state are comparable where totals are not (an arm scored mostly at 3 would lose to
one scored at 4 for no reason of its own). Rows that finish inside a step cost every arm alike
afterwards, so they count by the rounds they were live (accept_len = tokens / live row-rounds).

and picks, per bucket: every strategy until it has `min_samples` (3) scores (round robin, in the
order given), then the one with the
highest window MEDIAN (the median shrugs off a slow step from a compile or a hiccup; the window
forgets a drafter that has since improved), except that with probability epsilon it explores: a
uniformly drawn strategy, kept with probability (its median / the best median) and otherwise
replaced by the best. Exploring in proportion to the score keeps every arm's statistics fresh
while a hopeless arm (e.g. deep speculation at a batch where verifying costs several plain steps)
is rarely paid for: exploring an arm at r x the best costs at most epsilon x r x (1 - r) <=
epsilon / 4 of the throughput, instead of epsilon x (1 - r). When plain decoding (PLAIN) is one
of the arms, a speculative arm counts as the best only if its median beats plain's by more than
`plain_margin` (5 %): within the timing noise the safe arm wins, so the adaptive engine is not
slower than plain decoding where speculation does not pay. Hu et al. (2025), "Taming the Long Tail: Efficient Reasoning RL Training with
Adaptive Drafter" (TLT), the BEG-MAB selector.

Host-side and stateful by nature; `state_dict()` is JSON-serialisable, RNG included, so that a
checkpoint restores it exactly.
"""

from __future__ import annotations

import bisect
import collections
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tlt_jax.rollout.strategy import PLAIN

Strategy = tuple[int, int, int]  # (depth, topk, num_verify)

STATE_VERSION = 1




def _as_strategy(s: Sequence[int]) -> Strategy:
  s = tuple(s)
  if s == PLAIN:
    return PLAIN
  if len(s) != 3 or any(int(v) != v or v < 1 for v in s):
    raise ValueError(f"strategy {s!r} must be three positive ints (depth, topk, num_verify), or "
                     f"{PLAIN} for plain decoding")
  return tuple(int(v) for v in s)  # type: ignore[return-value]


def _rng_state_to_json(state: Mapping[str, Any]) -> dict[str, Any]:
  """numpy bit-generator state with its (up to 128-bit) ints written as decimal strings."""

  def convert(x):
    if isinstance(x, Mapping):
      return {k: convert(v) for k, v in x.items()}
    if isinstance(x, (int, np.integer)) and not isinstance(x, bool):
      return {"int": str(int(x))}
    return x

  return convert(state)


def _rng_state_from_json(state: Mapping[str, Any]) -> dict[str, Any]:

  def convert(x):
    if isinstance(x, Mapping):
      if set(x) == {"int"}:
        return int(x["int"])
      return {k: convert(v) for k, v in x.items()}
    return x

  return convert(state)


def arm_ladder(strategies: Sequence[Sequence[int]], buckets: Sequence[int],
               thresholds: Sequence[int]) -> dict[int, list[Strategy]]:
  """Per-bucket arms that verify more tokens at small batches and fewer at large ones, PLAIN in
  every bucket (TLT's bucketed BEG-MAB, github.com/mit-han-lab/fastrl
  third-party/sglang/python/sglang/srt/speculative/eagle_mab.py, BucketedEpsilonGreedyMAB: its
  arms grouped by verified tokens, most first, the group i serving batches from thresholds[i] up
  to thresholds[i+1] - 1; the released defaults are 48/32/16/8 tokens at thresholds 1, 2, 5, 21).

  `strategies`' speculative arms are grouped by num_verify (most first); there must be one
  threshold per group, strictly increasing from 1. A bucket (an upper bound of rows) takes the
  group of the last threshold <= it. Returns {bucket: [that group's arms..., PLAIN]}."""
  spec = [_as_strategy(s) for s in strategies if tuple(s) != PLAIN]
  tiers = sorted({s[2] for s in spec}, reverse=True)
  th = [int(t) for t in thresholds]
  if not th or th[0] != 1 or any(b <= a for a, b in zip(th, th[1:])) or len(th) != len(tiers):
    raise ValueError(f"arm ladder thresholds {tuple(thresholds)}: need {len(tiers)} strictly increasing "
                     f"batch sizes starting at 1, one per num_verify group {tiers} of the arms")
  out = {}
  for b in buckets:
    tier = tiers[bisect.bisect_right(th, int(b)) - 1]
    out[int(b)] = [s for s in spec if s[2] == tier] + [PLAIN]
  return out


class BegMab:
  """Per-bucket epsilon-greedy over the sliding-window median of `accept_len / time`.

  Args:
    strategies: the (depth, topk, num_verify) strategies, shared by all buckets, or a mapping
      bucket upper bound -> that bucket's strategies.
    buckets: sorted batch-size upper bounds, e.g. (1, 2, 4, 8, 16, 32, 64). A batch size b falls
      in the first bucket with b <= bound; one above the last bound in the last bucket.
    epsilon: exploration probability once every strategy of the bucket has been tried.
    window: how many recent scores per (bucket, strategy) the median is taken over.
    seed: seed of the bandit's own numpy Generator (saved in `state_dict`).
    plain_margin: how much a speculative arm's median must beat PLAIN's (when PLAIN is an arm) to
      be the greedy choice.
    min_samples: scores every strategy of a bucket gets before the greedy choice starts: a median
      of one noisy chunk could shut a faster arm out for long, epsilon being its only way back.
  """

  def __init__(self, strategies: Sequence[Sequence[int]] | Mapping[int, Sequence[Sequence[int]]],
               buckets: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), epsilon: float = 0.1,
               window: int = 16, seed: int = 0, plain_margin: float = 0.05, min_samples: int = 3):
    buckets = tuple(int(b) for b in buckets)
    if not buckets or any(b < 1 for b in buckets) or list(buckets) != sorted(set(buckets)):
      raise ValueError(f"buckets={buckets!r}; must be strictly increasing positive ints")
    if not 0.0 <= epsilon <= 1.0:
      raise ValueError(f"epsilon={epsilon!r}; must be in [0, 1]")
    if int(window) < 1:
      raise ValueError(f"window={window!r}; must be >= 1")
    if int(min_samples) < 1:
      raise ValueError(f"min_samples={min_samples!r}; must be >= 1")
    self.min_samples = min(int(min_samples), int(window))  # a window holds at most `window` scores
    if not float(plain_margin) >= 0.0:
      raise ValueError(f"plain_margin={plain_margin!r}; must be >= 0")
    self.plain_margin = float(plain_margin)
    if isinstance(strategies, Mapping):
      if set(int(b) for b in strategies) != set(buckets):
        raise ValueError(f"strategies are given for buckets {sorted(strategies)}, "
                         f"but buckets={buckets}")
      per_bucket = {int(b): strategies[b] for b in strategies}
    else:
      per_bucket = {b: strategies for b in buckets}
    self.buckets = buckets
    self.epsilon = float(epsilon)
    self.window = int(window)
    self.strategies: dict[int, list[Strategy]] = {}
    for b in buckets:
      arms = [_as_strategy(s) for s in per_bucket[b]]
      if not arms or len(set(arms)) != len(arms):
        raise ValueError(f"bucket {b}: strategies {arms} must be non-empty and distinct")
      self.strategies[b] = arms
    self._scores = {b: [collections.deque(maxlen=self.window) for _ in self.strategies[b]]
                    for b in buckets}
    self._pulls = {b: [0] * len(self.strategies[b]) for b in buckets}
    self._rng = np.random.default_rng(seed)

  # --- selection -------------------------------------------------------------------------

  def bucket(self, batch_size: int) -> int:
    """The upper bound of the bucket that `batch_size` falls in."""
    if int(batch_size) < 1:
      raise ValueError(f"batch_size={batch_size!r}; must be >= 1")
    i = bisect.bisect_left(self.buckets, int(batch_size))
    return self.buckets[min(i, len(self.buckets) - 1)]

  def medians(self, batch_size: int) -> list[float]:
    """Window median score of each strategy of the bucket (nan while untried)."""
    b = self.bucket(batch_size)
    return [float(np.median(w)) if w else float("nan") for w in self._scores[b]]

  def best(self, batch_size: int) -> Strategy | None:
    """The greedy choice: highest window median among tried strategies (first one on ties); PLAIN
    unless the best speculative arm beats it by more than `plain_margin`."""
    b = self.bucket(batch_size)
    medians = self.medians(b)
    arms = self.strategies[b]
    tried = [i for i, m in enumerate(medians) if not np.isnan(m)]
    if not tried:
      return None
    top = max(tried, key=lambda i: medians[i])
    if PLAIN in arms and arms[top] != PLAIN:
      p = arms.index(PLAIN)
      if p in tried and medians[top] <= medians[p] * (1.0 + self.plain_margin):
        return PLAIN
    return arms[top]

  def select(self, batch_size: int, rng: np.random.Generator | None = None) -> Strategy:
    """Strategies with fewer than `min_samples` scores first (round robin, in order), then greedy
    over window medians, exploring with
    probability epsilon in proportion to the score (module docstring).

    Draws from the bandit's own Generator unless `rng` is given.
    """
    b = self.bucket(batch_size)
    arms = self.strategies[b]
    counts = [len(w) for w in self._scores[b]]
    if min(counts) < self.min_samples:  # round robin over the arms short of min_samples scores
      return arms[counts.index(min(counts))]
    rng = self._rng if rng is None else rng
    best = self.best(b)
    assert best is not None
    if rng.random() < self.epsilon:
      i = int(rng.integers(len(arms)))
      medians = self.medians(b)
      top = medians[arms.index(best)]
      if arms[i] == best or (top > 0 and rng.random() < medians[i] / top):
        return arms[i]
    return best

  # --- feedback --------------------------------------------------------------------------

  def update(self, batch_size: int, strategy: Sequence[int], accept_len: float, time_s: float) -> float:
    """Records score = accept_len / time_s for `strategy` in batch_size's bucket.

    accept_len: tokens committed per live row per step (1 for PLAIN); time_s: a step's wall time.
    Returns the score.
    """
    if not time_s > 0:
      raise ValueError(f"time_s={time_s!r}; must be > 0")
    if accept_len < 0:
      raise ValueError(f"accept_len={accept_len!r} must be >= 0")
    b = self.bucket(batch_size)
    s = _as_strategy(strategy)
    if s not in self.strategies[b]:
      raise ValueError(f"strategy {s} is not one of bucket {b}'s strategies {self.strategies[b]}")
    i = self.strategies[b].index(s)
    score = float(accept_len) / float(time_s)
    self._scores[b][i].append(score)
    self._pulls[b][i] += 1
    return score

  def summary(self) -> dict[str, Any]:
    """For logging: per bucket, each strategy's pulls and window median."""
    out = {}
    for b in self.buckets:
      medians = self.medians(b)
      out[str(b)] = {"-".join(map(str, s)): {"pulls": self._pulls[b][i], "median": medians[i]}
                     for i, s in enumerate(self.strategies[b])}
    return out

  # --- checkpointing ---------------------------------------------------------------------

  def state_dict(self) -> dict[str, Any]:
    """JSON-serialisable state: config it was built with, windows, pull counts and RNG state."""
    return {
        "version": STATE_VERSION,
        "buckets": list(self.buckets),
        "epsilon": self.epsilon,
        "window": self.window,
        "per_bucket": {
            str(b): {"strategies": [list(s) for s in self.strategies[b]],
                     "scores": [list(w) for w in self._scores[b]],
                     "pulls": list(self._pulls[b])}
            for b in self.buckets
        },
        "rng": _rng_state_to_json(self._rng.bit_generator.state),
    }

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    """Restores a `state_dict()`. Buckets and strategies must match this bandit's; epsilon and
    the window length come from this bandit (a window shorter than the saved one keeps the most
    recent scores)."""
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"bandit state version {state.get('version')!r}; expected {STATE_VERSION}")
    if tuple(state["buckets"]) != self.buckets:
      raise ValueError(f"saved buckets {state['buckets']} != this bandit's {self.buckets}")
    for b in self.buckets:
      saved = state["per_bucket"][str(b)]
      saved_arms = [tuple(s) for s in saved["strategies"]]
      if saved_arms != self.strategies[b]:
        raise ValueError(f"bucket {b}: saved strategies {saved_arms} != {self.strategies[b]}")
    for b in self.buckets:
      saved = state["per_bucket"][str(b)]
      self._scores[b] = [collections.deque((float(x) for x in w), maxlen=self.window)
                         for w in saved["scores"]]
      self._pulls[b] = [int(n) for n in saved["pulls"]]
    rng_state = _rng_state_from_json(state["rng"])
    rng = np.random.Generator(getattr(np.random, rng_state["bit_generator"])())
    rng.bit_generator.state = rng_state
    self._rng = rng
