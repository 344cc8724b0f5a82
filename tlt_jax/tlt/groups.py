"""Rollout groups: the mesh's `data` axis cut into R sub-meshes that decode independently.

TLT (Hu et al., 2025, "Taming the Long Tail") splits a step's prompts over rollout workers;
a worker whose responses have all finished sits idle while the long tail of another one keeps
decoding, and that idle time is where the drafter trains. Here a worker is a *rollout group*:
the slice `mesh.devices[g*D/R : (g+1)*D/R]` of the data axis (D = data size), keeping every
fsdp/tensor device of the slice, as a `Mesh` with the same axis names. Per group:

  * the policy's params are replicated on the group's sub-mesh (`group.replicate`);
  * its share of the batch (contiguous GRPO prompt groups, `split_rows`) is sharded over the
    sub-mesh's batch axes (`group.place_batch`);
  * its rollout is one `RolloutSession`, whose chunks are dispatched asynchronously, so one host
    thread keeps all groups busy (tlt/scheduler.py).

The policy update still uses the whole mesh. On CPU the devices are fake
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`), so all groups share the same cores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from tlt_jax.parallel import mesh as mesh_lib


def divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


@dataclasses.dataclass(frozen=True, eq=False)
class RolloutGroup:
  """Group `index` of a split mesh: its sub-mesh and the placements on it."""

  index: int
  mesh: Mesh
  rules: Mapping[str, Any] = dataclasses.field(default_factory=lambda: mesh_lib.SAMPLE_RULES)

  @property
  def devices(self) -> tuple[jax.Device, ...]:
    return tuple(self.mesh.devices.flat)

  @property
  def size(self) -> int:
    return self.mesh.size

  def replicate(self, tree: Any) -> Any:
    """`tree` (e.g. the policy's or the drafter's params) replicated on every device of the group."""
    return jax.device_put(tree, NamedSharding(self.mesh, P()))

  def place_batch(self, x_BxN: np.ndarray) -> jax.Array:
    """A [B, ...] host array split over the group's batch axes (replicated when B does not divide)."""
    return jax.device_put(x_BxN, mesh_lib.batch_sharding(self.mesh, np.ndim(x_BxN), self.rules,
                                                         np.shape(x_BxN)[0]))


def split_mesh(mesh: Mesh, num_groups: int) -> list[RolloutGroup]:
  """R = `num_groups` rollout groups, each a contiguous slice of the mesh's `data` axis.

  Raises ValueError naming R, the data axis size and the allowed values when R does not divide it.
  """
  data = mesh.shape["data"]
  if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) or num_groups < 1 \
      or data % num_groups:
    hint = ""
    if jax.default_backend() == "cpu":
      hint = ("; on CPU, more (fake) devices come from XLA_FLAGS=--xla_force_host_platform_device_count=N, "
              "set before jax is imported (tlt_jax.main does this for tlt.rollout_groups)")
    raise ValueError(
        f"tlt.rollout_groups={num_groups!r} rollout groups do not divide the mesh's data axis "
        f"(data={data}, mesh {dict(mesh.shape)}); allowed: a divisor of {data}: {divisors(data)}{hint}")
  per = data // int(num_groups)
  axis = mesh.axis_names.index("data")
  groups = []
  for g in range(int(num_groups)):
    devices = np.take(mesh.devices, np.arange(g * per, (g + 1) * per), axis=axis)
    groups.append(RolloutGroup(g, Mesh(devices, mesh.axis_names)))
  return groups


def union_mesh(groups: Sequence[RolloutGroup]) -> Mesh:
  """One mesh over several groups' devices (stacked along `data`): where idle groups train the
  drafter together, data-parallel."""
  if not groups:
    raise ValueError("union_mesh needs at least one group")
  if len(groups) == 1:
    return groups[0].mesh
  axis = groups[0].mesh.axis_names.index("data")
  return Mesh(np.concatenate([g.mesh.devices for g in groups], axis=axis), groups[0].mesh.axis_names)


def split_rows(num_rows: int, group_size: int, num_groups: int) -> list[np.ndarray]:
  """Row indices of each rollout group: whole GRPO prompt groups (rows pG .. pG+G-1 share prompt
  p), contiguous, as even as possible (np.array_split over prompts). A group may get none when
  there are fewer prompts than groups."""
  if num_rows % group_size:
    raise ValueError(f"{num_rows} rows are not whole prompt groups of {group_size}")
  prompts = np.array_split(np.arange(num_rows // group_size), num_groups)
  return [(p[:, None] * group_size + np.arange(group_size)[None]).reshape(-1) for p in prompts]
