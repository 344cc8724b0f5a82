"""Group-relative advantage estimators, registered by name.

Each is a pure jnp function of the rewards `[num_prompts, G]` (G responses per prompt) that
returns float32 advantages of the same shape, one per response (broadcast over its tokens by the
loss). Hyper-parameters are keyword-only and bound by `get_advantage(name, **kwargs)`.
"""

from __future__ import annotations

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


def _check_group(rewards_NxG: Array, min_group: int, what: str) -> None:
  if rewards_NxG.ndim != 2 or rewards_NxG.shape[1] < min_group:
    raise ValueError(f"{what} needs rewards shaped [num_prompts, G] with G >= {min_group}, "
                     f"got shape {rewards_NxG.shape}")


@register_advantage("grpo")
def grpo_advantages(rewards_NxG: Array, *, normalize_std: bool = True, eps: float = 1e-6,
                    ddof: int = 1) -> Array:
  """A_i = (r_i - mean_j r_j) / (std_j r_j + eps), over the G responses to one prompt.

  Shao et al. (2024), "DeepSeekMath" (GRPO). The std uses `ddof` (1: the unbiased std, as in
  TRL/verl/tunix; 0: the population std). `normalize_std=False` keeps only the mean baseline,
  as in Dr. GRPO (Liu et al., 2025, "Understanding R1-Zero-Like Training"). A group whose
  rewards are all equal gets zero advantages.
  """
  _check_group(rewards_NxG, 1 + ddof if normalize_std else 1, "grpo")
  r = rewards_NxG.astype(jnp.float32)
  centered = r - r.mean(axis=1, keepdims=True)
  if not normalize_std:
    return centered
  return centered / (r.std(axis=1, keepdims=True, ddof=ddof) + eps)


@register_advantage("rloo")
def rloo_advantages(rewards_NxG: Array) -> Array:
  """A_i = r_i - (1/(G-1)) sum_{j != i} r_j = G/(G-1) * (r_i - mean_j r_j).

  REINFORCE leave-one-out: Kool et al. (2019), "Buy 4 REINFORCE samples, get a baseline for
  free!"; Ahmadian et al. (2024), "Back to Basics: Revisiting REINFORCE Style Optimization".
  """
  _check_group(rewards_NxG, 2, "rloo")
  r = rewards_NxG.astype(jnp.float32)
  g = r.shape[1]
  return r - (r.sum(axis=1, keepdims=True) - r) / (g - 1)
