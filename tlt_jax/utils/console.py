"""What a run prints: one progress bar per stage and one compact line per logged record.

The full records go to the stage's JSONL and TensorBoard (utils/metrics.py); the console gets
`compact(stage, record)`: the step and a few rounded figures on one line, written above the
stage's bar (`tqdm.write`) so that the bar stays at the bottom.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Iterable, Mapping

from tqdm import tqdm


def fmt(value: Any) -> str:
  """A figure rounded for reading: 4 significant digits, ints as they are."""
  if isinstance(value, bool) or value is None:
    return str(value)
  if isinstance(value, int):
    return str(value)
  if isinstance(value, float):
    if not math.isfinite(value):
      return str(value)
    if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
      return f"{value:.3g}"
    return f"{value:.4g}"
  return str(value)


def compact(stage: str, record: Mapping[str, Any], keys: Iterable[str] | None = None,
            total: int | None = None) -> str:
  """'sft  step 25/250  loss 1.234  token_acc 0.8123': the record's step and `keys` (default:
  every scalar), rounded."""
  step = record.get("step")
  head = f"{stage:<8s}" + (f" step {step}" + (f"/{total}" if total else "") if step is not None else "")
  keys = [k for k in (keys if keys is not None else record) if k != "step" and k in record]
  parts = [f"{k} {fmt(record[k])}" for k in keys
           if isinstance(record[k], (int, float, str)) or record[k] is None]
  return "  ".join([head, *parts])


def progress(total: int, desc: str, initial: int = 0, leave: bool = True, unit: str = "step") -> tqdm:
  """The stage's progress bar (stderr), with the same look in every stage."""
  return tqdm(total=total, initial=min(initial, total), desc=desc, dynamic_ncols=True, leave=leave,
              unit=unit, mininterval=0.5)


def track(iterable: Iterable, desc: str, unit: str = "it", total: int | None = None):
  """Iterates `iterable` under a transient progress bar (a sub-stage: features, evaluation)."""
  return tqdm(iterable, desc=desc, unit=unit, total=total, dynamic_ncols=True, leave=False,
              mininterval=0.5)


def say(line: str) -> None:
  """Prints a line without breaking an active progress bar."""
  tqdm.write(line)


class _TqdmHandler(logging.Handler):
  """Log records as `LEVEL name: message` lines written above any active progress bar."""

  def emit(self, record: logging.LogRecord) -> None:
    try:
      level = "" if record.levelno == logging.INFO else f"{record.levelname} "
      tqdm.write(f"{level}{record.name}: {record.getMessage()}")
    except Exception:  # noqa: BLE001 - logging must never raise
      self.handleError(record)


def setup_logging(level: int = logging.INFO) -> None:
  """One console handler: this package's INFO and up, other libraries' WARNING and up; absl's
  own handler (which would print every record a second time) is removed."""
  root = logging.getLogger()
  for handler in list(root.handlers):
    root.removeHandler(handler)
  try:
    from absl import logging as absl_logging
    absl_handler = absl_logging.get_absl_handler()
    root.removeHandler(absl_handler)
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass
  root.addHandler(_TqdmHandler())
  root.setLevel(logging.WARNING)
  logging.getLogger("tlt_jax").setLevel(level)
  logging.getLogger("experiments").setLevel(level)


def summary_line(summary: Mapping[str, Any]) -> str:
  """The run's result in one line: stage times, RL reward and accuracy, where the outputs are."""
  parts = [f"done in {fmt(summary.get('total_time_s', 0.0))} s"]
  for stage in ("sft", "drafter", "rl"):
    if f"{stage}_time_s" in summary:
      parts.append(f"{stage} {summary[f'{stage}_time_s']:.0f} s")
  rl = summary.get("rl") or {}
  if "reward_first5" in rl:
    parts.append(f"reward {fmt(rl['reward_first5'])} -> {fmt(rl['reward_last5'])} (first/last 5 steps)")
  if "final_eval" in rl:
    parts.append(f"greedy accuracy {fmt(rl['final_eval'].get('accuracy'))}")
  parts.append(f"summary in {summary.get('workdir', '.')}/summary.json")
  return "; ".join(parts)
