"""Renderings of a puzzle, its solving trace and its answer grid, and the answer parser.

Two styles:
  * "natural": the puzzle in English as the ZebraLogic benchmark writes it (attribute lists, then
    numbered clues) and the answer as its JSON grid, house -> attribute -> value:
      {"House 1": {"Name": "Alice", "Colour": "red"}, "House 2": {...}}
  * "compact": a small-alphabet encoding for a character-level tiny policy. Attribute a is the
    letter "abcdef"[a], its value v is that letter and v+1 ("b2"), houses are 1..N:
      prompt   "3x3:a1<b2,c3+a2,b1~c1;"            (size, then the clues)
      trace    "c3+a2:a2@2,*:c3@1,...;A:a3b1c3|a2b2c1|a1b3c2"
    A clue is  v@h (found_at)  v!h (not_at)  v=w (same_house)  v<w (left_of)  v>w (right_of)
    v+w (v directly left of w)  v~w (beside)  v%w (one house between)  v#w (two houses between).
    A trace step is "reason:fact" with fact "v@h"; reason is the clue, "*" (the only house or
    value left) or "?" (every other house contradicts); a found_at step is its clue alone. The
    answer after "A:" lists the houses left to right, separated by "|".

Both parse to one canonical grid, {"1": {attribute: value}, ...} with keys and values lower-cased
and whitespace collapsed, which is what puzzle and cell accuracy compare (the benchmark's own
evaluator also compares lower-cased, stripped cells).
"""

from __future__ import annotations

import json
import re
from typing import Any, Mapping, Sequence

from tlt_jax.data.zebra.puzzle import ATTRIBUTE_POOL, Clue, Puzzle
from tlt_jax.data.zebra.solve import Step

LETTERS = "abcdef"
COMPACT_OPS = {"found_at": "@", "not_at": "!", "same_house": "=", "left_of": "<", "right_of": ">",
               "directly_left": "+", "beside": "~", "one_between": "%", "two_between": "#"}
COMPACT_CHARSET = LETTERS + "123456" + "x:,;|*?A" + "".join(COMPACT_OPS.values())
ANSWER_MARKER = "A:"
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth")

Grid = dict[str, dict[str, str]]


# ----------------------------------------------------------------------------- compact


def compact_value(value: tuple[int, int]) -> str:
  return f"{LETTERS[value[0]]}{value[1] + 1}"


def compact_clue(clue: Clue) -> str:
  op = COMPACT_OPS[clue.kind]
  if clue.second is None:
    return f"{compact_value(clue.first)}{op}{clue.house + 1}"
  return f"{compact_value(clue.first)}{op}{compact_value(clue.second)}"


def compact_prompt(puzzle: Puzzle) -> str:
  return f"{puzzle.num_houses}x{puzzle.num_attributes}:" + ",".join(compact_clue(c) for c in puzzle.clues) + ";"


def compact_step(step: Step) -> str:
  fact = f"{compact_value(step.value)}@{step.house + 1}"
  if isinstance(step.reason, Clue):
    if step.reason.kind == "found_at":
      return fact
    return f"{compact_clue(step.reason)}:{fact}"
  return {"only": "*", "contradiction": "?", "search": "?"}[step.reason] + ":" + fact


def compact_answer(puzzle: Puzzle) -> str:
  rows = []
  for h in range(puzzle.num_houses):
    rows.append("".join(compact_value((a, puzzle.value_at(a, h))) for a in range(puzzle.num_attributes)))
  return "|".join(rows)


def compact_facts(puzzle: Puzzle) -> str:
  """The solution as one fact "v@h" per value, attribute by attribute: "a1@2,a2@1,b1@1,b2@2"
  (the clues' own found_at form; `parse_compact_answer` reads it as a grid)."""
  return ",".join(f"{compact_value((a, v))}@{puzzle.house_of[a][v] + 1}"
                  for a in range(puzzle.num_attributes) for v in range(puzzle.num_houses))


def compact_ordered_facts(steps: Sequence[Step]) -> str:
  """The solution as one fact "v@h" per value in the order the solver fixes them (`deduce`):
  "b2@1,b1@2,a1@2,a2@1". Each fact then follows from a clue and the facts before it, where the
  attribute-by-attribute order (`compact_facts`) may ask for the last deduction first."""
  return ",".join(f"{compact_value(s.value)}@{s.house + 1}" for s in steps)


