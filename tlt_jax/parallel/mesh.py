"""Device mesh, logical-axis rules and sharding helpers.

Mesh axes are ('data', 'fsdp', 'tensor'). Parameters and activations carry logical axis names
(`batch`, `length`, `embed`, `mlp`, `heads`, `kv_heads`, `vocab`, `norm`); a rules table maps
each logical name to a mesh axis (or a tuple of them, or None). Training and sampling may use
different rules. A dimension that its mesh axes do not divide is replicated instead.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. FSDP shards the embed dim of weights; tensor parallelism shards
# heads / mlp / vocab; the batch is split over data and fsdp.
TRAIN_RULES: dict[str, Any] = {
    "batch": ("data", "fsdp"),
    "length": None,
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "norm": None,
}
# Sampling keeps weights whole along fsdp (no per-step all-gather), splits the batch over data.
SAMPLE_RULES: dict[str, Any] = {**TRAIN_RULES, "batch": ("data", "fsdp"), "embed": None}

RULE_SETS = {"train": TRAIN_RULES, "sample": SAMPLE_RULES}


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh. One entry of `shape` may be -1 (fill the rest).

  Raises ValueError naming the shape and the device count when they do not divide.
  """
  devices = list(devices if devices is not None else jax.devices())
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape {tuple(shape)} must have {len(MESH_AXES)} entries for axes {MESH_AXES}")
  n = len(devices)
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {tuple(shape)}: at most one entry may be -1")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if known <= 0 or n % known:
      raise ValueError(f"mesh shape {tuple(shape)} does not divide the {n} available devices; "
                       f"the product of the fixed entries must divide {n}")
    shape[shape.index(-1)] = n // known
  if any(s <= 0 for s in shape) or math.prod(shape) != n:
    raise ValueError(f"mesh shape {tuple(shape)} (product {math.prod(shape)}) does not match the {n} "
                     f"available devices; allowed: positive sizes whose product is {n}, or -1 for one axis")
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def local_mesh(device: jax.Device | None = None) -> Mesh:
  """One device as a 1x1x1 mesh (the default device unless given): code that runs on a mesh
  needs no separate single-device path."""
  return Mesh(np.asarray([device or jax.devices()[0]]).reshape(1, 1, 1), MESH_AXES)


def mesh_of(tree: Any) -> Mesh:
  """The mesh `tree`'s arrays live on: the mesh of their NamedSharding, or a 1x1x1 mesh over the
  one device an unsharded (e.g. uncommitted) array sits on. Raises ValueError for arrays on
  several devices without a NamedSharding."""
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  if not leaves:
    return local_mesh()
  sharding = leaves[0].sharding
  if isinstance(sharding, NamedSharding) and isinstance(sharding.mesh, Mesh):
    return sharding.mesh
  devices = sorted(sharding.device_set, key=lambda d: d.id)
  if len(devices) != 1:
    raise ValueError(f"arrays on {len(devices)} devices without a NamedSharding ({sharding}); "
                     "allowed: a NamedSharding on a mesh, or one device")
  return local_mesh(devices[0])


def logical_to_spec(logical_axes: Sequence[str | None], rules: Mapping[str, Any],
                    shape: Sequence[int] | None = None, mesh: Mesh | None = None) -> P:
  """Maps logical axis names to a PartitionSpec; dims the mesh axes do not divide are replicated."""
  out, used = [], set()
  for i, name in enumerate(logical_axes):
    if name is None:
      out.append(None)
      continue
    if name not in rules:
      raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(rules)}")
    axes = rules[name]
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    if shape is not None and mesh is not None and axes:
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[i] % size:
        logging.debug("dim %d (%s=%d) not divisible by %s; replicated", i, name, shape[i], axes)
        axes = ()
    used.update(axes)
    out.append(None if not axes else (axes[0] if len(axes) == 1 else axes))
  return P(*out)


