"""Chain-of-thought multi-digit addition with reversed (little-endian) digits.

Writing numbers least-significant digit first makes every step of column addition local:
column i needs only a_i, b_i and the carry from column i-1, all adjacent in the trace. This is
the format of the length-generalisation line of work (Lee et al. 2023, "Teaching Arithmetic to
Small Transformers"; Zhou et al. 2024; Lee et al. 2025, "Self-Improving Transformers Overcome
Easy-to-Hard and Length Generalization Challenges").

  347 + 85 = 432
  prompt  "743+58="
  trace   "7+5=12,4+8+1=13,3+0+1=4;A:234"

One step per column, least significant first: "a_i+b_i[+1]=s_i", where "+1" appears iff the
previous step's sum s_{i-1} >= 10, b_i = 0 past the end of b, and s_i is written in ordinary
decimal. Answer digit i is the last digit of s_i; a final "1" follows when the last s >= 10.
Then ";A:" and the reversed sum.

SFT traces carry redundant re-checks so that a length penalty has something to remove: with
probability `p_recheck`, k ~ Geometric(`recheck_stop`) (capped at `max_rechecks`) random
earlier steps are restated verbatim as "|R:<step>" before the answer:
  "7+5=12,4+8+1=13,3+0+1=4|R:4+8+1=13;A:234"

Difficulty is long-tailed: the first operand has n digits with P(n) ∝ n^-alpha on
[min_digits, max_digits] less the lengths in `skip_digits` (held out: never drawn); the second has
m ~ U{1..n} digits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from tlt_jax.data.tasks.base import Example, Task, TraceCheck, register_task

ANSWER_MARKER = ";A:"
_EXTRACT_MARKER = "A:"  # the verifier keys on "A:"; 'A' appears nowhere else in the charset's use
RECHECK_MARKER = "|R:"
STEP_SEP = ","
CHARSET = "0123456789+=,;:AR|"


def _step(a: int, b: int, carry: int) -> tuple[str, int]:
  s = a + b + carry
  return f"{a}+{b}{'+1' if carry else ''}={s}", s


@register_task("arith")
@dataclasses.dataclass(frozen=True)
class ArithTask(Task):
  """Reversed-digit addition with a column-by-column chain of thought (see module docstring)."""

  max_digits: int = 8
  min_digits: int = 1
  alpha: float = 1.5
  p_recheck: float = 0.5
  recheck_stop: float = 0.5
  max_rechecks: int = 4
  skip_digits: tuple = ()  # first-operand lengths never drawn (a held-out length inside the range)

  def __post_init__(self):
    for key in ("max_digits", "min_digits"):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"arith.{key}={value!r} must be an int >= 1")
    if self.min_digits > self.max_digits:
      raise ValueError(f"arith.min_digits={self.min_digits} must be <= arith.max_digits={self.max_digits}")
    skip = self.skip_digits
    if (not isinstance(skip, (tuple, list)) or any(isinstance(n, bool) or not isinstance(n, int) for n in skip)
        or not set(range(self.min_digits, self.max_digits + 1)) - set(skip)):
      raise ValueError(f"arith.skip_digits={skip!r} must be a tuple of ints leaving at least one length in "
                       f"[{self.min_digits}, {self.max_digits}]")
    if not self.alpha >= 0:
      raise ValueError(f"arith.alpha={self.alpha!r} must be >= 0 (P(n) ∝ n^-alpha)")
    if not 0.0 <= self.p_recheck <= 1.0:
      raise ValueError(f"arith.p_recheck={self.p_recheck!r} must be in [0, 1]")
    if not 0.0 < self.recheck_stop <= 1.0:
      raise ValueError(f"arith.recheck_stop={self.recheck_stop!r} must be in (0, 1] (geometric success prob.)")
    if isinstance(self.max_rechecks, bool) or not isinstance(self.max_rechecks, int) or self.max_rechecks < 0:
      raise ValueError(f"arith.max_rechecks={self.max_rechecks!r} must be an int >= 0")

  @property
  def charset(self) -> str:
    return CHARSET

  @property
  def digit_probs(self) -> np.ndarray:
    """P(n) ∝ n^-alpha for n = min_digits .. max_digits, 0 for n in skip_digits."""
    n = np.arange(self.min_digits, self.max_digits + 1, dtype=np.float64)
    w = n ** -float(self.alpha) * ~np.isin(n, np.asarray(self.skip_digits, dtype=np.float64))
    return w / w.sum()

  @property
  def max_prompt_len(self) -> int:
    """Longest prompt in characters (= CharTokenizer tokens, BOS excluded): 2n + 2."""
    return 2 * self.max_digits + 2

  @property
  def max_trace_len(self) -> int:
    """Longest trace in characters (= CharTokenizer tokens, EOS excluded).

    Steps: 6 chars for column 0 ("9+9=18"), <= 8 after ("9+9+1=19"), n-1 commas; each re-check
    "|R:" + <= 8; the answer ";A:" + <= n+1 digits. Total 10n + 1 + 11 * max_rechecks.
    """
    rechecks = self.max_rechecks if self.p_recheck > 0 else 0
    return 10 * self.max_digits + 1 + 11 * rechecks

  def max_sft_len(self, bos: bool = True, eos: bool = True) -> int:
    """Longest BOS + prompt + trace + EOS in CharTokenizer tokens."""
    return self.max_prompt_len + self.max_trace_len + int(bos) + int(eos)

  def make_example(self, a: int | str, b: int | str, num_rechecks: int = 0,
                   rng: np.random.Generator | None = None) -> Example:
    """The example for a + b (ordinary decimal); re-checked steps are drawn from `rng`."""
    a_str, b_str = str(a), str(b)
    for name, s in (("a", a_str), ("b", b_str)):
      if not s.isdigit() or (len(s) > 1 and s[0] == "0"):
        raise ValueError(f"arith: operand {name}={s!r} must be a non-negative integer without leading zeros")
    if len(b_str) > len(a_str):
      raise ValueError(f"arith: b={b_str} must not have more digits than a={a_str}")
    a_rev = [int(c) for c in reversed(a_str)]
    b_rev = [int(c) for c in reversed(b_str)]
    n = len(a_rev)
    steps, digits, carry = [], [], 0
    for i in range(n):
      text, s = _step(a_rev[i], b_rev[i] if i < len(b_rev) else 0, carry)
      steps.append(text)
      digits.append(str(s % 10))
      carry = s // 10
    if carry:
      digits.append("1")
    answer = "".join(digits)
    body = STEP_SEP.join(steps)
    rechecks = ""
    if num_rechecks:
      if rng is None:
        raise ValueError("arith.make_example: num_rechecks > 0 needs an rng")
      picks = rng.integers(0, n, size=num_rechecks)
      rechecks = "".join(RECHECK_MARKER + steps[i] for i in picks)
    clean = body + ANSWER_MARKER + answer
    trace = body + rechecks + ANSWER_MARKER + answer
    meta = {"difficulty": n, "num_digits": n, "num_digits_b": len(b_rev), "a": a_str, "b": b_str,
            "num_rechecks": int(num_rechecks), "clean_trace_len": len(clean)}
    return Example(prompt="".join(map(str, a_rev)) + "+" + "".join(map(str, b_rev)) + "=",
                   trace=trace, answer=answer, meta=meta)

  def _operand(self, rng: np.random.Generator, num_digits: int) -> str:
    if num_digits == 1:
      return str(int(rng.integers(0, 10)))
    head = int(rng.integers(1, 10))
    return str(head) + "".join(map(str, rng.integers(0, 10, size=num_digits - 1)))

  def sample(self, rng: np.random.Generator, num_digits: int | None = None) -> Example:
    """Draws n ~ P(n) (or uses `num_digits`), m ~ U{1..n}, both operands, and the re-checks."""
    if num_digits is None:
      num_digits = int(rng.choice(np.arange(self.min_digits, self.max_digits + 1), p=self.digit_probs))
    a = self._operand(rng, num_digits)
    b = self._operand(rng, int(rng.integers(1, num_digits + 1)))
    k = 0
    if self.max_rechecks and rng.random() < self.p_recheck:
      k = min(int(rng.geometric(self.recheck_stop)), self.max_rechecks)
    return self.make_example(a, b, num_rechecks=k, rng=rng)

  @staticmethod
  def reference_steps(example: Example) -> list[str]:
    """The right column steps "a_i+b_i[+1]=s_i" of the example, read from its prompt."""
    a_rev, b_rev = example.prompt.rstrip("=").split("+")
    steps, carry = [], 0
    for i, a in enumerate(a_rev):
      text, s = _step(int(a), int(b_rev[i]) if i < len(b_rev) else 0, carry)
      steps.append(text)
      carry = s // 10
    return steps

  def check_trace(self, response: str, example: Example) -> TraceCheck:
    """Every step checked exactly. The response's steps (the comma-separated part before any
    "|R:" re-check and the answer) must be the n reference steps in order; step i is wrong when
    it differs from reference step i in any character, missing, or extra (index >= n). Each
    re-check j must restate one of the reference steps; a wrong one is step n + j. A response
    with a right answer and a wrong step is a false positive (Bansal et al. 2024, FPR)."""
    reference = self.reference_steps(example)
    pos = response.rfind(_EXTRACT_MARKER)
    body = response if pos < 0 else response[:pos]
    if body.endswith(ANSWER_MARKER[0]):
      body = body[:-1]
    main, *rechecks = body.split(RECHECK_MARKER)
    steps = main.split(STEP_SEP) if main else []
    n = len(reference)
    wrong = [i for i in range(max(len(steps), n))
             if i >= len(steps) or i >= n or steps[i] != reference[i]]
    allowed = set(reference)
    wrong += [n + j for j, r in enumerate(rechecks) if r not in allowed]
    first = min(wrong) if wrong else None
    return TraceCheck(self.verify(response, example), first is None, first)

  def extract_answer(self, response: str) -> str | None:
    """The text after the LAST "A:" marker, whitespace-stripped; None when there is no marker."""
    pos = response.rfind(_EXTRACT_MARKER)
    if pos < 0:
      return None
    return response[pos + len(_EXTRACT_MARKER):].strip()
