"""The drafter's trainer: its train state and jitted step on the idle groups' devices, a queue of
dispatched steps, and versioned publication (each completed step becomes the next drafter
version, placed on every rollout group). Used by the host scheduler (tlt/scheduler.py).
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tlt_jax.drafter.train import (DrafterTrainState, TargetHead, drafter_state_shardings,
                                   target_head_shardings)
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.tlt.buffer import DrafterBuffer
from tlt_jax.tlt.groups import RolloutGroup


def target_head(graphdef, params) -> TargetHead:
  """The frozen embedding / LM head the drafter trains against: the current policy's."""
  return TargetHead.from_target(nnx.merge(graphdef, params))


@dataclasses.dataclass(frozen=True)
class PublishedDrafter:
  """A completed drafter version (immutable): `params[g]` is placed on rollout group g."""

  version: int
  params: tuple[Any, ...]


def _same_devices(a: Mesh | None, b: Mesh) -> bool:
  return a is not None and a.devices.shape == b.devices.shape and bool(np.all(a.devices == b.devices))


class DrafterTrainer:
  """The drafter's train state and jitted `drafter_train_step`, with versioned publication.

  Args:
    make_step: `mesh -> drafter_train_step(state, head, batch) -> (state, metrics)`, jitted with
      explicit shardings on that mesh and donating the state (drafter/train.py's
      `make_drafter_train_step(..., mesh=mesh)`); built once per mesh the drafter trains on.
    state: the DrafterTrainState.
    groups: the rollout groups (each published version is placed on every one).
    buffer: the DrafterBuffer batches are drawn from.
    batch_size: rows per drafter step.
    version: the version of `state.params` (restored from a checkpoint, else 0).
  """

  def __init__(self, make_step: Callable[[Mesh], Callable], state: DrafterTrainState,
               groups: Sequence[RolloutGroup], buffer: DrafterBuffer, batch_size: int, *,
               version: int = 0):
    self.make_step, self.groups, self.buffer = make_step, tuple(groups), buffer
    self.batch_size = int(batch_size)
    self.state = state
    self._steps: dict[tuple, Callable] = {}  # device ids of a mesh -> its jitted step
    self._mesh: Mesh | None = None  # where `state` lives (None: wherever it was given)
    self._head = None  # (source head, mesh, placed head)
    self._queue: collections.deque = collections.deque()  # (snapshot, metrics) in dispatch order
    self.published = self._publication(version, self._snapshot(state.params))

  @staticmethod
  def _snapshot(params):
    """A copy that no later (donating) train step can touch."""
    return jax.tree.map(jnp.copy, params)

  def _publication(self, version: int, params) -> PublishedDrafter:
    return PublishedDrafter(int(version), tuple(g.place_drafter(params) for g in self.groups))

  @property
  def version(self) -> int:
    return self.published.version

  def restore(self, state: DrafterTrainState, version: int) -> None:
    """Continues from a checkpointed train state whose params are drafter `version`."""
    if self._queue:
      raise RuntimeError("DrafterTrainer.restore with train steps in flight")
    self.state, self._mesh, self._head = state, None, None
    self.published = self._publication(version, self._snapshot(state.params))

  @property
  def in_flight(self) -> int:
    return len(self._queue)

  def batch_shards(self, mesh: Mesh) -> int:
    """How many ways a drafter batch is split on `mesh` (its data x fsdp devices)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]

  def place(self, mesh: Mesh) -> None:
    """Moves the train state onto `mesh` (params and moments by their logical axes, the training
    layout), e.g. the devices of the idle groups."""
    if not _same_devices(self._mesh, mesh):
      self.state = jax.device_put(self.state, drafter_state_shardings(self.state, mesh))
      self._mesh = mesh

  def dispatch(self, mesh: Mesh, head: TargetHead) -> None:
    """Queues one train step (and the copy of its params) on `mesh`; returns without waiting."""
    key = tuple(d.id for d in mesh.devices.flat)
    if key not in self._steps:
      self._steps[key] = self.make_step(mesh)
    self.place(mesh)
    if self._head is None or self._head[0] is not head or not _same_devices(self._head[1], mesh):
      sharding = (target_head_shardings(head.cfg, mesh) if isinstance(head, TargetHead)
                  else NamedSharding(mesh, P()))
      self._head = (head, mesh, jax.device_put(head, sharding))
    batch = jax.device_put(self.buffer.sample(self.batch_size), mesh_lib.batch_sharding(mesh, 1))
    self.state, metrics = self._steps[key](self.state, self._head[2], batch)
    self._queue.append((self._snapshot(self.state.params), metrics))

  def oldest_ready(self) -> bool:
    return bool(self._queue) and all(x.is_ready() for x in jax.tree.leaves(self._queue[0][0]))

  def complete_one(self) -> dict[str, float]:
    """Waits for the oldest queued step, publishes it as version + 1; returns its metrics."""
    snapshot, metrics = self._queue.popleft()
    jax.block_until_ready(snapshot)
    self.published = self._publication(self.published.version + 1, snapshot)  # the atomic swap
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

  def complete_ready(self) -> list[dict[str, float]]:
    out = []
    while self.oldest_ready():
      out.append(self.complete_one())
    return out

  def complete_all(self) -> list[dict[str, float]]:
    return [self.complete_one() for _ in range(len(self._queue))]
