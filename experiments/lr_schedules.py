"""Learning-rate schedules from the convex bound, measured on SFT of a small policy.

Schaipp, Hägele, Taylor, Simsekli & Bach (2025), "The Surprising Agreement Between Convex
Optimization Theory and Learning-Rate Scheduling for Large Model Training", show that the
last-iterate bound of SGD on a convex Lipschitz problem (train/optim.py `last_iterate_bound`)
follows LLM loss curves, and use it to tune: the bound-optimal base LR gamma* of a schedule
shape, its ratio between shapes, and a two-stage schedule for extending a run. Here every
prediction is checked against SFT runs of a small policy on the default task (chain-of-thought
addition), the loss measured on fixed held-out batches (`train/sft.py:heldout_loss`):

  (i)   curves: the bound over steps beside the measured train / validation loss, for constant,
        cosine, WSD-20% linear and WSD-20% 1-sqrt at the same peak LR (the sweep's `--lr`);
  (ii)  LR sweep per schedule: the measured best LR (a parabola in log LR through the grid's
        best three points, per seed) and its ratio to cosine's, against the bound's
        gamma*(schedule) / gamma*(cosine);
  (iii) cooldown fraction 0.1 .. 0.6 (WSD linear, at the measured best WSD-20% LR): measured
        final loss against the bound's ranking (Spearman rank correlation);
  (iv)  horizon transfer: the tuned T-step WSD run extended to 2T steps with the old LR, with
        the bound's LR for 2T (old LR * gamma*(wsd, 2T) / gamma*(wsd, T)), and with the bound's
        two-stage schedule (the old LR until the T run's cooldown start, then rho * LR).

The bound needs D / G (distance to the optimum over the gradient bound) to say where an LR lies
against gamma*; it is set once, so that gamma*(WSD-20%) equals the measured best WSD-20% LR,
and then predicts everything else (ratios of gamma* do not depend on it). Seeds change the
initialisation and the order of the training data; the held-out batches are the same for all.

  python experiments/lr_schedules.py [--config=configs/default.py:tiny] [--config.sft.steps=...]
      [--seeds 3] [--steps 0] [--lr 0] [--parts i,ii,iii,iv] [--out experiments/results/lr_schedules]

Prints one compact JSON line per run, then the tables; writes OUT/lr_schedules.{jsonl,md} and
OUT/lr_schedules_{curves,sweep,cooldown,horizon}.png. `--resume` reuses the runs already in
OUT/lr_schedules.jsonl; `--report_only` rebuilds the tables and plots from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402

from experiments.common import Output, define_output_flags, pyplot, run_experiment, with_overrides  # noqa: E402
from tlt_jax import cli  # noqa: E402

cli.skip_absent_tpu()  # one CPU device: a small model trains fastest unsharded

# The experiment's own sizes, on the `:tiny` policy (2 layers, d=32, sums of up to 3 digits) with
# enough steps that the schedules differ. `lr` is the sweep's centre and part (i)'s common peak
# LR; the grid spans 16x in steps of sqrt(2), wide enough for the bound's predicted spread of
# best LRs (constant ~0.5x, WSD ~0.55x of cosine's). Default: ~7 s per 300-step run on 2 cores,
# 108 + 18 + 21 run-equivalents, ~16 min.
SIZES = {
    "default": dict(steps=300, warmup=15, seeds=3, eval_every=30, heldout_batches=16, lr=5e-3,
                    lr_factors=tuple(round(2 ** (k / 2), 4) for k in range(-4, 5)),
                    cooldowns=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6)),
    # the Colab notebook: about two minutes
    "notebook": dict(steps=80, warmup=5, seeds=2, eval_every=20, heldout_batches=4, lr=5e-3,
                     lr_factors=(0.5, 1.0, 2.0), cooldowns=(0.1, 0.3, 0.6)),
    # the notebook's test: seconds
    "test": dict(steps=20, warmup=2, seeds=1, eval_every=10, heldout_batches=2, lr=5e-3,
                 lr_factors=(0.5, 1.0, 2.0), cooldowns=(0.2, 0.5)),
}
CONFIG_OVERRIDES = {"stages": "sft", "sft.batch_size": 8, "sft.max_len": 96, "sft.weight_decay": 0.0}

# (label, registered schedule, options): the four shapes of parts (i) and (ii)
SCHEDULES = (
    ("constant", "constant", {}),
    ("cosine", "cosine", {}),
    ("wsd", "wsd", {"decay_frac": 0.2}),
    ("wsd_sqrt", "wsd_sqrt", {"decay_frac": 0.2}),
)
REFERENCE = "cosine"

# Schaipp et al. (2025), 124M / 210M Llama-style models on SlimPajama, AdamW: a WSD run tuned
# for 50k steps and extended to 100k / 200k with the bound's two-stage schedule ends 0.006-0.011
# lower in validation loss than extending it at the same LR (Section 5.1; ~7% of the steps saved).
PAPER = {"horizon_gain": (0.006, 0.011), "models": "124M / 210M Llama-style", "steps": "50k -> 100k / 200k"}

_CONFIG = cli.define_config_flag(os.path.join(ROOT, "configs", "default.py") + ":tiny")
define_output_flags("experiments/results/lr_schedules")
flags.DEFINE_string("size", "default", f"experiment size: one of {tuple(SIZES)}")
flags.DEFINE_integer("seeds", 0, "seeds per setting (0: the size's)")
flags.DEFINE_integer("steps", 0, "T, SFT steps per run (0: the size's)")
flags.DEFINE_float("lr", 0.0, "the sweep's centre and part (i)'s common peak LR (0: the size's)")
flags.DEFINE_string("parts", "i,ii,iii,iv", "which parts to run ((i) comes with (ii))")
flags.DEFINE_bool("resume", False, "reuse the runs already in OUT/lr_schedules.jsonl")
flags.DEFINE_bool("report_only", False, "only rebuild the tables and plots from OUT's jsonl")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the experiment runs: horizon T, warmup, seeds, the LR grid and cooldown fractions."""
  steps: int
  warmup: int
  seeds: tuple[int, ...]
  eval_every: int
  heldout_batches: int
  lr: float
  lr_factors: tuple[float, ...]
  cooldowns: tuple[float, ...]

  @property
  def lr_grid(self) -> list[float]:
    return [self.lr * f for f in self.lr_factors]


