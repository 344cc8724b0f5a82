"""Fixed ZebraLogic benchmark splits: our own generated one, and a reader for the public one.

* `benchmark_puzzles(count_per_size, seed)`: `count_per_size` puzzles for every size N x M with
  N, M in 2..6 (25 sizes), puzzle k of size N x M generated from default_rng([seed, N, M, k]):
  fixed, and any single puzzle reproducible on its own.
* `load_public_records(path)`: the public benchmark's grid-mode records (allenai/ZebraLogicBench,
  config "grid_mode": fields id, size "N*M", puzzle (text), solution {"header": [...], "rows":
  [[...]]}), from JSONL or parquet, as the user has it on disk; `to_public_record(puzzle)` writes
  ours in the same format.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from tlt_jax.data.zebra.generate import generate_puzzle
from tlt_jax.data.zebra.puzzle import MAX_ATTRIBUTES, MAX_HOUSES, MIN_ATTRIBUTES, MIN_HOUSES, Puzzle
from tlt_jax.data.zebra.render import puzzle_text

BENCHMARK_SEED = 20250203  # the ZebraLogic paper's arXiv date; any fixed number would do
BENCHMARK_SIZES = tuple((n, m) for n in range(MIN_HOUSES, MAX_HOUSES + 1)
                        for m in range(MIN_ATTRIBUTES, MAX_ATTRIBUTES + 1))


def benchmark_puzzle(num_houses: int, num_attributes: int, index: int, seed: int = BENCHMARK_SEED) -> Puzzle:
  """Puzzle `index` of size N x M in the fixed split of `seed`."""
  rng = np.random.default_rng([seed, num_houses, num_attributes, index])
  return generate_puzzle(rng, num_houses, num_attributes,
                         seed_info=f"bench-{seed}-{num_houses}x{num_attributes}-{index}")


def benchmark_puzzles(count_per_size: int = 4, seed: int = BENCHMARK_SEED,
                      sizes: Sequence[tuple[int, int]] = BENCHMARK_SIZES) -> list[Puzzle]:
  """`count_per_size` puzzles of each size (all 25 sizes 2..6 x 2..6 by default), size-major."""
  if isinstance(count_per_size, bool) or not isinstance(count_per_size, int) or count_per_size < 1:
    raise ValueError(f"benchmark_puzzles: count_per_size={count_per_size!r} must be an int >= 1")
  return [benchmark_puzzle(n, m, k, seed) for n, m in sizes for k in range(count_per_size)]


def to_public_record(puzzle: Puzzle, record_id: str | None = None) -> dict[str, Any]:
  """Our puzzle as a grid-mode record of the public benchmark."""
  header = ["House", *puzzle.attributes]
  rows = [[str(h + 1), *cells] for h, cells in enumerate(puzzle.grid())]
  return {"id": record_id or puzzle.seed_info or f"zebra-{puzzle.size}",
          "size": f"{puzzle.num_houses}*{puzzle.num_attributes}", "puzzle": puzzle_text(puzzle),
          "solution": {"header": header, "rows": rows}}


def _plain(value: Any) -> Any:
  """numpy arrays (as pandas gives parquet lists) -> lists, recursively."""
  if isinstance(value, np.ndarray):
    return [_plain(x) for x in value.tolist()]
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(x) for x in value]
  return value


def _blank(cell: Any) -> bool:
  """An empty or placeholder cell ("", "___", "?", None): how a release hides its answers."""
  return cell is None or str(cell).strip().strip("_?-*").strip() == ""


def check_public_record(record: Mapping, where: str) -> dict[str, Any]:
  """A grid-mode record with its fields checked; errors name the place and the field. A blanked
  solution (no rows, or a cell that is empty or a placeholder such as "___") is an error: there
  is nothing to score against."""
  if not isinstance(record, Mapping):
    raise ValueError(f"{where}: a ZebraLogic record must be a JSON object, got {type(record).__name__}; "
                     "a .json/.jsonl file holds one record object a line (not a JSON array)")
  for field in ("puzzle", "solution"):
    if field not in record:
      raise ValueError(f"{where}: ZebraLogic record has no field {field!r} (fields: {sorted(record)}); "
                       "expected id, size, puzzle, solution {header, rows}")
  solution = _plain(record["solution"])
  if isinstance(solution, str):
    solution = json.loads(solution)
  if not isinstance(solution, Mapping) or "header" not in solution or "rows" not in solution:
    raise ValueError(f"{where}: field 'solution' must be {{'header': [...], 'rows': [[...]]}}, got "
                     f"{str(solution)[:80]!r}")
  rows = solution["rows"]
  if not rows or any(not row or any(_blank(cell) for cell in row[1:]) for row in rows):
    raise ValueError(f"{where}: the solution is blanked ({str(rows)[:80]!r}); the records carry no "
                     "answers to score against (the public release hides them)")
  return {"id": str(record.get("id", "")), "size": str(record.get("size", "")),
          "puzzle": str(record["puzzle"]), "solution": solution}


def load_public_records(path: str) -> list[dict[str, Any]]:
  """Grid-mode records from a .jsonl/.json (one record a line) or .parquet file."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"ZebraLogic file {path!r} does not exist")
  if path.endswith((".parquet", ".pq")):
    import pyarrow.parquet as pq
    rows = pq.read_table(path).to_pylist()
  elif path.endswith((".jsonl", ".json")):
    rows = []
    with open(path, encoding="utf-8") as f:
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          if not rows and line.lstrip().startswith("["):
            raise ValueError(f"{path}, line {lineno}: the file holds a JSON array; expected one record "
                             "object a line (JSONL), e.g. write it with `for r in records: "
                             "print(json.dumps(r))`")
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {lineno}: invalid JSON ({e.msg})") from None
  else:
    raise ValueError(f"ZebraLogic file {path!r}: unknown suffix; allowed: .jsonl, .json, .parquet, .pq")
  if not rows:
    raise ValueError(f"ZebraLogic file {path!r} holds no records")
  return [check_public_record(r, f"{path}, record {i}") for i, r in enumerate(rows)]
