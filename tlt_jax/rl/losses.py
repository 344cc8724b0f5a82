"""Policy-gradient losses and per-token log-probability helpers, pure jnp, float32.

Shapes: B sequences (prompt x G responses flattened), T response positions, V vocabulary.
`mask_BxT` is 1 on response tokens that count and 0 on prompt/padding positions; values of the
other inputs at masked positions are ignored (even inf or nan), in the loss and its gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

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


def ppo_clip_loss(logp_new_BxT: Array, logp_old_BxT: Array, adv: Array, mask_BxT: Array,
                  clip_eps: float = 0.2, clip_eps_high: float | None = None,
                  aggregation: str = "token", logp_ref_BxT: Array | None = None,
                  kl_coef: float = 0.0, weights_BxT: Array | None = None) -> tuple[Array, dict[str, Array]]:
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
  logp_old, adv and logp_ref are constants (stop_gradient).

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
