"""Drafter training: the EAGLE feature + distribution loss and a pure jitted train step.

Batch convention (one row per sequence, right-padded, L tokens):
  tokens     [B, L] int32    x_0 .. x_{L-1}
  hidden     [B, L, H]       the target's final normed hidden states f_0 .. f_{L-1}
                             (f_t is what the target's head maps to the distribution of x_{t+1})
  loss_mask  [B, L] float32  loss_mask[t] = 1 iff the NEXT token x_{t+1} is a response token
                             (the policy-loss mask of the RL trainer, on f_t's position)
  positions  [B, L] int32    optional RoPE positions of the L tokens (default arange(L))

Training step t = 0 .. L-2 (drafter input index t, see `tlt_jax.drafter.eagle`):
  input (embed(x_{t+1}), f_t) at position positions[t]  ->  f̂_{t+1}, regressed onto f_{t+1}.

Step mask: step t counts iff loss_mask[t+1] = 1, i.e. the predicted feature f̂_{t+1} is the one
whose head drafts x_{t+2}, a response token; these are exactly the features the speculative
decoder uses. Its inputs are then valid too: x_{t+1} is the last prompt token or a response
token, and f_t its predecessor's feature (assuming a non-empty prompt). The step whose input is
the final response token (EOS) predicts past the end and does not count.

Loss, averaged over counted steps (Li et al., 2024, EAGLE; weights 0.5 / 0.5 as in TLT):
  l_t = 0.5 * mean_h SmoothL1_1(f̂_{t+1} - f_{t+1})
      + 0.5 * CE(softmax(head(f_{t+1})), log_softmax(head(f̂_{t+1})))
The head (and embedding) are the target's, frozen: gradients reach the drafter's params only.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Iterable, Iterator, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from tlt_jax.drafter.eagle import EagleDrafter, check_compatible
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import Transformer
from tlt_jax.parallel.mesh import (TRAIN_RULES, batch_sharding, logical_to_spec, replicated,
                                   tree_shardings)

Array = jax.Array
Batch = Mapping[str, Array]


@flax.struct.dataclass
class TargetHead:
  """The target's frozen embedding table and LM head, as plain arrays (a pytree).

  `embed` and `logits` are the Transformer's own methods (same code, same dtype policy), so
  drafter training and speculative decoding see bit-identical embeddings and logits.
  """

  embed_tokens: Array  # [V, H]
  lm_head: Array | None  # [H, V]; None when tied to embed_tokens
  cfg: ModelConfig = flax.struct.field(pytree_node=False)

  embed = Transformer.embed
  logits = Transformer.logits

  @classmethod
  def from_target(cls, target: Transformer) -> "TargetHead":
    """References (does not copy) the target's embedding and head arrays."""
    return cls(embed_tokens=target.embed_tokens[...],
               lm_head=None if target.lm_head is None else target.lm_head[...], cfg=target.cfg)


def target_head_shardings(target_cfg: ModelConfig, mesh: Mesh,
                          rules: Mapping[str, Any] = TRAIN_RULES) -> TargetHead:
  """NamedShardings for a TargetHead, laid out by the target's logical axes ('vocab', 'embed')."""
  v, h = target_cfg.vocab_size, target_cfg.hidden_size
  named = lambda axes, shape: NamedSharding(mesh, logical_to_spec(axes, rules, shape, mesh))
  return TargetHead(embed_tokens=named(("vocab", "embed"), (v, h)),
                    lm_head=None if target_cfg.tie_word_embeddings else named(("embed", "vocab"), (h, v)),
                    cfg=target_cfg)


@flax.struct.dataclass
class DrafterTrainState:
  """Drafter params (an nnx.State; graphdef kept outside), optax state and step counter."""

  params: nnx.State
  opt_state: optax.OptState
  step: Array  # int32 []


def drafter_steps(batch: Batch, embed_fn: Callable[[Array], Array]):
  """The training pairs of a batch, by drafter input index t = 0 .. L-2.

  Returns (emb_BxTxH = embed(x_{t+1}), feat_in_BxTxH = f_t, feat_target_BxTxH = f_{t+1},
  positions_BxT = positions[t], step_mask_BxT = loss_mask[t+1]) with T = L - 1.
  """
  tokens_BxL, hidden_BxLxH = batch["tokens"], batch["hidden"]
  b, l = tokens_BxL.shape
  positions_BxL = batch.get("positions")
  if positions_BxL is None:
    positions_BxL = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  return (embed_fn(tokens_BxL[:, 1:]), hidden_BxLxH[:, :-1], hidden_BxLxH[:, 1:],
          positions_BxL[:, :-1], batch["loss_mask"][:, 1:].astype(jnp.float32))


