"""Float comparisons sized to the computation, so that they hold on any CPU.

Two float32 programs that compute the same maths in a different order (a sharded forward and a
single-device one, XLA float32 and a float64 numpy reference, a tree-masked forward and a causal
one, packed and unpacked rows) differ by rounding errors that scale with the MAGNITUDE OF WHAT
WAS SUMMED, not with each output element: an element near zero can carry the error of its
large neighbours. Which order XLA picks depends on the CPU (vector width, thread count), so an
absolute bound that holds on one machine can fail on another.

`assert_close(actual, desired)` therefore checks, elementwise,

    |actual - desired| <= atol + rtol * max|desired|

with the scale taken over the compared array (per leaf for pytrees). The defaults (rtol 2e-5,
atol 1e-6) allow ~170 float32 ulps of the array's largest value: far above reordering noise of
the tiny models here, far below any real bug (a wrong mask, position or weight moves values by
O(1e-2) of the scale or more). Exact equality (`np.testing.assert_array_equal`) is kept only
where both sides run the same program bit for bit, or compare integers (tokens, lengths).
"""

from __future__ import annotations

import jax
import numpy as np

RTOL = 2e-5
ATOL = 1e-6


def max_abs_diff(actual, desired) -> float:
  a = np.asarray(actual, np.float64)
  b = np.asarray(desired, np.float64)
  return float(np.max(np.abs(a - b))) if a.size else 0.0


def assert_close(actual, desired, *, rtol: float = RTOL, atol: float = ATOL, err_msg: str = ""):
  """|actual - desired| <= atol + rtol * max|desired| for every element (and every leaf)."""

  def one(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape} {err_msg}"
    if not a.size:
      return
    scale = float(np.max(np.abs(b)))
    bound = atol + rtol * scale
    diff = np.abs(a - b)
    worst = float(np.max(diff))
    assert worst <= bound, (f"max |actual - desired| = {worst:.3g} > {bound:.3g} = atol {atol:g} + rtol "
                            f"{rtol:g} * scale {scale:.3g} (at index {np.unravel_index(np.argmax(diff), diff.shape)}) "
                            f"{err_msg}")

  jax.tree.map(one, actual, desired)
