"""A train state pytree and helpers to place it on a mesh and jit steps with explicit shardings."""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from tlt_jax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  opt_state: optax.OptState


def create_train_state(params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh | None,
                       rules=mesh_lib.TRAIN_RULES) -> TrainState:
  """Places params in their logical shardings and initialises the optimizer state beside them."""
  if mesh is not None:
    params = mesh_lib.shard_state(params, mesh, rules)
  opt_state = jax.jit(tx.init)(params)
  step = jnp.zeros((), jnp.int32)
  if mesh is not None:
    step = jax.device_put(step, mesh_lib.replicated(mesh))
  return TrainState(step=step, params=params, opt_state=opt_state)


def shardings_of(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


def jit_step(fn: Callable, state: Any, batch_sharding: Any, mesh: Mesh | None,
             num_outputs_extra: int = 1, donate: bool = True):
  """jax.jit(fn) with in/out shardings taken from a placed `state` and `batch_sharding`.

  `fn(state, batch) -> (state, *extras)`; the extras (metrics, ...) are replicated.
  """
  if mesh is None:
    return jax.jit(fn, donate_argnums=(0,) if donate else ())
  state_sh = shardings_of(state)
  rep = mesh_lib.replicated(mesh)
  return jax.jit(fn, in_shardings=(state_sh, batch_sharding),
                 out_shardings=(state_sh,) + (rep,) * num_outputs_extra,
                 donate_argnums=(0,) if donate else ())


def accumulate_gradients(loss_fn: Callable, params, batch: dict, micro_batches: int):
  """Sum of `jax.value_and_grad(loss_fn, has_aux=True)` over micro-batches (lax.scan).

  loss_fn(params, micro_batch) -> (loss, aux) must normalise by FULL-batch counts (e.g. the
  number of target tokens in the whole batch), so that the sum over micro-batches is exactly
  the full-batch loss and gradient, whatever the split. Aux pytrees are summed too.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    return grad_fn(params, batch)
  split = jax.tree.map(lambda x: x.reshape((micro_batches, -1) + x.shape[1:]), batch)

  def body(acc, mb):
    out = grad_fn(params, mb)
    return jax.tree.map(jnp.add, acc, out), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split)))
  total, _ = jax.lax.scan(body, zeros, split)
  return total
