"""One orbax CheckpointManager for everything a run needs to continue exactly.

A checkpoint holds a pytree `state` (arrays: params, optimizer, drafter, RNG, step, ...) and a
JSON `meta` (data-iterator position, bandit statistics, config, ...). `restore_latest` walks back
from the newest step: a corrupt or partial checkpoint is skipped with a warning, never silently
replaced by a fresh start; if checkpoints exist but none restores, it raises.

Saves are asynchronous with `async_save=True`: `save` returns once the arrays are copied to host
memory and orbax writes them in the background while training goes on; the next `save`, `close`
or `wait` waits for it. orbax writes a step into a temporary directory and renames it when
complete, so a process killed during a save leaves the previous checkpoint restorable.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from tlt_jax.errors import CheckpointError

log = logging.getLogger(__name__)


def _host_local(x) -> bool:
  """A jax.Array that only this process holds (an RNG key, a drafter on one device) in a
  multi-process run: every process holds the same values, and orbax saves only global arrays."""
  return isinstance(x, (jax.Array, jax.ShapeDtypeStruct)) and jax.process_count() > 1 and (
      getattr(x, "sharding", None) is not None and x.sharding.is_fully_addressable)


def _replicated_everywhere():
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec
  return NamedSharding(Mesh(np.asarray(jax.devices()), ("all",)), PartitionSpec())


def _to_global(tree):
  """Host-local arrays of `tree` as arrays replicated over every device of every process."""
  if jax.process_count() == 1:
    return tree
  from tlt_jax.parallel.mesh import host_value, put_global
  rep = _replicated_everywhere()
  return jax.tree.map(lambda x: put_global(host_value(x), rep) if _host_local(x) else x, tree)


def async_saves(setting) -> bool:
  """`config.checkpoint.async_save`: True, False, or "auto" (asynchronous on accelerators, where
  a save would stall the chips; synchronous on CPU, where it is cheap and runs stay reproducible
  to the byte)."""
  if setting == "auto":
    return jax.default_backend() != "cpu"
  return bool(setting)


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3, async_save: bool = False):
    self.directory = os.path.abspath(directory)
    self.async_save = async_save
    os.makedirs(self.directory, exist_ok=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save))

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, wait: bool | None = None) -> None:
    """Saves `step`, replacing a checkpoint of the same step (e.g. an unreadable one that a
    resumed run fell back past and now redoes). `wait`: block until it is on disk (default: unless
    the saves are asynchronous)."""
    self.manager.wait_until_finished()
    if step in self.manager.all_steps():
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_global(state)), meta=ocp.args.JsonSave(meta)), force=True)
    if wait or (wait is None and not self.async_save):
      self.manager.wait_until_finished()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    local = jax.tree.map(_host_local, abstract)
    if jax.process_count() > 1:  # host-local leaves come back replicated, then to their device
      rep = _replicated_everywhere()
      abstract = jax.tree.map(lambda a, h: a.update(sharding=rep) if h else a, abstract, local)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    state = out["state"]
    if jax.process_count() > 1:
      state = jax.tree.map(
          lambda x, a, h: jax.device_put(x.addressable_data(0), a.sharding) if h else x,
          state, jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state), local)
    return state, out["meta"]

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, meta) of the newest checkpoint that restores; None if there is none."""
    steps = self.steps()
    errors = []
    for step in reversed(steps):
      try:
        state, meta = self.restore(step, abstract_state)
        if errors:
          log.warning("resumed from step %d; newer checkpoints were unreadable: %s", step, errors)
        return step, state, meta
      except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
        log.warning("checkpoint at step %d in %s is corrupt or partial (%s: %s); trying the "
                    "previous one", step, self.directory, type(e).__name__, e)
        errors.append((step, f"{type(e).__name__}: {e}"))
    if errors:
      raise CheckpointError(
          f"no checkpoint in {self.directory} could be restored (tried steps "
          f"{[s for s, _ in errors]}): {errors[0][1]}. Refusing to start from scratch; move the "
          "directory away to start fresh.")
    return None

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
