"""Logic-grid (zebra) puzzles: the data model, the clue types and the clue reduction.

A puzzle has N houses in a row (house 0 leftmost; rendered 1..N) and M attributes. Attribute 0 is
always Name; the other M-1 are drawn from `ATTRIBUTE_POOL`. Each attribute takes N distinct
values, one per house: the solution is M permutations, `house_of[a][v]` = the house of value v of
attribute a. A value is referred to as the pair (a, v).

Clue types, with p = house of the first value, q = house of the second (Lin et al. 2025,
"ZebraLogic: On the Scaling Limits of LLMs for Logical Reasoning", sec. 2):

  found_at       p == h                 not_at       p != h
  same_house     p == q                 beside       |p - q| == 1
  left_of        p <  q                 right_of     p >  q
  directly_left  q == p + 1             one_between  |p - q| == 2
  two_between    |p - q| == 3

Generation follows the ZebraLogic generator (Lin et al. 2025; a descendant of tuchandra/zebra,
reproduced in reasoning-gym's `logic_puzzle/generate.py`, whose `try_to_remove` and
`reduce_clues` give the weights and the schedule below), in this project's words
(`RECIPES["zebralogic"]`, the default):

  * candidate pool: the reference's clue generators, one clue per true fact -- found_at and
    not_at for each value and house, same_house for values sharing a house, left_of OR right_of
    for each pair in different houses (a fair coin picks the phrasing), directly_left OR beside
    for each adjacent pair (a fair coin again: the reference never offers both), one_between
    and two_between. (reasoning-gym's copy enables only some of its generators in its
    `generate_puzzle`; every type is offered here.)
  * batch removal: draw n clues WITH replacement, each draw picking a clue with probability
    proportional to its type's weight (`REMOVAL_WEIGHTS`: found_at, not_at, same_house 0.75;
    beside, left_of, right_of 1.2; one_between, two_between 1.5; directly_left, which the
    reference weights by its default, 1.0), and drop the distinct clues drawn if the solution stays
    unique. n is 10 % of the current count; after a failed 10 % try, 5 %; after a failed 5 % try,
    one clue; any success restarts at 10 %, and a failed single-clue try ends the phase. So the
    relational clues (higher weight) tend to go first and the direct ones to stay.
  * single pass: visit every surviving clue in uniform random order, dropping each whose removal
    leaves the solution unique (checked by a SAT solver, `solve.UniquenessOracle`). Fewer clues
    never admit fewer solutions, so one pass already makes the result minimal.

`generate.generate_puzzle` puts these together with the SAT uniqueness oracle of `solve.py` (this
module imports neither: the solver reads the data model from here).

`RECIPES["halving"]` is the generator this module used before: the same relations but with both
directly_left and beside offered for adjacent pairs, removal without replacement weighted to
remove direct clues first (`HALVING_REMOVAL_WEIGHTS`), batches halving from 50 % of the clues
down to 2, and a weighted single pass. Everything is a function of the
`np.random.Generator` passed in.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import numpy as np

MIN_HOUSES, MAX_HOUSES = 2, 6
MIN_ATTRIBUTES, MAX_ATTRIBUTES = 2, 6

# Attribute name -> (values, phrase for "the person with value v"). Each pool has >= MAX_HOUSES
# values; a puzzle of N houses draws N of them.
ATTRIBUTE_POOL: dict[str, tuple[tuple[str, ...], str]] = {
    "Name": (("Alice", "Bob", "Carol", "Dave", "Eric", "Fiona", "Grace", "Hugo"), "{}"),
    "Colour": (("red", "green", "blue", "yellow", "white", "purple", "orange"),
               "the person in the {} house"),
    "Nationality": (("British", "Swedish", "Danish", "Norwegian", "German", "Japanese", "Brazilian"),
                    "the {} person"),
    "Animal": (("cat", "dog", "bird", "fish", "horse", "zebra", "rabbit"), "the person who keeps a {}"),
    "Drink": (("tea", "coffee", "milk", "water", "juice", "cocoa", "lemonade"), "the person who drinks {}"),
    "Food": (("pizza", "soup", "salad", "curry", "noodles", "tacos", "stew"), "the person who eats {}"),
    "Flower": (("roses", "tulips", "lilies", "daisies", "orchids", "carnations"), "the person who grows {}"),
    "Sport": (("tennis", "soccer", "golf", "swimming", "cycling", "rowing", "chess"), "the {} fan"),
    "Music": (("jazz", "rock", "pop", "classical", "blues", "folk", "techno"), "the {} lover"),
    "Car": (("Ford", "Toyota", "Tesla", "BMW", "Honda", "Volvo", "Fiat"), "the {} driver"),
    "Phone": (("Pixel", "iPhone", "Galaxy", "Xperia", "Nokia", "Moto"), "the person with the {} phone"),
}
NAME = "Name"

CLUE_KINDS = ("found_at", "not_at", "same_house", "left_of", "right_of", "directly_left", "beside",
              "one_between", "two_between")
UNARY_KINDS = ("found_at", "not_at")
# Relative chance of a clue being drawn for removal, by type: the ZebraLogic generator's weights
# (relational clues go first, direct ones stay; directly_left gets the reference's default 1.0).
REMOVAL_WEIGHTS = {"found_at": 0.75, "not_at": 0.75, "same_house": 0.75, "beside": 1.2,
                   "left_of": 1.2, "right_of": 1.2, "one_between": 1.5, "two_between": 1.5,
                   "directly_left": 1.0}
# The earlier generator's weights (`RECIPES["halving"]`): direct clues go first.
HALVING_REMOVAL_WEIGHTS = {"found_at": 1.5, "not_at": 2.0, "same_house": 1.0, "left_of": 1.5,
                           "right_of": 1.5, "directly_left": 1.0, "beside": 1.0, "one_between": 1.0,
                           "two_between": 1.0}
# recipe -> (adjacent pairs: "one" of directly_left/beside or "both", removal weights, schedule)
RECIPES = {"zebralogic": ("one", REMOVAL_WEIGHTS, "tenth"),
           "halving": ("both", HALVING_REMOVAL_WEIGHTS, "halving")}
DEFAULT_RECIPE = "zebralogic"

# Search-space buckets of the ZebraLogic paper: (name, lower bound inclusive) on (N!)^M.
SIZE_BUCKETS = (("small", 0.0), ("medium", 1e3), ("large", 1e6), ("xl", 1e10))

Value = tuple[int, int]  # (attribute index, value index)


def relation_holds(kind: str, p: int, q: int) -> bool:
  """Whether a binary clue of `kind` holds with its values in houses p and q (0-based)."""
  if kind == "same_house":
    return p == q
  if kind == "left_of":
    return p < q
  if kind == "right_of":
    return p > q
  if kind == "directly_left":
    return q == p + 1
  if kind == "beside":
    return abs(p - q) == 1
  if kind == "one_between":
    return abs(p - q) == 2
  if kind == "two_between":
    return abs(p - q) == 3
  raise ValueError(f"unknown binary clue kind {kind!r}; allowed: {CLUE_KINDS[2:]}")


@dataclasses.dataclass(frozen=True, order=True)
class Clue:
  """One clue. Unary (found_at, not_at): `first` is (or is not) in `house`. Binary: the relation
  `kind` between the houses of `first` and `second` (see the module docstring)."""

  kind: str
  first: Value
  second: Value | None = None
  house: int | None = None

  def __post_init__(self):
    if self.kind not in CLUE_KINDS:
      raise ValueError(f"clue kind {self.kind!r} is not allowed; allowed: {CLUE_KINDS}")
    if (self.kind in UNARY_KINDS) != (self.house is not None and self.second is None):
      raise ValueError(f"clue {self.kind!r} needs {'a house' if self.kind in UNARY_KINDS else 'a second value'}")

  @property
  def values(self) -> tuple[Value, ...]:
    return (self.first,) if self.second is None else (self.first, self.second)

  def holds(self, house_of: Sequence[Sequence[int]]) -> bool:
    """Whether the clue is true of the assignment house_of[a][v]."""
    p = house_of[self.first[0]][self.first[1]]
    if self.kind == "found_at":
      return p == self.house
    if self.kind == "not_at":
      return p != self.house
    return relation_holds(self.kind, p, house_of[self.second[0]][self.second[1]])

  def allowed(self, p: int, q: int | None = None) -> bool:
    """The clue's relation on houses: p for `first`, q for `second` (binary clues)."""
    if self.kind == "found_at":
      return p == self.house
    if self.kind == "not_at":
      return p != self.house
    return relation_holds(self.kind, p, q)


