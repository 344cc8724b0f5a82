"""Quality of a synthetic dataset, from its samples (Bansal et al. 2024, sec. 2).

For one problem with n samples, c of them answer-correct, c_u copies of each distinct correct
solution text u:

  coverage@k   P(at least one correct among k samples drawn without replacement from the n)
               = 1 - C(n - c, k) / C(n, k)                      (unbiased pass@k, Chen et al. 2021)
  diversity@k  E[number of distinct correct solutions among the k]
               = sum_u 1 - C(n - c_u, k) / C(n, k)
  FPR@k        among the answer-correct samples of the first k of each problem, the share with a
               wrong step (pooled over problems); exact when the task checks every step
               (`Task.check_trace`), None when it cannot check steps.

Both expectations equal the mean over all k-subsets of the samples (a test checks it by brute
force); each is averaged over problems.
"""

from __future__ import annotations

import math
from typing import Sequence

from tlt_jax.synth.sampling import Sample, group_by_problem


def _miss(n: int, bad: int, k: int) -> float:
  """C(bad, k) / C(n, k): the chance that k of n samples all avoid n - bad marked ones."""
  return math.comb(bad, k) / math.comb(n, k) if bad >= k else 0.0


def _check_k(per_problem: Sequence[Sequence[Sample]], k: int) -> None:
  short = min(len(s) for s in per_problem)
  if not 1 <= k <= short:
    raise ValueError(f"k={k} is not allowed; allowed: 1 <= k <= {short} (the fewest samples of a problem)")


def coverage_at_k(per_problem: Sequence[Sequence[Sample]], k: int) -> float:
  """Mean over problems of 1 - C(n - c, k) / C(n, k) (module docstring)."""
  _check_k(per_problem, k)
  total = 0.0
  for samples in per_problem:
    n, c = len(samples), sum(s.answer_correct for s in samples)
    total += 1.0 - _miss(n, n - c, k)
  return total / len(per_problem)


def diversity_at_k(per_problem: Sequence[Sequence[Sample]], k: int) -> float:
  """Mean over problems of the expected number of distinct correct solutions among k samples."""
  _check_k(per_problem, k)
  total = 0.0
  for samples in per_problem:
    n = len(samples)
    copies: dict[str, int] = {}
    for s in samples:
      if s.answer_correct:
        copies[s.text] = copies.get(s.text, 0) + 1
    total += sum(1.0 - _miss(n, n - c_u, k) for c_u in copies.values())
  return total / len(per_problem)


def false_positive_rate(per_problem: Sequence[Sequence[Sample]], k: int | None = None) -> float | None:
  """Answer-correct samples with a wrong step / answer-correct samples, over the first k samples
  of each problem (all with k=None). None when no sample is answer-correct or steps are not
  checkable (steps_correct None)."""
  correct = [s for samples in per_problem for s in (samples if k is None else samples[:k]) if s.answer_correct]
  if not correct or any(s.steps_correct is None for s in correct):
    return None
  return sum(not s.steps_correct for s in correct) / len(correct)


def data_metrics(samples: Sequence[Sample], k: int) -> dict:
  """Coverage, diversity and FPR at k (the first k samples of each problem for FPR, the data a
  budget of k samples gives), with the correct-sample and dataset counts and the FLOPs spent."""
  per_problem = group_by_problem(samples)
  first = [s[:k] for s in per_problem]
  return {"k": k, "problems": len(per_problem), "coverage": coverage_at_k(per_problem, k),
          "diversity": diversity_at_k(per_problem, k), "fpr": false_positive_rate(per_problem, k),
          "correct_samples": sum(s.answer_correct for p in first for s in p),
          "flops_per_problem": sum(s.flops for p in first for s in p) / len(per_problem)}


def metric_curves(samples: Sequence[Sample], ks: Sequence[int]) -> list[dict]:
  """`data_metrics` at each k of `ks` (a curve over k)."""
  return [data_metrics(samples, k) for k in ks]


def metric_curves_of(samples: Sequence[Sample]) -> list[dict]:
  """`data_metrics` at every k from 1 to the fewest samples of a problem."""
  return metric_curves(samples, range(1, min(len(p) for p in group_by_problem(samples)) + 1))
