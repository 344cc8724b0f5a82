"""Reverse addition and reverse copy without chain of thought: the length-generalisation tasks of
Lee et al. (2025), "Self-Improving Transformers Overcome Easy-to-Hard and Length Generalization
Challenges".

Reverse addition ("reverse_add"). For a + b with n = max(digits(a), digits(b)), both operands
and the sum are written least-significant digit first. By default (`padded=False`) nothing is
padded, the format of the paper's official code (JackCai1206/arithmetic-self-improve,
`{a[::-1]}+{b[::-1]}=`):

  347 + 85 = 432
  prompt  "743+58="       (n = 3)
  answer  "234"           (the sum's digits, reversed: n or n + 1 of them)

A well-formed answer has n or n + 1 digits and no zero in its most significant (last) place
unless it is the single digit 0; a sum of two n-digit numbers that carries out ends in "1".

With `padded=True` (the format this project used first) both operands are zero-padded to n
digits and the answer to n + 1, so that digit i of every string sits at the same offset:

  prompt  "743+580="      answer  "2340"

There answer digit i depends only on operand digits <= i, every answer has exactly n + 1 digits,
and the position of a digit in the prompt tells which place it holds: a simplification for a
model without position embeddings that the unpadded format does not give.

Reverse copy ("reverse_copy"), the second task: the prompt is n digits then "=", the answer is
those digits in reverse order (n digits).

  prompt  "12345="        answer  "54321"

Difficulty = n, the number of digits. `sample(rng)` draws n ~ U{min_digits..max_digits};
`sample(rng, num_digits=n)` draws a problem of exactly n digits (the curriculum's "next
difficulty"). The verifier is exact: the response, stripped, must equal the answer string.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tlt_jax.data.tasks.base import Example, Task, register_task

DIGITS = "0123456789"


def _check_digits_range(name: str, min_digits, max_digits) -> None:
  for key, value in (("min_digits", min_digits), ("max_digits", max_digits)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name}.{key}={value!r} must be an int >= 1")
  if min_digits > max_digits:
    raise ValueError(f"{name}.min_digits={min_digits} must be <= {name}.max_digits={max_digits}")


def _number(rng: np.random.Generator, num_digits: int) -> str:
  """A uniformly random number of exactly `num_digits` digits (0..9 for one digit)."""
  if num_digits == 1:
    return str(int(rng.integers(0, 10)))
  return str(int(rng.integers(1, 10))) + "".join(map(str, rng.integers(0, 10, size=num_digits - 1)))


class _DigitsTask(Task):
  """Shared parts: n ~ U{min_digits..max_digits}, an exact whole-response verifier, and the
  expected answer length that the curriculum's length filter checks."""

  min_digits: int
  max_digits: int

  def _num_digits(self, rng: np.random.Generator, num_digits: int | None) -> int:
    if num_digits is None:
      return int(rng.integers(self.min_digits, self.max_digits + 1))
    if isinstance(num_digits, bool) or not isinstance(num_digits, (int, np.integer)) or num_digits < 1:
      raise ValueError(f"{self.name}: num_digits={num_digits!r} must be an int >= 1")
    return int(num_digits)

  def extract_answer(self, response: str) -> str | None:
    """The whole response, whitespace-stripped (the format has no marker); None when empty."""
    text = response.strip()
    return text or None

  def answer_length(self, num_digits: int) -> int:
    """Characters of a well-formed answer to a problem of `num_digits` digits."""
    raise NotImplementedError

  def well_formed(self, response: str, num_digits: int) -> bool:
    """The length filter's test: only digits, exactly `answer_length(num_digits)` of them."""
    text = response.strip()
    return len(text) == self.answer_length(num_digits) and all(c in DIGITS for c in text)

  def with_answer(self, example: Example, answer: str) -> Example:
    """`example` with `answer` as its trace (a self-generated label); the true answer stays in
    meta["true_answer"] so that a label's error can be measured."""
    meta = dict(example.meta, true_answer=example.answer, label_correct=answer == example.answer)
    return dataclasses.replace(example, trace=answer, answer=answer, meta=meta)


