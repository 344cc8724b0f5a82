"""Tasks over question/answer records read from files (GSM8K, MATH and look-alikes).

Final-answer conventions:
  * GSM8K (Cobbe et al. 2021): the solution ends with "#### 42";
  * MATH (Hendrycks et al. 2021): the final answer is the last "\\boxed{...}" of the solution.

A record is {"question": str, "answer": str}, as the loaders in `tlt_jax.data.sources` return
them. When the answer text carries no marker (e.g. MATH-500's short "answer" column) it is the
final answer itself and the trace becomes "#### <answer>" or "\\boxed{<answer>}". A verl-style
record (`sources.load_verl_parquet`) adds "messages" (the prompt as chat messages),
"data_source" (which picks the verifier when answer_format="auto") and "extra" (its other
columns, kept in the example's meta).

Prompts. In the plain format a prompt is `prompt_template.format(question=...)`. In the chat
format (`prompt_format`, settled against the tokenizer by `tlt_jax.data.chat.configure_prompts`)
it is the checkpoint's chat template rendered over the messages: an optional `system_prompt`,
then the question with `instruction` appended (e.g. GSM8K's customary "Let's think step by step
and output the final answer after \"####\"."), ending with the assistant's generation prompt.
A leading BOS token the template writes is left to the batching code, which adds BOS itself.
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
AUTO = "auto"  # answer_format: per record, from its data_source (DATA_SOURCE_FORMATS)
# data_source (lower-cased) -> answer format: the first rule whose key is a substring wins.
DATA_SOURCE_FORMATS = (("gsm8k", "gsm8k"), ("math", "math"), ("aime", "math"), ("amc", "math"),
                       ("deepscaler", "math"), ("dapo", "math"), ("numina", "math"), ("eurus", "math"),
                       ("olympiad", "math"), ("minerva", "math"))
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


def format_for_source(data_source: str) -> str | None:
  """The answer format a verl-style `data_source` implies (DATA_SOURCE_FORMATS), None if unknown."""
  key = str(data_source).lower()
  for pattern, fmt in DATA_SOURCE_FORMATS:
    if pattern in key:
      return fmt
  return None


def _optional_text(value, key: str) -> str | None:
  if value is not None and not isinstance(value, str):
    raise ValueError(f"{key}={value!r} is not allowed; allowed: a string or None")
  return value or None


@register_task("gsm8k")
class FileTask(Task):
  """Question/answer records from a file (or given in memory).

  answer_format: "gsm8k" ("#### x" marks the final answer), "math" (last \\boxed{x}) or "auto"
  (each record's data_source decides; see DATA_SOURCE_FORMATS). Each falls back to the other
  marker when its own is missing from a response.
  path / records: optional data for `sample`; the file loaders also build Examples through
  `example_from_record` directly. A .parquet file with a `prompt` column of chat messages and a
  `reward_model` column is read as verl-style data.
  prompt_format: "auto" (chat when the tokenizer has a chat template), "chat" or "plain";
  system_prompt / instruction: the chat prompt's system turn and the text appended to the
  question (see the module docstring).
  """

  def __init__(self, path: str | None = None, records: Sequence[Mapping] | None = None,
               answer_format: str = "gsm8k", prompt_template: str = DEFAULT_TEMPLATE,
               on_bad_record: str = "error", prompt_format: str = "auto", system_prompt: str | None = None,
               instruction: str | None = None):
    if on_bad_record not in ("skip", "error"):
      raise ValueError(f"{self.name}.on_bad_record={on_bad_record!r} is not supported; allowed: 'skip', 'error'")
    if answer_format not in ANSWER_FORMATS + (AUTO,):
      raise ValueError(f"{self.name}.answer_format={answer_format!r} is not supported; allowed: "
                       f"{ANSWER_FORMATS + (AUTO,)}")
    if "{question}" not in prompt_template:
      raise ValueError(f"{self.name}.prompt_template={prompt_template!r} must contain '{{question}}'")
    if path is not None and records is not None:
      raise ValueError(f"{self.name}: give path or records, not both")
    from tlt_jax.data.chat import PROMPT_FORMATS
    if prompt_format not in PROMPT_FORMATS:
      raise ValueError(f"{self.name}.prompt_format={prompt_format!r} is not supported; allowed: {PROMPT_FORMATS}")
    self.answer_format = answer_format
    self.prompt_template = prompt_template
    self.prompt_format = prompt_format
    self.system_prompt = _optional_text(system_prompt, f"{self.name}.system_prompt")
    self.instruction = _optional_text(instruction, f"{self.name}.instruction")
    self._chat, self._bos_text = None, None
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
      records = load_qa_file(self.path, on_bad_record=self.on_bad_record)
      if self.answer_format == AUTO:
        records = self._known_sources(records)
      self._records = records
    return self._records

  def _known_sources(self, records: list) -> list:
    """The records whose data_source names a verifier; the others raise or are skipped (and
    logged), as on_bad_record says."""
    import logging
    from tlt_jax.errors import DataError
    kept, skipped = [], []
    for i, record in enumerate(records):
      try:
        self.record_format(record)
        kept.append(record)
      except DataError as e:
        if self.on_bad_record == "error":
          raise DataError(f"{self.path}, record {i}: {e}") from None
        skipped.append(f"record {i}: {e}")
    if skipped:
      logging.getLogger(__name__).warning("skipped %d of %d records of %s (data.on_bad_record='skip'): %s",
                                          len(skipped), len(records), self.path, skipped[0])
    if not kept:
      raise DataError(f"{self.path}: no record has a data_source with a known verifier ({skipped[0]})")
    return kept

  def use_chat(self, template, bos_text: str | None = None) -> None:
    """Renders prompts with `template` (a `ChatTemplate`; None: the plain format). `bos_text`:
    the tokenizer's BOS token, dropped from the front of a rendered prompt (batching adds it)."""
    self._chat, self._bos_text = template, bos_text

  @property
  def chat(self):
    """The chat template prompts are rendered with, None in the plain format."""
    return self._chat

  def messages(self, record: Mapping) -> list[dict]:
    """The prompt of `record` as chat messages: its own messages (verl-style) or one user turn,
    with `system_prompt` and `instruction` applied."""
    from tlt_jax.data.chat import user_messages
    return user_messages(str(record.get("question", "")), self.system_prompt, self.instruction,
                         record.get("messages"))

  def render_prompt(self, record: Mapping) -> str:
    """The prompt text of `record` in the task's format."""
    if self._chat is not None:
      text = self._chat.render(self.messages(record), add_generation_prompt=True)
      if self._bos_text and text.startswith(self._bos_text):
        text = text[len(self._bos_text):]
      return text
    if record.get("messages") is not None:  # verl-style: the turns' texts, one paragraph each
      question = "\n\n".join(m["content"] for m in self.messages(record))
    else:
      question = str(record["question"])
      if self.instruction:
        question = f"{question} {self.instruction}"
    return self.prompt_template.format(question=question)

  def record_format(self, record: Mapping) -> str:
    """The answer format of one record: the task's, or with "auto" its data_source's."""
    if self.answer_format != AUTO:
      return self.answer_format
    source = record.get("data_source")
    fmt = format_for_source(source) if source is not None else None
    if fmt is None:
      from tlt_jax.errors import DataError
      raise DataError(f"data_source={source!r} names no known verifier; allowed: a data_source containing "
                      f"one of {[p for p, _ in DATA_SOURCE_FORMATS]}, or the task option "
                      f"answer_format in {ANSWER_FORMATS}")
    return fmt

  def final_answer(self, answer_text: str, answer_format: str | None = None) -> str:
    """The reference final answer inside a record's answer text (the whole text if unmarked)."""
    found = self._extract(answer_text, answer_format)
    return (found if found is not None else answer_text).strip()

  def example_from_record(self, record: Mapping, index: int = -1) -> Example:
    answer_text = str(record["answer"])
    fmt = self.record_format(record)
    final = self.final_answer(answer_text, fmt)
    trace = str(record["trace"]) if record.get("trace") else answer_text
    if self._extract(trace, fmt) is None:
      trace = f"{GSM8K_MARKER} {final}" if fmt == "gsm8k" else f"\\boxed{{{final}}}"
    meta = {"difficulty": _difficulty(record, trace), "source_index": int(index)}
    if self.answer_format == AUTO:
      meta["answer_format"] = fmt
    for key in ("data_source", "extra"):
      if record.get(key) is not None:
        meta[key] = record[key]
    return Example(prompt=self.render_prompt(record), trace=trace, answer=final, meta=meta,
                   prompt_id=int(index))

  def __repr__(self) -> str:
    return f"{type(self).__name__}(path={self.path!r}, answer_format={self.answer_format!r})"

  def sample(self, rng: np.random.Generator) -> Example:
    records = self.records
    i = int(rng.integers(0, len(records)))
    return self.example_from_record(records[i], i)

  def _extract(self, text: str, answer_format: str | None = None) -> str | None:
    fmt = answer_format or self.answer_format
    first, second = ((last_boxed, after_gsm8k_marker) if fmt == "math"
                     else (after_gsm8k_marker, last_boxed))
    found = first(text)
    return found if found is not None else second(text)

  def extract_answer(self, response: str, answer_format: str | None = None) -> str | None:
    found = self._extract(response, answer_format)
    return None if found is None else found.strip()

  def verify(self, response: str, example: Example) -> bool:
    """The final answer, read with the example's own answer format (verl-style data), matches."""
    predicted = self.extract_answer(response, example.meta.get("answer_format"))
    return predicted is not None and self.answers_match(predicted, example.answer)

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
               on_bad_record: str = "error", prompt_format: str = "auto", system_prompt: str | None = None,
               instruction: str | None = None):
    super().__init__(path=path, records=records, answer_format=answer_format,
                     prompt_template=prompt_template, on_bad_record=on_bad_record,
                     prompt_format=prompt_format, system_prompt=system_prompt, instruction=instruction)


@register_task("verl")
class VerlFileTask(FileTask):
  """verl-style RL data (a parquet `prompt` of chat messages, `reward_model.ground_truth`,
  `data_source`): each record's data_source picks its verifier ("auto")."""

  def __init__(self, path: str | None = None, records: Sequence[Mapping] | None = None,
               answer_format: str = AUTO, prompt_template: str = DEFAULT_TEMPLATE,
               on_bad_record: str = "error", prompt_format: str = "auto", system_prompt: str | None = None,
               instruction: str | None = None):
    super().__init__(path=path, records=records, answer_format=answer_format,
                     prompt_template=prompt_template, on_bad_record=on_bad_record,
                     prompt_format=prompt_format, system_prompt=system_prompt, instruction=instruction)