@dataclasses.dataclass(frozen=True)
class Puzzle:
  """A logic-grid puzzle: `attributes[a]` names attribute a, `values[a][v]` its values (N each),
  `house_of[a][v]` the solution, `clues` the kept clues in presentation order."""

  num_houses: int
  attributes: tuple[str, ...]
  values: tuple[tuple[str, ...], ...]
  house_of: tuple[tuple[int, ...], ...]
  clues: tuple[Clue, ...]
  seed_info: str = ""

  @property
  def num_attributes(self) -> int:
    return len(self.attributes)

  @property
  def size(self) -> str:
    """"NxM", e.g. "3x4" (ZebraLogic writes "3*4")."""
    return f"{self.num_houses}x{self.num_attributes}"

  def value_at(self, attribute: int, house: int) -> int:
    """The value index of `attribute` in `house` under the solution."""
    return self.house_of[attribute].index(house)

  def grid(self) -> list[list[str]]:
    """grid[h][a] = the name of attribute a's value in house h."""
    return [[self.values[a][self.value_at(a, h)] for a in range(self.num_attributes)]
            for h in range(self.num_houses)]

  def solution_satisfies_all(self) -> bool:
    return all(c.holds(self.house_of) for c in self.clues)

  @property
  def search_space(self) -> int:
    return search_space(self.num_houses, self.num_attributes)

  @property
  def bucket(self) -> str:
    return size_bucket(self.search_space)