@register_task("reverse_add")
@dataclasses.dataclass(frozen=True)
class ReverseAddTask(_DigitsTask):
  """Reverse addition, unpadded or with `padded=True` zero-padded (see module docstring);
  n ~ U{min_digits..max_digits} digits for the longer operand, the other has m ~ U{1..n} digits,
  and the two are swapped at random."""

  min_digits: int = 1
  max_digits: int = 8
  padded: bool = False

  def __post_init__(self):
    _check_digits_range("reverse_add", self.min_digits, self.max_digits)
    if not isinstance(self.padded, bool):
      raise ValueError(f"reverse_add.padded={self.padded!r} is not allowed; allowed: True or False")

  @property
  def charset(self) -> str:
    return DIGITS + "+="

  def answer_length(self, num_digits: int) -> int:
    """The longest well-formed answer: n + 1 digits (exactly that many when padded)."""
    return num_digits + 1

  def well_formed(self, response: str, num_digits: int) -> bool:
    """Padded: exactly n + 1 digits. Unpadded: n or n + 1 digits, the last (most significant)
    not 0 unless the answer is "0", and a carry digit (the (n+1)-th) can only be 1."""
    if self.padded:
      return super().well_formed(response, num_digits)
    text = response.strip()
    if not text or any(c not in DIGITS for c in text) or len(text) not in (num_digits, num_digits + 1):
      return False
    if len(text) == num_digits + 1:
      return text[-1] == "1"
    return text[-1] != "0" or text == "0"

  def make_example(self, a: int | str, b: int | str) -> Example:
    """The example for a + b (ordinary decimal, non-negative)."""
    a_str, b_str = str(a), str(b)
    for name, s in (("a", a_str), ("b", b_str)):
      if not s.isdigit() or (len(s) > 1 and s[0] == "0"):
        raise ValueError(f"reverse_add: operand {name}={s!r} must be a non-negative integer without "
                         "leading zeros")
    n = max(len(a_str), len(b_str))
    total = str(int(a_str) + int(b_str))
    if self.padded:
      prompt = a_str[::-1].ljust(n, "0") + "+" + b_str[::-1].ljust(n, "0") + "="
      answer = total[::-1].ljust(n + 1, "0")
    else:
      prompt, answer = a_str[::-1] + "+" + b_str[::-1] + "=", total[::-1]
    meta = {"difficulty": n, "num_digits": n, "a": a_str, "b": b_str}
    return Example(prompt=prompt, trace=answer, answer=answer, meta=meta)

  def sample(self, rng: np.random.Generator, num_digits: int | None = None) -> Example:
    n = self._num_digits(rng, num_digits)
    a = _number(rng, n)
    b = _number(rng, int(rng.integers(1, n + 1)))
    if rng.random() < 0.5:
      a, b = b, a
    return self.make_example(a, b)


@register_task("reverse_copy")
@dataclasses.dataclass(frozen=True)
class ReverseCopyTask(_DigitsTask):
  """Reverse a string of n ~ U{min_digits..max_digits} random digits (see module docstring)."""

  min_digits: int = 1
  max_digits: int = 8

  def __post_init__(self):
    _check_digits_range("reverse_copy", self.min_digits, self.max_digits)

  @property
  def charset(self) -> str:
    return DIGITS + "="

  def answer_length(self, num_digits: int) -> int:
    return num_digits

  def make_example(self, digits: str) -> Example:
    if not digits or not digits.isdigit():
      raise ValueError(f"reverse_copy: {digits!r} must be a non-empty string of digits")
    meta = {"difficulty": len(digits), "num_digits": len(digits)}
    return Example(prompt=digits + "=", trace=digits[::-1], answer=digits[::-1], meta=meta)

  def sample(self, rng: np.random.Generator, num_digits: int | None = None) -> Example:
    n = self._num_digits(rng, num_digits)
    return self.make_example("".join(map(str, rng.integers(0, 10, size=n))))
