"""Task interface, the Example record and the task registry.

A task turns randomness into problems and checks answers:
  * `sample(rng) -> Example` (synthetic tasks; file tasks draw a record);
  * `extract_answer(response) -> str | None` pulls the final answer out of a model response;
  * `verify(response, example) -> bool` is `extract_answer` followed by the task's comparison;
  * `charset` lists every character a prompt or trace may contain (for `CharTokenizer`).

Optional:
  * `partial_credit(response, example) -> float` in [0, 1]: how much of the answer is right (e.g.
    the fraction of a logic grid's cells, tasks/zebra.py). The `partial_credit` reward
    (rl/rewards.py) calls it; a task without it cannot use that reward.
  * `check_trace(response, example) -> TraceCheck(answer_correct, steps_correct, first_wrong_step)`:
    the step checker. A task whose every reasoning step can be checked (tasks/arith.py) overrides
    it; the default checks only the final answer and says so with steps_correct = None.
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
from typing import Any, NamedTuple

import numpy as np
from tlt_jax.utils.registry import Registry


@dataclasses.dataclass(frozen=True)
class Example:
  """One problem.

  prompt: the text the policy is conditioned on.
  trace: the SFT target completion; it ends with the final answer in the task's format.
  answer: the reference final answer (what `extract_answer` should return for a correct response).
  meta: task metadata, JSON-serialisable, with at least "difficulty".
  prompt_id: a stable integer id given by the data source / iterator (-1 until assigned).
  """

  prompt: str
  trace: str
  answer: str
  meta: dict = dataclasses.field(default_factory=dict)
  prompt_id: int = -1

  def with_id(self, prompt_id: int) -> "Example":
    return dataclasses.replace(self, prompt_id=int(prompt_id))


class TraceCheck(NamedTuple):
  """What a step checker found in one response.

  answer_correct: the final answer matches (`Task.verify`).
  steps_correct: every reasoning step is right (and none is missing); None when the task cannot
    check steps (only the final answer is checkable).
  first_wrong_step: 0-based index of the first wrong or missing step; None when every step is
    right or steps are not checked.
  """

  answer_correct: bool
  steps_correct: bool | None
  first_wrong_step: int | None


class Task(abc.ABC):
  """Base class of every task; see the module docstring for the contract."""

  name: str = "task"

  @property
  @abc.abstractmethod
  def charset(self) -> str:
    ...

  @abc.abstractmethod
  def sample(self, rng: np.random.Generator) -> Example:
    ...

  @abc.abstractmethod
  def extract_answer(self, response: str) -> str | None:
    ...

  def answers_match(self, predicted: str, reference: str) -> bool:
    """Exact string match; tasks with looser notions of equality override this."""
    return predicted == reference

  def verify(self, response: str, example: Example) -> bool:
    """True iff the response's final answer matches `example.answer`. No answer is wrong."""
    predicted = self.extract_answer(response)
    return predicted is not None and self.answers_match(predicted, example.answer)

  def check_trace(self, response: str, example: Example) -> TraceCheck:
    """The step checker. Default: only the final answer is checkable, so steps_correct and
    first_wrong_step are None (a false positive cannot be told from a true one)."""
    return TraceCheck(self.verify(response, example), None, None)


_TASKS = Registry("task")
registered_tasks = _TASKS.names


def register_task(name: str):
  """Class decorator: makes the task constructible by name through `get_task(name, **kwargs)`."""

  def wrap(cls):
    _TASKS.register(name)(cls)
    cls.name = name
    return cls

  return wrap


def task_options(name: str) -> list[str]:
  """The options (constructor keywords) of the task registered as `name`."""
  params = inspect.signature(_TASKS.get(name)).parameters
  return sorted(p for p, v in params.items() if v.kind is not inspect.Parameter.VAR_KEYWORD)


def get_task(name: str, **kwargs: Any) -> Task:
  """Builds the task registered under `name` with its options `kwargs`.

  Raises ValueError naming the registered tasks for an unknown name, and the allowed options
  for an unknown option.
  """
  factory = _TASKS.get(name)
  params = inspect.signature(factory).parameters
  if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
      raise ValueError(f"task {name!r} has no option(s) {unknown}; allowed: {sorted(params)}")
  return factory(**kwargs)
