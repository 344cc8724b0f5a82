"""The reduced draft vocabulary's side of the speculative decoder (rollout/speculative.py): its ids
(`set_draft_vocab`, placed once per refresh and mesh) and the draft sub-head, the ids' columns of
the target's LM head built by a small program of its own once per (policy parameters, draft
vocabulary) and handed to the speculative chunks as an argument (`subhead`)."""

from __future__ import annotations

import functools
import weakref

import jax
import numpy as np
from flax import nnx

from tlt_jax.drafter.draft import draft_subhead
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.programs import ProgramKey


class DraftVocabPrograms:
  """Mixed into SpeculativeDecoder (which sets `draft_vocab_size`, `target_graphdef` and
  `programs`, and calls `_init_draft_vocab`)."""

  def _init_draft_vocab(self) -> None:
    self.vocab_version = 0  # bumped by every set_draft_vocab
    self._vocab_np = (np.arange(self.draft_vocab_size, dtype=np.int32) if self.draft_vocab_size else None)
    self._vocab_placed: dict = {}  # mesh key -> (version, placed int32[V_d])
    self._subheads: dict = {}  # mesh key -> (version, weakref to the head array, sub-head)
    self.subhead_builds = 0  # sub-heads built (one per policy parameters and draft vocabulary)
    self._target_cfg = None

  @property
  def draft_vocab(self) -> np.ndarray | None:
    """The current draft vocabulary (int32[V_d], host), or None for the full vocabulary."""
    return None if self._vocab_np is None else self._vocab_np.copy()

  def set_draft_vocab(self, ids) -> None:
    """Replaces the draft vocabulary by `ids` (V_d distinct token ids; the later chunks draft among
    them). Its shape is fixed, so the compiled chunks are reused as they are."""
    if not self.draft_vocab_size:
      raise ValueError("set_draft_vocab needs draft_vocab_size > 0 (this decoder drafts over the full vocabulary)")
    ids = np.asarray(ids, np.int64).reshape(-1)
    if ids.size != self.draft_vocab_size or np.unique(ids).size != ids.size or (ids < 0).any():
      raise ValueError(f"draft vocabulary: {ids.size} ids, {np.unique(ids).size} distinct, min "
                       f"{ids.min() if ids.size else None}; needs {self.draft_vocab_size} distinct ids >= 0")
    self._vocab_np = ids.astype(np.int32)
    self.vocab_version += 1

  def _vocab_on(self, mesh):
    """The draft vocabulary placed (replicated) on `mesh`, re-placed after a refresh only."""
    if self._vocab_np is None:
      return None
    key = ProgramKey.of("vocab", mesh)
    held = self._vocab_placed.get(key)
    if held is None or held[0] != self.vocab_version:
      held = (self.vocab_version, mesh_lib.put_global(self._vocab_np, mesh_lib.replicated(mesh)))
      self._vocab_placed[key] = held
    return held[1]

  def _head_of(self, tparams):
    """(the target's head array as placed: `lm_head` [D, V], or the token embeddings [V, D] when
    tied; tied)."""
    tied = "lm_head" not in tparams
    leaf = tparams["embed_tokens" if tied else "lm_head"]
    return (leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf), tied

  def subhead_sharding(self, head, tied: bool, mesh):
    """The sub-head's sharding: the head's vocabulary dimension's (its columns stay on the chips
    that hold them), replicated where that does not divide V_d."""
    spec = tuple(getattr(head.sharding, "spec", ())) + (None, None)
    d_ax, v_ax = (spec[1], spec[0]) if tied else (spec[0], spec[1])
    axes = lambda a: () if a is None else ((a,) if isinstance(a, str) else tuple(a))  # noqa: E731
    if self.draft_vocab_size % max(1, int(np.prod([mesh.shape[a] for a in axes(v_ax)]))):
      v_ax = None
    if head.shape[1 if tied else 0] % max(1, int(np.prod([mesh.shape[a] for a in axes(d_ax)]))):
      d_ax = None
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(d_ax, v_ax))

  def subhead_fn(self, mesh, head, tied: bool):
    """The jitted gather `(head, ids) -> w [D, V_d]` on `mesh` (one program per head shape)."""
    if self._target_cfg is None:
      raise ValueError("subhead_fn needs the target's config: call subhead (or set_target_config) first")
    dtype = self._target_cfg.jnp_dtype

    def build():
      return jax.jit(functools.partial(draft_subhead, tied=tied, dtype=dtype),
                     in_shardings=(head.sharding, mesh_lib.replicated(mesh)),
                     out_shardings=self.subhead_sharding(head, tied, mesh))
    return self.programs.get(ProgramKey.of("subhead", mesh, tuple(head.shape), str(head.dtype), tied), build)

  def set_target_config(self, cfg) -> None:
    """The target's ModelConfig (its activation dtype is the sub-head's)."""
    self._target_cfg = cfg

  def subhead(self, tparams, mesh):
    """The draft vocabulary's columns of the target's head, [D, V_d], on `mesh` (None for the full
    vocabulary). Built by `subhead_fn` once per (head array, draft vocabulary version) and held:
    a chunk with the same parameters reuses it, a refresh or new parameters (the policy update
    replaces them) rebuild it. The head is held by a weak reference, so the sub-head never keeps
    a replaced policy's head alive."""
    if not self.draft_vocab_size:
      return None
    head, tied = self._head_of(tparams)
    if self._target_cfg is None:
      self._target_cfg = nnx.merge(self.target_graphdef, tparams).cfg
    key = ProgramKey.of("subhead", mesh)
    held = self._subheads.get(key)
    if held is not None and held[0] == self.vocab_version and held[1]() is head and not head.is_deleted():
      return held[2]
    self._subheads.pop(key, None)  # drop the old sub-head before building the new one
    w = self.subhead_fn(mesh, head, tied)(head, self._vocab_on(mesh))
    self._subheads[key] = (self.vocab_version, weakref.ref(head), w)
    self.subhead_builds += 1
    return w
