"""Sampling parameters and the target distribution p shared by plain and speculative decoding.

`target_logprobs` is the single definition of the distribution rollouts are drawn from
(temperature, then top-k, then top-p); plain sampling draws from it and speculative
verification accepts against it, which is what makes speculative decoding lossless.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -1e30


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 means greedy (argmax); top_k 0 and top_p 1 disable those filters."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"sampling temperature={self.temperature} must be >= 0 (0 = greedy)")
    if not isinstance(self.top_k, int) or self.top_k < 0:
      raise ValueError(f"sampling top_k={self.top_k!r} must be an int >= 0 (0 = off)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"sampling top_p={self.top_p} must be in (0, 1] (1 = off)")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def target_logprobs(logits_BxV: jax.Array, sp: SamplingParams) -> jax.Array:
  """log p(v): log_softmax(logits / T) restricted to the top-k, then to the top-p nucleus.

  Tokens outside the support get NEG_INF. For greedy decoding this is log_softmax(logits).
  """
  x = logits_BxV.astype(jnp.float32)
  if sp.greedy:
    return jax.nn.log_softmax(x, axis=-1)
  x = x / sp.temperature
  if sp.top_k:
    kth_B = jax.lax.top_k(x, sp.top_k)[0][..., -1:]
    x = jnp.where(x < kth_B, NEG_INF, x)
  if sp.top_p < 1.0:
    sorted_desc = jnp.sort(x, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < sp.top_p  # the first token is always kept
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    x = jnp.where(x < cutoff, NEG_INF, x)
  return jax.nn.log_softmax(x, axis=-1)


def policy_logprobs(logits_BxV: jax.Array, sp: SamplingParams) -> jax.Array:
  """The logprob reported for sampled tokens: log_softmax(logits / T) without top-k/top-p
  truncation (T = 1 when greedy), float32. The RL trainer recomputes exactly this."""
  t = 1.0 if sp.greedy else sp.temperature
  return jax.nn.log_softmax(logits_BxV.astype(jnp.float32) / t, axis=-1)


def sample_from(logp_BxV: jax.Array, rng: jax.Array, sp: SamplingParams) -> jax.Array:
  """Draws one token per row from log p (argmax when greedy)."""
  if sp.greedy:
    return jnp.argmax(logp_BxV, axis=-1).astype(jnp.int32)
  return jax.random.categorical(rng, logp_BxV, axis=-1).astype(jnp.int32)