def compact_trace(puzzle: Puzzle, steps: Sequence[Step]) -> str:
  return ",".join(compact_step(s) for s in steps) + ";" + ANSWER_MARKER + compact_answer(puzzle)


def compact_grid(puzzle: Puzzle) -> Grid:
  """The solution as a canonical grid in the compact style's names ("a": "a2", ...)."""
  return parse_compact_answer(compact_answer(puzzle))


# ----------------------------------------------------------------------------- natural language


def describe(puzzle: Puzzle, value: tuple[int, int]) -> str:
  """"the person who drinks tea", "Alice", ... for value (a, v)."""
  a, v = value
  return ATTRIBUTE_POOL[puzzle.attributes[a]][1].format(puzzle.values[a][v])


def clue_sentence(puzzle: Puzzle, clue: Clue) -> str:
  x = describe(puzzle, clue.first)
  if clue.kind == "found_at":
    text = f"{x} lives in the {ORDINALS[clue.house]} house."
  elif clue.kind == "not_at":
    text = f"{x} does not live in the {ORDINALS[clue.house]} house."
  else:
    y = describe(puzzle, clue.second)
    text = {"same_house": f"{x} is {y}.",
            "left_of": f"{x} lives somewhere to the left of {y}.",
            "right_of": f"{x} lives somewhere to the right of {y}.",
            "directly_left": f"{x} lives directly left of {y}.",
            "beside": f"{x} and {y} live next to each other.",
            "one_between": f"There is one house between {x} and {y}.",
            "two_between": f"There are two houses between {x} and {y}."}[clue.kind]
  return text[0].upper() + text[1:]


def puzzle_text(puzzle: Puzzle) -> str:
  """The puzzle in English, laid out like the ZebraLogic benchmark's puzzles."""
  n = puzzle.num_houses
  lines = [f"There are {n} houses in a row, numbered 1 to {n} from left to right. Each house has one "
           "occupant, and each of the following attributes takes a different value in every house:"]
  for name, values in zip(puzzle.attributes, puzzle.values):
    lines.append(f" - {name}: {', '.join(values)}")
  lines += ["", "## Clues:"]
  lines += [f"{i + 1}. {clue_sentence(puzzle, c)}" for i, c in enumerate(puzzle.clues)]
  return "\n".join(lines)


def natural_step(puzzle: Puzzle, step: Step) -> str:
  who = describe(puzzle, step.value)
  where = f"lives in house {step.house + 1}"
  if isinstance(step.reason, Clue):
    return f"By clue {puzzle.clues.index(step.reason) + 1}, {who} {where}."
  if step.reason == "only":
    return f"By elimination, {who} {where}."
  return f"Every other house leads to a contradiction, so {who} {where}."


def answer_json(puzzle: Puzzle) -> dict[str, dict[str, str]]:
  """The benchmark's answer grid: {"House h": {attribute: value}}, houses 1..N."""
  grid = puzzle.grid()
  return {f"House {h + 1}": dict(zip(puzzle.attributes, grid[h])) for h in range(puzzle.num_houses)}


def natural_trace(puzzle: Puzzle, steps: Sequence[Step]) -> str:
  body = "\n".join(natural_step(puzzle, s) for s in steps)
  return f"{body}\nSolution: {json.dumps(answer_json(puzzle))}"


NATURAL_INSTRUCTION = ("Solve the puzzle step by step. End with the solution as JSON that maps each "
                       "house to its attributes, e.g. {\"House 1\": {\"Name\": \"...\", ...}, ...}.")


def natural_prompt(puzzle_body: str) -> str:
  return f"{puzzle_body}\n\n{NATURAL_INSTRUCTION}\n"


# ----------------------------------------------------------------------------- parsing


def normalize_cell(text: Any) -> str:
  """Lower-cased, whitespace collapsed: "  Red  House" -> "red house"."""
  return " ".join(str(text).split()).lower()


def _house_key(key: Any) -> str | None:
  digits = re.findall(r"\d+", str(key))
  return str(int(digits[-1])) if digits else None


