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


def load_parquet(path: str, question_field: str | None = None, answer_field: str | None = None,
                 on_bad_record: str = "error") -> list[dict]:
  """Reads question/answer records from a parquet file (pyarrow); same fields, errors and
  `on_bad_record` as `load_jsonl`, with rows counted from 0."""
  import pyarrow
  import pyarrow.parquet as pq

  path = _check_file(path, PARQUET_SUFFIXES, "parquet")
  try:
    names = pq.read_schema(path).names
  except (pyarrow.ArrowException, OSError) as e:
    raise DataError(f"parquet file {path!r} is unreadable ({type(e).__name__}: {e}); allowed: a parquet "
                    "file with question and answer columns") from None
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
