"""Supervised fine-tuning: a pure, jitted, sharded step and the loop that warm-starts the policy.

Loss: L = Σ_t m_{t+1} · CE(logits_t, x_{t+1}) / Σ_t m_{t+1}, where m marks target tokens
(trace + EOS) of the right-padded sequence x (see data/batching.py).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tlt_jax.data.batching import segment_mask
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.train.state import TrainState, accumulate_gradients, create_train_state, jit_step


def next_token_ce(logits_BxTxV, tokens_BxT, target_mask_BxT):
  """Per-position CE of predicting tokens[t+1] from logits[t], weighted by target_mask[t+1].

  Returns (ce_sum, count, correct_sum) as float32 scalars.
  """
  logits = logits_BxTxV[:, :-1].astype(jnp.float32)
  targets = tokens_BxT[:, 1:]
  w = target_mask_BxT[:, 1:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  ce = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return (ce * w).sum(), w.sum(), (correct * w).sum()


def sft_step(graphdef, tx: optax.GradientTransformation, micro_batches: int,
             state: TrainState, batch: dict[str, jax.Array]):
  """One SFT update: (state, batch{tokens, loss_mask[, positions, segment_ids]}) -> (state, metrics).

  Pure. Packed batches (data/batching.pack_sft_batch) carry positions and segment ids.
  """
  denom = jnp.maximum(batch["loss_mask"][:, 1:].astype(jnp.float32).sum(), 1.0)

  def loss_fn(params, mb):
    positions, mask = None, None
    if "segment_ids" in mb:  # packed rows
      positions, mask = mb["positions"], segment_mask(mb["segment_ids"])
    logits, _, _ = nnx.merge(graphdef, params)(mb["tokens"], positions, attn_mask_BxTxT=mask)
    ce_sum, _, correct = next_token_ce(logits, mb["tokens"], mb["loss_mask"])
    return ce_sum / denom, {"token_acc": correct / denom}

  (loss, aux), grads = accumulate_gradients(loss_fn, state.params, batch, micro_batches)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **aux}
  return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def make_sft_step(graphdef, tx, state: TrainState, mesh, micro_batches: int = 1,
                  batch_keys=("tokens", "loss_mask", "positions", "segment_ids")):
  """The jitted SFT step with explicit in/out shardings over `mesh` (None: single device)."""
  batch_sh = None
  if mesh is not None:
    batch_sh = {k: mesh_lib.batch_sharding(mesh, 2) for k in batch_keys}
  fn = functools.partial(sft_step, graphdef, tx, micro_batches)
  return jit_step(fn, state, batch_sh, mesh)


def run_sft(model, tx, batches: Callable[[int], dict[str, np.ndarray]], steps: int, *, mesh=None,
            micro_batches: int = 1, log_every: int = 25, on_log: Callable[[int, dict], None] | None = None,
            evaluate: Callable[[Any], dict] | None = None, eval_every: int = 0,
            state: TrainState | None = None, on_step: Callable[[TrainState], None] | None = None,
            show_progress: bool = True, step_fn: Callable | None = None):
  """Runs `steps` SFT updates. `batches(step)` returns the host batch of that step (so a resumed
  run sees the same data). Every `log_every` steps (and at the last) the metrics, with the
  evaluation's when due, go to `on_log(step, record)` and the history. A progress bar ("sft")
  shows the latest loss and token accuracy. `step_fn`: an already compiled `make_sft_step` of
  the same model and optimizer structure (e.g. an LR-table optimizer of the same length), so
  that a sweep compiles once. Returns (model, state, history)."""
  from tlt_jax.utils.console import progress
  graphdef, params = nnx.split(model)
  if state is None:
    state = create_train_state(params, tx, mesh)
  if step_fn is None:
    step_fn = make_sft_step(graphdef, tx, state, mesh, micro_batches)
  history = []
  t0 = time.perf_counter()
  start = int(state.step)
  bar = progress(steps, "sft", initial=start) if show_progress else None
  try:
    for step in range(start, steps):
      batch = batches(step)
      if mesh is not None:
        batch = mesh_lib.shard_batch(batch, mesh)
      state, metrics = step_fn(state, batch)
      if bar is not None:
        bar.update(1)
      if (step + 1) % log_every == 0 or step + 1 == steps:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        m.update(step=step + 1, time_s=time.perf_counter() - t0)
        if evaluate is not None and eval_every and ((step + 1) % eval_every == 0 or step + 1 == steps):
          m.update(evaluate(nnx.merge(graphdef, state.params)))
        history.append(m)
        if bar is not None:
          bar.set_postfix(loss=f"{m['loss']:.4f}", token_acc=f"{m['token_acc']:.3f}")
        if on_log is not None:
          on_log(step + 1, m)
      if on_step is not None:  # after the step's record: a stop here (preemption) keeps it
        on_step(state)
  finally:
    if bar is not None:
      bar.close()
  return nnx.merge(graphdef, state.params), state, history


def _eval_sums(graphdef, params, batch: dict[str, jax.Array]):
  positions, mask = None, None
  if "segment_ids" in batch:  # packed rows
    positions, mask = batch["positions"], segment_mask(batch["segment_ids"])
  logits, _, _ = nnx.merge(graphdef, params)(batch["tokens"], positions, attn_mask_BxTxT=mask)
  return next_token_ce(logits, batch["tokens"], batch["loss_mask"])


# (graphdef, params, batch) -> (ce_sum, count, correct_sum): the SFT loss's sums on one batch,
# no gradient. Pure; compiled once per model architecture and batch shape.
sft_eval_sums = jax.jit(_eval_sums, static_argnums=0)


def heldout_loss(model, batches) -> dict[str, float]:
  """The SFT loss on fixed held-out batches (a validation loss): Σ CE / Σ target tokens over all
  of them, and the token accuracy, as {"val_loss", "val_token_acc"}. `batches` are host batches
  as `run_sft` takes them (packed or not)."""
  graphdef, params = nnx.split(model)
  ce, count, correct = 0.0, 0.0, 0.0
  for batch in batches:
    sums = jax.device_get(sft_eval_sums(graphdef, params, batch))
    ce, count, correct = ce + float(sums[0]), count + float(sums[1]), correct + float(sums[2])
  count = max(count, 1.0)
  return {"val_loss": ce / count, "val_token_acc": correct / count}
