"""Metric sinks: JSON lines, TensorBoard event files and PNG plots.

In a multi-process run only process 0 writes them (the records are the same on every host).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Sequence


def writes_outputs() -> bool:
  """Whether this process writes the run's host-side outputs (process 0 of a multi-host run)."""
  import jax
  return jax.process_index() == 0


def _jsonable(v: Any) -> Any:
  if hasattr(v, "item"):
    v = v.item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


class MetricsWriter:
  """Appends one JSON record per call to `<workdir>/<name>.jsonl` and mirrors scalars to
  TensorBoard under `<workdir>/tb/<name>`."""

  def __init__(self, workdir: str, name: str = "metrics", tensorboard: bool = True):
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, f"{name}.jsonl")
    self._tb = None
    self.enabled = writes_outputs()
    if tensorboard and self.enabled:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb", name))

  def truncate_after(self, step: int) -> None:
    """Drops records with step > `step` (a resumed run rewrites them)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    keep = [r for r in read_jsonl(self.path) if r.get("step", 0) <= step]
    with open(self.path, "w") as f:
      for r in keep:
        f.write(json.dumps(r) + "\n")

  def write(self, step: int, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), **{k: _jsonable(v) for k, v in record.items() if k != "step"}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
          self._tb.add_scalar(k, v, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def plot_curves(records: Sequence[dict[str, Any]], keys: Iterable[str], path: str, title: str = "",
                x: str = "step", ncols: int | None = None) -> None:
  """One subplot per key present in the records (`ncols` per row, default all in one row); saved
  as PNG."""
  if not writes_outputs():
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]
  if not keys:
    return
  ncols = min(ncols or len(keys), len(keys))
  nrows = -(-len(keys) // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3.2 * nrows), squeeze=False)
  for ax in axes.flat[len(keys):]:
    ax.axis("off")
  for ax, k in zip(axes.flat, keys):
    pts = [(r[x], r[k]) for r in records if isinstance(r.get(k), (int, float))]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".")
    ax.set_xlabel(x)
    ax.set_title(k)
    ax.grid(alpha=0.3)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)

  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def plot_stacked_bars(records: Sequence[dict[str, Any]], parts: Sequence[tuple[str, str]], path: str,
                      title: str = "", x: str = "step") -> None:
  """One stacked bar per record: the values of `parts` ((key, label) pairs, e.g. the phases of
  a step's time), bottom to top; a missing or non-numeric value counts as 0. Saved as PNG."""
  if not writes_outputs():
    return
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if not records:
    return
  xs = [r.get(x, i) for i, r in enumerate(records)]
  fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(records)), 3.6))
  bottom = [0.0] * len(records)
  for key, label in parts:
    ys = [float(r[key]) if isinstance(r.get(key), (int, float)) else 0.0 for r in records]
    ax.bar(xs, ys, bottom=bottom, label=label, width=0.8)
    bottom = [b + y for b, y in zip(bottom, ys)]
  ax.set_xlabel(x)
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3, axis="y")
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
