"""Typed results of a rollout: what a session, the scheduler and the RL stages hand each other.

`ChunkRecord` is one decoding chunk, `RolloutStats` the statistics of one result, with one merge
(`merge_stats`) for a step's rollout groups and for its rollout rounds. Records are frozen; each
also answers `record["field"]` by its field name (the names the metrics JSONL, the replay traces
and the plots use), read-only.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np


class _ByName:
  """Read-only access by field name: `record["tokens"]` is `record.tokens`."""

  def __getitem__(self, key: str) -> Any:
    if not isinstance(key, str) or key.startswith("_") or not hasattr(self, key):
      raise KeyError(key)
    return getattr(self, key)


@dataclasses.dataclass(frozen=True)
class ChunkRecord(_ByName):
  """One decoding chunk of a session: `batch` live rows when dispatched, `rows` the state's rows
  it computed (the bucket), `strategy` the name of its speculative strategy (None: plain),
  `tokens` committed, `rounds` (steps, or speculative rounds), `row_rounds` (live row-rounds),
  `time_s` from dispatch to the host reading its statistics, `cold` (its program compiled inside
  it), `group` (the rollout group, once merged)."""

  batch: int
  rows: int
  strategy: str | None
  tokens: int
  rounds: int
  row_rounds: int
  time_s: float
  cold: bool = False
  group: int = 0

  @property
  def accept_len(self) -> float:
    """Tokens per live row per round."""
    return self.tokens / max(self.row_rounds, 1)

  @property
  def speculative(self) -> bool:
    return self.strategy is not None


@dataclasses.dataclass(frozen=True)
class RolloutStats(_ByName):
  """Statistics of a rollout result: seconds per phase (`time_s`: prefill, decode, speculative,
  compact; group-seconds once merged), tokens generated, every chunk, and the active-batch trace
  (a session's: live rows per chunk; merged: one trace per part)."""

  time_s: Mapping[str, float]
  num_tokens: int
  chunks: tuple[ChunkRecord, ...] = ()
  active_trace: tuple = ()

  @property
  def spec_chunks(self) -> tuple[ChunkRecord, ...]:
    return tuple(c for c in self.chunks if c.speculative)

  @property
  def spec_accept_len(self) -> float | None:
    """Tokens per live row-round over every speculative chunk (None: none ran)."""
    spec = self.spec_chunks
    row_rounds = sum(c.row_rounds for c in spec)
    return sum(c.tokens for c in spec) / row_rounds if row_rounds else None

  def tail(self, threshold: int) -> tuple[ChunkRecord, ...]:
    """The chunks dispatched at an active batch <= `threshold` (where speculation may run)."""
    return tuple(c for c in self.chunks if c.batch <= threshold)


@dataclasses.dataclass(frozen=True)
class RolloutResult:
  """Generated tokens [N, M] (PAD after the end), lengths [N], float32 logprobs [N, M], finished
  flags (EOS reached) [N], and statistics."""

  tokens: np.ndarray
  lengths: np.ndarray
  logprobs: np.ndarray
  finished: np.ndarray
  stats: RolloutStats


def merge_stats(stats: Sequence[RolloutStats], *, tag_groups: bool = False,
                num_tokens: int | None = None) -> RolloutStats:
  """The statistics of several results (a step's rollout groups, or its rollout rounds) as one:
  times per phase summed (group-seconds, not wall), tokens summed (or `num_tokens`), chunks
  pooled (each tagged with its `group` index with `tag_groups`), and the parts' active-batch
  traces side by side (a merged part contributes each of its own)."""
  times: dict[str, float] = {}
  for st in stats:
    for k, v in st.time_s.items():
      times[k] = times.get(k, 0.0) + float(v)
  chunks = tuple(dataclasses.replace(c, group=g) if tag_groups else c
                 for g, st in enumerate(stats) for c in st.chunks)
  traces: list = []
  for st in stats:
    nested = bool(st.active_trace) and not isinstance(st.active_trace[0], (int, np.integer))
    traces.extend(st.active_trace if nested else [st.active_trace])
  total = sum(int(st.num_tokens) for st in stats) if num_tokens is None else int(num_tokens)
  return RolloutStats(time_s=times, num_tokens=total, chunks=chunks, active_trace=tuple(traces))


# ------------------------------------------------------------------------------ the step's account


@dataclasses.dataclass(frozen=True)
class GroupAccount(_ByName):
  """One rollout group's time during a rollout (host clock, seconds): decoding, training the
  drafter, idle (decode + train + idle = the rollout's wall time), its bubble (idle time before
  training filled it: from its finish to the rollout's end), its finish, and the host's timings
  (its session's start and first dispatch from the rollout's start, time inside `advance()`)."""

  decode_s: float
  train_s: float
  idle_s: float
  bubble_s: float
  done_s: float
  start_s: float = 0.0
  first_dispatch_s: float = 0.0
  host_s: float = 0.0


def _mean(values) -> float | None:
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


@dataclasses.dataclass(frozen=True)
class StepAccount(_ByName):
  """The scheduler's account of a rollout (or of a step's rollout rounds, `merge_accounts`):
  group-seconds per phase summed over the groups, the bubble and the share training filled, the
  preemption wait (the last group's finish to the rollout's end), the drafter steps completed,
  the published version at the end and the versions the speculative chunks used, the drafter's
  mean loss / accuracy over its steps, each group's own account (the last round's) and the rows
  whose features went to the drafter buffer."""

  wall_s: float
  groups: tuple[GroupAccount, ...]
  decode_s: float
  train_s: float
  idle_s: float
  bubble_s: float
  preempt_wait_s: float
  drafter_steps: int
  drafter_version: int | None = None
  drafter_versions_used: tuple[int, ...] = ()
  drafter_loss: float | None = None
  drafter_accuracy: float | None = None
  buffered_rows: np.ndarray | None = None

  @property
  def num_groups(self) -> int:
    return len(self.groups)

  @property
  def bubble_utilisation(self) -> float | None:
    return self.train_s / self.bubble_s if self.bubble_s > 0 else None

  @classmethod
  def of_groups(cls, groups: Sequence[GroupAccount], **fields) -> "StepAccount":
    """The account of one rollout: the phase totals summed over `groups`."""
    groups = tuple(groups)
    return cls(groups=groups, **{k: sum(getattr(g, k) for g in groups)
                                 for k in ("decode_s", "train_s", "idle_s", "bubble_s")}, **fields)


def merge_accounts(accounts: Sequence[StepAccount]) -> StepAccount:
  """The accounts of a step's rollout rounds as one: times and drafter steps summed, the last
  round's version and groups, every version used, the losses averaged over the rounds."""
  last = accounts[-1]
  total = lambda k: sum(getattr(a, k) for a in accounts)  # noqa: E731
  return dataclasses.replace(
      last, **{k: total(k) for k in ("wall_s", "decode_s", "train_s", "idle_s", "bubble_s", "preempt_wait_s",
                                     "drafter_steps")},
      drafter_versions_used=tuple(sorted({v for a in accounts for v in a.drafter_versions_used})),
      drafter_loss=_mean(a.drafter_loss for a in accounts), drafter_accuracy=_mean(a.drafter_accuracy for a in accounts))


@dataclasses.dataclass(frozen=True)
class BetweenSteps(_ByName):
  """Drafter training between policy steps: its seconds, the steps completed, the published
  version after them and their mean loss."""

  train_s: float
  drafter_steps: int
  drafter_version: int | None
  drafter_loss: float | None = None