def drafter_loss(drafter: EagleDrafter, head: TargetHead | Transformer, batch: Batch, *,
                 feature_weight: float = 0.5, ce_weight: float = 0.5, mesh: Mesh | None = None):
  """EAGLE drafter loss over the counted steps (see the module docstring for the conventions).

  loss = Σ_t m_t [w_f · mean_h SmoothL1(f̂_{t+1} - f_{t+1}) + w_ce · CE(p_{t+1}, q̂_{t+1})] / Σ_t m_t
  with p = softmax(head(f)), log q̂ = log_softmax(head(f̂)), m_t = loss_mask[t+1].

  `head` is the target's TargetHead (or the target itself); its arrays are stop-gradiented.
  Returns (loss, metrics) with metrics {loss, smooth_l1, ce, kl, accuracy, num_steps}: `kl` is
  ce minus the target's entropy (the reducible part of ce), `accuracy` the top-1 agreement
  argmax head(f̂) == argmax head(f), an acceptance-rate proxy.

  Each row is one sequence: its attention is causal within segment 1 (all ones), computed
  without a dense [L, L] mask (models/attention.py; splash on a TPU `mesh`).
  """
  if not isinstance(head, TargetHead):
    head = TargetHead.from_target(head)
  check_compatible(drafter, head.cfg)
  head = jax.tree.map(jax.lax.stop_gradient, head)
  emb, feat_in, feat_target, positions, mask_BxT = drafter_steps(batch, head.embed)
  feat_target = jax.lax.stop_gradient(feat_target).astype(jnp.float32)
  from tlt_jax.models.attention import AttentionSpec
  spec = AttentionSpec(drafter.cfg.attention, drafter.cfg.attention_chunk, mesh)
  feat_pred, _ = drafter(emb, feat_in, positions, segment_ids_BxT=jnp.ones(mask_BxT.shape, jnp.int32),
                         attn_spec=spec)
  feat_pred = feat_pred.astype(jnp.float32)

  smooth_l1_BxT = jnp.mean(optax.huber_loss(feat_pred, feat_target, delta=1.0), axis=-1)
  logits_target = head.logits(feat_target)
  logits_pred = head.logits(feat_pred)
  p_target = jax.nn.softmax(logits_target, axis=-1)
  ce_BxT = -jnp.sum(p_target * jax.nn.log_softmax(logits_pred, axis=-1), axis=-1)
  entropy_BxT = -jnp.sum(p_target * jax.nn.log_softmax(logits_target, axis=-1), axis=-1)
  agree_BxT = (jnp.argmax(logits_pred, -1) == jnp.argmax(logits_target, -1)).astype(jnp.float32)

  num_steps = jnp.sum(mask_BxT)
  mean = lambda x_BxT: jnp.sum(x_BxT * mask_BxT) / jnp.maximum(num_steps, 1.0)
  smooth_l1, ce = mean(smooth_l1_BxT), mean(ce_BxT)
  loss = feature_weight * smooth_l1 + ce_weight * ce
  return loss, dict(loss=loss, smooth_l1=smooth_l1, ce=ce, kl=ce - mean(entropy_BxT),
                    accuracy=mean(agree_BxT), num_steps=num_steps)


def init_drafter_train_state(drafter: EagleDrafter,
                             optimizer: optax.GradientTransformation) -> DrafterTrainState:
  """A fresh train state from the drafter's params (copied, so donating the state leaves the
  module usable). The graphdef is `nnx.graphdef(drafter)`."""
  params = jax.tree.map(jnp.copy, nnx.state(drafter, nnx.Param))
  return DrafterTrainState(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def drafter_state_shardings(state: DrafterTrainState, mesh: Mesh,
                            rules: Mapping[str, Any] = TRAIN_RULES) -> DrafterTrainState:
  """NamedShardings for a (possibly abstract) train state: every nnx.Variable (params and the
  optimizer moments, which keep the params' `logical_axes`) by its logical axes, the rest
  (step, optimizer counts) replicated (mesh.tree_shardings)."""
  return tree_shardings(state, mesh, rules)


def make_drafter_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                            target_cfg: ModelConfig, *, mesh: Mesh | None = None,
                            rules: Mapping[str, Any] = TRAIN_RULES, feature_weight: float = 0.5,
                            ce_weight: float = 0.5):
  """`drafter_train_step(state, target_head, batch) -> (state, metrics)`, pure and jitted.

  One optimizer step on `drafter_loss`, gradients w.r.t. the drafter params only (the target's
  TargetHead arrays are frozen inputs). The state is donated. With `mesh`, in/out shardings
  are explicit: drafter params and optimizer moments by their logical axes under `rules`, the
  target head by ('vocab', 'embed'), the batch split over its leading dim, metrics replicated.
  """
  abstract_graphdef, abstract_params = nnx.split(
      nnx.eval_shape(lambda: EagleDrafter(target_cfg, rngs=nnx.Rngs(0))), nnx.Param)
  if abstract_graphdef != graphdef:
    raise ValueError("make_drafter_train_step: graphdef is not that of EagleDrafter(target_cfg) "
                     f"(target hidden_size={target_cfg.hidden_size}); build the drafter from the "
                     "target's ModelConfig")

  def step(state: DrafterTrainState, head: TargetHead, batch: Batch):

    def loss_fn(params):
      return drafter_loss(nnx.merge(graphdef, params), head, batch,
                          feature_weight=feature_weight, ce_weight=ce_weight, mesh=mesh)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
    return DrafterTrainState(params=params, opt_state=opt_state, step=state.step + 1), metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  abstract_state = jax.eval_shape(
      lambda p: DrafterTrainState(p, optimizer.init(p), jnp.zeros((), jnp.int32)), abstract_params)
  state_sh = drafter_state_shardings(abstract_state, mesh, rules)
  in_sh = (state_sh, target_head_shardings(target_cfg, mesh, rules), batch_sharding(mesh, 1, rules))
  return jax.jit(step, in_shardings=in_sh, out_shardings=(state_sh, replicated(mesh)),
                 donate_argnums=0)


