"""Tasks over question/answer records read from files (GSM8K, MATH and look-alikes).

Final-answer conventions:
  * GSM8K (Cobbe et al. 2021): the solution ends with "#### 42";
  * MATH (Hendrycks et al. 2021): the final answer is the last "\\boxed{...}" of the solution.

A record is {"question": str, "answer": str}, as the loaders in `tlt_jax.data.sources` return
them. When the answer text carries no marker (e.g. MATH-500's short "answer" column) it is the
final answer itself and the trace becomes "#### <answer>" or "\\boxed{<answer>}".
"""

from __future__ import annotations

import os
import re
import string
from typing import Mapping, Sequence

import numpy as np

from tlt_jax.data.readers import load_qa_file
from tlt_jax.data.tasks.base import Example, Task, register_task

ANSWER_FORMATS = ("gsm8k", "math")
GSM8K_MARKER = "####"
DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"
_BOXED = ("\\boxed{", "\\fbox{")


def last_boxed(text: str) -> str | None:
  """Contents of the last \\boxed{...} (or \\fbox{...}), braces matched; None if absent/unclosed."""
  start = max(text.rfind(b) for b in _BOXED)
  if start < 0:
    return None
  i = text.index("{", start) + 1
  depth, j = 1, i
  while j < len(text):
    if text[j] == "{":
      depth += 1
    elif text[j] == "}":
      depth -= 1
      if depth == 0:
        return text[i:j]
    j += 1
  return None


def after_gsm8k_marker(text: str) -> str | None:
  """The first line after the last "####"; None if absent."""
  pos = text.rfind(GSM8K_MARKER)
  if pos < 0:
    return None
  rest = text[pos + len(GSM8K_MARKER):].strip()
  return rest.splitlines()[0].strip() if rest else ""


_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def normalize_answer(text: str) -> str:
  """Light normalisation: drops $, thousands commas, spaces, \\left/\\right, \\!, trailing '.',
  `^\\circ`, `\\text{...}` wrappers of units; maps \\dfrac/\\tfrac to \\frac; writes plain numbers
  canonically ("72.0" -> "72")."""
  s = text.strip()
  s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
  for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\dfrac", "\\frac"),
                   ("\\tfrac", "\\frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("$", ""), (" ", "")):
    s = s.replace(old, new)
  s = s.rstrip(".")
  plain = s.replace(",", "")
  if _NUMBER.match(plain):
    value = float(plain)
    s = str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
  return s


def _difficulty(record: Mapping, answer_text: str) -> int:
  """MATH's "Level k" when present, else the number of solution lines (GSM8K: one step a line)."""
  level = re.search(r"\d+", str(record.get("level", "")))
  if level:
    return int(level.group())
  return max(1, len([line for line in answer_text.splitlines() if line.strip()]))


@register_task("gsm8k")
class FileTask(Task):
  """Question/answer records from a file (or given in memory).

  answer_format: "gsm8k" ("#### x" marks the final answer) or "math" (last \\boxed{x}).
  Each falls back to the other marker when its own is missing from a response.
  path / records: optional data for `sample`; the file loaders also build Examples through
  `example_from_record` directly.
  """

  def __init__(self, path: str | None = None, records: Sequence[Mapping] | None = None,
               answer_format: str = "gsm8k", prompt_template: str = DEFAULT_TEMPLATE,
               on_bad_record: str = "error"):
    if on_bad_record not in ("skip", "error"):
      raise ValueError(f"{self.name}.on_bad_record={on_bad_record!r} is not supported; allowed: 'skip', 'error'")
    if answer_format not in ANSWER_FORMATS:
      raise ValueError(f"{self.name}.answer_format={answer_format!r} is not supported; allowed: {ANSWER_FORMATS}")
    if "{question}" not in prompt_template:
      raise ValueError(f"{self.name}.prompt_template={prompt_template!r} must contain '{{question}}'")
    if path is not None and records is not None:
      raise ValueError(f"{self.name}: give path or records, not both")
    self.answer_format = answer_format
    self.prompt_template = prompt_template
    if path is not None and not os.path.isfile(path):
      raise FileNotFoundError(f"{self.name}.path={path!r}: no such file; allowed: a .jsonl/.json or "
                              ".parquet file of question/answer records")
    self.path = path
    self.on_bad_record = on_bad_record
    self._records = list(records) if records is not None else None

  @property
  def charset(self) -> str:
    """Printable ASCII; real text wants an HF tokenizer, and CharTokenizer names any other char."""
    return "".join(sorted(set(string.printable) - set("\x0b\x0c\r")))

  @property
  def records(self) -> list:
    if self._records is None:
      if self.path is None:
        raise ValueError(f"task {self.name!r} has no data: construct it with path=... or records=...")
      self._records = load_qa_file(self.path, on_bad_record=self.on_bad_record)
    return self._records

  def final_answer(self, answer_text: str) -> str:
    """The reference final answer inside a record's answer text (the whole text if unmarked)."""
    found = self._extract(answer_text)
    return (found if found is not None else answer_text).strip()

  def example_from_record(self, record: Mapping, index: int = -1) -> Example:
    question, answer_text = str(record["question"]), str(record["answer"])
    final = self.final_answer(answer_text)
    trace = answer_text
    if self._extract(answer_text) is None:
      trace = f"{GSM8K_MARKER} {final}" if self.answer_format == "gsm8k" else f"\\boxed{{{final}}}"
    meta = {"difficulty": _difficulty(record, answer_text), "source_index": int(index)}
    return Example(prompt=self.prompt_template.format(question=question), trace=trace, answer=final,
                   meta=meta, prompt_id=int(index))

  def __repr__(self) -> str:
    return f"{type(self).__name__}(path={self.path!r}, answer_format={self.answer_format!r})"

  def sample(self, rng: np.random.Generator) -> Example:
    records = self.records
    i = int(rng.integers(0, len(records)))
    return self.example_from_record(records[i], i)

  def _extract(self, text: str) -> str | None:
    first, second = ((after_gsm8k_marker, last_boxed) if self.answer_format == "gsm8k"
                     else (last_boxed, after_gsm8k_marker))
    found = first(text)
    return found if found is not None else second(text)

  def extract_answer(self, response: str) -> str | None:
    found = self._extract(response)
    return None if found is None else found.strip()

  def answers_match(self, predicted: str, reference: str) -> bool:
    return normalize_answer(predicted) == normalize_answer(reference)

  def check_trace(self, response: str, example: Example):
    """Free-text solutions: only the final answer is checkable, so steps_correct and
    first_wrong_step are None (the base step checker); an FPR needs a judge here."""
    return super().check_trace(response, example)


@register_task("math")
class MathFileTask(FileTask):
  """FileTask with MATH's \\boxed{} answers by default."""

  def __init__(self, path: str | None = None, records: Sequence[Mapping] | None = None,
               answer_format: str = "math", prompt_template: str = DEFAULT_TEMPLATE,
               on_bad_record: str = "error"):
    super().__init__(path=path, records=records, answer_format=answer_format,
                     prompt_template=prompt_template, on_bad_record=on_bad_record)