def make_plan(size: str, seeds: int = 0, steps: int = 0, lr: float = 0.0) -> Plan:
  """The plan of a size in SIZES, with --seeds / --steps / --lr where given (non-zero)."""
  from tlt_jax.errors import ConfigError
  if size not in SIZES:
    raise ConfigError(f"--size={size!r} is not allowed; allowed: one of {tuple(SIZES)}")
  s = SIZES[size]
  steps = steps or s["steps"]
  warmup = min(s["warmup"], max(steps // 10, 1))
  if steps < 10:
    raise ConfigError(f"--steps={steps} is not allowed; allowed: an int >= 10")
  return Plan(steps=steps, warmup=warmup, seeds=tuple(range(seeds or s["seeds"])),
              eval_every=min(s["eval_every"], steps), heldout_batches=s["heldout_batches"],
              lr=float(lr or s["lr"]), lr_factors=tuple(s["lr_factors"]),
              cooldowns=tuple(s["cooldowns"]))


# --- one run ---------------------------------------------------------------------------------


def heldout_batches(setup, n: int):
  """n fixed packed batches of the task, drawn from a stream no training run uses (the same for
  every seed): the validation set."""
  import numpy as np

  from tlt_jax.data.batching import pack_sft_batch
  c = setup.config.sft
  out = []
  for i in range(n):
    rng = np.random.default_rng([987_654, 2, i])
    out.append(pack_sft_batch(lambda: setup.task.sample(rng), setup.tokenizer, c.batch_size, c.max_len))
  return out


_STEP_FNS: dict = {}  # steps T -> the compiled SFT step shared by every run of that length


def run_key(part: str, label: str, lr: float, steps: int, seed: int) -> str:
  return f"{part}|{label}|{lr:.6g}|{steps}|{seed}"


def train_run(setup, heldout, *, part: str, label: str, schedule: str, options: dict, lr: float,
              steps: int, warmup: int, seed: int, eval_every: int) -> dict:
  """One SFT run from scratch: the policy initialised with `seed`, the task's batches of `seed`,
  AdamW (the config's sft optimizer keys) on `schedule` at peak `lr`; the held-out loss every
  `eval_every` steps and at the end. Returns the run's record (curves included)."""
  import numpy as np
  from flax import nnx

  from tlt_jax.models.transformer import Transformer
  from tlt_jax.run import sft_batches
  from tlt_jax.train import optim
  from tlt_jax.train.sft import heldout_loss, make_sft_step, run_sft
  from tlt_jax.train.state import create_train_state

  import ml_collections
  config = setup.config.as_configdict()
  config.seed = seed  # the training data's order (run.sft_batches) and the initialisation
  config = ml_collections.FrozenConfigDict(config)
  seeded = dataclasses.replace(setup, config=config)
  lrs = optim.schedule_values(optim.make_schedule(schedule, lr, steps, warmup, **options), steps)
  tx = optim.make_optimizer(config.sft, lr_table=lrs)  # one compiled step for every schedule of T
  model = Transformer(setup.model_cfg, rngs=nnx.Rngs(seed))
  t0 = time.perf_counter()
  graphdef, params = nnx.split(model)
  state = create_train_state(params, tx, None)
  if steps not in _STEP_FNS:  # the LR table rides in the state: the step does not depend on it
    _STEP_FNS[steps] = make_sft_step(graphdef, tx, state, None)
  _, _, history = run_sft(model, tx, sft_batches(seeded), steps, log_every=1, eval_every=eval_every,
                          evaluate=lambda m: heldout_loss(m, heldout), state=state,
                          step_fn=_STEP_FNS[steps])
  train = np.array([h["loss"] for h in history])
  window = max(eval_every // 2, 1)
  train_curve = [[int(history[i]["step"]), float(train[max(0, i + 1 - window):i + 1].mean())]
                 for i in range(len(history)) if "val_loss" in history[i]]
  val_curve = [[int(h["step"]), float(h["val_loss"])] for h in history if "val_loss" in h]
  return dict(part=part, label=label, schedule=schedule, options=options, lr=float(lr), steps=steps,
              warmup=warmup, seed=seed, final_val_loss=val_curve[-1][1],
              final_train_loss=float(train[-window:].mean()), val_curve=val_curve,
              train_curve=train_curve, time_s=time.perf_counter() - t0,
              key=run_key(part, label, lr, steps, seed))


# --- statistics ------------------------------------------------------------------------------


def best_lr(lrs, losses) -> tuple[float, bool]:
  """The LR of least loss on a grid, refined by the vertex of the parabola in log LR through the
  best point and its two neighbours (kept within them). Returns (lr, at_edge): at_edge when the
  best grid point is the first or last (the optimum may lie outside the grid)."""
  import numpy as np
  x, y = np.log(np.asarray(lrs, float)), np.asarray(losses, float)
  i = int(np.argmin(y))
  if i == 0 or i == len(y) - 1:
    return float(np.exp(x[i])), True
  a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
  vertex = -b / (2 * a) if a > 0 else x[i]
  return float(np.exp(np.clip(vertex, x[i - 1], x[i + 1]))), False


def mean_ci(values, level: float = 0.95) -> dict:
  """Mean and the t-interval of the mean over seeds: {mean, lo, hi, sd, n}."""
  import numpy as np
  from scipy import stats
  v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
  n = v.size
  if n == 0:
    return dict(mean=float("nan"), lo=float("nan"), hi=float("nan"), sd=float("nan"), n=0)
  mean = float(v.mean())
  if n == 1:
    return dict(mean=mean, lo=float("nan"), hi=float("nan"), sd=float("nan"), n=1)
  sd = float(v.std(ddof=1))
  half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
  return dict(mean=mean, lo=mean - half, hi=mean + half, sd=sd, n=n)


def spearman(a, b) -> float:
  from scipy import stats
  if len(a) < 2:
    return float("nan")
  return float(stats.spearmanr(a, b).statistic)


def fmt_ci(ci: dict, digits: int = 3) -> str:
  if not math.isfinite(ci["lo"]):
    return f"{ci['mean']:.{digits}f}"
  return f"{ci['mean']:.{digits}f} [{ci['lo']:.{digits}f}, {ci['hi']:.{digits}f}]"


# --- the bound's side ------------------------------------------------------------------------


def shape(schedule: str, options: dict, steps: int, warmup: int):
  from tlt_jax.train import optim
  return optim.schedule_shape(schedule, steps, warmup, **options)


def calibrate(measured_wsd_lr: float, steps: int, warmup: int) -> float:
  """D / G such that the bound-optimal LR of WSD-20% equals the measured one (gamma* ~ D / G)."""
  from tlt_jax.train import optim
  return measured_wsd_lr / optim.optimal_base_lr("wsd", steps, warmup_steps=warmup, decay_frac=0.2).lr


def bound_at(lr: float, schedule: str, options: dict, steps: int, warmup: int, d_over_g: float) -> float:
  """The bound of lr * s (G = 1, D = D / G): its scale is arbitrary, its ordering is not."""
  from tlt_jax.train import optim
  return optim.last_iterate_bound(lr * shape(schedule, options, steps, warmup), D=d_over_g, G=1.0)


# --- analysis --------------------------------------------------------------------------------


def analyse(records: list[dict], plan: Plan) -> dict:
  """Everything the report says, from the run records."""
  import numpy as np

  from tlt_jax.train import optim
  T, W = plan.steps, plan.warmup
  out: dict = {"plan": dataclasses.asdict(plan)}
  by = {}
  for r in records:
    by.setdefault((r["part"], r["label"]), []).append(r)

  # (ii) best LR per schedule and seed, ratio to cosine, against the bound
  sweep = {}
  for label, schedule, options in SCHEDULES:
    runs = by.get(("sweep", label), [])
    per_seed = {}
    for seed in sorted({r["seed"] for r in runs}):
      pts = sorted((r["lr"], r["final_val_loss"]) for r in runs if r["seed"] == seed)
      if len(pts) >= 3:
        per_seed[seed] = best_lr([p[0] for p in pts], [p[1] for p in pts])
    lrs = sorted({r["lr"] for r in runs})
    mean_curve = [float(np.mean([r["final_val_loss"] for r in runs if r["lr"] == lr])) for lr in lrs]
    pooled = best_lr(lrs, mean_curve) if len(lrs) >= 3 else (float("nan"), True)
    sweep[label] = dict(schedule=schedule, options=options, per_seed=per_seed, lrs=lrs,
                        mean_final=mean_curve, pooled_best=pooled[0], pooled_at_edge=pooled[1],
                        predicted_gamma=optim.optimal_base_lr(schedule, T, warmup_steps=W, **options).lr)
  rows = []
  if REFERENCE in sweep and sweep[REFERENCE]["per_seed"]:
    ref = sweep[REFERENCE]
    for label, s in sweep.items():
      seeds = sorted(set(s["per_seed"]) & set(ref["per_seed"]))
      ratios = [s["per_seed"][k][0] / ref["per_seed"][k][0] for k in seeds]
      log_ci = mean_ci(np.log(ratios)) if ratios else mean_ci([])
      edge = sum(s["per_seed"][k][1] for k in seeds)
      rows.append(dict(
          schedule=label, best_lr=fmt_ci(mean_ci([s["per_seed"][k][0] for k in seeds]), 5),
          measured_ratio=math.exp(log_ci["mean"]) if ratios else float("nan"),
          ratio_ci=(f"[{math.exp(log_ci['lo']):.2f}, {math.exp(log_ci['hi']):.2f}]"
                    if math.isfinite(log_ci["lo"]) else ""),
          predicted_ratio=s["predicted_gamma"] / ref["predicted_gamma"],
          best_lr_pooled=s["pooled_best"], seeds=len(seeds), at_grid_edge=edge,
          best_final_val=min(s["mean_final"]) if s["mean_final"] else float("nan")))
    out["lr_ratio_rows"] = rows
    measured = [r["measured_ratio"] for r in rows]
    predicted = [r["predicted_ratio"] for r in rows]
    out["lr_ratio_spearman"] = spearman(measured, predicted)
    out["lr_ratio_log_error"] = float(np.mean(np.abs(np.log(np.array(measured) / np.array(predicted)))))
  out["sweep"] = sweep

  # calibration: D / G from the measured best WSD-20% LR (geometric mean over seeds)
  wsd_best = [v[0] for v in sweep.get("wsd", {}).get("per_seed", {}).values()]
  tuned = float(np.exp(np.mean(np.log(wsd_best)))) if wsd_best else plan.lr
  out["tuned_wsd_lr"] = tuned
  d_over_g = calibrate(tuned, T, W)
  out["d_over_g"] = d_over_g

  # (i) the four shapes at the common peak LR: measured finals vs the bound's
  curves = []
  for label, schedule, options in SCHEDULES:
    runs = [r for r in by.get(("sweep", label), []) if math.isclose(r["lr"], plan.lr, rel_tol=1e-6)]
    if runs:
      curves.append(dict(schedule=label, final_val=mean_ci([r["final_val_loss"] for r in runs]),
                         final_train=mean_ci([r["final_train_loss"] for r in runs]),
                         bound=bound_at(plan.lr, schedule, options, T, W, d_over_g)))
  out["curves"] = curves
  if len(curves) >= 2:
    out["curves_spearman"] = spearman([c["final_val"]["mean"] for c in curves], [c["bound"] for c in curves])

  # (iii) cooldown fractions at the tuned LR
  cooldown = []
  seeds_iii = sorted({r["seed"] for r in records if r["part"] == "cooldown"})
  for c in plan.cooldowns:
    runs = by.get(("cooldown", f"wsd_c{c:g}"), [])
    if runs:
      lr = runs[0]["lr"]
      cooldown.append(dict(decay_frac=c, final_val=mean_ci([r["final_val_loss"] for r in runs]),
                           bound=bound_at(lr, "wsd", {"decay_frac": c}, T, W, d_over_g),
                           bound_at_own_gamma=optim.optimal_base_lr("wsd", T, D=d_over_g, warmup_steps=W,
                                                                    decay_frac=c).bound,
                           gamma_star=optim.optimal_base_lr("wsd", T, D=d_over_g, warmup_steps=W,
                                                            decay_frac=c).lr,
                           per_seed={r["seed"]: r["final_val_loss"] for r in runs}))
  out["cooldown"] = cooldown
  if len(cooldown) >= 2:
    bounds = [c["bound"] for c in cooldown]
    out["cooldown_spearman"] = spearman([c["final_val"]["mean"] for c in cooldown], bounds)
    per_seed = [spearman([c["per_seed"][s] for c in cooldown], bounds) for s in seeds_iii
                if all(s in c["per_seed"] for c in cooldown)]
    out["cooldown_spearman_seeds"] = mean_ci(per_seed)
    out["cooldown_spearman_per_seed"] = per_seed

  # (iv) horizon transfer
  horizon = []
  base_runs = {r["seed"]: r for r in by.get(("horizon", "wsd_T"), [])}
  for label in ("wsd_T", "wsd_2T_same_lr", "wsd_2T_bound_lr", "two_stage_2T"):
    runs = by.get(("horizon", label), [])
    if not runs:
      continue
    finals = {r["seed"]: r["final_val_loss"] for r in runs}
    same = {r["seed"]: r["final_val_loss"] for r in by.get(("horizon", "wsd_2T_same_lr"), [])}
    gain = [same[s] - finals[s] for s in finals if s in same]
    r0 = runs[0]
    horizon.append(dict(run=label, steps=r0["steps"], lr=r0["lr"], schedule=r0["schedule"],
                        options=r0["options"], final_val=mean_ci(list(finals.values())),
                        gain_vs_same_lr=mean_ci(gain) if label != "wsd_T" else None,
                        bound=bound_at(r0["lr"], r0["schedule"], r0["options"], r0["steps"], r0["warmup"],
                                       d_over_g)))
  out["horizon"] = horizon
  out["horizon_T_seeds"] = len(base_runs)
  return out


# --- report ----------------------------------------------------------------------------------


def report(analysis: dict, plan: Plan, elapsed: float, command: str) -> str:
  from tlt_jax.utils.metrics import markdown_table
  T = plan.steps
  md = ["# Learning-rate schedules from the convex bound (Schaipp et al. 2025), measured on SFT\n",
        f"Small policy (`configs/default.py:tiny` shape), SFT on chain-of-thought addition, T = {T} steps "
        f"(warmup {plan.warmup}), AdamW, seeds {list(plan.seeds)}; loss = SFT cross-entropy on "
        f"{plan.heldout_batches} fixed held-out packed batches. {elapsed:.0f} s in all. Command: "
        f"`{command}`. Intervals: 95 % t-intervals over seeds. The bound's D / G is set once so that "
        f"gamma*(WSD-20%) equals the measured best WSD-20% LR ({analysis['tuned_wsd_lr']:.4g}); "
        "gamma* ratios do not depend on it.\n"]
  if analysis.get("curves"):
    md.append("## (i) Same peak LR: final losses beside the bound\n")
    md.append(f"Peak LR {plan.lr:g}. The bound's scale is arbitrary (D·G); its order is the prediction.\n")
    md.append(markdown_table([dict(schedule=c["schedule"], final_val_loss=fmt_ci(c["final_val"], 4),
                                   final_train_loss=fmt_ci(c["final_train"], 4), bound=c["bound"])
                              for c in analysis["curves"]], ["schedule", "final_val_loss", "final_train_loss", "bound"]))
    md.append(f"Rank correlation (Spearman) of measured final validation loss and bound: "
              f"{analysis.get('curves_spearman', float('nan')):.2f}.\n")
  if analysis.get("lr_ratio_rows"):
    md.append("## (ii) Best LR per schedule: measured vs the bound's ratio to cosine\n")
    md.append(f"Grid {', '.join(f'{x:.3g}' for x in plan.lr_grid)}. best_lr: per seed, the vertex of a "
              "parabola in log LR through the grid's best point and its neighbours; measured_ratio: the "
              "geometric mean over seeds of best_lr / best_lr(cosine) with its 95 % interval; "
              "predicted_ratio: gamma*(schedule) / gamma*(cosine) of the bound; at_grid_edge: seeds whose "
              "best grid point was the first or last.\n")
    md.append(markdown_table(analysis["lr_ratio_rows"],
                             ["schedule", "best_lr", "measured_ratio", "ratio_ci", "predicted_ratio",
                              "best_lr_pooled", "at_grid_edge", "best_final_val"]))
    md.append(f"Spearman(measured, predicted ratio) = {analysis['lr_ratio_spearman']:.2f}; mean |log(measured / "
              f"predicted)| = {analysis['lr_ratio_log_error']:.2f}.\n")
  if analysis.get("cooldown"):
    md.append("## (iii) Cooldown fraction (WSD linear, at the tuned WSD-20% LR)\n")
    md.append(markdown_table([dict(decay_frac=c["decay_frac"], final_val_loss=fmt_ci(c["final_val"], 4),
                                   bound=c["bound"], gamma_star=c["gamma_star"],
                                   bound_at_own_gamma_star=c["bound_at_own_gamma"])
                              for c in analysis["cooldown"]],
                             ["decay_frac", "final_val_loss", "bound", "gamma_star", "bound_at_own_gamma_star"]))
    md.append(f"Spearman(measured mean final loss, bound at the same LR) = {analysis['cooldown_spearman']:.2f}; "
              f"per seed {fmt_ci(analysis['cooldown_spearman_seeds'], 2)} "
              f"({', '.join(f'{x:.2f}' for x in analysis['cooldown_spearman_per_seed'])}).\n")
  if analysis.get("horizon"):
    md.append(f"## (iv) Horizon transfer: the tuned {T}-step WSD run extended to {2 * T} steps\n")
    rows = []
    for h in analysis["horizon"]:
      opts = ", ".join(f"{k}={v:.3g}" for k, v in h["options"].items())
      rows.append(dict(run=h["run"], steps=h["steps"], lr=h["lr"], schedule=f"{h['schedule']} ({opts})",
                       final_val_loss=fmt_ci(h["final_val"], 4),
                       gain_vs_same_lr=fmt_ci(h["gain_vs_same_lr"], 4) if h["gain_vs_same_lr"] else "",
                       sd=h["final_val"]["sd"], bound=h["bound"]))
    md.append(markdown_table(rows, ["run", "steps", "lr", "schedule", "final_val_loss", "sd", "gain_vs_same_lr",
                                    "bound"]))
    md.append(f"gain_vs_same_lr: final loss of `wsd_2T_same_lr` minus the run's, paired by seed (> 0: better). "
              f"**Paper, a different scale** ({PAPER['models']} models, {PAPER['steps']} steps): the two-stage "
              f"extension gains {PAPER['horizon_gain'][0]}–{PAPER['horizon_gain'][1]} in final validation "
              "loss over the same-LR extension.\n")
  return "\n".join(md)


def plot(records: list[dict], analysis: dict, plan: Plan, output: Output) -> None:
  plt = pyplot()
  import numpy as np

  from tlt_jax.train import optim
  T, W, k = plan.steps, plan.warmup, analysis["d_over_g"]
  colors = dict(constant="tab:gray", cosine="tab:blue", wsd="tab:orange", wsd_sqrt="tab:green")

  def mean_curve(runs, key):
    steps = [p[0] for p in runs[0][key]]
    return np.array(steps), np.mean([[p[1] for p in r[key]] for r in runs], axis=0)

  # (i) curves
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  for label, schedule, options in SCHEDULES:
    runs = [r for r in records if r["part"] == "sweep" and r["label"] == label
            and math.isclose(r["lr"], plan.lr, rel_tol=1e-6)]
    if not runs:
      continue
    x, y = mean_curve(runs, "train_curve")
    axes[0].plot(x, y, color=colors[label], label=label)
    x, y = mean_curve(runs, "val_curve")
    axes[1].plot(x, y, color=colors[label], label=label, marker=".")
    curve = optim.bound_curve(plan.lr * shape(schedule, options, T, W), D=k, G=1.0)
    axes[2].plot(np.arange(1, T + 1), curve, color=colors[label], label=label)
  for ax, title in zip(axes, ["train loss (window mean, over seeds)", "held-out loss (mean over seeds)",
                              "bound Omega_t (same peak LR, D/G calibrated)"]):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  for ax in axes[:2]:
    lo = min(line.get_ydata().min() for line in ax.get_lines()) if ax.get_lines() else 0
    ax.set_ylim(lo * 0.95, lo * 2.5 if lo > 0 else None)
  finite = [line.get_ydata()[np.isfinite(line.get_ydata())] for line in axes[2].get_lines()]
  if finite:
    lo = min(f.min() for f in finite)
    axes[2].set_ylim(lo * 0.9, lo * 3)
  fig.suptitle(f"(i) Schedules at peak LR {plan.lr:g}: measured loss vs the convex bound")
  fig.tight_layout()
  output.figure(fig, "lr_schedules_curves.png")

  # (ii) sweep: measured final loss vs LR, bound vs LR
  sweep = analysis.get("sweep", {})
  if sweep:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    grid = np.geomspace(min(plan.lr_grid) / 2, max(plan.lr_grid) * 2, 60)
    for label, schedule, options in SCHEDULES:
      s = sweep.get(label)
      if not s or not s["lrs"]:
        continue
      axes[0].plot(s["lrs"], s["mean_final"], marker="o", color=colors[label], label=label)
      for seed, (lr, _) in s["per_seed"].items():
        axes[0].axvline(lr, color=colors[label], alpha=0.25, lw=1)
      b = [bound_at(g, schedule, options, T, W, k) for g in grid]
      axes[1].plot(grid, b, color=colors[label], label=label)
      axes[1].axvline(optim.optimal_base_lr(schedule, T, D=k, warmup_steps=W, **options).lr,
                      color=colors[label], ls="--", lw=1)
    axes[0].set_title("measured final held-out loss (mean over seeds; thin: best LR per seed)", fontsize=9)
    axes[1].set_title("bound at T (dashed: gamma*)", fontsize=9)
    for ax in axes:
      ax.set_xscale("log")
      ax.set_xlabel("peak LR")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    fig.suptitle("(ii) LR sweep per schedule")
    fig.tight_layout()
    output.figure(fig, "lr_schedules_sweep.png")

  # (iii) cooldown
  cd = analysis.get("cooldown", [])
  if cd:
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    x = [c["decay_frac"] for c in cd]
    m = [c["final_val"]["mean"] for c in cd]
    err = [[c["final_val"]["mean"] - c["final_val"]["lo"] for c in cd],
           [c["final_val"]["hi"] - c["final_val"]["mean"] for c in cd]]
    err = np.nan_to_num(np.array(err))
    ax.errorbar(x, m, yerr=err, marker="o", color="tab:orange", label="measured (95% CI)")
    ax.set_xlabel("cooldown fraction")
    ax.set_ylabel("final held-out loss")
    ax2 = ax.twinx()
    ax2.plot(x, [c["bound"] for c in cd], marker="s", color="k", ls="--", label="bound (same LR)")
    ax2.set_ylabel("bound")
    ax.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper right", fontsize=8)
    ax.set_title(f"(iii) WSD cooldown fraction, Spearman {analysis.get('cooldown_spearman', float('nan')):.2f}",
                 fontsize=10)
    fig.tight_layout()
    output.figure(fig, "lr_schedules_cooldown.png")

  # (iv) horizon
  hz = [r for r in records if r["part"] == "horizon"]
  if hz:
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    names = [h["run"] for h in analysis["horizon"]]
    palette = dict(wsd_T="tab:gray", wsd_2T_same_lr="tab:red", wsd_2T_bound_lr="tab:blue",
                   two_stage_2T="tab:green")
    for name in names:
      runs = [r for r in hz if r["label"] == name]
      x, y = mean_curve(runs, "val_curve")
      axes[0].plot(x, y, color=palette[name], label=name, marker=".")
      r0 = runs[0]
      axes[1].plot(np.arange(r0["steps"]), r0["lr"] * shape(r0["schedule"], r0["options"], r0["steps"],
                                                           r0["warmup"]), color=palette[name], label=name)
    lo = min(line.get_ydata().min() for line in axes[0].get_lines())
    axes[0].set_ylim(lo * 0.95, lo * 1.8)
    axes[0].set_title("held-out loss (mean over seeds)", fontsize=10)
    axes[1].set_title("learning rate", fontsize=10)
    for ax in axes:
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
      ax.legend(fontsize=8)
    fig.suptitle(f"(iv) Extending a tuned {T}-step WSD run to {2 * T} steps")
    fig.tight_layout()
    output.figure(fig, "lr_schedules_horizon.png")


# --- the experiment --------------------------------------------------------------------------


def build(config, plan: Plan, workdir: str):
  """(setup, held-out batches) of the experiment's config: the main job's config with the small
  SFT batch of CONFIG_OVERRIDES, validated."""
  from tlt_jax import config as config_lib
  from tlt_jax import run as run_lib
  config = config_lib.finalize(with_overrides(config, {**CONFIG_OVERRIDES, "sft.steps": plan.steps,
                                                        "sft.warmup_steps": plan.warmup}))
  setup = run_lib.build_setup(config, workdir)
  return setup, heldout_batches(setup, plan.heldout_batches)


def planned_runs(plan: Plan, parts: set[str], tuned_lr: float | None = None) -> list[dict]:
  """The runs of `parts`; (iii) and (iv) need the tuned WSD-20% LR (from (ii))."""
  from tlt_jax.train import optim
  T, W = plan.steps, plan.warmup
  runs = []
  if "ii" in parts or "i" in parts:
    factors = plan.lr_factors if "ii" in parts else (1.0,)
    for f in factors:
      for seed in plan.seeds:
        for label, schedule, options in SCHEDULES:
          runs.append(dict(part="sweep", label=label, schedule=schedule, options=options, lr=plan.lr * f,
                           steps=T, seed=seed))
  if tuned_lr is not None and "iii" in parts:
    for seed in plan.seeds:
      for c in plan.cooldowns:
        runs.append(dict(part="cooldown", label=f"wsd_c{c:g}", schedule="wsd", options={"decay_frac": c},
                         lr=tuned_lr, steps=T, seed=seed))
  if tuned_lr is not None and "iv" in parts:
    bound_lr = tuned_lr * optim.optimal_base_lr("wsd", 2 * T, warmup_steps=W, decay_frac=0.2).lr / \
        optim.optimal_base_lr("wsd", T, warmup_steps=W, decay_frac=0.2).lr
    two = optim.two_stage_options(T, 2 * T, decay_frac=0.2, warmup_steps=W)
    for seed in plan.seeds:
      runs += [dict(part="horizon", label="wsd_T", schedule="wsd", options={"decay_frac": 0.2}, lr=tuned_lr,
                    steps=T, seed=seed),
               dict(part="horizon", label="wsd_2T_same_lr", schedule="wsd", options={"decay_frac": 0.2},
                    lr=tuned_lr, steps=2 * T, seed=seed),
               dict(part="horizon", label="wsd_2T_bound_lr", schedule="wsd", options={"decay_frac": 0.2},
                    lr=bound_lr, steps=2 * T, seed=seed),
               dict(part="horizon", label="two_stage_2T", schedule="wsd_two_stage", options=two,
                    lr=tuned_lr, steps=2 * T, seed=seed)]
  return runs


def execute(runs: list[dict], setup, heldout, plan: Plan, done: dict, sink) -> list[dict]:
  """Runs what `done` (key -> record) lacks; each record goes to `sink` and one compact JSON line."""
  from tlt_jax.utils.console import say
  records = []
  for spec in runs:
    key = run_key(spec["part"], spec["label"], spec["lr"], spec["steps"], spec["seed"])
    if key in done:
      records.append(done[key])
      continue
    rec = train_run(setup, heldout, warmup=plan.warmup, eval_every=plan.eval_every, **spec)
    done[key] = rec
    records.append(rec)
    sink(rec)
    say(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in rec.items()
                    if k not in ("val_curve", "train_curve", "key")}))
  return records


def run_all(config, plan: Plan, parts: set[str], workdir: str, out_dir: str, resume: bool = False,
            command: str = "") -> dict:
  """The whole experiment; returns the analysis (also written as OUT/lr_schedules.{jsonl,md} and
  PNGs)."""
  from tlt_jax.utils.compile_cache import enable_compile_cache
  enable_compile_cache()  # every run of a horizon compiles the same step: later ones load it
  output = Output(out_dir)
  path = output.path("lr_schedules.jsonl")
  done = {}
  if resume and os.path.isfile(path):
    from tlt_jax.utils.metrics import read_jsonl
    done = {r["key"]: r for r in read_jsonl(path) if "key" in r}
  t0 = time.perf_counter()
  setup, heldout = build(config, plan, workdir)
  with output.jsonl("lr_schedules.jsonl", append=resume) as sink:
    records = execute(planned_runs(plan, parts), setup, heldout, plan, done, sink)
    tuned = analyse(records, plan)["tuned_wsd_lr"]
    records += execute(planned_runs(plan, parts - {"i", "ii"}, tuned), setup, heldout, plan, done, sink)
  return finish(records, plan, out_dir, time.perf_counter() - t0, command)


def finish(records, plan, out_dir, elapsed, command) -> dict:
  analysis = analyse(records, plan)
  output = Output(out_dir)
  output.markdown("lr_schedules.md", report(analysis, plan, elapsed, command))
  plot(records, analysis, plan, output)
  return analysis


def main(argv):
  del argv
  from tlt_jax.errors import ConfigError
  args = flags.FLAGS
  plan = make_plan(args.size, args.seeds, args.steps, args.lr)
  parts = {p.strip() for p in args.parts.split(",") if p.strip()}
  if not parts or parts - {"i", "ii", "iii", "iv"}:
    raise ConfigError(f"--parts={args.parts!r} is not allowed; allowed: a comma-separated subset of i,ii,iii,iv")
  command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
  if args.report_only:
    from tlt_jax.utils.metrics import read_jsonl
    path = os.path.join(args.out, "lr_schedules.jsonl")
    if not os.path.isfile(path):
      raise ConfigError(f"--report_only: {path} does not exist; allowed: an --out directory holding the "
                        "lr_schedules.jsonl of an earlier run")
    records = read_jsonl(path)
    analysis = finish(records, plan, args.out, sum(r["time_s"] for r in records), command)
  else:
    import tempfile
    analysis = run_all(_CONFIG.value, plan, parts, tempfile.mkdtemp(prefix="lr_schedules_"), args.out,
                       args.resume, command)
  with open(os.path.join(args.out, "lr_schedules.md")) as f:
    print(f.read(), flush=True)
  del analysis


if __name__ == "__main__":
  run_experiment(main)
