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
  if mesh is None:
    opt_state = jax.jit(tx.init)(params)
  else:
    params = mesh_lib.shard_state(params, mesh, rules)
    # Moments laid out like their params (jit would otherwise put them on one device).
    opt_sh = mesh_lib.tree_shardings(jax.eval_shape(tx.init, params), mesh, rules)
    opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
  step = jnp.zeros((), jnp.int32)
  if mesh is not None:
    step = mesh_lib.put_global(step, mesh_lib.replicated(mesh))  # multi-host safe
  return TrainState(step=step, params=params, opt_state=opt_state)


def shardings_of(tree: Any) -> Any:
  return jax.tree.map(lambda x: x.sharding, tree)


def jit_step(fn: Callable, state: Any, batch_sharding: Any, mesh: Mesh | None,
             num_outputs_extra: int = 1, donate: bool = True, extra_shardings: tuple | None = None):
  """jax.jit(fn) with in/out shardings taken from a placed `state` and `batch_sharding`.

  `fn(state, batch) -> (state, *extras)`; the extras (metrics, ...) are replicated, unless
  `extra_shardings` gives one sharding per extra (None entries stay replicated), e.g. a
  batch sharding for per-example outputs.
  """
  if mesh is None:
    return jax.jit(fn, donate_argnums=(0,) if donate else ())
  state_sh = shardings_of(state)
  rep = mesh_lib.replicated(mesh)
  extras = tuple(extra_shardings) if extra_shardings is not None else (None,) * num_outputs_extra
  if len(extras) != num_outputs_extra:
    raise ValueError(f"jit_step: {len(extras)} extra_shardings for {num_outputs_extra} extra outputs")
  return jax.jit(fn, in_shardings=(state_sh, batch_sharding),
                 out_shardings=(state_sh,) + tuple(rep if sh is None else sh for sh in extras),
                 donate_argnums=(0,) if donate else ())


def accumulate_gradients(loss_fn: Callable, params, batch: dict, micro_batches: int,
                         has_outputs: bool = False):
  """Sum of `jax.value_and_grad(loss_fn, has_aux=True)` over micro-batches (lax.scan).

  loss_fn(params, micro_batch) -> (loss, aux) must normalise by FULL-batch counts (e.g. the
  number of target tokens in the whole batch), so that the sum over micro-batches is exactly
  the full-batch loss and gradient, whatever the split. Aux pytrees are summed too.

  With `has_outputs`, loss_fn returns (loss, (aux, outputs)) where `outputs` are per-example
  arrays (leading dim = the micro-batch's rows, e.g. hidden states): they are concatenated
  back to full-batch order instead of summed, and the result is ((loss, (aux, outputs)), grads).
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    return grad_fn(params, batch)
  split = jax.tree.map(lambda x: x.reshape((micro_batches, -1) + x.shape[1:]), batch)

  def summed_part(out):
    (loss, aux), grads = out
    return (loss, aux[0] if has_outputs else aux), grads

  def body(acc, mb):
    out = grad_fn(params, mb)
    stacked = out[0][1][1] if has_outputs else None
    return jax.tree.map(jnp.add, acc, summed_part(out)), stacked

  first = jax.eval_shape(grad_fn, params, jax.tree.map(lambda x: x[0], split))
  zeros = jax.tree.map(jnp.zeros_like, summed_part(first))
  ((loss, aux), grads), stacked = jax.lax.scan(body, zeros, split)
  if not has_outputs:
    return (loss, aux), grads
  outputs = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stacked)
  return (loss, (aux, outputs)), grads


def guarded_update(state: TrainState, grads, loss, optimizer: optax.GradientTransformation):
  """One optimizer step that is skipped when the loss or the gradient norm is not finite (the
  params and optimizer state then stay as they were; the step counter still advances).
  Returns (new_state, grad_norm, ok)."""
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
  new_state = TrainState(step=state.step + 1, params=jax.tree.map(keep, params, state.params),
                         opt_state=jax.tree.map(keep, opt_state, state.opt_state))
  return new_state, grad_norm, ok
