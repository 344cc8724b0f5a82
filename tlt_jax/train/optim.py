"""Learning-rate schedules (registered by name), the WSD convex bound, and the optimizer.

Schedules are optax schedules `step -> lr` over steps 0 .. total_steps-1. Every one warms up
linearly from `init_lr` (default 0) to `peak_lr` over `warmup_steps`, and a decaying one reaches
`final_lr` at step `total_steps` (optax's convention), so every step actually taken has lr > 0
when final_lr = 0.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tlt_jax.utils.registry import Registry

ScheduleBuilder = Callable[..., optax.Schedule]

_SCHEDULES = Registry("schedule")
# decorator: registers `builder(peak_lr, total_steps, warmup_steps, *, init_lr, ...)` under a name
register_schedule = _SCHEDULES.register
registered_schedules = _SCHEDULES.names


def schedule_options(name: str) -> list[str]:
  """The keyword-only options of schedule `name` (e.g. ["decay_frac", "final_lr", "init_lr"])."""
  params = inspect.signature(_SCHEDULES.get(name)).parameters.values()
  return sorted(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def make_schedule(name: str, peak_lr: float, total_steps: int, warmup_steps: int = 0,
                  **kwargs) -> optax.Schedule:
  """The schedule registered as `name`; kwargs are its options (see `schedule_options`)."""
  builder = _SCHEDULES.get(name)
  if not peak_lr > 0:
    raise ValueError(f"peak_lr={peak_lr!r}; must be > 0")
  if int(total_steps) < 1:
    raise ValueError(f"total_steps={total_steps!r}; must be >= 1")
  if not 0 <= int(warmup_steps) <= int(total_steps):
    raise ValueError(f"warmup_steps={warmup_steps!r}; must be in [0, total_steps={total_steps}]")
  unknown = set(kwargs) - set(schedule_options(name))
  if unknown:
    raise ValueError(f"schedule {name!r} got unknown option(s) {sorted(unknown)}; "
                     f"allowed: {schedule_options(name)}")
  return builder(float(peak_lr), int(total_steps), int(warmup_steps), **kwargs)


def _join(pieces: list[tuple[int, optax.Schedule]]) -> optax.Schedule:
  """Concatenates (num_steps, schedule) pieces; each piece sees its own step count from 0."""
  pieces = [(n, s) for n, s in pieces if n > 0]
  if len(pieces) == 1:
    return pieces[0][1]
  boundaries = np.cumsum([n for n, _ in pieces[:-1]]).tolist()
  return optax.join_schedules([s for _, s in pieces], boundaries)


def _warmup(init_lr: float, peak_lr: float, warmup_steps: int) -> tuple[int, optax.Schedule]:
  return warmup_steps, optax.linear_schedule(init_lr, peak_lr, max(warmup_steps, 1))


@register_schedule("constant")
def constant_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *,
                      init_lr: float = 0.0) -> optax.Schedule:
  """lr_t = init + (peak - init) t / W for t < W, then peak."""
  return _join([_warmup(init_lr, peak_lr, warmup_steps),
                (total_steps - warmup_steps + 1, optax.constant_schedule(peak_lr))])


@register_schedule("cosine")
def cosine_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *,
                    init_lr: float = 0.0, final_lr: float = 0.0) -> optax.Schedule:
  """Linear warmup, then lr_t = final + (peak - final) (1 + cos(pi (t - W) / (T - W))) / 2.

  Loshchilov & Hutter (2017), "SGDR: Stochastic Gradient Descent with Warm Restarts".
  """
  decay_steps = total_steps - warmup_steps
  if decay_steps < 1:
    raise ValueError(f"cosine: warmup_steps={warmup_steps} leaves no step to decay over "
                     f"(total_steps={total_steps})")
  cosine = optax.cosine_decay_schedule(peak_lr, decay_steps, alpha=final_lr / peak_lr)
  return _join([_warmup(init_lr, peak_lr, warmup_steps), (decay_steps + 1, cosine)])


@register_schedule("wsd")
def wsd_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *,
                 decay_frac: float = 0.2, init_lr: float = 0.0,
                 final_lr: float = 0.0) -> optax.Schedule:
  """Warmup-stable-decay: linear warmup over W steps, constant peak, then a linear cooldown.

    C = round(decay_frac * T) cooldown steps starting at step T - C:
    lr_t = peak - (peak - final) (t - (T - C)) / C   for T - C <= t <= T.

  Hägele et al. (2024), "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
  Durations"; its convex-theory bound (see `wsd_convex_bound`) from Schaipp et al. (2025),
  "The Surprising Agreement Between Convex Optimization Theory and Learning-Rate Scheduling
  for Large Model Training".
  """
  if not 0.0 <= decay_frac <= 1.0:
    raise ValueError(f"wsd: decay_frac={decay_frac!r}; must be in [0, 1]")
  cooldown_steps = int(round(decay_frac * total_steps))
  stable_steps = total_steps - warmup_steps - cooldown_steps
  if stable_steps < 0:
    raise ValueError(f"wsd: warmup_steps={warmup_steps} + cooldown round(decay_frac={decay_frac} "
                     f"* total_steps={total_steps})={cooldown_steps} exceed total_steps")
  if cooldown_steps == 0:
    return constant_schedule(peak_lr, total_steps, warmup_steps, init_lr=init_lr)
  return _join([_warmup(init_lr, peak_lr, warmup_steps),
                (stable_steps, optax.constant_schedule(peak_lr)),
                (cooldown_steps + 1, optax.linear_schedule(peak_lr, final_lr, cooldown_steps))])


def schedule_values(schedule: optax.Schedule, total_steps: int) -> np.ndarray:
  """[schedule(0), ..., schedule(total_steps - 1)] as float64 numpy (for plots and bounds)."""
  return np.asarray(jax.vmap(schedule)(jnp.arange(total_steps)), np.float64)


def wsd_convex_bound(schedule_values: np.ndarray, D: float = 1.0, G: float | np.ndarray = 1.0,
                     return_terms: bool = False):
  """Last-iterate bound of SGD with step sizes eta_1..eta_T on a convex G-Lipschitz problem.

    E[f(x_T)] - f*  <=  D^2 / (2 S_1)  +  G^2 sum_{t=1}^T eta_t^2 / (2 S_1)
                      + (G^2 / 2) sum_{k=1}^{T-1} eta_k / S_{k+1} * (Q_k / S_k),

    with S_k = sum_{t=k}^T eta_t,  Q_k = sum_{t=k}^T eta_t^2,  D = ||x_1 - x*||,
    and E||g_t||^2 <= G^2 (G may be an array [T] of per-step bounds G_t, in which case
    G^2 eta_t^2 reads G_t^2 eta_t^2 inside both sums).

  Defazio, Cutkosky, Mehta & Mishchenko (2023), "When, Why and How Much? Adaptive Learning Rate
  Scheduling by Refinement" (later "Optimal Linear Decay Learning Rate Schedules and Further
  Refinements"), Theorem 10; used by Schaipp et al. (2025) as their Theorem 1 to show that the
  bound of the WSD schedule follows its LLM loss curves (a sudden drop during the cooldown).
  The first two terms are the classical averaged-iterate bound; the third is the price of
  returning the last iterate. Works on any non-negative schedule with eta_T > 0 (a decaying
  optax schedule here never reaches 0 within its total_steps). Computed in O(T) with suffix
  sums. Returns the bound, or its three terms with `return_terms=True`.
  """
  eta = np.asarray(schedule_values, np.float64)
  if eta.ndim != 1 or eta.size < 1:
    raise ValueError(f"schedule_values must be a 1-d array of T >= 1 step sizes, got {eta.shape}")
  if np.any(eta < 0) or not eta[-1] > 0:
    raise ValueError("schedule_values must be >= 0 with a positive last value eta_T "
                     f"(got min {eta.min()}, last {eta[-1]})")
  g2 = np.broadcast_to(np.asarray(G, np.float64) ** 2, eta.shape)
  eta2g2 = eta**2 * g2
  suffix_eta = np.cumsum(eta[::-1])[::-1]          # S_k, k = 1..T
  suffix_eta2g2 = np.cumsum(eta2g2[::-1])[::-1]    # G^2 Q_k
  total = suffix_eta[0]
  term_distance = D**2 / (2.0 * total)
  term_noise = suffix_eta2g2[0] / (2.0 * total)
  term_last = 0.5 * np.sum(eta[:-1] / suffix_eta[1:] * (suffix_eta2g2[:-1] / suffix_eta[:-1]))
  if return_terms:
    return float(term_distance), float(term_noise), float(term_last)
  return float(term_distance + term_noise + term_last)


_REQUIRED = object()


def _field(cfg: Any, names: tuple[str, ...], default: Any = _REQUIRED) -> Any:
  """cfg.<name> or cfg[<name>] for the first of `names` present (ConfigDict, dict, dataclass)."""
  for name in names:
    if isinstance(cfg, Mapping):
      if name in cfg:
        return cfg[name]
    elif hasattr(cfg, name):
      return getattr(cfg, name)
  if default is _REQUIRED:
    raise ValueError(f"optimizer config needs one of {list(names)}")
  return default


def schedule_from_config(cfg: Any) -> optax.Schedule:
  """make_schedule from a config with lr (or peak_lr), steps (or total_steps), schedule,
  warmup_steps and the schedule's own options (decay_frac, init_lr, final_lr) where present;
  options the chosen schedule does not take are ignored."""
  name = _field(cfg, ("schedule",), "constant")
  if name not in _SCHEDULES:
    raise ValueError(f"schedule={name!r}; registered schedules: {registered_schedules()}")
  options = {}
  for option in schedule_options(name):
    value = _field(cfg, (option,), None)
    if value is not None:
      options[option] = value
  return make_schedule(name, _field(cfg, ("lr", "peak_lr", "learning_rate")),
                       _field(cfg, ("steps", "total_steps")),
                       _field(cfg, ("warmup_steps",), 0), **options)


def make_optimizer(cfg: Any) -> optax.GradientTransformation:
  """optax.chain(clip_by_global_norm(max_grad_norm), adamw(schedule, b1, b2, eps, weight_decay)).

  AdamW: Loshchilov & Hutter (2019), "Decoupled Weight Decay Regularization". Reads the
  schedule keys of `schedule_from_config` plus max_grad_norm (1.0; None or <= 0 turns clipping
  off), b1 (0.9), b2 (0.95), eps (1e-8) and weight_decay (0.0). Weight decay applies to every
  parameter.
  """
  schedule = schedule_from_config(cfg)
  max_grad_norm = _field(cfg, ("max_grad_norm",), 1.0)
  adamw = optax.adamw(schedule, b1=_field(cfg, ("b1",), 0.9), b2=_field(cfg, ("b2",), 0.95),
                      eps=_field(cfg, ("eps",), 1e-8),
                      weight_decay=_field(cfg, ("weight_decay",), 0.0))
  clip = (optax.clip_by_global_norm(max_grad_norm) if max_grad_norm and max_grad_norm > 0
          else optax.identity())
  return optax.chain(clip, adamw)
