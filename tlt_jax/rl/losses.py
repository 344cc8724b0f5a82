"""Policy-gradient losses and per-token log-probability helpers, pure jnp, float32.

Policy losses are registered by name (`rl.loss`, `rl.loss_kwargs`): ppo_clip, gspo, cispo. Each
is `fn(logp_new_BxT, logp_old_BxT, adv, mask_BxT, *, weights_BxT, segment_ids_BxT, logp_ref_BxT,
kl_coef, clip_eps, clip_eps_high, aggregation, ...) -> (loss, metrics)` with the metric keys of
`ppo_clip_loss`.

Shapes: B sequences (prompt x G responses flattened), T response positions, V vocabulary.
`mask_BxT` is 1 on response tokens that count and 0 on prompt/padding positions; values of the
other inputs at masked positions are ignored (even inf or nan), in the loss and its gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tlt_jax.utils.registry import Registry

Array = jax.Array

_LOSSES = Registry("loss")
register_loss = _LOSSES.register  # decorator: registers a policy loss under a name
registered_losses = _LOSSES.names


def get_loss(name: str, **kwargs):
  """The policy loss registered as `name`, with keyword hyper-parameters bound."""
  return _LOSSES.bind(name, **kwargs)

AGGREGATIONS = ("token", "sequence")


def token_logprobs(logits_BxTxV: Array, targets_BxT: Array, temperature: float = 1.0) -> Array:
  """log p(target_t) = z_t[target_t] - logsumexp(z_t), with z = logits / temperature, in float32.

  Use the sampler's temperature so that the PPO ratio compares the distributions that were
  actually sampled from.
  """
  z_BxTxV = logits_BxTxV.astype(jnp.float32) / temperature
  picked_BxT = jnp.take_along_axis(z_BxTxV, targets_BxT[..., None].astype(jnp.int32),
                                   axis=-1)[..., 0]
  return picked_BxT - jax.nn.logsumexp(z_BxTxV, axis=-1)


def entropy_from_logits(logits_BxTxV: Array) -> Array:
  """H(p_t) = logsumexp(z_t) - sum_v p_t(v) z_t(v), with p = softmax(z), in float32 [B, T]."""
  z_BxTxV = logits_BxTxV.astype(jnp.float32)
  p_BxTxV = jax.nn.softmax(z_BxTxV, axis=-1)
  return jax.nn.logsumexp(z_BxTxV, axis=-1) - jnp.sum(p_BxTxV * z_BxTxV, axis=-1)


def kl_k3(logp_new: Array, logp_ref: Array) -> Array:
  """k3(t) = exp(d) - d - 1 with d = logp_ref - logp_new, per token (no reduction).

  Schulman (2020), "Approximating KL Divergence": an unbiased, always non-negative estimator of
  KL(pi_new || pi_ref) from samples of pi_new; the KL penalty of GRPO (Shao et al., 2024).
  """
  d = logp_ref.astype(jnp.float32) - logp_new.astype(jnp.float32)
  return jnp.exp(d) - d - 1.0


def masked_aggregate(x_BxT: Array, mask_BxT: Array, aggregation: str = "token") -> Array:
  """Reduces per-token values to a scalar over the tokens where mask is 1.

  "token":    sum_{b,t} m x / sum_{b,t} m   -- every token weighs the same (DAPO, Yu et al. 2025).
  "sequence": mean over sequences with >= 1 token of sum_t m x / sum_t m   -- every sequence
              weighs the same (GRPO, Shao et al. 2024).
  An all-masked input gives 0.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; allowed: {AGGREGATIONS}")
  m = mask_BxT.astype(jnp.float32)
  x = jnp.where(m > 0, x_BxT.astype(jnp.float32), 0.0)
  if aggregation == "token":
    return jnp.sum(m * x) / jnp.maximum(jnp.sum(m), 1.0)
  tokens_B = jnp.sum(m, axis=-1)
  per_seq_B = jnp.sum(m * x, axis=-1) / jnp.maximum(tokens_B, 1.0)
  has_tokens_B = (tokens_B > 0).astype(jnp.float32)
  return jnp.sum(per_seq_B * has_tokens_B) / jnp.maximum(jnp.sum(has_tokens_B), 1.0)


