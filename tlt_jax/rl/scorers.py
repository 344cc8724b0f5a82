"""Device scorers: per-token rewards computed on the update batch, registered by name.

`rl.token_rewards` maps scorer names to weights (0 = off); the token reward of the step is
sum_k w_k r^k_t over response tokens, read by a token advantage estimator (rl/advantages.py,
e.g. rloo_returns). A scorer is built once per run from the `ScorerContext` and has

  score(batch: UpdateBatch, scores: Scores) -> (rewards in the update's layout, metrics dict)
  state   the arrays it checkpoints (None when it has none; PRIME's PRM has params + optimizer)

Host scorers (verifier, format, length penalty: one reward per response) are rl/rewards.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from tlt_jax.errors import ConfigError
from tlt_jax.utils.registry import Registry

_SCORERS = Registry("token reward")
register_scorer = _SCORERS.register  # decorator: registers a scorer class under a name
registered_scorers = _SCORERS.names


@dataclasses.dataclass(frozen=True)
class ScorerContext:
  """What a device scorer may use: the policy's graph and current params (a template), the
  frozen reference params (None without rl.kl_coef / rl.track_kl), the mesh, the sampler's
  temperature, the trainer's jitted log-prob forward, and the update's micro-batches."""

  graphdef: Any
  policy_params: Any
  ref_params: Any
  mesh: Any
  temperature: float
  logprob_fn: Callable
  micro_batches: int = 1


@register_scorer("kl")
class KLPenaltyScorer:
  """r_t = -(log pi_old(y_t) - log pi_ref(y_t)): a KL penalty in the reward, per token (the
  estimator k1 of KL(pi_old || pi_ref); Ouyang et al., 2022, "InstructGPT" Eq. 2; its weight
  in rl.token_rewards is the coefficient). Needs the reference's log-probs (rl.track_kl)."""

  state = None

  def __init__(self, config, ctx: ScorerContext):
    if ctx.ref_params is None:
      raise ConfigError("config.rl.token_rewards.kl needs the reference policy's log-probs; allowed: "
                        "rl.track_kl=True or rl.kl_coef > 0")
    self._fn = jax.jit(lambda old, ref, m: jnp.where(m > 0, ref - old, 0.0))

  def score(self, batch, scores):
    d = batch.device
    r = self._fn(d["old_logprobs"], d["ref_logprobs"], d["response_mask"])
    return r, {}


def build_scorers(config, ctx: ScorerContext) -> dict[str, tuple[float, Any]]:
  """{name: (weight, scorer)} of the non-zero weights in `rl.token_rewards` (rl/prime.py
  registers "prime" when the package is imported: rl/__init__.py)."""
  weights = dict(config.rl.token_rewards)
  return {name: (float(w), _SCORERS.get(name)(config, ctx)) for name, w in weights.items() if float(w)}
