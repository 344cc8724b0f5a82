"""Learning-rate schedules (registered by name), their convex last-iterate bound, and the optimizer.

Schedules are optax schedules `step -> lr` over steps 0 .. total_steps-1. Every one warms up
linearly from `init_lr` (default 0) to `peak_lr` over `warmup_steps`, and a decaying one reaches
`final_lr` at step `total_steps` (optax's convention), so every step actually taken has lr > 0
when final_lr = 0.

Registered: constant, cosine, wsd (linear cooldown), wsd_sqrt (1 - sqrt cooldown), wsd_two_stage
(a second constant stage at a lower LR before the cooldown).

The bound (`last_iterate_bound`) and what it predicts for tuning (`optimal_base_lr`,
`predicted_lr_ratio`, `transfer_lr`, `two_stage_lr_factor`) follow Schaipp, Hägele, Taylor,
Simsekli & Bach (2025), "The Surprising Agreement Between Convex Optimization Theory and
Learning-Rate Scheduling for Large Model Training".
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tlt_jax.utils.registry import Registry

ScheduleBuilder = Callable[..., optax.Schedule]
log = logging.getLogger(__name__)

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


COOLDOWN_SHAPES = ("linear", "1-sqrt")


def cooldown_schedule(peak_lr: float, final_lr: float, cooldown_steps: int,
                      shape: str = "linear") -> optax.Schedule:
  """The cooldown from peak to final over C steps, with u = step / C in [0, 1]:

    linear:  lr = final + (peak - final) (1 - u)
    1-sqrt:  lr = final + (peak - final) (1 - sqrt(u))

  1-sqrt stays higher for longer and drops at the end; Hägele et al. (2024), "Scaling Laws and
  Compute-Optimal Training Beyond Fixed Training Durations", find it beats linear.
  """
  if shape not in COOLDOWN_SHAPES:
    raise ValueError(f"cooldown shape {shape!r}; allowed: {COOLDOWN_SHAPES}")
  if shape == "linear":
    return optax.linear_schedule(peak_lr, final_lr, cooldown_steps)

  def one_minus_sqrt(count):
    u = jnp.clip(jnp.asarray(count, jnp.float32) / cooldown_steps, 0.0, 1.0)
    return final_lr + (peak_lr - final_lr) * (1.0 - jnp.sqrt(u))

  return one_minus_sqrt


def _cooldown_steps(name: str, decay_frac: float, total_steps: int) -> int:
  if not 0.0 <= decay_frac <= 1.0:
    raise ValueError(f"{name}: decay_frac={decay_frac!r}; must be in [0, 1]")
  return int(round(decay_frac * total_steps))


def _warmup_stable_cooldown(name: str, peak_lr: float, total_steps: int, warmup_steps: int,
                            decay_frac: float, init_lr: float, final_lr: float,
                            shape: str) -> optax.Schedule:
  cooldown_steps = _cooldown_steps(name, decay_frac, total_steps)
  stable_steps = total_steps - warmup_steps - cooldown_steps
  if stable_steps < 0:
    raise ValueError(f"{name}: warmup_steps={warmup_steps} + cooldown round(decay_frac={decay_frac} "
                     f"* total_steps={total_steps})={cooldown_steps} exceed total_steps")
  if cooldown_steps == 0:
    return constant_schedule(peak_lr, total_steps, warmup_steps, init_lr=init_lr)
  return _join([_warmup(init_lr, peak_lr, warmup_steps),
                (stable_steps, optax.constant_schedule(peak_lr)),
                (cooldown_steps + 1, cooldown_schedule(peak_lr, final_lr, cooldown_steps, shape))])


@register_schedule("wsd")
def wsd_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *,
                 decay_frac: float = 0.2, init_lr: float = 0.0,
                 final_lr: float = 0.0) -> optax.Schedule:
  """Warmup-stable-decay: linear warmup over W steps, constant peak, then a linear cooldown.

    C = round(decay_frac * T) cooldown steps starting at step T - C:
    lr_t = peak - (peak - final) (t - (T - C)) / C   for T - C <= t <= T.

  Hägele et al. (2024), "Scaling Laws and Compute-Optimal Training Beyond Fixed Training
  Durations"; its convex-theory bound (see `last_iterate_bound`) from Schaipp et al. (2025),
  "The Surprising Agreement Between Convex Optimization Theory and Learning-Rate Scheduling
  for Large Model Training".
  """
  return _warmup_stable_cooldown("wsd", peak_lr, total_steps, warmup_steps, decay_frac, init_lr,
                                 final_lr, "linear")


@register_schedule("wsd_sqrt")
def wsd_sqrt_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *,
                      decay_frac: float = 0.2, init_lr: float = 0.0,
                      final_lr: float = 0.0) -> optax.Schedule:
  """WSD with a 1 - sqrt cooldown: as `wsd`, but over the last C = round(decay_frac * T) steps

    lr_t = final + (peak - final) (1 - sqrt((t - (T - C)) / C))   for T - C <= t <= T.

  Hägele et al. (2024); its bound in Schaipp et al. (2025), Section 4 (cooldown shapes).
  """
  return _warmup_stable_cooldown("wsd_sqrt", peak_lr, total_steps, warmup_steps, decay_frac,
                                 init_lr, final_lr, "1-sqrt")


@register_schedule("wsd_two_stage")
def wsd_two_stage_schedule(peak_lr: float, total_steps: int, warmup_steps: int, *,
                           decay_frac: float = 0.2, stage2_frac: float = 0.4,
                           stage2_lr_factor: float = 0.5, init_lr: float = 0.0,
                           final_lr: float = 0.0) -> optax.Schedule:
  """Two-stage WSD: warmup, peak until step S = round(stage2_frac * T), then a second constant
  stage at rho * peak (rho = stage2_lr_factor) until T - C, then a linear cooldown to final over
  C = round(decay_frac * T) steps:

    lr_t = peak          for W <= t < S
    lr_t = rho * peak    for S <= t < T - C
    lr_t = rho * peak - (rho * peak - final) (t - (T - C)) / C   for T - C <= t <= T.

  The schedule Schaipp et al. (2025), Section 5.1, build for continued training: a run tuned
  for T1 steps is extended to T2 > T1 by keeping its stable stage up to its cooldown start
  (stage2_frac = (1 - c) T1 / T2) and continuing at the lower LR rho * peak that the bound
  chooses (`two_stage_lr_factor`).
  """
  cooldown_steps = _cooldown_steps("wsd_two_stage", decay_frac, total_steps)
  stage2_start = int(round(stage2_frac * total_steps))
  if not 0.0 < stage2_lr_factor <= 1.0:
    raise ValueError(f"wsd_two_stage: stage2_lr_factor={stage2_lr_factor!r}; must be in (0, 1]")
  if not warmup_steps <= stage2_start <= total_steps - cooldown_steps:
    raise ValueError(f"wsd_two_stage: stage2_frac={stage2_frac!r} puts the second stage at step "
                     f"{stage2_start}; must be in [warmup_steps={warmup_steps}, cooldown start "
                     f"{total_steps - cooldown_steps}] (total_steps={total_steps}, "
                     f"decay_frac={decay_frac})")
  stage2_lr = stage2_lr_factor * peak_lr
  pieces = [_warmup(init_lr, peak_lr, warmup_steps),
            (stage2_start - warmup_steps, optax.constant_schedule(peak_lr)),
            (total_steps - cooldown_steps - stage2_start, optax.constant_schedule(stage2_lr))]
  if cooldown_steps == 0:
    pieces[-1] = (pieces[-1][0] + 1, pieces[-1][1])
  else:
    pieces.append((cooldown_steps + 1, optax.linear_schedule(stage2_lr, final_lr, cooldown_steps)))
  return _join(pieces)


def schedule_values(schedule: optax.Schedule, total_steps: int) -> np.ndarray:
  """[schedule(0), ..., schedule(total_steps - 1)] as float64 numpy (for plots and bounds)."""
  return np.asarray(jax.vmap(schedule)(jnp.arange(total_steps)), np.float64)


def last_iterate_bound(schedule_values: np.ndarray, D: float = 1.0, G: float | np.ndarray = 1.0,
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
  bound of any schedule (constant, cosine, WSD with any cooldown) follows its LLM loss curves
  (a sudden drop during the cooldown). The first two terms are the classical averaged-iterate
  bound; the third is the price of returning the last iterate. Works on any non-negative
  schedule with eta_T > 0 (a decaying optax schedule here never reaches 0 within its
  total_steps). Computed in O(T) with suffix sums. Returns the bound, or its three terms
  (distance, noise, last-iterate) with `return_terms=True`; with eta_t = gamma * s_t the terms
  of s are t1, t2, t3 and the bound of eta is t1 / gamma + gamma (t2 + t3) (`optimal_base_lr`).
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


wsd_convex_bound = last_iterate_bound  # the name it had when only WSD was studied


def bound_curve(schedule_values: np.ndarray, D: float = 1.0,
                G: float | np.ndarray = 1.0) -> np.ndarray:
  """[Omega_1, ..., Omega_T]: the bound of the run stopped after t steps, Omega_t =
  last_iterate_bound(eta_1..eta_t), the curve Schaipp et al. (2025) set beside the loss curve
  (their Fig. 1). NaN where eta_t = 0 (a step at lr 0, the first of a warmup from 0)."""
  eta = np.asarray(schedule_values, np.float64)
  g = np.broadcast_to(np.asarray(G, np.float64), eta.shape)
  out = np.full(eta.shape, np.nan)
  for t in range(1, eta.size + 1):
    if eta[t - 1] > 0:
      out[t - 1] = last_iterate_bound(eta[:t], D, g[:t])
  return out


class BoundOptimum(NamedTuple):
  """The bound-optimal base LR of a schedule shape s and what it reaches.

  lr = gamma* = sqrt(t1 / (t2 + t3)); bound = 2 sqrt(t1 (t2 + t3)); t1, t23 = t1, t2 + t3."""
  lr: float
  bound: float
  t1: float
  t23: float


def schedule_shape(name: str, total_steps: int, warmup_steps: int = 0, **options) -> np.ndarray:
  """s_1..s_T: the values of the schedule `name` with peak 1 (so eta_t = gamma * s_t)."""
  return schedule_values(make_schedule(name, 1.0, total_steps, warmup_steps, **options), total_steps)


def optimal_base_lr(shape: str | np.ndarray, T: int | None = None, D: float = 1.0,
                    G: float | np.ndarray = 1.0, warmup_steps: int = 0, **options) -> BoundOptimum:
  """The base LR gamma that minimises the bound of eta_t = gamma * s_t, t = 1..T.

  With (t1, t2, t3) = last_iterate_bound(s, D, G, return_terms=True), the bound is
  Omega(gamma) = t1 / gamma + gamma (t2 + t3): convex in gamma, least at

    gamma* = sqrt(t1 / (t2 + t3)),   Omega(gamma*) = 2 sqrt(t1 (t2 + t3)).

  Schaipp et al. (2025), Section 3 and their Fig. 3 (gamma* falls with T and rises with the
  cooldown fraction). `shape` is a registered schedule name (built with peak 1 over T steps,
  `warmup_steps` and its `options`) or the values s_1.. themselves (then the bound at step T,
  default all of them). gamma* scales as D / G, so ratios of gamma* between shapes do not depend
  on D and G (`predicted_lr_ratio`).
  """
  if isinstance(shape, str):
    if T is None:
      raise ValueError(f"optimal_base_lr({shape!r}): give the horizon T")
    s = schedule_shape(shape, T, warmup_steps, **options)
  else:
    if options or warmup_steps:
      raise ValueError("optimal_base_lr: schedule options only go with a schedule name")
    s = np.asarray(shape, np.float64)[:T]
  t1, t2, t3 = last_iterate_bound(s, D, G, return_terms=True)
  t23 = t2 + t3
  return BoundOptimum(lr=math.sqrt(t1 / t23), bound=2.0 * math.sqrt(t1 * t23), t1=t1, t23=t23)


def predicted_lr_ratio(shape: str | np.ndarray, reference: str | np.ndarray, T: int | None = None,
                       shape_options: Mapping[str, Any] | None = None,
                       reference_options: Mapping[str, Any] | None = None,
                       warmup_steps: int = 0) -> float:
  """gamma*(shape) / gamma*(reference): the factor by which the bound says the best base LR of
  `shape` differs from that of `reference` (e.g. WSD vs cosine at the same T). Independent of
  D and G. Schaipp et al. (2025), Section 5.2 (transferring the LR across schedules)."""
  def gamma(s, opts):
    if isinstance(s, str):
      return optimal_base_lr(s, T, warmup_steps=warmup_steps, **dict(opts or {})).lr
    return optimal_base_lr(s).lr
  return gamma(shape, shape_options) / gamma(reference, reference_options)


def transfer_lr(tuned_lr: float, shape: str | np.ndarray, reference: str | np.ndarray,
                T: int | None = None, shape_options: Mapping[str, Any] | None = None,
                reference_options: Mapping[str, Any] | None = None, warmup_steps: int = 0) -> float:
  """The LR for `shape` from an LR tuned on `reference`: tuned_lr * gamma*(shape) / gamma*(reference).

  The bound's rule for moving a tuned LR to another schedule, cooldown or horizon without a new
  sweep; Schaipp et al. (2025), Section 5."""
  return tuned_lr * predicted_lr_ratio(shape, reference, T, shape_options, reference_options,
                                       warmup_steps)


def two_stage_lr_factor(first_steps: int, total_steps: int, decay_frac: float = 0.2,
                        warmup_steps: int = 0, tol: float = 1e-6) -> float:
  """rho for extending a WSD run tuned for T1 = first_steps to T2 = total_steps (wsd_two_stage).

  The extension keeps the T1 run's peak stage up to its cooldown start S = round((1 - c) T1)
  (c = decay_frac), continues at rho * peak until T2 - round(c T2) and cools down linearly. rho
  is the factor whose bound-optimal base LR equals that of the T1 run,

    gamma*(two-stage(rho), T2) = gamma*(wsd, T1),

  so the LR tuned for T1 stays the right one after extending: Schaipp et al. (2025), Section 5.1
  ("the theoretically optimal schedule extension"). gamma*(rho) rises as rho falls from 1 (a
  slower second stage wants a larger base LR), up to a maximum near rho ~ 0.1-0.2 below which
  the run is a constant schedule without a real cooldown and gamma* falls again; the answer is
  the largest rho that reaches the target, found by a scan down from 1 and bisection. Returns
  1.0 when gamma*(1) already reaches it, and the rho of the scan's largest gamma* when no rho
  does (with a warning).
  """
  if not 0 < first_steps < total_steps:
    raise ValueError(f"two_stage_lr_factor: first_steps={first_steps} must be in (0, total_steps="
                     f"{total_steps})")
  target = optimal_base_lr("wsd", first_steps, warmup_steps=warmup_steps, decay_frac=decay_frac).lr
  stage2_frac = int(round((1.0 - decay_frac) * first_steps)) / total_steps

  def gamma(rho):
    return optimal_base_lr("wsd_two_stage", total_steps, warmup_steps=warmup_steps,
                           decay_frac=decay_frac, stage2_frac=stage2_frac,
                           stage2_lr_factor=float(rho)).lr

  grid = np.linspace(1.0, 0.02, 50)
  gammas = []
  for i, rho in enumerate(grid):
    gammas.append(gamma(rho))
    if gammas[-1] >= target:
      if i == 0:
        return 1.0
      lo, hi = float(rho), float(grid[i - 1])  # gamma(lo) >= target > gamma(hi)
      while hi - lo > tol:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if gamma(mid) >= target else (lo, mid)
      return 0.5 * (lo + hi)
  import warnings
  warnings.warn(f"two_stage_lr_factor: no rho reaches the bound-optimal LR of the {first_steps}-step "
                f"run; using the rho of the largest gamma*")
  return float(grid[int(np.argmax(gammas))])


def two_stage_options(first_steps: int, total_steps: int, decay_frac: float = 0.2,
                      warmup_steps: int = 0) -> dict[str, float]:
  """The wsd_two_stage options of the bound's extension of a T1-step WSD run to T2 steps:
  {decay_frac, stage2_frac = round((1 - c) T1) / T2, stage2_lr_factor = two_stage_lr_factor}."""
  stage2_start = int(round((1.0 - decay_frac) * first_steps))
  return {"decay_frac": decay_frac, "stage2_frac": stage2_start / total_steps,
          "stage2_lr_factor": two_stage_lr_factor(first_steps, total_steps, decay_frac, warmup_steps)}


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


def parse_lr_reference(spec: str) -> tuple[str, dict[str, float], int | None]:
  """`name[:option=value,...]` -> (name, options, steps): the reference schedule of
  `lr_from_bound`, e.g. "cosine", "wsd:decay_frac=0.1", "wsd:steps=200" (another horizon).
  `steps` is the reference's horizon (None: the run's own). ValueError naming what is wrong."""
  name, _, rest = str(spec).strip().partition(":")
  if name not in _SCHEDULES:
    raise ValueError(f"reference schedule {name!r} is not registered; registered: {registered_schedules()}")
  options, steps = {}, None
  allowed = schedule_options(name) + ["steps"]
  for item in filter(None, (p.strip() for p in rest.split(","))):
    key, eq, value = item.partition("=")
    if not eq or key not in allowed:
      raise ValueError(f"{item!r} is not an option of the reference schedule {name!r}; allowed: "
                       f"<option>=<number> with <option> one of {allowed}")
    try:
      number = float(value)
    except ValueError:
      raise ValueError(f"{item!r}: {value!r} is not a number") from None
    if key == "steps":
      if number != int(number) or number < 1:
        raise ValueError(f"{item!r}: steps must be an int >= 1")
      steps = int(number)
    else:
      options[key] = number
  return name, options, steps


def _schedule_options_of(cfg: Any, name: str) -> dict[str, Any]:
  options = {}
  for option in schedule_options(name):
    value = _field(cfg, (option,), None)
    if value is not None:
      options[option] = value
  return options


def lr_from_config(cfg: Any) -> float:
  """The peak LR of a config: lr (or peak_lr), or, when `lr_from_bound` names a reference
  schedule, lr moved from that reference to the config's schedule by the bound:

    lr_run = lr * gamma*(schedule, steps) / gamma*(reference, reference steps)   (`transfer_lr`)

  i.e. `lr` is the LR tuned for the reference ("cosine", "wsd:decay_frac=0.1",
  "wsd:steps=200"; same warmup). Schaipp et al. (2025), Section 5."""
  lr = float(_field(cfg, ("lr", "peak_lr", "learning_rate")))
  reference = _field(cfg, ("lr_from_bound",), "") or ""
  if not reference:
    return lr
  name = _field(cfg, ("schedule",), "constant")
  steps = int(_field(cfg, ("steps", "total_steps")))
  warmup = int(_field(cfg, ("warmup_steps",), 0))
  ref_name, ref_options, ref_steps = parse_lr_reference(reference)
  ours = optimal_base_lr(name, steps, warmup_steps=warmup, **_schedule_options_of(cfg, name)).lr
  theirs = optimal_base_lr(ref_name, ref_steps or steps, warmup_steps=warmup, **ref_options).lr
  log.info("lr_from_bound: lr %.4g tuned for %r -> %.4g for %r over %d steps (gamma* ratio %.4f)",
           lr, reference, lr * ours / theirs, name, steps, ours / theirs)
  return lr * ours / theirs


def schedule_from_config(cfg: Any) -> optax.Schedule:
  """make_schedule from a config with lr (or peak_lr), steps (or total_steps), schedule,
  warmup_steps and the schedule's own options (decay_frac, stage2_frac, stage2_lr_factor,
  init_lr, final_lr) where present; options the chosen schedule does not take are ignored. The
  peak LR is `lr_from_config` (lr, or lr transferred by the bound with `lr_from_bound`)."""
  name = _field(cfg, ("schedule",), "constant")
  if name not in _SCHEDULES:
    raise ValueError(f"schedule={name!r}; registered schedules: {registered_schedules()}")
  return make_schedule(name, lr_from_config(cfg), _field(cfg, ("steps", "total_steps")),
                       _field(cfg, ("warmup_steps",), 0), **_schedule_options_of(cfg, name))


class LrTableState(NamedTuple):
  count: jax.Array  # int32 []: updates so far
  lrs: jax.Array  # float32 [T]: the learning rate of each step


def scale_by_lr_table(lrs: np.ndarray) -> optax.GradientTransformation:
  """u_t -> -lrs[t] * u_t, with the table of per-step learning rates kept in the optimizer state
  (the last entry repeats after T steps). The same as optax.scale_by_learning_rate(schedule) for
  lrs = schedule_values(schedule, T), but the compiled update does not depend on the values: one
  compilation serves every schedule of the same length (LR sweeps)."""
  table = np.asarray(lrs, np.float32)
  if table.ndim != 1 or table.size < 1:
    raise ValueError(f"scale_by_lr_table: lrs must be a 1-d array of T >= 1 rates, got {table.shape}")

  def init(params):
    del params
    return LrTableState(count=jnp.zeros((), jnp.int32), lrs=jnp.asarray(table))

  def update(updates, state, params=None):
    del params
    lr = state.lrs[jnp.minimum(state.count, state.lrs.shape[0] - 1)]
    updates = jax.tree.map(lambda u: -lr * u, updates)
    return updates, LrTableState(count=state.count + 1, lrs=state.lrs)

  return optax.GradientTransformation(init, update)


def make_optimizer(cfg: Any, lr_table: np.ndarray | None = None) -> optax.GradientTransformation:
  """optax.chain(clip_by_global_norm(max_grad_norm), adamw(schedule, b1, b2, eps, weight_decay)).

  AdamW: Loshchilov & Hutter (2019), "Decoupled Weight Decay Regularization". Reads the
  schedule keys of `schedule_from_config` plus max_grad_norm (1.0; None or <= 0 turns clipping
  off), b1 (0.9), b2 (0.95), eps (1e-8) and weight_decay (0.0). Weight decay applies to every
  parameter. With `lr_table` (the per-step rates, e.g. schedule_values of a schedule) the
  schedule keys are not read and the rates ride in the optimizer state (`scale_by_lr_table`):
  the same updates, one compilation for a whole LR sweep.
  """
  max_grad_norm = _field(cfg, ("max_grad_norm",), 1.0)
  clip = (optax.clip_by_global_norm(max_grad_norm) if max_grad_norm and max_grad_norm > 0
          else optax.identity())
  b1, b2 = _field(cfg, ("b1",), 0.9), _field(cfg, ("b2",), 0.95)
  eps, weight_decay = _field(cfg, ("eps",), 1e-8), _field(cfg, ("weight_decay",), 0.0)
  if lr_table is not None:  # optax.adamw's own chain, with the table as its learning rate
    return optax.chain(clip, optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
                       optax.add_decayed_weights(weight_decay), scale_by_lr_table(lr_table))
  adamw = optax.adamw(schedule_from_config(cfg), b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
  return optax.chain(clip, adamw)