def aggregation_weights(mask_BxT: Array, segment_ids_BxT: Array | None = None,
                        aggregation: str = "token") -> Array:
  """Per-token weights w with loss = sum_{b,t} w l = masked_aggregate(l, mask, aggregation), for
  rows that may hold several sequences (packed: `segment_ids` 1, 2, ... per sequence, 0 on
  padding; None: one sequence per row).

  "token":    w = m / sum(m)
  "sequence": w = m / (tokens of its sequence * sequences with >= 1 token)
  The weights sum to 1 over the batch (0 everywhere when no token counts). Because they are
  normalised over the WHOLE batch, the loss of any split into micro-batches is the sum of the
  parts' sum_{b,t} w l: micro-batching needs no rescaling.
  """
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"aggregation={aggregation!r}; allowed: {AGGREGATIONS}")
  m = mask_BxT.astype(jnp.float32)
  if aggregation == "token":
    return m / jnp.maximum(jnp.sum(m), 1.0)
  per_token = _per_sequence_unit(m, segment_ids_BxT)
  return per_token / jnp.maximum(jnp.sum(per_token), 1.0)  # sum(per_token) = sequences


def _per_sequence_unit(m_BxT: Array, segment_ids_BxT: Array | None) -> Array:
  """m / (masked tokens of the token's sequence): each sequence's tokens sum to 1."""
  if segment_ids_BxT is None:
    seq_tokens_BxT = jnp.broadcast_to(jnp.sum(m_BxT, axis=-1, keepdims=True), m_BxT.shape)
  else:  # tokens of the sequence each token belongs to, within its row
    same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    seq_tokens_BxT = jnp.einsum("bts,bs->bt", same_BxTxT.astype(jnp.float32), m_BxT)
  return m_BxT / jnp.maximum(seq_tokens_BxT, 1.0)


def num_sequences(mask_BxT: Array, segment_ids_BxT: Array | None = None) -> Array:
  """Sequences (segments of rows) with >= 1 masked token, as a float32 scalar."""
  return jnp.round(jnp.sum(_per_sequence_unit(mask_BxT.astype(jnp.float32), segment_ids_BxT)))


