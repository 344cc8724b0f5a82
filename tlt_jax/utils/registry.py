"""Name -> object registries: configs choose rewards, advantages, schedules and tasks by name."""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Registry:
  """A registry of one kind of thing ("reward", "advantage", ...). Names are unique."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator registering a function or class under `name`."""

    def wrap(obj: T) -> T:
      if name in self._items and self._items[name] is not obj:
        raise ValueError(f"{self.kind} {name!r} is already registered to {self._items[name]!r}")
      self._items[name] = obj
      return obj

    return wrap

  def names(self) -> list[str]:
    return sorted(self._items)

  def __contains__(self, name: str) -> bool:
    return name in self._items

  def get(self, name: str) -> Any:
    """The object registered as `name`; ValueError listing the registered names otherwise."""
    if name not in self._items:
      raise ValueError(f"unknown {self.kind} {name!r}; registered {self.kind}s: {self.names()}")
    return self._items[name]

  def bind(self, name: str, **kwargs) -> Callable:
    """`get(name)` with keyword hyper-parameters bound; bad ones raise ValueError naming them."""
    fn = self.get(name)
    if not kwargs:
      return fn
    try:
      inspect.signature(fn).bind_partial(**kwargs)
    except TypeError as e:
      raise ValueError(f"{self.kind} {name!r}: bad arguments {sorted(kwargs)}: {e}") from None
    return functools.partial(fn, **kwargs)
