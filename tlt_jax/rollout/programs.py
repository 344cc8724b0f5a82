"""The one cache of the rollout's jitted programs, each with explicit in/out shardings on a mesh
(one device is a 1x1x1 mesh), keyed by a frozen `ProgramKey`.

A program is built once per key (kind, the mesh's devices and shape, its static arguments) and
compiles once per key; `warm(keys)` marks the programs dispatched before, so that a session can
tell a chunk that paid its own compilation (its time is no score for the selector) from one that
did not. The session (rollout/session.py) asks this cache for every program it runs; the
speculative decoder (rollout/speculative.py) keeps its chunk programs here too.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.decode import DecodeState, gather_rows, mark_done_from, state_shardings


def _shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


@dataclasses.dataclass(frozen=True)
class ProgramKey:
  """What a compiled program depends on: its kind, the mesh (device ids and shape) and its
  static arguments (shapes, window, strategy...)."""

  kind: Any
  devices: tuple[int, ...]
  mesh_shape: tuple[int, ...]
  static: tuple = ()

  @classmethod
  def of(cls, kind, mesh: Mesh, *static) -> "ProgramKey":
    return cls(kind, tuple(d.id for d in mesh.devices.flat), tuple(mesh.devices.shape), tuple(static))


class ProgramCache:
  """Jitted programs by `ProgramKey`, and the keys dispatched before (`warm`)."""

  def __init__(self):
    self._programs: dict[ProgramKey, Any] = {}
    self._warm: set[ProgramKey] = set()

  def get(self, key: ProgramKey, build: Callable[[], Any]):
    if key not in self._programs:
      self._programs[key] = build()
    return self._programs[key]

  def items(self):
    return self._programs.items()

  def of_kind(self, kind) -> dict[ProgramKey, Any]:
    """The programs of one kind built so far (each compiles once: `f._cache_size()`)."""
    return {k: f for k, f in self._programs.items() if k.kind == kind}

  def is_warm(self, key: ProgramKey) -> bool:
    return key in self._warm

  def warm(self, keys: Iterable[ProgramKey]) -> None:
    """Marks `keys` as dispatched (their compilation is paid)."""
    self._warm.update(keys)


class RolloutPrograms:
  """The plain rollout's programs on a mesh: prefill, a chunk of decoding steps, compaction to a
  bucket, the row gather and the done-flag padding. `prefill_fn(params, prompts, prompt_len,
  max_new, rng, *, capacity)` and `chunk_fn(params, state, *, window)` are the engine's partials
  of rollout/decode.py."""

  def __init__(self, prefill_fn: Callable, chunk_fn: Callable):
    self.prefill_fn, self.chunk_fn = prefill_fn, chunk_fn
    self.cache = ProgramCache()

  def programs(self, kind: str) -> list:
    """The jitted programs of one kind ("prefill", "chunk", "compact", "gather", "mark_done")."""
    return list(self.cache.of_kind(kind).values())

  def prefill(self, mesh: Mesh, params, prompt_shape: tuple[int, int], capacity: int):
    """The prefill (params as placed, prompts split over 'batch', per-row vectors and the RNG
    replicated, the state by `state_shardings`)."""
    b = prompt_shape[0]

    def build():
      fn = functools.partial(self.prefill_fn, capacity=capacity)
      rep = mesh_lib.replicated(mesh)
      prompts = mesh_lib.batch_sharding(mesh, 2, mesh_lib.SAMPLE_RULES, b)
      row = jax.ShapeDtypeStruct((b,), jnp.int32)
      abstract = jax.eval_shape(fn, params, jax.ShapeDtypeStruct(prompt_shape, jnp.int32), row, row,
                                jax.random.PRNGKey(0))
      return jax.jit(fn, in_shardings=(_shardings_of(params), prompts, rep, rep, rep),
                     out_shardings=state_shardings(abstract, mesh))
    return self.cache.get(ProgramKey.of("prefill", mesh, tuple(prompt_shape), capacity), build)

  def chunk(self, mesh: Mesh, params, state: DecodeState, window: int | None):
    """`decode_chunk`; the state is donated, the statistics replicated."""

    def build():
      st, rep = state_shardings(state, mesh), mesh_lib.replicated(mesh)
      return jax.jit(functools.partial(self.chunk_fn, window=window, mesh=mesh),
                     in_shardings=(_shardings_of(params), st), out_shardings=(st, (rep, rep, rep)),
                     donate_argnums=(1,))
    return self.cache.get(self.chunk_key(mesh, state.seq_BxS.shape, window), build)

  @staticmethod
  def chunk_key(mesh: Mesh, seq_shape: tuple, window: int | None) -> ProgramKey:
    return ProgramKey.of("chunk", mesh, tuple(seq_shape), window)

  def compact(self, mesh: Mesh, state: DecodeState, bucket: int):
    """Batch compaction to `bucket` rows (`DecodeState.compact`, the new bucket's batch split)."""

    def build():
      out = jax.eval_shape(lambda st: st.take(jnp.zeros((bucket,), jnp.int32)), state)
      rep = mesh_lib.replicated(mesh)
      return jax.jit(lambda st, idx, n: st.compact(idx, n),
                     in_shardings=(state_shardings(state, mesh), rep, rep),
                     out_shardings=state_shardings(out, mesh))
    has_draft = state.draft_cache is not None
    return self.cache.get(ProgramKey.of("compact", mesh, tuple(state.seq_BxS.shape), bucket, has_draft), build)

  def gather(self, mesh: Mesh, state: DecodeState, num_rows: int, with_features: bool):
    """`gather_rows` with replicated outputs: every host can read the rows it copies out."""

    def build():
      rep = mesh_lib.replicated(mesh)
      return jax.jit(functools.partial(gather_rows, with_features=with_features),
                     in_shardings=(state_shardings(state, mesh), rep), out_shardings=rep)
    has_draft = state.draft_cache is not None
    key = ProgramKey.of("gather", mesh, tuple(state.seq_BxS.shape), num_rows, with_features, has_draft)
    return self.cache.get(key, build)

  def mark_done(self, mesh: Mesh, rows: int):
    """`mark_done_from` on the replicated done flags of a state of `rows` rows."""
    rep = mesh_lib.replicated(mesh)
    build = lambda: jax.jit(mark_done_from, in_shardings=(rep, rep), out_shardings=rep)  # noqa: E731
    return self.cache.get(ProgramKey.of("mark_done", mesh, rows), build)