@register_loss("ppo_clip")
def ppo_clip_loss(logp_new_BxT: Array, logp_old_BxT: Array, adv: Array, mask_BxT: Array,
                  clip_eps: float = 0.2, clip_eps_high: float | None = None,
                  aggregation: str = "token", logp_ref_BxT: Array | None = None,
                  kl_coef: float = 0.0, weights_BxT: Array | None = None,
                  segment_ids_BxT: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """PPO-clip policy loss, aggregated over response tokens.

    rho_t  = exp(logp_new_t - logp_old_t)
    l_t    = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A)  [+ kl_coef * k3_t]
    loss   = masked_aggregate(l, mask, aggregation)    or, with `weights_BxT`, sum_{b,t} w l

  `adv` is one advantage per row [B] or per token [B, T] (packed rows hold several sequences).
  `weights_BxT` (`aggregation_weights`, possibly of a larger batch this is a part of) replace
  the aggregation; they must be 0 where mask is 0.

  Schulman et al. (2017), "Proximal Policy Optimization Algorithms"; the sequence advantage A is
  shared by all tokens of a response as in GRPO (Shao et al., 2024). eps_high = clip_eps_high
  (default clip_eps) decouples the upper bound, DAPO's "clip-higher" (Yu et al., 2025).
  With `logp_ref_BxT` and kl_coef > 0 the k3 KL to a reference policy is added per token.
  logp_old, adv and logp_ref are constants (stop_gradient). `segment_ids_BxT` is unused (the
  registered losses' common signature).

  Metrics (masked token means): clip_frac (tokens whose clipped term is active, i.e. with zero
  gradient), clip_frac_low / clip_frac_high (split by side), approx_kl (k3 estimate of
  KL(pi_old || pi_new) = mean(rho - 1 - log rho)), ratio_mean, ratio_max, kl_ref when a reference
  is given, and pg_loss (the loss without the KL term).
  """
  eps_low = clip_eps
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  valid_BxT = mask_BxT > 0
  adv_Bx1 = jax.lax.stop_gradient(adv.astype(jnp.float32))
  adv_Bx1 = adv_Bx1[:, None] if adv_Bx1.ndim == 1 else jnp.where(valid_BxT, adv_Bx1, 0.0)

  def aggregate(x_BxT):
    if weights_BxT is None:
      return masked_aggregate(x_BxT, mask_BxT, aggregation)
    return jnp.sum(weights_BxT * jnp.where(valid_BxT, x_BxT, 0.0))

  log_ratio_BxT = jnp.where(
      valid_BxT,
      logp_new_BxT.astype(jnp.float32) - jax.lax.stop_gradient(logp_old_BxT.astype(jnp.float32)),
      0.0)
  ratio_BxT = jnp.exp(log_ratio_BxT)
  clipped_BxT = jnp.clip(ratio_BxT, 1.0 - eps_low, 1.0 + eps_high)
  unclipped_obj_BxT = ratio_BxT * adv_Bx1
  clipped_obj_BxT = clipped_BxT * adv_Bx1
  pg_loss_BxT = -jnp.minimum(unclipped_obj_BxT, clipped_obj_BxT)

  pg_loss = aggregate(pg_loss_BxT)
  loss = pg_loss

  def token_mean(x_BxT):
    return masked_aggregate(x_BxT, mask_BxT, "token")

  clip_active_BxT = clipped_obj_BxT < unclipped_obj_BxT
  metrics = {
      "pg_loss": pg_loss,
      "clip_frac": token_mean(clip_active_BxT),
      "clip_frac_low": token_mean(clip_active_BxT & (ratio_BxT < 1.0)),
      "clip_frac_high": token_mean(clip_active_BxT & (ratio_BxT > 1.0)),
      "approx_kl": token_mean(ratio_BxT - 1.0 - log_ratio_BxT),
      "ratio_mean": token_mean(ratio_BxT),
      "ratio_max": jnp.max(jnp.where(valid_BxT, ratio_BxT, 0.0)),
  }
  if logp_ref_BxT is not None:
    safe_new_BxT = jnp.where(valid_BxT, logp_new_BxT.astype(jnp.float32), 0.0)
    safe_ref_BxT = jnp.where(valid_BxT, jax.lax.stop_gradient(logp_ref_BxT), 0.0)
    kl_BxT = kl_k3(safe_new_BxT, safe_ref_BxT)
    kl_ref = aggregate(kl_BxT)
    metrics["kl_ref"] = kl_ref
    loss = loss + kl_coef * kl_ref
  return loss, metrics


# ---------------------------------------------------------------------------------------------
# GSPO and CISPO: the same inputs, metrics and KL term as ppo_clip.


def _segment_sums(x_BxT: Array, mask_BxT: Array, segment_ids_BxT: Array | None) -> tuple[Array, Array]:
  """Per token, (sum of m x, sum of m) over the tokens of its sequence (segment of its row; the
  whole row when segment_ids is None). Segment sums over flat (row, segment) ids: O(B L)."""
  b, t = x_BxT.shape
  m = mask_BxT.astype(jnp.float32)
  seg = jnp.ones((b, t), jnp.int32) if segment_ids_BxT is None else segment_ids_BxT.astype(jnp.int32)
  ids = (jnp.arange(b, dtype=jnp.int32)[:, None] * (t + 1) + jnp.clip(seg, 0, t)).reshape(-1)
  sums = jax.ops.segment_sum((m * jnp.where(m > 0, x_BxT, 0.0)).reshape(-1), ids, num_segments=b * (t + 1))
  counts = jax.ops.segment_sum(m.reshape(-1), ids, num_segments=b * (t + 1))
  return sums[ids].reshape(b, t), counts[ids].reshape(b, t)


def segment_sum(x_BxT: Array, mask_BxT: Array, segment_ids_BxT: Array | None) -> Array:
  """Per token, sum_{s in its sequence} m_s x_s."""
  return _segment_sums(x_BxT, mask_BxT, segment_ids_BxT)[0]


def segment_mean(x_BxT: Array, mask_BxT: Array, segment_ids_BxT: Array | None) -> Array:
  """Per token, the masked mean of x over the tokens of its sequence."""
  sums, counts = _segment_sums(x_BxT, mask_BxT, segment_ids_BxT)
  return sums / jnp.maximum(counts, 1.0)


def _loss_parts(logp_new_BxT, logp_old_BxT, adv, mask_BxT, aggregation, weights_BxT):
  """(valid, adv_BxT, log_ratio_BxT, aggregate, token_mean) shared by gspo and cispo."""
  valid_BxT = mask_BxT > 0
  adv_BxT = jax.lax.stop_gradient(adv.astype(jnp.float32))
  adv_BxT = adv_BxT[:, None] if adv_BxT.ndim == 1 else jnp.where(valid_BxT, adv_BxT, 0.0)
  log_ratio_BxT = jnp.where(
      valid_BxT,
      logp_new_BxT.astype(jnp.float32) - jax.lax.stop_gradient(logp_old_BxT.astype(jnp.float32)), 0.0)

  def aggregate(x_BxT):
    if weights_BxT is None:
      return masked_aggregate(x_BxT, mask_BxT, aggregation)
    return jnp.sum(weights_BxT * jnp.where(valid_BxT, x_BxT, 0.0))

  token_mean = lambda x_BxT: masked_aggregate(x_BxT, mask_BxT, "token")  # noqa: E731
  return valid_BxT, adv_BxT, log_ratio_BxT, aggregate, token_mean


def _finish(pg_loss_BxT, ratio_BxT, low_BxT, high_BxT, log_ratio_BxT, valid_BxT, aggregate,
            token_mean, logp_new_BxT, logp_ref_BxT, kl_coef):
  """(loss, metrics) with the metric keys of ppo_clip_loss; low/high: tokens clipped per side."""
  pg_loss = aggregate(pg_loss_BxT)
  metrics = {
      "pg_loss": pg_loss,
      "clip_frac": token_mean(low_BxT | high_BxT),
      "clip_frac_low": token_mean(low_BxT), "clip_frac_high": token_mean(high_BxT),
      "approx_kl": token_mean(jnp.exp(log_ratio_BxT) - 1.0 - log_ratio_BxT),
      "ratio_mean": token_mean(ratio_BxT),
      "ratio_max": jnp.max(jnp.where(valid_BxT, ratio_BxT, 0.0)),
  }
  loss = pg_loss
  if logp_ref_BxT is not None:
    safe_new_BxT = jnp.where(valid_BxT, logp_new_BxT.astype(jnp.float32), 0.0)
    safe_ref_BxT = jnp.where(valid_BxT, jax.lax.stop_gradient(logp_ref_BxT), 0.0)
    metrics["kl_ref"] = aggregate(kl_k3(safe_new_BxT, safe_ref_BxT))
    loss = loss + kl_coef * metrics["kl_ref"]
  return loss, metrics


@register_loss("gspo")
def gspo_loss(logp_new_BxT: Array, logp_old_BxT: Array, adv: Array, mask_BxT: Array,
              clip_eps: float = 3e-4, clip_eps_high: float | None = 4e-4,
              aggregation: str = "sequence", logp_ref_BxT: Array | None = None,
              kl_coef: float = 0.0, weights_BxT: Array | None = None,
              segment_ids_BxT: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """GSPO: PPO-clip on the SEQUENCE importance ratio (the token form, for per-token advantages).

    s_i     = exp( mean_{t in i} (log pi_new(y_t) - log pi_old(y_t)) )      (length-normalised)
    s_{i,t} = sg(s_i) * pi_new(y_t) / sg(pi_new(y_t))                       (value s_i)
    l_t     = -min(s_{i,t} A_{i,t}, clip(s_{i,t}, 1 - eps_low, 1 + eps_high) A_{i,t})

  Zheng et al. (2025), "Group Sequence Policy Optimization" (GSPO-token, their Eq. 13: with a
  constant A_i its gradient is GSPO's). The whole response is clipped or not: clip ranges are
  small (the paper: 3e-4 / 4e-4; pass them in rl.loss_kwargs). Aggregation "sequence" gives the
  paper's mean over responses.
  """
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  valid, adv_BxT, log_ratio, aggregate, token_mean = _loss_parts(
      logp_new_BxT, logp_old_BxT, adv, mask_BxT, aggregation, weights_BxT)
  seq_log_ratio = jax.lax.stop_gradient(segment_mean(log_ratio, mask_BxT, segment_ids_BxT))
  new = jnp.where(valid, logp_new_BxT.astype(jnp.float32), 0.0)
  ratio = jnp.exp(seq_log_ratio + new - jax.lax.stop_gradient(new))
  clipped = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
  unclipped_obj, clipped_obj = ratio * adv_BxT, clipped * adv_BxT
  pg_loss_BxT = -jnp.minimum(unclipped_obj, clipped_obj)
  active = valid & (clipped_obj < unclipped_obj)
  return _finish(pg_loss_BxT, ratio, active & (ratio < 1.0), active & (ratio > 1.0),
                 jnp.where(valid, seq_log_ratio, 0.0), valid, aggregate, token_mean, logp_new_BxT,
                 logp_ref_BxT, kl_coef)


@register_loss("cispo")
def cispo_loss(logp_new_BxT: Array, logp_old_BxT: Array, adv: Array, mask_BxT: Array,
               clip_eps: float = 0.2, clip_eps_high: float | None = None,
               aggregation: str = "token", logp_ref_BxT: Array | None = None,
               kl_coef: float = 0.0, weights_BxT: Array | None = None,
               segment_ids_BxT: Array | None = None) -> tuple[Array, dict[str, Array]]:
  """CISPO: REINFORCE with a clipped, stopped importance weight; no token loses its gradient.

    rho_t = exp(log pi_new(y_t) - log pi_old(y_t))
    l_t   = -sg(clip(rho_t, 1 - eps_low, 1 + eps_high)) * A_t * log pi_new(y_t)

  MiniMax (2025), "MiniMax-M1" (CISPO, Eq. 4-5): PPO drops the gradient of clipped tokens; CISPO
  clips the weight instead, so rare reflective tokens keep contributing. Token aggregation as in
  the paper. clip_frac counts tokens whose weight was clipped.
  """
  eps_high = clip_eps if clip_eps_high is None else clip_eps_high
  valid, adv_BxT, log_ratio, aggregate, token_mean = _loss_parts(
      logp_new_BxT, logp_old_BxT, adv, mask_BxT, aggregation, weights_BxT)
  ratio = jnp.exp(log_ratio)
  weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high))
  new = jnp.where(valid, logp_new_BxT.astype(jnp.float32), 0.0)
  pg_loss_BxT = -weight * adv_BxT * new
  return _finish(pg_loss_BxT, ratio, valid & (ratio < 1.0 - clip_eps), valid & (ratio > 1.0 + eps_high),
                 log_ratio, valid, aggregate, token_mean, logp_new_BxT, logp_ref_BxT, kl_coef)