def param_shardings(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] = TRAIN_RULES):
  """A pytree of NamedShardings matching `state` (an nnx.State of Params with `logical_axes`)."""

  def one(v):
    axes = getattr(v, "logical_axes", None) or (None,) * np.ndim(v[...])
    return NamedSharding(mesh, logical_to_spec(axes, rules, np.shape(v[...]), mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def tree_shardings(tree: Any, mesh: Mesh, rules: Mapping[str, Any] = TRAIN_RULES) -> Any:
  """NamedShardings for any (possibly abstract) pytree holding nnx.Variables, e.g. a train state:
  every Variable by its `logical_axes` (params, and the optimizer moments, which keep them), every
  other leaf (step, optimizer counts, RNG) replicated."""

  def one(x):
    axes = getattr(x, "logical_axes", None)
    if not axes:
      return replicated(mesh)
    shape = x.get_value().shape if isinstance(x, nnx.Variable) else x.shape
    return NamedSharding(mesh, logical_to_spec(axes, rules, shape, mesh))

  return jax.tree.map(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def put_global(x: Any, sharding: NamedSharding) -> jax.Array:
  """A global array in `sharding` from a value every process holds whole (a numpy array, or a
  fully addressable / fully replicated jax.Array): each process builds only the shards of its own
  devices (`jax.make_array_from_callback`), so this also works when the sharding spans hosts."""
  if isinstance(x, jax.Array):
    if x.sharding == sharding:
      return x
    if (x.is_fully_addressable and sharding.is_fully_addressable
        and set(x.sharding.device_set) <= set(sharding.addressable_devices)):
      return jax.device_put(x, sharding)  # a local move
    x = host_value(x)
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx], dtype=x.dtype)


def host_value(x: Any) -> np.ndarray:
  """The value of `x` on this host, reading only what this process holds: a fully addressable
  array whole, a fully replicated one from its local copy. Multi-host: a sharded array that
  other processes hold parts of raises ValueError (gather it, or make it replicated, first)."""
  if not isinstance(x, jax.Array):
    return np.asarray(x)
  if x.is_fully_addressable:
    return np.asarray(x)
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  raise ValueError(f"host read of a {x.shape} array sharded as {x.sharding.spec} across processes; "
                   "allowed: fully addressable or fully replicated arrays")


def gather_to_host(x: Any) -> np.ndarray:
  """The whole value of `x` on every host: `host_value` when this process can read it, else a
  collective all-gather (`multihost_utils.process_allgather`; every process must call it)."""
  if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return host_value(x)


def to_host(tree: Any) -> Any:
  """`host_value` of every leaf (a multi-host-safe `jax.device_get`)."""
  return jax.tree.map(host_value, tree)


def shard_state(state: nnx.State, mesh: Mesh, rules: Mapping[str, Any] = TRAIN_RULES) -> nnx.State:
  """Places every variable of `state` in its sharding (multi-host safe: `put_global`)."""
  shardings = param_shardings(state, mesh, rules)
  if jax.process_count() == 1:
    return jax.device_put(state, shardings)
  return jax.tree.map(lambda v, sh: v.replace(put_global(v.get_value(), sh)), state, shardings,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int, rules: Mapping[str, Any] = TRAIN_RULES,
                   batch_size: int | None = None) -> NamedSharding:
  """Sharding for an array whose leading dim is the batch and the rest replicated."""
  shape = None if batch_size is None else (batch_size,) + (1,) * (ndim - 1)
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, shape, mesh))


def shard_batch(batch: Any, mesh: Mesh, rules: Mapping[str, Any] = TRAIN_RULES) -> Any:
  """Places a pytree of [B, ...] host arrays batch-sharded over the mesh (each process passes
  the same values and builds its own shards: multi-host safe)."""
  return jax.tree.map(
      lambda x: put_global(x, batch_sharding(mesh, np.ndim(x), rules, np.shape(x)[0])), batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _on_multi_host_tpu() -> bool:
  """A TPU slice of several hosts (TPU_WORKER_HOSTNAMES lists more than one), with the TPU
  platform allowed. A single host needs no initialisation, and a compile-only libtpu setup
  (analysis/aot.py sets TPU_WORKER_HOSTNAMES=localhost) or JAX_PLATFORMS=cpu is no pod."""
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  platforms = os.environ.get("JAX_PLATFORMS", "")
  return len(hosts) > 1 and (not platforms or "tpu" in platforms)


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None, **timeouts) -> bool:
  """Calls `jax.distributed.initialize` for multi-host runs.

  On TPU pods the arguments are discovered automatically (pass none). On CPU, give all three
  (or set JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), e.g. for two local
  processes over gloo. `timeouts`: `jax.distributed.initialize`'s heartbeat and shutdown timeouts
  (parallel/hosts.py sets them from the config). Returns True when it initialised.
  """
  coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and "JAX_NUM_PROCESSES" in os.environ:
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and "JAX_PROCESS_ID" in os.environ:
    process_id = int(os.environ["JAX_PROCESS_ID"])
  if coordinator is None and not _on_multi_host_tpu():
    return False
  jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                             process_id=process_id, **timeouts)
  return True
