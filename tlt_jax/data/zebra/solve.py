"""Solving zebra puzzles: SAT uniqueness, Z3 difficulty, brute force, and a deduction trace.

CNF encoding (one boolean x[a, v, h] per attribute a, value v, house h: "value v of attribute a
is in house h"):
  * each value is in exactly one house, each house holds exactly one value of each attribute
    (at-least-one clauses plus pairwise at-most-one);
  * found_at(u, h): [x_uh];  not_at(u, h): [-x_uh];
  * a binary clue R(u, w): for every house p, x_up -> OR_{q : R(p, q)} x_wq (an empty OR makes
    it [-x_up]). With the exactly-one constraints this is exactly "R(house(u), house(w))".
Each clue's clauses carry a selector literal s_c ([-s_c, ...]), so one solver answers "is the
solution unique under this subset of clues?" for every subset: assume s_c for the kept clues,
and add once the clause that blocks the intended solution. UNSAT <=> unique.

Difficulty (Lin et al. 2025, sec. 2.3): the search space (N!)^M and the number of conflicts Z3
meets solving the puzzle as integer constraints (a house 1..N per value, Distinct per attribute).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Iterator, Sequence

from pysat.solvers import Solver

from tlt_jax.data.zebra.puzzle import Clue, Puzzle, relation_holds

SAT_SOLVER = "minisat22"


class CNF:
  """The variable numbering and base clauses of an N-house, M-attribute grid."""

  def __init__(self, num_houses: int, num_attributes: int):
    self.num_houses, self.num_attributes = num_houses, num_attributes
    self.num_grid_vars = num_attributes * num_houses * num_houses

  def var(self, a: int, v: int, h: int) -> int:
    """The SAT variable (1-based) of "value v of attribute a is in house h"."""
    n = self.num_houses
    return 1 + (a * n + v) * n + h

  def base_clauses(self) -> list[list[int]]:
    n, out = self.num_houses, []
    for a in range(self.num_attributes):
      for v in range(n):  # value v: exactly one house
        out.append([self.var(a, v, h) for h in range(n)])
        out += [[-self.var(a, v, h), -self.var(a, v, g)] for h, g in itertools.combinations(range(n), 2)]
      for h in range(n):  # house h: exactly one value of attribute a
        out.append([self.var(a, v, h) for v in range(n)])
        out += [[-self.var(a, v, h), -self.var(a, w, h)] for v, w in itertools.combinations(range(n), 2)]
    return out

  def clue_clauses(self, clue: Clue) -> list[list[int]]:
    (a, v), n = clue.first, self.num_houses
    if clue.kind == "found_at":
      return [[self.var(a, v, clue.house)]]
    if clue.kind == "not_at":
      return [[-self.var(a, v, clue.house)]]
    b, w = clue.second
    return [[-self.var(a, v, p)] + [self.var(b, w, q) for q in range(n) if relation_holds(clue.kind, p, q)]
            for p in range(n)]

  def solution_literals(self, house_of: Sequence[Sequence[int]]) -> list[int]:
    return [self.var(a, v, house_of[a][v]) for a in range(self.num_attributes) for v in range(self.num_houses)]

  def decode(self, model: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    true = {lit for lit in model if lit > 0}
    n = self.num_houses
    return tuple(tuple(next(h for h in range(n) if self.var(a, v, h) in true) for v in range(n))
                 for a in range(self.num_attributes))


class UniquenessOracle:
  """`is_unique(clues)`: is `house_of` the only assignment satisfying `clues` (a subset of the
  `candidates` given at construction)? One incremental SAT solver with a selector per clue."""

  def __init__(self, num_houses: int, num_attributes: int, candidates: Sequence[Clue],
               house_of: Sequence[Sequence[int]]):
    self.cnf = CNF(num_houses, num_attributes)
    self.selector: dict[Clue, int] = {}
    self.solver = Solver(name=SAT_SOLVER, bootstrap_with=self.cnf.base_clauses())
    next_var = self.cnf.num_grid_vars + 1
    for clue in candidates:
      if clue in self.selector:
        continue
      self.selector[clue] = next_var
      for clause in self.cnf.clue_clauses(clue):
        self.solver.add_clause([-next_var] + clause)
      next_var += 1
    self.solver.add_clause([-lit for lit in self.cnf.solution_literals(house_of)])
    self.calls = 0

  def is_unique(self, clues: Sequence[Clue]) -> bool:
    self.calls += 1
    return not self.solver.solve(assumptions=[self.selector[c] for c in clues])

  def __del__(self):
    solver = getattr(self, "solver", None)
    if solver is not None:
      solver.delete()


def sat_solutions(num_houses: int, num_attributes: int, clues: Sequence[Clue], limit: int = 2
                  ) -> list[tuple[tuple[int, ...], ...]]:
  """Up to `limit` distinct assignments house_of[a][v] satisfying `clues`, by SAT enumeration
  (each found model is blocked and the solver asked again)."""
  cnf = CNF(num_houses, num_attributes)
  found = []
  with Solver(name=SAT_SOLVER, bootstrap_with=cnf.base_clauses()) as solver:
    for clue in clues:
      for clause in cnf.clue_clauses(clue):
        solver.add_clause(clause)
    while len(found) < limit and solver.solve():
      house_of = cnf.decode(solver.get_model())
      found.append(house_of)
      solver.add_clause([-lit for lit in cnf.solution_literals(house_of)])
  return found


def count_solutions(puzzle: Puzzle, clues: Sequence[Clue] | None = None, limit: int = 2) -> int:
  """min(#solutions, limit) of the puzzle (or of `clues` over its grid), by SAT."""
  clues = puzzle.clues if clues is None else clues
  return len(sat_solutions(puzzle.num_houses, puzzle.num_attributes, clues, limit))


def all_assignments(num_houses: int, num_attributes: int) -> Iterator[tuple[tuple[int, ...], ...]]:
  """Every one of the (N!)^M assignments house_of[a][v] (brute force; small grids only)."""
  perms = list(itertools.permutations(range(num_houses)))
  return itertools.product(perms, repeat=num_attributes)


def brute_force_solutions(puzzle: Puzzle, clues: Sequence[Clue] | None = None, limit: int = 0
                          ) -> list[tuple[tuple[int, ...], ...]]:
  """The assignments satisfying the clues, by trying all (N!)^M of them (stops at `limit` > 0)."""
  clues = puzzle.clues if clues is None else clues
  out = []
  for house_of in all_assignments(puzzle.num_houses, puzzle.num_attributes):
    if all(c.holds(house_of) for c in clues):
      out.append(house_of)
      if limit and len(out) >= limit:
        break
  return out


def z3_conflicts(puzzle: Puzzle, seed: int = 0) -> int:
  """The number of conflicts Z3 meets solving the puzzle (its "conflicts" statistic; 0 when Z3
  reports none): an Int in [0, N) per value, Distinct per attribute, one constraint per clue.
  Lin et al. (2025) use it as the second difficulty measure, beside the search space. Each call
  has its own Z3 context, so the count is a function of the puzzle alone."""
  import z3

  n = puzzle.num_houses
  context = z3.Context()  # a fresh context: the count does not depend on earlier calls
  house = [[z3.Int(f"h_{a}_{v}", context) for v in range(n)] for a in range(puzzle.num_attributes)]
  solver = z3.Solver(ctx=context)
  solver.set("random_seed", seed)
  for row in house:
    solver.add(z3.Distinct(*row))
    solver.add(*[z3.And(x >= 0, x < n) for x in row])
  for clue in puzzle.clues:
    p = house[clue.first[0]][clue.first[1]]
    if clue.kind == "found_at":
      solver.add(p == clue.house)
      continue
    if clue.kind == "not_at":
      solver.add(p != clue.house)
      continue
    q = house[clue.second[0]][clue.second[1]]
    solver.add({"same_house": p == q, "left_of": p < q, "right_of": p > q,
                "directly_left": q == p + 1, "beside": z3.Or(q == p + 1, p == q + 1),
                "one_between": z3.Or(q == p + 2, p == q + 2),
                "two_between": z3.Or(q == p + 3, p == q + 3)}[clue.kind])
  if solver.check() != z3.sat:
    raise ValueError(f"z3_conflicts: puzzle {puzzle.size} {puzzle.seed_info!r} has no solution")
  stats = solver.statistics()
  return int(stats.get_key_value("conflicts")) if "conflicts" in stats.keys() else 0


# ----------------------------------------------------------------------------- deduction trace


@dataclasses.dataclass(frozen=True)
class Step:
  """One deduction step: `reason` fixed value `value` in `house`. reason is a Clue, "only"
  (the last house left for the value, or the last value left for a house), "contradiction"
  (every other house leads to a contradiction under propagation) or "search" (propagation and
  probing stall; the value is set to its true house, as a backtracking search would find)."""

  reason: Clue | str
  value: tuple[int, int]
  house: int


class _Contradiction(Exception):
  pass


def _propagate(domains: list[list[set[int]]], clues: Sequence[Clue], on_fix=None) -> None:
  """Prunes domains[a][v] (the houses value (a, v) may be in) to a fixed point: each clue made
  arc consistent in order, then all-different per attribute (a fixed value's house is taken; a
  house left to one value holds it). `on_fix(reason, value, house)` sees each value as it becomes
  fixed. Raises _Contradiction on an empty domain."""
  num_attributes, n = len(domains), len(domains[0])
  fixed = {(a, v) for a in range(num_attributes) for v in range(n) if len(domains[a][v]) == 1}

  def note(reason):
    for a in range(num_attributes):
      for v in range(n):
        dom = domains[a][v]
        if not dom:
          raise _Contradiction
        if len(dom) == 1 and (a, v) not in fixed:
          fixed.add((a, v))
          if on_fix is not None:
            on_fix(reason, (a, v), next(iter(dom)))

  changed = True
  while changed:
    changed = False
    for clue in clues:
      a, v = clue.first
      if clue.second is None:
        keep = {p for p in domains[a][v] if clue.allowed(p)}
        if keep != domains[a][v]:
          domains[a][v] = keep
          changed = True
          note(clue)
        continue
      b, w = clue.second
      keep_first = {p for p in domains[a][v] if any(clue.allowed(p, q) for q in domains[b][w])}
      keep_second = {q for q in domains[b][w] if any(clue.allowed(p, q) for p in keep_first)}
      if keep_first != domains[a][v] or keep_second != domains[b][w]:
        domains[a][v], domains[b][w] = keep_first, keep_second
        changed = True
        note(clue)
    for a in range(num_attributes):
      for v in range(n):
        if len(domains[a][v]) == 1:
          (h,) = domains[a][v]
          for w in range(n):
            if w != v and h in domains[a][w]:
              domains[a][w] = domains[a][w] - {h}
              changed = True
      for h in range(n):
        holders = [v for v in range(n) if h in domains[a][v]]
        if len(holders) == 1 and len(domains[a][holders[0]]) > 1:
          domains[a][holders[0]] = {h}
          changed = True
    note("only")


def deduce(puzzle: Puzzle) -> list[Step]:
  """A human-style solving trace: the values in the order they become fixed, each with its
  reason. Propagation (`_propagate`) first; when it stalls, a value's house is found by failed-
  literal probing (every other house contradicts, "contradiction"). Every value appears in
  exactly one step; the steps end at the unique solution."""
  n, m = puzzle.num_houses, puzzle.num_attributes
  domains = [[set(range(n)) for _ in range(n)] for _ in range(m)]
  steps: list[Step] = []
  record = lambda reason, value, house: steps.append(Step(reason, value, house))  # noqa: E731
  _propagate(domains, puzzle.clues, record)
  while len(steps) < n * m:
    progressed = False
    for a, v in itertools.product(range(m), range(n)):
      if len(domains[a][v]) == 1:
        continue
      alive = []
      for h in sorted(domains[a][v]):
        trial = [[set(d) for d in row] for row in domains]
        trial[a][v] = {h}
        try:
          _propagate(trial, puzzle.clues)
          alive.append(h)
        except _Contradiction:
          pass
      if len(alive) == 1:
        domains[a][v] = {alive[0]}
        steps.append(Step("contradiction", (a, v), alive[0]))
        _propagate(domains, puzzle.clues, record)
        progressed = True
        break
    if not progressed:  # rare: propagation and probing both stall
      a, v = next((a, v) for a, v in itertools.product(range(m), range(n)) if len(domains[a][v]) > 1)
      domains[a][v] = {puzzle.house_of[a][v]}
      steps.append(Step("search", (a, v), puzzle.house_of[a][v]))
      _propagate(domains, puzzle.clues, record)
  found = {s.value: s.house for s in steps}
  if any(found[(a, v)] != puzzle.house_of[a][v] for a in range(m) for v in range(n)):
    raise AssertionError(f"deduce: trace of puzzle {puzzle.size} {puzzle.seed_info!r} ends off the solution")
  return steps
