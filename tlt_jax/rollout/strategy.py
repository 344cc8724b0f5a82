"""A draft strategy and its names, the one representation every module uses.

`Strategy(depth, topk, num_verify)` is a draft tree of `depth` levels, `topk` branching,
verifying the best `num_verify` nodes; its name is "d<depth>k<topk>n<num_verify>". PLAIN, the
tuple (0, 0, 0) named "plain", is the arm "decode this chunk without speculation" (the bandit's
and the scheduler's; a speculative decoder never runs it).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

PLAIN = (0, 0, 0)


@dataclasses.dataclass(frozen=True, order=True)
class Strategy:
  """A draft tree of `depth` levels, `topk` branching, verifying the best `num_verify` nodes."""

  depth: int
  topk: int
  num_verify: int

  def __post_init__(self):
    if self.depth < 1 or self.topk < 1:
      raise ValueError(f"strategy {self}: depth and topk must be >= 1")
    if not 1 <= self.num_verify <= self.depth * self.topk:
      raise ValueError(f"strategy {self}: num_verify must be in [1, depth*topk={self.depth * self.topk}]")

  def __iter__(self):
    return iter((self.depth, self.topk, self.num_verify))

  def __str__(self) -> str:
    return self.name

  @property
  def name(self) -> str:
    return f"d{self.depth}k{self.topk}n{self.num_verify}"

  @classmethod
  def parse(cls, s: "str | Sequence[int] | Strategy") -> "Strategy":
    if isinstance(s, Strategy):
      return s
    if isinstance(s, str):
      m = re.fullmatch(r"d(\d+)k(\d+)n(\d+)", s.strip())
      if not m:
        raise ValueError(f"strategy {s!r} is not of the form 'd<depth>k<topk>n<num_verify>', e.g. 'd4k1n4'")
      return cls(*map(int, m.groups()))
    return cls(*map(int, s))


def strategy_name(s: Sequence[int]) -> str:
  """"plain" for PLAIN, else the strategy's name."""
  return "plain" if tuple(int(v) for v in s) == PLAIN else Strategy.parse(s).name


def parse_strategy(name: str) -> tuple[int, int, int]:
  """The (depth, topk, num_verify) tuple of a name ("plain": PLAIN)."""
  return PLAIN if str(name).strip() == "plain" else tuple(Strategy.parse(name))
