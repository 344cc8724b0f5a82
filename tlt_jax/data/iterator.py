"""A checkpointable, deterministic iterator of prompt batches over a random-access source.

The iterator walks one endless stream. Stream position k reads epoch e = k // N, slot
r = k % N, and yields `source[perm_e[r]]` with perm_e = default_rng([seed, e]).permutation(N)
(or the identity when shuffle=False). A batch is the next `batch_size` positions, so batches
cross epoch boundaries and every prompt is seen once per epoch. The whole state is the stream
position: `get_state()` / `set_state()` restore it exactly (nanodo-style: checkpoint it with
the train state).

Multi-host: each process builds the same global batch and keeps its own contiguous slice,
`rows [process_index * B / P, (process_index + 1) * B / P)`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tlt_jax.data.tasks import Example


class PromptIterator:
  """Yields lists of `Example`s; each carries a stable `prompt_id` (its index in the source)."""

  def __init__(self, source, batch_size: int, seed: int = 0, shuffle: bool = True,
               process_index: int = 0, process_count: int = 1):
    n = len(source)
    if n <= 0:
      raise ValueError("PromptIterator: the source is empty")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
      raise ValueError(f"PromptIterator: batch_size={batch_size!r} must be a positive int")
    if not 0 <= process_index < process_count:
      raise ValueError(f"PromptIterator: process_index={process_index} must be in [0, {process_count})")
    if batch_size % process_count:
      raise ValueError(f"PromptIterator: batch_size={batch_size} must be divisible by "
                       f"process_count={process_count}")
    self.source = source
    self.num_examples = n
    self.batch_size = batch_size
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self.process_index, self.process_count = process_index, process_count
    self._position = 0
    self._perm_cache: dict[int, np.ndarray] = {}

  @property
  def epoch(self) -> int:
    """The epoch the next example comes from."""
    return self._position // self.num_examples

  @property
  def position(self) -> int:
    """Examples consumed so far (global, over all processes)."""
    return self._position

  def _permutation(self, epoch: int) -> np.ndarray:
    if epoch not in self._perm_cache:
      if len(self._perm_cache) > 2:
        self._perm_cache.clear()
      if self.shuffle:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      else:
        perm = np.arange(self.num_examples)
      self._perm_cache[epoch] = perm
    return self._perm_cache[epoch]

  def index_at(self, position: int) -> int:
    """Source index read at stream position `position`."""
    epoch, slot = divmod(position, self.num_examples)
    return int(self._permutation(epoch)[slot])

  def __iter__(self) -> "PromptIterator":
    return self

  def __next__(self) -> list[Example]:
    per_process = self.batch_size // self.process_count
    start = self._position + self.process_index * per_process
    batch = []
    for k in range(start, start + per_process):
      i = self.index_at(k)
      batch.append(self.source[i].with_id(i))
    self._position += self.batch_size
    return batch

  def get_state(self) -> dict:
    """JSON-serialisable state; `set_state` of it continues exactly where this left off."""
    return {"position": int(self._position), "seed": self.seed, "num_examples": self.num_examples,
            "batch_size": self.batch_size, "shuffle": int(self.shuffle)}

  def set_state(self, state: dict) -> None:
    """Restores `get_state()`. Raises ValueError if it came from a different source/seed/shuffle
    (a different batch_size is allowed: the stream position is what counts)."""
    for key in ("seed", "num_examples", "shuffle"):
      mine = int(getattr(self, key))
      if key in state and int(state[key]) != mine:
        raise ValueError(f"PromptIterator.set_state: state has {key}={state[key]} but this iterator has "
                         f"{key}={mine}; restore into an iterator over the same data and seed")
    position = int(state["position"])
    if position < 0:
      raise ValueError(f"PromptIterator.set_state: position={position} must be >= 0")
    self._position = position


def repeat_groups(batch: Sequence[Example], group_size: int) -> list[Example]:
  """Each prompt repeated `group_size` times, contiguously: [p0]*G + [p1]*G + ... (GRPO groups).

  Row r belongs to group r // G, whose prompt is batch[r // G].
  """
  if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
    raise ValueError(f"repeat_groups: group_size={group_size!r} must be a positive int")
  return [ex for ex in batch for _ in range(group_size)]
