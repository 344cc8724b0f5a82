"""Published GSM8K and MATH files -> verl-style parquet (the layout `readers.load_verl_parquet`
and the `verl` task read; scripts/prepare_data.py is the command line).

Inputs, as published:
  * GSM8K (Cobbe et al. 2021, `openai/gsm8k`, config "main"): parquet or JSONL rows
    {question, answer}, the answer a worked solution ending "#### <number>".
  * MATH (Hendrycks et al. 2021, `hendrycks/competition_math`, `DigitalLearningGmbH/MATH-lighteval`,
    and the 500-problem test subset `HuggingFaceH4/MATH-500`): rows {problem, solution, level,
    type} (+ `answer` in MATH-500), the final answer the solution's last \\boxed{...}.

Output rows (one per problem):
  data_source   "openai/gsm8k" or the MATH set's name (picks the verifier: `####` / `\\boxed{}`)
  prompt        [{"role": "user", "content": problem + " " + instruction}]
  ability       "math"
  reward_model  {"style": "rule", "ground_truth": final answer}
  extra_info    {"split", "index", "answer": the worked solution, "question": the problem,
                 "level", "type" (MATH)}
"""

from __future__ import annotations

import json
import logging
import os
from typing import Iterable, Mapping, Sequence

import numpy as np

from tlt_jax.data.tasks.file_task import after_gsm8k_marker, last_boxed
from tlt_jax.errors import DataError

log = logging.getLogger(__name__)

GSM8K_INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."
MATH_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
DATASETS = {
    "gsm8k": dict(data_source="openai/gsm8k", question=("question",), solution=("answer",),
                  instruction=GSM8K_INSTRUCTION),
    "math": dict(data_source="DigitalLearningGmbH/MATH-lighteval", question=("problem",),
                 solution=("solution",), instruction=MATH_INSTRUCTION),
}


def read_rows(path: str) -> list[dict]:
  """Rows of a .parquet, .jsonl or .json (a list of objects) file."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path!r} does not exist")
  if path.endswith((".parquet", ".pq")):
    import pyarrow.parquet as pq
    return pq.read_table(path).to_pylist()
  if path.endswith(".jsonl"):
    rows = []
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
    return rows
  if path.endswith(".json"):
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
    if not isinstance(data, list):
      raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
    return data
  raise ValueError(f"{path!r}: unsupported extension; allowed: .parquet, .jsonl, .json")


def _field(row: Mapping, names: Sequence[str]) -> str | None:
  for name in names:
    value = row.get(name)
    if isinstance(value, str) and value.strip():
      return value
  return None


def verl_row(dataset: str, row: Mapping, split: str, index: int, instruction: str | None = None,
             data_source: str | None = None) -> dict:
  """One published row as a verl-style row; DataError naming what is missing."""
  spec = DATASETS[dataset]
  question, solution = _field(row, spec["question"]), _field(row, spec["solution"])
  if question is None:
    raise DataError(f"no {spec['question'][0]!r} text")
  if solution is None and not (dataset == "math" and _field(row, ("answer",))):
    raise DataError(f"no {spec['solution'][0]!r} text")
  if dataset == "gsm8k":
    final = after_gsm8k_marker(solution)
  else:
    final = _field(row, ("answer",)) or last_boxed(solution or "")
  if not final or not final.strip():
    marker = "####" if dataset == "gsm8k" else "\\boxed{}"
    raise DataError(f"no final answer in the solution ({marker} missing)")
  instruction = spec["instruction"] if instruction is None else instruction
  content = f"{question} {instruction}" if instruction else question
  extra = {"split": split, "index": int(index), "question": question, "answer": solution or ""}
  for key in ("level", "type", "subject", "unique_id"):
    if row.get(key) is not None:
      extra[key] = str(row[key])
  return {"data_source": data_source or spec["data_source"], "prompt": [{"role": "user", "content": content}],
          "ability": "math", "reward_model": {"style": "rule", "ground_truth": final.strip()},
          "extra_info": extra}


def convert(dataset: str, rows: Iterable[Mapping], split: str, instruction: str | None = None,
            data_source: str | None = None, on_bad_record: str = "skip", where: str = "input") -> list[dict]:
  """verl-style rows of `rows`; unusable ones are skipped (counted, logged) or raise DataError."""
  if dataset not in DATASETS:
    raise ValueError(f"dataset {dataset!r} is not supported; allowed: {sorted(DATASETS)}")
  out, skipped = [], []
  for i, row in enumerate(rows):
    try:
      out.append(verl_row(dataset, row, split, len(out), instruction, data_source))
    except DataError as e:
      if on_bad_record == "error":
        raise DataError(f"{where}, row {i}: {e}") from None
      skipped.append(f"row {i}: {e}")
  if skipped:
    log.warning("skipped %d of %d rows of %s: %s", len(skipped), len(out) + len(skipped), where, skipped[0])
  return out


def split_rows(rows: Sequence, test_size: float | int, seed: int = 0) -> tuple[list, list]:
  """(train, test): a seeded permutation's last `test_size` rows (a fraction < 1 or a count) held out."""
  n = len(rows)
  k = int(round(test_size * n)) if isinstance(test_size, float) and test_size < 1 else int(test_size)
  if not 0 < k < n:
    raise ValueError(f"test_size={test_size!r} holds out {k} of {n} rows; allowed: between 1 and {n - 1}")
  perm = np.random.default_rng(seed).permutation(n)
  return [rows[i] for i in sorted(perm[:n - k])], [rows[i] for i in sorted(perm[n - k:])]


def write_parquet(rows: Sequence[Mapping], path: str) -> str:
  import pyarrow as pa
  import pyarrow.parquet as pq
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  pq.write_table(pa.Table.from_pylist(list(rows)), path)
  return path


def prepare(dataset: str, train: str, out: str, test: str | None = None, test_size: float = 0.0,
            seed: int = 0, instruction: str | None = None, data_source: str | None = None,
            on_bad_record: str = "skip") -> dict:
  """Writes `out`/train.parquet and `out`/test.parquet; returns {split: rows written}.

  The test split is the `test` file when given, else `test_size` of `train` held out (seeded).
  """
  train_rows = read_rows(train)
  if test is not None:
    test_rows = read_rows(test)
  elif test_size:
    train_rows, test_rows = split_rows(train_rows, test_size, seed)
  else:
    test_rows = []
  counts = {}
  for split, rows, where in (("train", train_rows, train), ("test", test_rows, test or train)):
    if not rows:
      continue
    converted = convert(dataset, rows, split, instruction, data_source, on_bad_record, where)
    if not converted:
      raise DataError(f"{where}: no usable {dataset} rows among {len(rows)}")
    write_parquet(converted, os.path.join(out, f"{split}.parquet"))
    counts[split] = len(converted)
  return counts