def normalize_grid(grid: Mapping) -> Grid | None:
  """{house: {attribute: value}} -> the canonical grid ("House 2" -> "2"; keys and values
  lower-cased, whitespace collapsed). A {"solution": grid} wrapper is unwrapped. None if the
  object is not a grid."""
  if "solution" in grid and isinstance(grid["solution"], Mapping):
    grid = grid["solution"]
  out: Grid = {}
  for key, row in grid.items():
    house = _house_key(key)
    if house is None or not isinstance(row, Mapping):
      return None
    out[house] = {normalize_cell(k): normalize_cell(v) for k, v in row.items()}
  return out or None


def grid_from_rows(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Grid:
  """The benchmark's record solution {"header": ["House", "Name", ...], "rows": [["1", ...]]}
  as a canonical grid."""
  header = [normalize_cell(h) for h in header]
  grid: Grid = {}
  for row in rows:
    row = [normalize_cell(x) for x in row]
    house = _house_key(row[0])
    if house is None:
      raise ValueError(f"zebra record: row {row} does not start with a house number")
    grid[house] = dict(zip(header[1:], row[1:]))
  return grid


def _json_objects(text: str):
  """Balanced {...} substrings of text, last first."""
  ends = [i for i, ch in enumerate(text) if ch == "}"]
  seen_starts = set()
  for end in reversed(ends):
    depth = 0
    for start in range(end, -1, -1):
      if text[start] == "}":
        depth += 1
      elif text[start] == "{":
        depth -= 1
        if depth == 0:
          if start not in seen_starts:
            seen_starts.add(start)
            yield text[start:end + 1]
          break


def parse_json_answer(text: str) -> Grid | None:
  """The last JSON object in `text` that is an answer grid, canonical; None if there is none."""
  for candidate in _json_objects(text):
    try:
      obj = json.loads(candidate)
    except ValueError:
      continue
    if isinstance(obj, Mapping):
      grid = normalize_grid(obj)
      if grid is not None:
        return grid
  return None


_COMPACT_CELL = re.compile(r"([a-f])(\d)")
_COMPACT_FACT = re.compile(r"([a-f])(\d)@(\d)")


def parse_compact_answer(text: str) -> Grid | None:
  """"a3b1c3|a2b2c1" (whitespace and case ignored) -> {"1": {"a": "a3", ...}, ...}; None if a
  house has no cell or a cell is malformed. The facts form "a1@2,a2@1,..." (`compact_facts`)
  gives the same grid (a value placed twice: the later fact; a house no fact names: absent)."""
  text = "".join(text.split()).lower()
  grid: Grid = {}
  if "@" in text:
    for item in text.split(","):
      fact = _COMPACT_FACT.fullmatch(item)
      if fact is None:
        return None
      attribute, value, house = fact.groups()
      grid.setdefault(house, {})[attribute] = attribute + value
    return grid
  for h, row in enumerate(text.split("|")):
    cells = _COMPACT_CELL.findall(row)
    if not cells or "".join(a + v for a, v in cells) != row:
      return None
    grid[str(h + 1)] = {a: a + v for a, v in cells}
  return grid


def extract_grid(response: str) -> Grid | None:
  """The final answer grid of a response: the last JSON grid if there is one, else the compact
  grid after the last "A:" marker (either case). None when there is neither."""
  grid = parse_json_answer(response) if "{" in response else None
  if grid is not None:
    return grid
  pos = max(response.rfind(ANSWER_MARKER), response.rfind(ANSWER_MARKER.lower()))
  if pos < 0:
    return None
  return parse_compact_answer(response[pos + len(ANSWER_MARKER):])


def grid_to_text(grid: Grid) -> str:
  """The canonical grid as a canonical string (sorted keys): Example.answer."""
  return json.dumps(grid, sort_keys=True, separators=(",", ":"))


def cell_counts(predicted: Grid | None, reference: Grid) -> tuple[int, int]:
  """(cells right, cells in the reference); an unparsed prediction (None) gets 0 right. Summed
  over puzzles these give ZeroEval's pooled cell accuracy."""
  total = sum(len(row) for row in reference.values())
  if predicted is None or total == 0:
    return 0, total
  right = sum(predicted.get(h, {}).get(k) == v for h, row in reference.items() for k, v in row.items())
  return int(right), total


def cell_accuracy(predicted: Grid | None, reference: Grid) -> float:
  """Fraction of the reference's N*M cells the prediction gets right (missing cells are wrong)."""
  right, total = cell_counts(predicted, reference)
  return right / total if total else 0.0
