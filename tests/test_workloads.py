"""Workload presets: per-prompt medians, the cap, the drift, and their one-line errors."""

import numpy as np
import pytest

from tlt_jax.analysis.workloads import Workload, workload


def test_long_cot_shape():
  w = workload("long_cot")
  x = np.concatenate([w.sample(np.random.default_rng(i), 64, 8) for i in range(40)])
  assert abs(np.median(x) / 3500 - 1) < 0.05
  assert 0.005 < (x == 32768).mean() < 0.03  # about 1 % cut at the cap
  assert x.max() == 32768 and x.min() >= 1


def test_groups_share_their_prompt_median():
  """Within-group spread is below the total: rows of one prompt are correlated."""
  w = Workload("t", median=1000.0, sigma=1.0, cap=10**9, prompt_share=0.8)
  x = np.log(w.sample(np.random.default_rng(0), 400, 8).reshape(400, 8))
  within = x.std(axis=1, ddof=1).mean()
  assert within == pytest.approx(w.within_sigma, rel=0.15) and w.within_sigma < 0.5
  assert x.mean(axis=1).std() == pytest.approx(np.sqrt(w.prompt_sigma**2 + w.within_sigma**2 / 8), rel=0.15)


def test_drift_and_errors():
  w = workload("base8k", drift=1.1)
  assert w.median_at(10) == pytest.approx(1500 * 1.1**10)
  a = w.sample(np.random.default_rng(0), 64, 8, step=0)
  b = w.sample(np.random.default_rng(0), 64, 8, step=10)
  assert np.median(b) > 2 * np.median(a)
  with pytest.raises(ValueError, match="not known"):
    workload("nope")
  with pytest.raises(ValueError, match="median > 0"):
    Workload("bad", median=-1.0, sigma=1.0, cap=10)
