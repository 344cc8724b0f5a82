"""Typed results of a rollout: what a session, the scheduler and the RL stages hand each other."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class RolloutResult:
  """Generated tokens [N, M] (PAD after the end), lengths [N], float32 logprobs [N, M], finished
  flags (EOS reached) [N], and statistics."""

  tokens: np.ndarray
  lengths: np.ndarray
  logprobs: np.ndarray
  finished: np.ndarray
  stats: dict[str, Any]


def merge_stats(stats: Sequence[Mapping[str, Any]], *, tag_groups: bool = False) -> dict[str, Any]:
  """The statistics of several results (a step's rollout groups, or its rollout rounds) as one:
  times per phase summed (group-seconds, not wall), tokens summed, chunks pooled (each tagged
  with its `group` index with `tag_groups`), the accept length pooled over every speculative
  chunk, and each part's active-batch trace."""
  times: dict[str, float] = {}
  for st in stats:
    for k, v in st.get("time_s", {}).items():
      times[k] = times.get(k, 0.0) + float(v)
  chunks = [dict(c, group=g) if tag_groups else c for g, st in enumerate(stats) for c in st.get("chunks", [])]
  spec = [c for c in chunks if c["strategy"] is not None]
  row_rounds = sum(c.get("row_rounds", 0) for c in spec)
  return dict(time_s=times, num_tokens=sum(int(st.get("num_tokens", 0)) for st in stats),
              spec_accept_len=(sum(c["tokens"] for c in spec) / row_rounds) if row_rounds else None,
              chunks=chunks, spec_chunks=spec, active_trace=[st.get("active_trace") for st in stats])
