"""The policy update: a pure, jitted, sharded PPO-clip step over one rollout batch.

Batch (every array [B, L], aligned with `tokens`; a row holds one sequence, or several when
packed, see rl/packing.py):
  tokens         int32    BOS + prompt + response (+ the next sequences of a packed row) (+ PAD)
  positions      int32    RoPE positions, restarting at 0 with every sequence
  segment_ids    int32    1, 2, ... per sequence of the row, 0 on padding; attention stays
                          within a sequence (data/batching.segment_mask)
  response_mask  float32  1 on generated tokens (EOS included), 0 on prompt and padding
  advantages     float32  the advantage of the token's response (GRPO/RLOO, rl/advantages.py)
  old_logprobs   float32  log pi_old(tokens[t] | its sequence before t) where response_mask = 1
  ref_logprobs   float32  optional, the same under the frozen reference policy

Token t is predicted by logits[t - 1]; `token_logprobs_aligned` puts log pi(tokens[t]) at index t
(0 at t = 0, which is never a response token; at a packed sequence's first token, its BOS, the
value belongs to the previous sequence and is masked), so every quantity shares `response_mask`.

Loss: the registered policy loss `cfg.loss` (rl/losses.py: ppo_clip, gspo, cispo), here the
default, ppo_clip (Schulman et al. 2017, with per-token advantages; GRPO's are constant per
response, Shao et al. 2024):
  rho_t = exp(log pi_theta(y_t) - log pi_old(y_t))
  l_t   = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + kl_coef * k3(pi_theta, pi_ref)_t
  loss  = sum_t m_t l_t / sum_t m_t                         (aggregation "token", DAPO)
        = mean_seq [sum_{t in seq} m_t l_t / sum_{t in seq} m_t]   ("sequence", GRPO)
written as loss = sum_t w_t l_t with weights normalised over the FULL batch
(losses.aggregation_weights, from response_mask and segment_ids), so that micro-batches
(gradient accumulation) sum to exactly the full-batch loss and gradient.

Non-finite guard: when the loss or the gradient norm is not finite the update is dropped
inside the jitted step (params and optimizer state pass through unchanged, via jnp.where) and
`skipped` = 1; the trainer stops after `max_consecutive_skips` skips in a row.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.models.attention import AttentionSpec
from tlt_jax.rl.losses import (AGGREGATIONS, aggregation_weights, entropy_from_logits, get_loss,
                               masked_aggregate, num_sequences, registered_losses)
from tlt_jax.train.state import TrainState, accumulate_gradients, guarded_update, jit_step, shardings_of

Array = jax.Array

BATCH_KEYS = ("tokens", "positions", "segment_ids", "response_mask", "advantages", "old_logprobs")
# ppo_clip_loss metrics that are token means (summed over micro-batches with token weights).
_TOKEN_MEAN_METRICS = ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean")


@dataclasses.dataclass(frozen=True)
class UpdateConfig:
  """Hyper-parameters of `policy_update_step` (static under jit).

  clip_eps / clip_eps_high: PPO clip range [1 - clip_eps, 1 + clip_eps_high] (None: symmetric).
  aggregation: "token" or "sequence" (see the module docstring).
  kl_coef: weight of the k3 KL to the reference policy (needs `ref_logprobs` in the batch).
  temperature: the sampler's temperature; log-probs are those of softmax(logits / T).
  micro_batches: gradient-accumulation splits of the batch (must divide B).
  loss: the registered policy loss (rl/losses.py: ppo_clip, gspo, cispo).
  loss_kwargs: (name, value) pairs for the loss, over clip_eps / clip_eps_high / aggregation.
  """

  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  aggregation: str = "token"
  kl_coef: float = 0.0
  temperature: float = 1.0
  micro_batches: int = 1
  loss: str = "ppo_clip"
  loss_kwargs: tuple[tuple[str, Any], ...] = ()

  def __post_init__(self):
    if self.aggregation not in AGGREGATIONS:
      raise ValueError(f"UpdateConfig.aggregation={self.aggregation!r}; allowed: {AGGREGATIONS}")
    if not self.clip_eps > 0:
      raise ValueError(f"UpdateConfig.clip_eps={self.clip_eps!r} must be > 0")
    if not self.temperature > 0:
      raise ValueError(f"UpdateConfig.temperature={self.temperature!r} must be > 0 for RL "
                       "(log-probs of softmax(logits / T))")
    if not self.kl_coef >= 0:
      raise ValueError(f"UpdateConfig.kl_coef={self.kl_coef!r} must be >= 0")
    if self.micro_batches < 1:
      raise ValueError(f"UpdateConfig.micro_batches={self.micro_batches!r} must be >= 1")
    if self.loss not in registered_losses():
      raise ValueError(f"UpdateConfig.loss={self.loss!r}; allowed: {tuple(registered_losses())}")
    get_loss(self.loss, **dict(self.loss_kwargs))  # bad keyword names raise here

  def loss_fn(self):
    """The policy loss with its hyper-parameters bound: rl.clip_eps / clip_eps_high, then
    loss_kwargs on top. ppo_clip's aggregation comes from the step's weights."""
    kwargs = {"clip_eps": self.clip_eps, "clip_eps_high": self.clip_eps_high, **dict(self.loss_kwargs)}
    kwargs.pop("aggregation", None)  # the step aggregates with full-batch weights
    return get_loss(self.loss, **kwargs)

  @classmethod
  def from_config(cls, rl_cfg: Mapping[str, Any], temperature: float) -> "UpdateConfig":
    """From the config's `rl` section (clip_eps_high 0 means symmetric; an `aggregation` in
    rl.loss_kwargs replaces rl.aggregation)."""
    loss_kwargs = dict(rl_cfg["loss_kwargs"])
    if "clip_eps_high" in loss_kwargs:
      loss_kwargs["clip_eps_high"] = float(loss_kwargs["clip_eps_high"]) or None
    return cls(clip_eps=float(rl_cfg["clip_eps"]),
               clip_eps_high=float(rl_cfg["clip_eps_high"]) or None,
               aggregation=str(loss_kwargs.pop("aggregation", rl_cfg["aggregation"])),
               kl_coef=float(rl_cfg["kl_coef"]), temperature=float(temperature),
               micro_batches=int(rl_cfg["micro_batches"]), loss=str(rl_cfg["loss"]),
               loss_kwargs=tuple(sorted(loss_kwargs.items())))


def token_logprobs_aligned(logits_BxLxV: Array, tokens_BxL: Array,
                           temperature: float) -> tuple[Array, Array]:
  """(logp_BxL, entropy_BxL) aligned with tokens: index t holds log softmax(z_{t-1})[tokens_t]
  and the entropy of softmax(z_{t-1}), z = logits / T; index 0 holds 0. float32."""
  z_BxTxV = logits_BxLxV[:, :-1].astype(jnp.float32) / temperature
  logp_all = jax.nn.log_softmax(z_BxTxV, axis=-1)
  picked_BxT = jnp.take_along_axis(logp_all, tokens_BxL[:, 1:, None], axis=-1)[..., 0]
  entropy_BxT = entropy_from_logits(jax.lax.stop_gradient(z_BxTxV))
  pad = jnp.zeros((tokens_BxL.shape[0], 1), jnp.float32)
  return jnp.concatenate([pad, picked_BxT], 1), jnp.concatenate([pad, entropy_BxT], 1)


def policy_forward(graphdef: nnx.GraphDef, params: nnx.State, tokens_BxL: Array,
                   positions_BxL: Array, segment_ids_BxL: Array, temperature: float,
                   mesh: Mesh | None = None, embedder=None):
  """One uncached forward, attention within each sequence (segment) of a row, without a dense
  [L, L] mask (models/attention.py: splash on a TPU `mesh`, chunked elsewhere; the model's
  cfg.attention / attention_chunk): (logp_BxL, entropy_BxL, hidden_BxLxH), see
  `token_logprobs_aligned`; hidden is the final normed hidden state f_t (EAGLE's feature).
  `embedder` (SCONE's `HostTable`, None for the plain model) gives the input embeddings, looked
  up per sequence of the packed rows as the rollout engine looked them up."""
  model = nnx.merge(graphdef, params)
  spec = AttentionSpec(model.cfg.attention, model.cfg.attention_chunk, mesh)
  extra = {} if embedder is None else {
      "input_embeds_BxTxD": embedder.embed_packed(model, tokens_BxL, positions_BxL)}
  logits_BxLxV, hidden_BxLxH, _ = model(tokens_BxL, positions_BxL, segment_ids_BxT=segment_ids_BxL,
                                        attn_spec=spec, **extra)
  logp_BxL, entropy_BxL = token_logprobs_aligned(logits_BxLxV, tokens_BxL, temperature)
  return logp_BxL, entropy_BxL, hidden_BxLxH


def policy_update_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                       cfg: UpdateConfig, state: TrainState, batch: Mapping[str, Array],
                       mesh: Mesh | None = None, embedder=None):
  """One PPO-clip update: (state, batch) -> (state, metrics, hidden_BxLxH). Pure.

  Metrics (replicated scalars): loss, pg_loss, kl (k3 to the reference; 0 without one),
  entropy (token mean, at the sampler's temperature), clip_frac[_low|_high], approx_kl (old ->
  new), ratio_mean, grad_norm (before clipping), skipped (1.0 when the update was dropped as
  non-finite), num_tokens, num_sequences.
  """
  mask_full = batch["response_mask"].astype(jnp.float32)
  tokens_full = jnp.maximum(jnp.sum(mask_full), 1.0)
  has_ref = "ref_logprobs" in batch
  policy_loss = cfg.loss_fn()
  batch = dict(batch, loss_weights=aggregation_weights(mask_full, batch["segment_ids"], cfg.aggregation))

  def loss_fn(params, mb):
    mask = mb["response_mask"].astype(jnp.float32)
    logp, entropy, hidden = policy_forward(graphdef, params, mb["tokens"], mb["positions"],
                                           mb["segment_ids"], cfg.temperature, mesh, embedder)
    loss, m = policy_loss(logp, mb["old_logprobs"], mb["advantages"], mask,
                          logp_ref_BxT=mb["ref_logprobs"] if has_ref else None,
                          kl_coef=cfg.kl_coef, weights_BxT=mb["loss_weights"],
                          segment_ids_BxT=mb["segment_ids"])
    w_tokens = jnp.sum(mask) / tokens_full  # token means: full-batch normalisation
    aux = {k: m[k] * w_tokens for k in _TOKEN_MEAN_METRICS}
    aux["pg_loss"] = m["pg_loss"]  # already a part of the full-batch weighted sum
    aux["kl"] = m["kl_ref"] if has_ref else jnp.zeros((), jnp.float32)
    aux["entropy"] = masked_aggregate(entropy, mask, "token") * w_tokens
    return loss, (aux, hidden)

  (loss, (aux, hidden)), grads = accumulate_gradients(loss_fn, state.params, batch,
                                                      cfg.micro_batches, has_outputs=True)
  new_state, grad_norm, ok = guarded_update(state, grads, loss, optimizer)
  metrics = dict(aux, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32),
                 num_tokens=jnp.sum(mask_full),
                 num_sequences=num_sequences(mask_full, batch["segment_ids"]))
  return new_state, metrics, hidden


def update_batch_shardings(mesh: Mesh, with_ref: bool, rules=mesh_lib.TRAIN_RULES) -> dict:
  """NamedShardings of an update batch: every array split over 'batch' on its leading dim."""
  keys = BATCH_KEYS + (("ref_logprobs",) if with_ref else ())
  return {k: mesh_lib.batch_sharding(mesh, 2, rules) for k in keys}


def make_policy_update_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                            cfg: UpdateConfig, state: TrainState, mesh: Mesh | None,
                            with_ref: bool | None = None, embedder=None):
  """The jitted `policy_update_step(state, batch) -> (state, metrics, hidden)`.

  With `mesh`, in/out shardings are explicit: the state keeps its placement (params by their
  logical axes), the batch and `hidden` are split over 'batch', metrics are replicated. The
  state is donated. `with_ref` (default: kl_coef > 0) says whether batches carry ref_logprobs.
  """
  if with_ref is None:
    with_ref = cfg.kl_coef > 0
  fn = functools.partial(policy_update_step, graphdef, optimizer, cfg, mesh=mesh, embedder=embedder)
  if mesh is None:
    return jit_step(fn, state, None, None, num_outputs_extra=2)
  return jit_step(fn, state, update_batch_shardings(mesh, with_ref), mesh, num_outputs_extra=2,
                  extra_shardings=(None, mesh_lib.batch_sharding(mesh, 3)))


def logprob_gap_metrics(sampler_BxL: Array, recomputed_BxL: Array, mask_BxL: Array) -> dict:
  """|log pi_sampler - log pi_recomputed| over response tokens: mean and max.

  The sampler's incremental (KV-cached) decode and the trainer's full forward compute the same
  log-probs up to floating-point order; a large gap flags a sampler/trainer mismatch (wrong
  temperature, misaligned positions) that would bias the PPO ratio.
  """
  valid = mask_BxL > 0
  gap = jnp.where(valid, jnp.abs(sampler_BxL.astype(jnp.float32) - recomputed_BxL), 0.0)
  return {"logprob_gap": masked_aggregate(gap, mask_BxL, "token"),
          "logprob_gap_max": jnp.max(gap)}


def make_logprob_fn(graphdef: nnx.GraphDef, temperature: float, params_like: Any = None,
                    mesh: Mesh | None = None, micro_batches: int = 1, embedder=None):
  """Jitted `(params, tokens, positions, segment_ids, response_mask, sampler_logprobs) ->
  (logp_BxL, metrics)`:
  a forward without gradients that recomputes log-probs (old ones before the update, or the
  reference policy's) and their gap to the sampler's (`logprob_gap_metrics`).

  With `mesh`, params keep the shardings of `params_like` and the batch is split over 'batch'.
  With `micro_batches` > 1 the rows go through the forward in that many slices (`lax.map`, as
  the update's micro-batches), so the [rows, L, V] logits of only one slice exist at a time.
  `embedder`: SCONE's input embeddings (`policy_forward`).
  """

  def forward(params, tokens_BxL, positions_BxL, segment_ids_BxL):
    return policy_forward(graphdef, params, tokens_BxL, positions_BxL, segment_ids_BxL,
                          temperature, mesh, embedder)[0]

  def fn(params, tokens_BxL, positions_BxL, segment_ids_BxL, mask_BxL, sampler_BxL):
    if micro_batches == 1:
      logp_BxL = forward(params, tokens_BxL, positions_BxL, segment_ids_BxL)
    else:
      split = lambda x: x.reshape((micro_batches, -1) + x.shape[1:])  # noqa: E731
      logp_MxBxL = jax.lax.map(lambda a: forward(params, *a),
                               (split(tokens_BxL), split(positions_BxL), split(segment_ids_BxL)))
      logp_BxL = logp_MxBxL.reshape(tokens_BxL.shape)
    return logp_BxL, logprob_gap_metrics(sampler_BxL, logp_BxL, mask_BxL)

  if mesh is None:
    return jax.jit(fn)
  b2 = mesh_lib.batch_sharding(mesh, 2)
  return jax.jit(fn, in_shardings=(shardings_of(params_like), b2, b2, b2, b2, b2),
                 out_shardings=(b2, mesh_lib.replicated(mesh)))
