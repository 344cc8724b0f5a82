"""Question/answer file readers (JSONL, Parquet): records {"question", "answer"[, "level"]} with
the field names found or given, bad records skipped or reported by `on_bad_record`. The readers
import no task: data/sources.py and data/tasks/file_task.py both use them."""

from __future__ import annotations

import json
import logging
import os
from typing import Mapping, Sequence

from tlt_jax.errors import DataError

log = logging.getLogger(__name__)

QUESTION_FIELDS = ("question", "problem")
ANSWER_FIELDS = ("answer", "solution")
EXTRA_FIELDS = ("level",)  # kept when present (MATH difficulty)
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


def _check_file(path: str, suffixes: Sequence[str], kind: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{kind} file {path!r} does not exist")
  if not path.endswith(tuple(suffixes)):
    raise ValueError(f"{kind} file {path!r}: unsupported extension; allowed: {tuple(suffixes)}")
  return path


def _pick_field(available: Sequence[str], explicit: str | None, aliases: Sequence[str], role: str,
                where: str) -> str:
  if explicit is not None:
    if explicit not in available:
      raise DataError(f"{where}: {role} field {explicit!r} is missing; fields present: {sorted(available)}")
    return explicit
  for name in aliases:
    if name in available:
      return name
  raise DataError(f"{where}: no {role} field; allowed names: {tuple(aliases)} (or pass "
                   f"{role}_field=...); fields present: {sorted(available)}")


def _field_text(value, field: str, where: str) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  raise DataError(f"{where}: field {field!r} must be a string or a number, got {type(value).__name__} "
                   f"({value!r:.40})")


def _record(row: Mapping, qf: str, af: str, where: str) -> dict:
  out = {"question": _field_text(row[qf], qf, where), "answer": _field_text(row[af], af, where)}
  for extra in EXTRA_FIELDS:
    if row.get(extra) is not None:
      out[extra] = row[extra]
  return out


def _report_skipped(path: str, skipped: list[str], total: int) -> None:
  if skipped:
    log.warning("skipped %d of %d records of %s (data.on_bad_record='skip'; 'error' stops instead): %s%s",
                len(skipped), total, path, "; ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")


def _parse_records(path: str, items, parse, on_bad_record: str) -> tuple[list[dict], list[str]]:
  """(records, skipped): `parse(where, raw)` of every (where, raw) of `items`. A DataError it
  raises stops the load (on_bad_record="error") or skips that item, its message kept."""
  records, skipped = [], []
  for where, raw in items:
    try:
      records.append(parse(where, raw))
    except DataError as e:
      if on_bad_record == "error":
        raise
      skipped.append(str(e).replace(f"{path}, ", ""))
  return records, skipped


def load_jsonl(path: str, question_field: str | None = None, answer_field: str | None = None,
               on_bad_record: str = "error") -> list[dict]:
  """Reads question/answer records, one JSON object a line (blank lines skipped).

  Fields: `question_field` / `answer_field`, else the first present of QUESTION_FIELDS
  ("question", "problem") / ANSWER_FIELDS ("answer", "solution"). Returns dicts
  {"question", "answer"} (+ "level" when present). Errors (DataError) name the file, the line
  and the field. With on_bad_record="skip" an unusable line (invalid JSON, missing or non-text
  field) is skipped, counted and logged instead; a file with no usable record still raises.
  """
  path = _check_file(path, JSONL_SUFFIXES, "JSONL")

  def parse(where, line):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
      raise DataError(f"{where}: expected a JSON object with question/answer fields, got {type(row).__name__}")
    qf = _pick_field(list(row), question_field, QUESTION_FIELDS, "question", where)
    af = _pick_field(list(row), answer_field, ANSWER_FIELDS, "answer", where)
    return _record(row, qf, af, where)

  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [(f"{path}, line {lineno}", line) for lineno, line in enumerate(f, start=1) if line.strip()]
  records, skipped = _parse_records(path, lines, parse, on_bad_record)
  if not records:
    raise DataError(f"JSONL file {path!r} holds no usable records ({len(lines)} lines with text, "
                    f"{len(skipped)} unusable); allowed: one JSON object a line with question and "
                    "answer fields")
  _report_skipped(path, skipped, len(lines))
  return records


VERL_COLUMNS = ("prompt", "reward_model")  # a parquet file with both is read as verl-style data
VERL_TRACE_KEYS = ("answer", "solution")  # extra_info keys holding a worked solution (SFT traces)


def _verl_messages(value, where: str) -> list[dict]:
  from tlt_jax.data.chat import check_messages
  if hasattr(value, "tolist"):
    value = value.tolist()
  try:
    return check_messages(value, f"{where}, prompt")
  except ValueError as e:
    raise DataError(str(e)) from None


def _verl_record(row: Mapping, where: str) -> dict:
  """One verl-style row as a record: messages, answer (= reward_model.ground_truth),
  data_source, question (the last user turn), trace (extra_info's worked solution when it has
  one) and extra (every other column, JSON-ready)."""
  messages = _verl_messages(row.get("prompt"), where)
  reward = row.get("reward_model")
  if not isinstance(reward, Mapping) or reward.get("ground_truth") is None:
    raise DataError(f"{where}: reward_model.ground_truth is missing (reward_model={reward!r:.80}); allowed: "
                    "a struct with a ground_truth string")
  answer = _field_text(reward["ground_truth"], "reward_model.ground_truth", where)
  users = [m["content"] for m in messages if m["role"] == "user"]
  if not users:
    raise DataError(f"{where}: prompt has no user message (roles {[m['role'] for m in messages]})")
  record = {"messages": messages, "question": users[-1], "answer": answer}
  if row.get("data_source") is not None:
    record["data_source"] = _field_text(row["data_source"], "data_source", where)
  extra = {k: v for k, v in row.items() if k not in ("prompt", "reward_model", "data_source") and v is not None}
  info = extra.get("extra_info")
  if isinstance(info, Mapping):
    for key in VERL_TRACE_KEYS:
      if isinstance(info.get(key), str) and info[key].strip():
        record["trace"] = info[key]
        break
  if extra:
    record["extra"] = json.loads(json.dumps(extra, default=str))
  return record


def load_verl_parquet(path: str, on_bad_record: str = "error") -> list[dict]:
  """Reads verl-style RL data: a `prompt` column of chat messages [{role, content}], a
  `reward_model` struct whose `ground_truth` is the reference answer, and `data_source` (which
  picks the verifier, see tasks/file_task.py). Other columns (ability, extra_info, ...) are kept
  under "extra" and end up in each example's meta. Errors and `on_bad_record` as `load_jsonl`."""
  import pyarrow.parquet as pq

  path = _check_file(path, PARQUET_SUFFIXES, "parquet")
  rows = pq.read_table(path).to_pylist()
  records, skipped = _parse_records(path, ((f"{path}, row {i}", row) for i, row in enumerate(rows)),
                                    lambda where, row: _verl_record(row, where), on_bad_record)
  if not records:
    raise DataError(f"verl-style parquet file {path!r} holds no usable rows ({len(rows)} rows, {len(skipped)} "
                    f"unusable{': ' + skipped[0] if skipped else ''}); allowed: rows with a prompt of "
                    "{role, content} messages and reward_model.ground_truth")
  _report_skipped(path, skipped, len(rows))
  return records


def load_parquet(path: str, question_field: str | None = None, answer_field: str | None = None,
                 on_bad_record: str = "error") -> list[dict]:
  """Reads question/answer records from a parquet file (pyarrow); same fields, errors and
  `on_bad_record` as `load_jsonl`, with rows counted from 0. A file with `prompt` and
  `reward_model` columns (and no explicit fields) is verl-style data: `load_verl_parquet`."""
  import pyarrow
  import pyarrow.parquet as pq

  path = _check_file(path, PARQUET_SUFFIXES, "parquet")
  try:
    names = pq.read_schema(path).names
  except (pyarrow.ArrowException, OSError) as e:
    raise DataError(f"parquet file {path!r} is unreadable ({type(e).__name__}: {e}); allowed: a parquet "
                    "file with question and answer columns") from None
  if question_field is None and answer_field is None and all(c in names for c in VERL_COLUMNS):
    return load_verl_parquet(path, on_bad_record)
  qf = _pick_field(names, question_field, QUESTION_FIELDS, "question", f"{path}, columns")
  af = _pick_field(names, answer_field, ANSWER_FIELDS, "answer", f"{path}, columns")
  columns = [qf, af] + [c for c in EXTRA_FIELDS if c in names and c not in (qf, af)]
  rows = pq.read_table(path, columns=columns).to_pylist()
  records, skipped = _parse_records(path, ((f"{path}, row {i}", row) for i, row in enumerate(rows)),
                                    lambda where, row: _record(row, qf, af, where), on_bad_record)
  if not records:
    raise DataError(f"parquet file {path!r} holds no usable rows ({len(rows)} rows, {len(skipped)} "
                    "unusable); allowed: rows with text question and answer columns")
  _report_skipped(path, skipped, len(rows))
  return records


def load_qa_file(path: str, question_field: str | None = None, answer_field: str | None = None,
                 on_bad_record: str = "error") -> list[dict]:
  """`load_jsonl` or `load_parquet`, chosen by the file's extension."""
  path = os.fspath(path)
  if path.endswith(JSONL_SUFFIXES):
    return load_jsonl(path, question_field, answer_field, on_bad_record)
  if path.endswith(PARQUET_SUFFIXES):
    return load_parquet(path, question_field, answer_field, on_bad_record)
  if not os.path.exists(path):
    raise FileNotFoundError(f"question/answer file {path!r} does not exist")
  raise ValueError(f"question/answer file {path!r}: unsupported extension; allowed: "
                   f"{JSONL_SUFFIXES + PARQUET_SUFFIXES}")