@functools.partial(jax.jit, static_argnums=0)
def _target_features(graphdef, state, tokens_BxL, positions_BxL):
  _, hidden_BxLxH, _ = nnx.merge(graphdef, state)(tokens_BxL, positions_BxL, return_logits=False)
  return hidden_BxLxH


def collect_target_features(target: Transformer, tokens_BxL: Array,
                            positions_BxL: Array | None = None) -> Array:
  """f_t for every position: one uncached target forward (final normed hidden states).

  The RL trainer passes the hidden states its policy update already computed instead.
  """
  graphdef, state = nnx.split(target)
  return _target_features(graphdef, state, jnp.asarray(tokens_BxL, jnp.int32), positions_BxL)


def warmup_drafter(target: Transformer, drafter: EagleDrafter, batches_iter: Iterable[Batch],
                   steps: int, optimizer: optax.GradientTransformation, log_every: int = 50,
                   mesh: Mesh | None = None, on_log: Callable[[dict], None] | None = None,
                   show_progress: bool = True, on_step: Callable[[int], None] | None = None):
  """Offline warm-up on the target's own features of SFT / rollout token batches.

  Each batch holds `tokens` and `loss_mask` (optionally `positions` and precomputed `hidden`;
  when absent, `hidden` comes from `collect_target_features`). Runs `steps` train steps, updates
  `drafter` in place and returns (drafter, history), history being the metrics (as floats, with
  `step`) every `log_every` steps and at the last one; each is also passed to `on_log`.
  `on_step(step)` runs after every step (it may raise to stop the warm-up). A progress bar
  ("drafter") shows the latest loss and accuracy.
  """
  from tlt_jax.utils.console import progress
  check_compatible(drafter, target.cfg)
  graphdef = nnx.graphdef(drafter)
  train_step = make_drafter_train_step(graphdef, optimizer, target.cfg, mesh=mesh)
  state = init_drafter_train_state(drafter, optimizer)
  head = TargetHead.from_target(target)
  if mesh is not None:
    state = jax.device_put(state, drafter_state_shardings(state, mesh))
    head = jax.device_put(head, target_head_shardings(target.cfg, mesh))
  it: Iterator[Batch] = iter(batches_iter)
  history = []
  bar = progress(steps, "drafter") if show_progress else None
  try:
    for i in range(1, steps + 1):
      batch = dict(next(it))
      if "hidden" not in batch:
        batch["hidden"] = collect_target_features(target, batch["tokens"], batch.get("positions"))
      if mesh is not None:
        batch = jax.device_put(batch, batch_sharding(mesh, 1))
      state, metrics = train_step(state, head, batch)
      if on_step is not None:
        on_step(i)
      if bar is not None:
        bar.update(1)
      if i % log_every == 0 or i == steps:
        record = {"step": i, **{k: float(v) for k, v in metrics.items()}}
        history.append(record)
        if bar is not None:
          bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}")
        if on_log is not None:
          on_log(record)
  finally:
    if bar is not None:
      bar.close()
  nnx.update(drafter, state.params)
  return drafter, history


# ----------------------------------------------------------------------------- persistence


def save_drafter(drafter: EagleDrafter, directory: str, step: int, meta: Mapping[str, Any]) -> None:
  """Writes the drafter's params (orbax, one step) and a JSON `meta` to `directory`."""
  from tlt_jax.train.checkpoint import Checkpointer
  ckpt = Checkpointer(directory, max_to_keep=1)
  ckpt.save(step, nnx.state(drafter, nnx.Param), dict(meta))
  ckpt.close()


def load_drafter(directory: str, target_cfg: ModelConfig) -> tuple[EagleDrafter, dict] | None:
  """(drafter, meta) saved by `save_drafter` for a target with config `target_cfg`; None when
  `directory` holds no drafter checkpoint."""
  from tlt_jax.train.checkpoint import Checkpointer
  if not os.path.isdir(directory):
    return None
  ckpt = Checkpointer(directory, max_to_keep=1)
  try:
    drafter = EagleDrafter(target_cfg, rngs=nnx.Rngs(0))
    restored = ckpt.restore_latest(nnx.state(drafter, nnx.Param))
  finally:
    ckpt.close()
  if restored is None:
    return None
  _, params, meta = restored
  nnx.update(drafter, params)
  return drafter, meta
