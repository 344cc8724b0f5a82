"""Rewards for RL on reasoning tasks, registered by name.

A reward function scores a GROUP of G responses to one prompt, so that group statistics (the
length penalty's mean and std) are available:

  fn(responses: list[str], finished: list[bool], lengths: list[int], example, task)
      -> np.ndarray float32 [G]

`finished[i]` says response i reached EOS (a truncated response is never correct), `lengths[i]`
is its length in tokens, and `task.verify(response, example) -> bool` checks the answer.
Hyper-parameters are keyword-only and bound by `get_reward(name, **kwargs)`.

Rewards run on the host, on untrusted model output: wrap the final reward in `safe_reward` so
that one failing group scores zeros and the run goes on (a `RewardConfigError`, a reward that
cannot work with the task at all, still stops the run).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
from tlt_jax.utils.registry import Registry

logger = logging.getLogger(__name__)


class Task(Protocol):
  """What a reward needs from a task."""

  def verify(self, response: str, example: Any) -> bool: ...

  def extract_answer(self, response: str) -> Any: ...


RewardFn = Callable[[list, list, list, Any, Task], np.ndarray]

_REWARDS = Registry("reward")
register_reward = _REWARDS.register  # decorator: registers a group reward function under a name
registered_rewards = _REWARDS.names


def get_reward(name: str, **kwargs) -> RewardFn:
  """The reward registered as `name`, with its keyword-only hyper-parameters bound."""
  return _REWARDS.bind(name, **kwargs)


def _correct_mask(responses, finished, example, task) -> np.ndarray:
  """correct_i = finished_i and task.verify(response_i, example); verify is skipped if truncated."""
  return np.array([bool(f) and bool(task.verify(r, example)) for r, f in zip(responses, finished)],
                  dtype=bool)


@register_reward("verifier")
def verifier_reward(responses, finished, lengths, example, task) -> np.ndarray:
  """r_i = 1[finished_i and verify(y_i)]: the binary outcome reward of RL with verifiable rewards.

  A truncated response (no EOS) scores 0 even if its text happens to verify.
  """
  del lengths
  return _correct_mask(responses, finished, example, task).astype(np.float32)


@register_reward("length_penalty")
def length_penalty_reward(responses, finished, lengths, example, task, *,
                          alpha: float = 0.1) -> np.ndarray:
  """r_i = 1[correct_i] * (1 - alpha * sigmoid((len_i - mean) / (std + 1e-7))).

  mean and std (population, ddof=0) are over the lengths of the CORRECT responses in the group.
  Arora & Zanette (2025), "Training Language Models to Reason Efficiently": among correct
  answers to the same prompt, shorter ones score more; alpha trades accuracy for length
  (alpha=0 is the plain verifier reward). A lone correct response scores 1 - alpha/2.
  """
  correct = _correct_mask(responses, finished, example, task)
  rewards = np.zeros(len(responses), np.float32)
  if not correct.any():
    return rewards
  lengths_c = np.asarray(lengths, np.float64)[correct]
  z = (lengths_c - lengths_c.mean()) / (lengths_c.std() + 1e-7)
  rewards[correct] = 1.0 - alpha / (1.0 + np.exp(-z))
  return rewards


@register_reward("format")
def format_reward(responses, finished, lengths, example, task) -> np.ndarray:
  """r_i = 1[finished_i and task.extract_answer(y_i) is not None]: a well-formed answer.

  Right or wrong, the response ends and states an answer the task can parse. Give it a small
  weight in `combine_rewards` (e.g. 0.1 next to the verifier's 1.0).
  """
  del lengths, example
  return np.array([bool(f) and task.extract_answer(r) is not None
                   for r, f in zip(responses, finished)], np.float32)


class RewardConfigError(TypeError):
  """A reward that cannot work with the task at all (a configuration error, not a bad response):
  `SafeReward` lets it through instead of scoring zeros."""


@register_reward("partial_credit")
def partial_credit_reward(responses, finished, lengths, example, task) -> np.ndarray:
  """r_i = 1[finished_i] * task.partial_credit(y_i, example), clipped to [0, 1].

  Generic partial credit: the task says how much of the answer is right (for ZebraLogic grids,
  the fraction of cells right: "cell accuracy", Lin et al. 2025). A truncated response scores 0.
  Raises RewardConfigError when the task has no `partial_credit` method (tasks/base.py).
  """
  del lengths
  credit = getattr(task, "partial_credit", None)
  if not callable(credit):
    raise RewardConfigError(
        f"reward 'partial_credit' needs a task with a partial_credit(response, example) method; "
        f"task {getattr(task, 'name', type(task).__name__)!r} has none (use rl.rewards.partial_credit=0 "
        "or a task that defines it, e.g. 'zebra')")
  return np.array([float(np.clip(credit(r, example), 0.0, 1.0)) if f else 0.0
                   for r, f in zip(responses, finished)], np.float32)


def combine_rewards(specs: Mapping[str, float],
                    kwargs: Mapping[str, Mapping[str, Any]] | None = None) -> RewardFn:
  """r_i = sum_name weight_name * reward_name(group)_i.

  `specs` maps registered names to weights (zero weights are skipped, never called);
  `kwargs[name]` holds that reward's hyper-parameters, e.g. {"length_penalty": {"alpha": 0.2}}.
  """
  kwargs = dict(kwargs or {})
  unused = set(kwargs) - set(specs)
  if unused:
    raise ValueError(f"combine_rewards: kwargs for {sorted(unused)} which are not in specs "
                     f"{sorted(specs)}")
  terms = [(float(w), get_reward(name, **kwargs.get(name, {}))) for name, w in specs.items()
           if float(w) != 0.0]

  def combined(responses, finished, lengths, example, task) -> np.ndarray:
    total = np.zeros(len(responses), np.float32)
    for weight, fn in terms:
      total += weight * np.asarray(fn(responses, finished, lengths, example, task), np.float32)
    return total

  return combined


def prompt_id(example: Any) -> str:
  """The first of example.meta["id"], example.prompt_id (if assigned, i.e. >= 0) and example.id
  that is present, else "?"; dict examples are looked up by key."""

  def field(obj, key):
    if isinstance(obj, Mapping):
      return obj.get(key)
    return getattr(obj, key, None)

  meta = field(example, "meta")
  candidates = (field(meta, "id") if meta is not None else None, field(example, "prompt_id"),
                field(example, "id"))
  for value in candidates:
    if value is not None and not (isinstance(value, int) and value < 0):
      return str(value)
  return "?"


class SafeReward:
  """A reward that never raises: a failing group scores zeros and the failure is counted.

  A failure is an exception in the wrapped function, or an output that is not G finite numbers.
  Each is logged with the prompt id; `failures` counts them and `recent_errors` keeps the last
  `keep` as (prompt_id, message), for the trainer to report.
  """

  def __init__(self, fn: RewardFn, name: str | None = None, keep: int = 32):
    self.fn = fn
    self.name = name or getattr(fn, "__name__", "reward")
    self.failures = 0
    self.calls = 0
    self.recent_errors: collections.deque[tuple[str, str]] = collections.deque(maxlen=keep)

  def __call__(self, responses, finished, lengths, example, task) -> np.ndarray:
    self.calls += 1
    num = len(responses)
    try:
      rewards = np.asarray(self.fn(responses, finished, lengths, example, task), np.float32)
      if rewards.shape != (num,):
        raise ValueError(f"returned shape {rewards.shape}, expected ({num},)")
      if not np.all(np.isfinite(rewards)):
        raise ValueError(f"returned non-finite rewards {rewards.tolist()}")
      return rewards
    except RewardConfigError:
      raise
    except Exception as e:  # noqa: BLE001 -- any failure of untrusted scoring code
      self.failures += 1
      pid = prompt_id(example)
      message = f"{type(e).__name__}: {e}"
      self.recent_errors.append((pid, message))
      logger.warning("reward %s failed on prompt %s (failure %d of %d calls): %s",
                     self.name, pid, self.failures, self.calls, message)
      return np.zeros(num, np.float32)


def safe_reward(fn: RewardFn, name: str | None = None) -> SafeReward:
  """Wraps `fn` so that any exception scores the group zeros, is logged and counted."""
  return SafeReward(fn, name)
