"""ZebraLogic logic-grid puzzles as an RL task (Lin et al. 2025, "ZebraLogic: On the Scaling Limits
of LLMs for Logical Reasoning").

A puzzle of N houses x M attributes (tlt_jax/data/zebra/) asks for the unique assignment of every
attribute's values to houses. The final answer is the grid house -> attribute -> value:
  * puzzle accuracy (`verify`): every one of the N*M cells right;
  * cell accuracy (`cell_accuracy`, `partial_credit`): the fraction of cells right, the optional
    partial-credit reward (`rl.rewards.partial_credit`).

Two renderings (`style`):
  * "compact" (default): a small alphabet for the CharTokenizer of the tiny policy; the SFT trace
    is the solver's deduction (each step names the clue and the value it fixes) then the grid:
      prompt "3x3:c1+a3,b2=c2,a1~b3;"   trace "c1+a3:a3@2,...,*:b1@1;A:a2b3c1|a3b2c3|a1b1c2"
  * "natural": the benchmark's English puzzle with an instruction to answer in JSON, for HF
    tokenizers; the trace is the same deduction in English ending in the JSON grid.

meta: difficulty = ceil(log10((N!)^M)) (an int for `rl.min_difficulty`), num_houses, num_attributes,
size "NxM", search_space (N!)^M, bucket (small < 1e3 <= medium < 1e6 <= large < 1e10 <= xl),
z3_conflicts, num_clues, num_steps.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import Any, Mapping

import numpy as np

from tlt_jax.data.tasks.base import Example, Task, register_task
from tlt_jax.data.zebra import render
from tlt_jax.data.zebra.generate import generate_puzzle
from tlt_jax.data.zebra.puzzle import (MAX_ATTRIBUTES, MAX_HOUSES, MIN_ATTRIBUTES, MIN_HOUSES, RECIPES, Puzzle,
                                       search_space, size_bucket)
from tlt_jax.data.zebra.solve import deduce, z3_conflicts

STYLES = ("compact", "natural")
TRACES = ("deduction", "answer", "facts", "ordered")


def difficulty_of(space: int) -> int:
  """ceil(log10((N!)^M)): 1 for 2x2 (4), 3 for 3x3 (216), 18 for 6x6 (~1.4e17)."""
  return max(1, math.ceil(math.log10(space)))


def puzzle_key(puzzle: Puzzle) -> str:
  """The puzzle's identity for `ZebraTask.holdout`: its size and its clues (compact, sorted), so
  the same clues in another order or wording are the same puzzle: "2x2:a2!1,b1<b2"."""
  return f"{puzzle.size}:" + ",".join(sorted(render.compact_clue(c) for c in puzzle.clues))


@register_task("zebra")
@dataclasses.dataclass(frozen=True)
class ZebraTask(Task):
  """Random zebra puzzles with N ~ U{min_houses..max_houses}, M ~ U{min_attributes..max_attributes}.

  style: "compact" (char tokenizer) or "natural" (English + JSON, HF tokenizers).
  z3: record Z3's conflict count in meta (a few ms per puzzle).
  recipe: the generator's recipe (zebra/puzzle.py `RECIPES`): "zebralogic" (the ZebraLogic
    generator's removal weights and schedule) or "halving" (the earlier one).
  trace: the SFT target: "deduction" (the solver's steps, then the grid), "answer" (the grid
    alone: "A:a2b1|a1b2" in the compact style, "Solution: {...}" in the natural one) or "facts"
    (compact: each value's house, "A:a1@2,a2@1,b1@1,b2@2", the clues' found_at form; natural: as
    "answer") or "ordered" (compact: the same facts in the order the solver fixes them,
    "A:b2@1,b1@2,a1@2,a2@1"; natural: as "answer").
  holdout: puzzle keys (`puzzle_key`: the size and the set of clues, whatever their order or
    wording) that `sample` never returns, so that training draws miss a fixed evaluation set.
  """

  min_houses: int = 2
  max_houses: int = 3
  min_attributes: int = 2
  max_attributes: int = 3
  style: str = "compact"
  z3: bool = True
  recipe: str = "zebralogic"
  trace: str = "deduction"
  holdout: frozenset = frozenset()

  def __post_init__(self):
    for key, lo, hi in (("min_houses", MIN_HOUSES, MAX_HOUSES), ("max_houses", MIN_HOUSES, MAX_HOUSES),
                        ("min_attributes", MIN_ATTRIBUTES, MAX_ATTRIBUTES),
                        ("max_attributes", MIN_ATTRIBUTES, MAX_ATTRIBUTES)):
      value = getattr(self, key)
      if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"zebra.{key}={value!r} is not allowed; allowed: an int in [{lo}, {hi}]")
    if self.min_houses > self.max_houses:
      raise ValueError(f"zebra.min_houses={self.min_houses} must be <= zebra.max_houses={self.max_houses}")
    if self.min_attributes > self.max_attributes:
      raise ValueError(f"zebra.min_attributes={self.min_attributes} must be <= "
                       f"zebra.max_attributes={self.max_attributes}")
    if self.style not in STYLES:
      raise ValueError(f"zebra.style={self.style!r} is not allowed; allowed: {STYLES}")
    if not isinstance(self.z3, bool):
      raise ValueError(f"zebra.z3={self.z3!r} must be a bool")
    if self.recipe not in RECIPES:
      raise ValueError(f"zebra.recipe={self.recipe!r} is not allowed; allowed: {sorted(RECIPES)}")
    if not isinstance(self.holdout, frozenset):
      object.__setattr__(self, "holdout", frozenset(self.holdout))
    if self.trace not in TRACES:
      raise ValueError(f"zebra.trace={self.trace!r} is not allowed; allowed: {TRACES}")

  @property
  def charset(self) -> str:
    if self.style == "compact":
      return render.COMPACT_CHARSET
    return "".join(sorted(set(string.printable) - set("\x0b\x0c\r")))

  # ------------------------------------------------------------------------------- examples

  def make_example(self, puzzle: Puzzle) -> Example:
    """The example of `puzzle` in the task's style, with its difficulty in meta."""
    steps = deduce(puzzle)
    if self.style == "compact":
      prompt = render.compact_prompt(puzzle)
      trace = {"deduction": lambda: render.compact_trace(puzzle, steps),
               "answer": lambda: render.ANSWER_MARKER + render.compact_answer(puzzle),
               "facts": lambda: render.ANSWER_MARKER + render.compact_facts(puzzle),
               "ordered": lambda: render.ANSWER_MARKER + render.compact_ordered_facts(steps)}[self.trace]()
      grid = render.compact_grid(puzzle)
    else:
      prompt = render.natural_prompt(render.puzzle_text(puzzle))
      trace = (render.natural_trace(puzzle, steps) if self.trace == "deduction"
               else render.natural_trace(puzzle, ()).lstrip("\n"))
      grid = render.normalize_grid(render.answer_json(puzzle))
    space = puzzle.search_space
    meta = {"difficulty": difficulty_of(space), "num_houses": puzzle.num_houses,
            "num_attributes": puzzle.num_attributes, "size": puzzle.size, "search_space": space,
            "bucket": size_bucket(space), "z3_conflicts": z3_conflicts(puzzle) if self.z3 else None,
            "num_clues": len(puzzle.clues), "num_steps": len(steps),
            "clue_kinds": sorted({c.kind for c in puzzle.clues}), "key": puzzle_key(puzzle),
            "id": puzzle.seed_info or None}
    if meta["id"] is None:
      del meta["id"]
    return Example(prompt=prompt, trace=trace, answer=render.grid_to_text(grid), meta=meta)

  def sample(self, rng: np.random.Generator, num_houses: int | None = None,
             num_attributes: int | None = None) -> Example:
    """Draws N and M uniformly from the task's ranges (unless given) and a puzzle of that size.
    Puzzles whose key is in `holdout` are drawn again (the size too), up to 1,000 times."""
    for _ in range(1000):
      n = int(rng.integers(self.min_houses, self.max_houses + 1)) if num_houses is None else num_houses
      m = int(rng.integers(self.min_attributes, self.max_attributes + 1)) if num_attributes is None else num_attributes
      puzzle = generate_puzzle(rng, n, m, recipe=self.recipe)
      if not self.holdout or puzzle_key(puzzle) not in self.holdout:
        return self.make_example(puzzle)
    raise ValueError(f"zebra.holdout: 1,000 draws in a row were held out (size {n}x{m}); the holdout "
                     "covers nearly every puzzle of the task's sizes")

  def example_from_public_record(self, record: Mapping[str, Any], index: int = -1) -> Example:
    """An example of the public benchmark's grid-mode record (natural prompt, no trace: these
    records carry no solving steps); meta has the size, search space and bucket, and no Z3
    count (the clues are only given as text)."""
    header, rows = record["solution"]["header"], record["solution"]["rows"]
    grid = render.grid_from_rows(header, rows)
    n, m = len(rows), len(header) - 1
    space = search_space(n, m)
    meta = {"difficulty": difficulty_of(space), "num_houses": n, "num_attributes": m,
            "size": f"{n}x{m}", "search_space": space, "bucket": size_bucket(space),
            "z3_conflicts": None, "id": record.get("id") or f"record-{index}"}
    return Example(prompt=render.natural_prompt(record["puzzle"]), trace="",
                   answer=render.grid_to_text(grid), meta=meta, prompt_id=int(index))

  # ------------------------------------------------------------------------------- answers

  def extract_answer(self, response: str) -> str | None:
    """The canonical grid (JSON text, sorted keys, lower case) of the response's last JSON grid
    or compact "A:" grid; None when it has neither."""
    grid = render.extract_grid(response)
    return None if grid is None else render.grid_to_text(grid)

  def answers_match(self, predicted: str, reference: str) -> bool:
    """Puzzle accuracy: every reference cell right (extra cells are ignored)."""
    return self.cell_accuracy_of(predicted, reference) == 1.0

  @staticmethod
  def cell_accuracy_of(predicted: str | None, reference: str) -> float:
    import json
    grid = None if predicted is None else json.loads(predicted)
    return render.cell_accuracy(grid, json.loads(reference))

  def cell_accuracy(self, response: str, example: Example) -> float:
    """Fraction of the N*M cells the response's grid gets right (0 without a grid)."""
    return self.cell_accuracy_of(self.extract_answer(response), example.answer)

  def partial_credit(self, response: str, example: Example) -> float:
    """The partial-credit reward of rl/rewards.py: cell accuracy, in [0, 1]."""
    return self.cell_accuracy(response, example)