def search_space(num_houses: int, num_attributes: int) -> int:
  """(N!)^M: the number of assignments of M attributes over N houses (ZebraLogic, sec. 2.2)."""
  return math.factorial(num_houses) ** num_attributes


def size_bucket(space: float) -> str:
  """ZebraLogic's buckets of (N!)^M: small < 1e3 <= medium < 1e6 <= large < 1e10 <= xl."""
  name = SIZE_BUCKETS[0][0]
  for bucket, lower in SIZE_BUCKETS:
    if space >= lower:
      name = bucket
  return name


def check_size(num_houses, num_attributes) -> None:
  for key, value, lo, hi in (("num_houses", num_houses, MIN_HOUSES, MAX_HOUSES),
                             ("num_attributes", num_attributes, MIN_ATTRIBUTES, MAX_ATTRIBUTES)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
      raise ValueError(f"zebra: {key}={value!r} is not allowed; allowed: an int in [{lo}, {hi}]")


def check_recipe(recipe: str) -> str:
  if recipe not in RECIPES:
    raise ValueError(f"zebra: recipe={recipe!r} is not allowed; allowed: {sorted(RECIPES)}")
  return recipe


def all_true_clues(house_of: Sequence[Sequence[int]], rng: np.random.Generator,
                   adjacent: str = "one") -> list[Clue]:
  """Every clue true of the solution: found_at and not_at for each value and house, and for each
  unordered pair of values the binary relations that hold: left_of or right_of (the phrasing
  drawn from `rng`, so both occur), for adjacent pairs directly_left or beside (`adjacent="one"`,
  a coin picks, as the ZebraLogic generator does) or both (`adjacent="both"`), one_between and
  two_between."""
  if adjacent not in ("one", "both"):
    raise ValueError(f"all_true_clues: adjacent={adjacent!r} is not allowed; allowed: 'one', 'both'")
  num_attributes, num_houses = len(house_of), len(house_of[0])
  values = [(a, v) for a in range(num_attributes) for v in range(num_houses)]
  clues = []
  for a, v in values:
    for h in range(num_houses):
      clues.append(Clue("found_at" if house_of[a][v] == h else "not_at", (a, v), house=h))
  for i, x in enumerate(values):
    for y in values[i + 1:]:
      p, q = house_of[x[0]][x[1]], house_of[y[0]][y[1]]
      if p == q:
        clues.append(Clue("same_house", x, y))
        continue
      left, right = (x, y) if p < q else (y, x)
      if rng.random() < 0.5:
        clues.append(Clue("left_of", left, right))
      else:
        clues.append(Clue("right_of", right, left))
      distance = abs(p - q)
      if distance == 1:
        if adjacent == "both":
          clues.append(Clue("directly_left", left, right))
          clues.append(Clue("beside", x, y))
        elif rng.random() < 0.5:
          clues.append(Clue("directly_left", left, right))
        else:
          clues.append(Clue("beside", x, y))
      elif distance == 2:
        clues.append(Clue("one_between", x, y))
      elif distance == 3:
        clues.append(Clue("two_between", x, y))
  return clues


def _weighted_order(weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random permutation where i comes early with probability growing with weights[i]:
  sort by u_i^(1/w_i), u ~ U(0,1) (Efraimidis & Spirakis 2006, weighted sampling without
  replacement)."""
  keys = rng.random(len(weights)) ** (1.0 / weights)
  return np.argsort(-keys, kind="stable")


def removal_draw(kept: Sequence[Clue], n: int, weights: dict[str, float],
                 rng: np.random.Generator) -> np.ndarray:
  """n indices into `kept` drawn WITH replacement, each with probability proportional to its
  clue type's weight (the ZebraLogic generator's batch draw; duplicates are possible)."""
  if n <= 0 or not kept:
    return np.zeros(0, dtype=np.int64)
  w = np.array([weights[c.kind] for c in kept], dtype=np.float64)
  return rng.choice(len(kept), size=n, replace=True, p=w / w.sum())


def reduce_clues(clues: Sequence[Clue], is_unique, rng: np.random.Generator,
                 weights: dict[str, float] | None = None, min_batch: int = 2,
                 schedule: str = "tenth", trace: list | None = None) -> list[Clue]:
  """Removes clues while `is_unique(kept)` stays True; returns a minimal subset.

  `schedule="tenth"` (the ZebraLogic generator's): batches of n = 10 % of the current count,
  then 5 %, then 1, drawn by `removal_draw`; a successful removal restarts at 10 %, a failed
  single-clue try ends the phase. `schedule="halving"` (the earlier generator's): a weighted
  batch without replacement of half the clues, halved after each failure, until below
  `min_batch`. Then one pass over the survivors (uniform order for "tenth", weighted for
  "halving"), keeping each removal that leaves the solution unique. Since fewer clues never
  admit fewer solutions, a clue kept in that pass is still needed at the end: the result is
  minimal. `trace`, if given, receives one (requested n, distinct clues tried, accepted) tuple
  per batch try.
  """
  if schedule not in ("tenth", "halving"):
    raise ValueError(f"reduce_clues: schedule={schedule!r} is not allowed; allowed: 'tenth', 'halving'")
  weights = weights or (REMOVAL_WEIGHTS if schedule == "tenth" else HALVING_REMOVAL_WEIGHTS)
  kept = list(clues)
  if not is_unique(kept):
    raise ValueError("reduce_clues: the full clue set does not determine a unique solution")

  def try_remove(drop: set[int], n: int) -> bool:
    nonlocal kept
    trial = [c for i, c in enumerate(kept) if i not in drop]
    ok = bool(drop) and is_unique(trial)
    if trace is not None:
      trace.append((n, len(drop), ok))
    if ok:
      kept = trial
    return ok

  if schedule == "tenth":
    while len(kept) > 1:
      if try_remove(set(removal_draw(kept, len(kept) // 10, weights, rng).tolist()), len(kept) // 10):
        continue
      if try_remove(set(removal_draw(kept, len(kept) // 20, weights, rng).tolist()), len(kept) // 20):
        continue
      if not try_remove(set(removal_draw(kept, 1, weights, rng).tolist()), 1):
        break
    order = rng.permutation(len(kept))
  else:
    batch = len(kept) // 2
    while batch >= min_batch and len(kept) > batch:
      w = np.array([weights[c.kind] for c in kept])
      if not try_remove(set(_weighted_order(w, rng)[:batch].tolist()), batch):
        batch //= 2
    order = _weighted_order(np.array([weights[c.kind] for c in kept]), rng)
  for clue in [kept[i] for i in order]:
    trial = [c for c in kept if c != clue]
    if is_unique(trial):
      kept = trial
  return kept
