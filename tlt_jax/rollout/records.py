"""Typed results of a rollout: what a session, the scheduler and the RL stages hand each other."""

from __future__ import annotations

import dataclasses
from typing import Any

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
