"""One orbax CheckpointManager for everything a run needs to continue exactly.

A checkpoint holds a pytree `state` (arrays: params, optimizer, drafter, RNG, step, ...) and a
JSON `meta` (data-iterator position, bandit statistics, config, ...). `restore_latest` walks back
from the newest step: a corrupt or partial checkpoint is skipped with a warning, never silently
replaced by a fresh start; if checkpoints exist but none restores, it raises.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from tlt_jax.errors import CheckpointError

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    os.makedirs(self.directory, exist_ok=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def steps(self) -> list[int]:
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, wait: bool = True) -> None:
    """Saves `step`, replacing a checkpoint of the same step (e.g. an unreadable one that a
    resumed run fell back past and now redoes)."""
    if step in self.manager.all_steps():
      self.manager.delete(step)
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

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
