"""Rollout groups: the mesh's `data` axis cut into R sub-meshes that decode independently.

TLT (Hu et al., 2025, "Taming the Long Tail") splits a step's prompts over rollout workers;
a worker whose responses have all finished sits idle while the long tail of another one keeps
decoding, and that idle time is where the drafter trains. Here a worker is a *rollout group*:
the slice `mesh.devices[g*D/R : (g+1)*D/R]` of the data axis (D = data size), keeping every
fsdp/tensor device of the slice, as a `Mesh` with the same axis names. Per group:

  * the policy's params are laid out by the sampling rules (mesh.SAMPLE_RULES: tensor parallel
    within the group, whole along fsdp, copied per group along data): `place_params` reshards
    the training params ONCE on the whole mesh into that layout (weights never use the data
    axis, so every group's slice holds a complete copy) and hands each group a zero-copy view of
    its own devices' shards. Multi-host safe: each process only touches its own shards;
  * its share of the batch (contiguous GRPO prompt groups, `split_rows`) is sharded over the
    sub-mesh's batch axes (`group.place_batch`, built shard by shard on each process);
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
  parent: Mesh | None = None  # the mesh the group was cut from

  @property
  def devices(self) -> tuple[jax.Device, ...]:
    return tuple(self.mesh.devices.flat)

  @property
  def size(self) -> int:
    return self.mesh.size

  def replicate(self, tree: Any) -> Any:
    """`tree` (e.g. the drafter's params, an RNG key) replicated on every device of the group."""
    if jax.process_count() == 1:
      return jax.device_put(tree, NamedSharding(self.mesh, P()))
    return jax.tree.map(lambda x: mesh_lib.put_global(x, NamedSharding(self.mesh, P())), tree)

  def place_drafter(self, params: Any) -> Any:
    """The drafter's params laid out by the group's sampling rules, as the policy's layers are
    (tensor parallel within the group): every draft level then reads a 1/tensor share of the
    drafter's layer per chip instead of all of it. Leaves without logical axes are replicated."""
    shardings = mesh_lib.tree_shardings(params, self.mesh, self.rules)
    if jax.process_count() == 1:
      return jax.device_put(params, shardings)
    from flax import nnx
    put = lambda x, sh: (x.replace(mesh_lib.put_global(x.get_value(), sh)) if isinstance(x, nnx.Variable)  # noqa: E731
                         else mesh_lib.put_global(x, sh))
    return jax.tree.map(put, params, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))

  def place_batch(self, x_BxN: np.ndarray) -> jax.Array:
    """A [B, ...] host array split over the group's batch axes (replicated when B does not divide)."""
    return mesh_lib.put_global(x_BxN, mesh_lib.batch_sharding(self.mesh, np.ndim(x_BxN), self.rules,
                                                              np.shape(x_BxN)[0]))

  def view(self, x: jax.Array) -> jax.Array:
    """The group's part of an array laid out on the parent mesh with a spec that does not use
    the data axis (so the group's devices hold all of it): a zero-copy array on the group's mesh."""
    sharding = NamedSharding(self.mesh, x.sharding.spec)
    mine = set(self.mesh.devices.flat)
    shards = [s.data for s in x.addressable_shards if s.device in mine]
    return jax.make_array_from_single_device_arrays(x.shape, sharding, shards)


def _uses_data_axis(spec) -> bool:
  return any(a == "data" or (isinstance(a, tuple) and "data" in a) for a in spec)


def place_params(tree: Any, groups: Sequence[RolloutGroup]) -> list[Any]:
  """`tree` (the policy's params, any layout) laid out by each group's sampling rules on its
  devices, one tree per group (see the module docstring). When the groups come from one parent
  mesh that holds `tree`, this is one reshard on that mesh plus per-group views; otherwise each
  group gets its own copy."""
  parent = groups[0].parent
  leaves = [x for x in jax.tree.leaves(tree) if isinstance(x, jax.Array)]
  on_parent = parent is not None and leaves and all(
      set(x.sharding.device_set) == set(parent.devices.flat) for x in leaves)
  layout = lambda mesh: mesh_lib.tree_shardings(tree, mesh, groups[0].rules)  # noqa: E731
  if on_parent:
    full = jax.device_put(tree, layout(parent))
    if not any(_uses_data_axis(x.sharding.spec) for x in jax.tree.leaves(full)):
      return [jax.tree.map(g.view, full) for g in groups]
  return [jax.device_put(tree, layout(g.mesh)) for g in groups]


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
    groups.append(RolloutGroup(g, Mesh(devices, mesh.axis_names), parent=mesh))
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
