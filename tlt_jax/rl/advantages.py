"""Group-relative advantage estimators, registered by name (`rl.advantage`, `rl.advantage_kwargs`).

A sequence estimator is a pure jnp function of the rewards `[num_prompts, G]` (G responses per
prompt) returning one float32 advantage per response (grpo, rloo, dr_grpo). A token estimator
(`register_token_advantage`) reads `AdvantageInputs`, sequence AND per-token rewards, and returns
one advantage per response token (rloo_returns, grpo_returns, reinforce_returns: PRIME's). `token_advantages(name)` gives either
kind as `AdvantageInputs -> [P, G, L]`. Hyper-parameters are keyword-only and bound by
`get_advantage(name, **kwargs)`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from tlt_jax.utils.registry import Registry

Array = jax.Array
AdvantageFn = Callable[[Array], Array]

_ADVANTAGES = Registry("advantage")
register_advantage = _ADVANTAGES.register  # decorator: registers an estimator under a name
registered_advantages = _ADVANTAGES.names


def get_advantage(name: str, **kwargs) -> AdvantageFn:
  """The estimator registered as `name`, with its keyword-only hyper-parameters bound."""
  return _ADVANTAGES.bind(name, **kwargs)


def batch_whiten(adv_NxG: Array, eps: float = 1e-8) -> Array:
  """(A - mean) / sqrt(var + eps) over every response of the batch (population variance).

  The batch-level normalisation of OpenRLHF-style RLOO, e.g. the efficient-reasoning runs
  (Arora & Zanette, 2025); there the statistics weigh each response by its tokens, here each
  response counts once.
  """
  a = adv_NxG.astype(jnp.float32)
  return (a - a.mean()) * jax.lax.rsqrt(a.var() + eps)


def _check_group(rewards_NxG: Array, min_group: int, what: str) -> None:
  if rewards_NxG.ndim != 2 or rewards_NxG.shape[1] < min_group:
    raise ValueError(f"{what} needs rewards shaped [num_prompts, G] with G >= {min_group}, "
                     f"got shape {rewards_NxG.shape}")


@register_advantage("grpo")
def grpo_advantages(rewards_NxG: Array, *, normalize_std: bool = True, eps: float = 1e-6,
                    ddof: int = 1, whiten: bool = False) -> Array:
  """A_i = (r_i - mean_j r_j) / (std_j r_j + eps), over the G responses to one prompt.

  Shao et al. (2024), "DeepSeekMath" (GRPO). The std uses `ddof` (1: the unbiased std, as in
  TRL/verl/tunix; 0: the population std). `normalize_std=False` keeps only the mean baseline,
  as in Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training"). A group whose
  rewards are all equal gets zero advantages. `whiten`: then `batch_whiten` over the batch.
  """
  _check_group(rewards_NxG, 1 + ddof if normalize_std else 1, "grpo")
  r = rewards_NxG.astype(jnp.float32)
  adv = r - r.mean(axis=1, keepdims=True)
  if normalize_std:
    adv = adv / (r.std(axis=1, keepdims=True, ddof=ddof) + eps)
  return batch_whiten(adv) if whiten else adv


@register_advantage("rloo")
def rloo_advantages(rewards_NxG: Array, *, whiten: bool = False) -> Array:
  """A_i = r_i - (1/(G-1)) sum_{j != i} r_j = G/(G-1) * (r_i - mean_j r_j).

  REINFORCE leave-one-out: Kool et al. (2019), "Buy 4 REINFORCE samples, get a baseline for
  free!"; Ahmadian et al. (2024), "Back to Basics: Revisiting REINFORCE Style Optimization".
  `whiten`: then `batch_whiten` over the batch (the efficient-reasoning runs' RLOO).
  """
  _check_group(rewards_NxG, 2, "rloo")
  r = rewards_NxG.astype(jnp.float32)
  g = r.shape[1]
  adv = r - (r.sum(axis=1, keepdims=True) - r) / (g - 1)
  return batch_whiten(adv) if whiten else adv


@register_advantage("dr_grpo")
def dr_grpo_advantages(rewards_NxG: Array, *, whiten: bool = False) -> Array:
  """A_i = r_i - mean_j r_j: GRPO without the std normalisation.

  Liu et al. (2025), "Understanding R1-Zero-Like Training: A Critical Perspective" (Dr. GRPO):
  dividing by the group's std over-weights groups that are nearly all right or all wrong. Pair
  it with rl.aggregation="token" (no per-response length normalisation).
  """
  return grpo_advantages(rewards_NxG, normalize_std=False, whiten=whiten)


# ---------------------------------------------------------------------------------------------
# Per-token advantages. Every estimator yields one advantage per response token, [P, G, L]
# (rows grouped by prompt, 0 off the response): a sequence estimator's A_i is the special case
# of a constant over response i's tokens; a token estimator also sees per-token rewards (the
# device scorers': PRIME's implicit process rewards, a KL penalty).
# ---------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AdvantageInputs:
  """What an advantage estimator sees, rows grouped by prompt.

  rewards_PxG:          float32 sequence rewards (host scorers: verifier, format, length penalty)
  token_rewards_PxGxL:  float32 per-token rewards (device scorers), 0 off the response
  mask_PxGxL:           float32 1 on response tokens, 0 on prompt and padding
  """

  rewards_PxG: Array
  token_rewards_PxGxL: Array
  mask_PxGxL: Array


def is_token_estimator(name: str) -> bool:
  """True when the estimator registered as `name` reads per-token rewards (AdvantageInputs)."""
  return bool(getattr(_ADVANTAGES.get(name), "per_token", False))


def register_token_advantage(name: str):
  """Registers a per-token estimator `fn(inputs: AdvantageInputs, **kw) -> [P, G, L]`."""

  def wrap(fn):
    fn.per_token = True
    return _ADVANTAGES.register(name)(fn)

  return wrap


def token_advantages(name: str, **kwargs) -> Callable[[AdvantageInputs], Array]:
  """`fn(inputs) -> advantages [P, G, L]` of the estimator `name`, sequence ones broadcast over
  their response's tokens (A_{i,t} = A_i where mask = 1, else 0)."""
  fn = get_advantage(name, **kwargs)
  if is_token_estimator(name):
    return fn
  return lambda inputs: jnp.where(inputs.mask_PxGxL > 0, fn(inputs.rewards_PxG)[..., None], 0.0)


def returns_to_go(rewards_PxGxL: Array, mask_PxGxL: Array) -> Array:
  """R_t = sum_{s >= t} m_s r_s (gamma = 1), 0 where mask is 0."""
  r = jnp.where(mask_PxGxL > 0, rewards_PxGxL, 0.0)
  return jnp.where(mask_PxGxL > 0, jnp.flip(jnp.cumsum(jnp.flip(r, -1), -1), -1), 0.0)


def masked_whiten(x: Array, mask: Array, eps: float = 1e-8) -> Array:
  """(x - mean) / sqrt(var + eps) with mean and (population) var over the tokens where mask is 1;
  0 elsewhere."""
  m = (mask > 0).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(m), 1.0)
  mean = jnp.sum(m * x) / n
  var = jnp.sum(m * jnp.square(x - mean)) / n
  return jnp.where(m > 0, (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


BASELINES = ("rloo", "grpo", "none")


def _group_baselined(x_PxGxL: Array, m_PxGxL: Array, baseline: str, eps: float = 1e-6) -> Array:
  """One reward source x (its tokens where m = 1) against the other responses to its prompt.

  xbar_i = mean_t x_{i,t} over response i's masked tokens (one token: the reward itself), and
    "rloo": G/(G-1) x_{i,t} - sum_j xbar_j / (G-1)  (= x_i - mean_{j != i} x_j for one token);
            PRIME's leave-one-out estimator as its code applies it to each source
    "grpo": (x_{i,t} - mean_j xbar_j) / (std_j xbar_j + eps), std with ddof = 1
    "none": x_{i,t} (REINFORCE: no baseline; the batch whitening centres it)
  0 where m = 0.
  """
  x = jnp.where(m_PxGxL > 0, x_PxGxL.astype(jnp.float32), 0.0)
  g = x.shape[1]
  xbar_PxG = jnp.sum(x, -1) / jnp.maximum(jnp.sum(m_PxGxL, -1), 1.0)
  if baseline == "rloo":
    out = g / (g - 1) * x - (jnp.sum(xbar_PxG, 1) / (g - 1))[:, None, None]
  elif baseline == "grpo":
    mean_P = jnp.mean(xbar_PxG, 1)[:, None, None]
    std_P = jnp.std(xbar_PxG, 1, ddof=1)[:, None, None]
    out = (x - mean_P) / (std_P + eps)
  else:
    out = x
  return jnp.where(m_PxGxL > 0, out, 0.0)


def process_outcome_returns(inputs: AdvantageInputs, *, baseline: str = "rloo", outcome_coef: float = 1.0,
                            process_coef: float = 1.0, whiten: bool = True) -> Array:
  """Each reward source against its group (`baseline`), returns with gamma = 1, summed, whitened.

    outcome:  o_{i,t} = b(r)_i at the response's last token, 0 before
    process:  p_{i,t} = b(q)_{i,t} on every response token (q: the device scorers' token rewards)
    A_{i,t} = whiten( sum_{s >= t} (outcome_coef o_{i,s} + process_coef p_{i,s}) )

  with b the group baseline of `_group_baselined` ("rloo", "grpo" or "none"), whitened over all
  response tokens of the batch (mean 0, variance 1) when `whiten`. The advantage estimator of
  PRIME (Cui et al., 2025, "Process Reinforcement through Implicit Rewards", Sec. 3.3 and its
  REINFORCE / GRPO variants, Sec. 5); with q = 0 it is the baseline's outcome-only estimator.
  """
  if baseline not in BASELINES:
    raise ValueError(f"baseline={baseline!r}; allowed: {BASELINES}")
  m = (inputs.mask_PxGxL > 0).astype(jnp.float32)
  g = m.shape[1]
  if g < 2 and baseline != "none":
    raise ValueError(f"the {baseline} baseline needs G >= 2 responses per prompt, got {g}")
  last_PxGxL = ((m > 0) & (jnp.cumsum(m[..., ::-1], -1)[..., ::-1] == 1.0)).astype(jnp.float32)
  outcome_at_last = last_PxGxL * inputs.rewards_PxG.astype(jnp.float32)[..., None]
  per_token = (outcome_coef * _group_baselined(outcome_at_last, last_PxGxL, baseline)
               + process_coef * _group_baselined(inputs.token_rewards_PxGxL, m, baseline))
  returns = returns_to_go(per_token, m)
  return masked_whiten(returns, m) if whiten else returns


@register_token_advantage("rloo_returns")
def rloo_returns_advantages(inputs: AdvantageInputs, *, outcome_coef: float = 1.0,
                            process_coef: float = 1.0, whiten: bool = True) -> Array:
  """PRIME's estimator: `process_outcome_returns` with the leave-one-out baseline per source."""
  return process_outcome_returns(inputs, baseline="rloo", outcome_coef=outcome_coef,
                                 process_coef=process_coef, whiten=whiten)


@register_token_advantage("grpo_returns")
def grpo_returns_advantages(inputs: AdvantageInputs, *, outcome_coef: float = 1.0,
                            process_coef: float = 1.0, whiten: bool = True) -> Array:
  """`process_outcome_returns` with GRPO's group mean / std per source (PRIME + GRPO)."""
  return process_outcome_returns(inputs, baseline="grpo", outcome_coef=outcome_coef,
                                 process_coef=process_coef, whiten=whiten)


@register_token_advantage("reinforce_returns")
def reinforce_returns_advantages(inputs: AdvantageInputs, *, outcome_coef: float = 1.0,
                                 process_coef: float = 1.0, whiten: bool = True) -> Array:
  """`process_outcome_returns` without a group baseline: REINFORCE returns, whitened over the
  batch (PRIME + REINFORCE)."""
  return process_outcome_returns(inputs, baseline="none", outcome_coef=outcome_coef,
                                 process_coef=process_coef, whiten=whiten)
