"""PRIME vs outcome-only RLOO: sample efficiency of implicit process rewards.

Cui et al. (2025), "Process Reinforcement through Implicit Rewards" (PRIME): an implicit PRM
(a language model pi_psi against the frozen SFT policy, r_t = beta log pi_psi / pi_ref), trained
online on outcome labels only, adds dense token rewards to RLOO. The paper reports ~2.5x sample
efficiency over outcome-only RLOO and +16.7 points average over its SFT model (Eurus-2-7B-PRIME,
7 math/coding benchmarks).

Here, from ONE SFT policy (the main job's `--workdir`, made there when missing), two RL runs with
the same seeds, steps, prompts filter and config (configs/prime.py), differing only in the PRM:

  rloo    rloo_returns with rl.token_rewards.prime = 0: RLOO on the verifier's outcome, whitened
  prime   rloo_returns + the implicit PRM's process rewards (prime.*), the paper's recipe

Both keep the groups whose accuracy lies in rl.accuracy_band (PRIME's online filter), refilled
from fresh prompts, so rollouts per step vary: every curve is also drawn against the number of
sampled responses (`rollouts_total`, dropped groups included). Measured:

  held-out sampled accuracy (T = 1, a fixed set, the same key: coupled samples) vs step and vs
            rollouts, every `--eval_every` steps
  prm_accuracy  the PRM's outcome prediction sign(sum_t r_t) vs the verifier, on each batch
            BEFORE the PRM learns from it
  sample efficiency  rollouts the baseline needs to reach the target accuracy (default: the
            best held-out accuracy the baseline reached) / rollouts PRIME needs (linear
            interpolation between evaluations)

  python experiments/prime.py [--workdir runs/default] [--steps 40] [--out DIR] [--config.prime.lr=3e-4 ...]

(the config defaults to configs/prime.py)

Prints JSON lines (one per evaluation and a summary) and writes DIR/prime.{jsonl,md,png}. The RL
runs live in WORKDIR/prime/<run>/ (a rerun resumes finished ones). Speculative decoding and the
drafter are off (lossless: they change the time, not the results).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import ROOT, build_trainer, enable_compile_cache, run_experiment, with_overrides  # noqa: E402

PRIME_CONFIG = os.path.join(ROOT, "configs", "prime.py")
RUNS = {"rloo": {"rl.token_rewards.prime": 0.0}, "prime": {}}
PAPER = ("Paper (Eurus-2-7B-SFT -> Eurus-2-7B-PRIME, Qwen2.5-Math-7B base, 7 math/coding "
         "benchmarks): PRIME reaches RLOO's final training reward with ~40% of the steps (about "
         "2.5x sample efficiency) and improves the SFT model by +16.7 points on average. A 7B "
         "model, thousands of prompts per step; ours is a tiny policy (configs/prime.py:small: 4 "
         "layers, d=64) on reversed addition of up to 4 digits: a different scale.")


def define_flags():
  from absl import flags
  flags.DEFINE_string("workdir", "runs/default", "main-job workdir holding sft/ (made there when missing)")
  flags.DEFINE_string("out", "experiments/results/prime", "output directory")
  flags.DEFINE_integer("steps", 40, "RL steps per run")
  flags.DEFINE_integer("eval_every", 5, "held-out evaluation every this many steps")
  flags.DEFINE_integer("eval_size", 256, "fixed held-out prompts (one sample each, T = rollout temperature)")
  flags.DEFINE_float("target", 0.0, "target held-out accuracy (0: the best the baseline reached)")
  flags.DEFINE_bool("quick", False, "150 SFT steps when the policy is missing")
  from tlt_jax import cli
  return cli.define_config_flag(PRIME_CONFIG)


def ensure_policy(workdir: str, config, quick: bool = False):
  """(setup, SFT policy) of the main job's `workdir`, its SFT stage run there when missing."""
  from tlt_jax import config as config_lib
  from tlt_jax import run as run_lib
  config = config_lib.finalize(with_overrides(config, {"stages": "sft", **({"sft.steps": 150} if quick else {})}))
  setup = run_lib.build_setup(config, workdir)
  return setup, run_lib.run_sft_stage(setup)


def run_overrides(steps: int, eval_every: int, eval_size: int) -> dict:
  return {"rl.steps": steps, "rl.sample_eval_every": eval_every, "rl.sample_eval_size": eval_size,
          "rl.eval_size": 0, "rl.checkpoint_every": max(steps, 1),
          "tlt.speculative": False, "tlt.train_drafter": False}


def run_pair(base, setup, policy, runs_dir: str, overrides: dict, out=None) -> dict:
  """The two runs from `policy`: {run: {"records": per-step metrics, "evals": held-out evals}}."""
  from tlt_jax.utils.console import say
  from tlt_jax.utils.metrics import read_jsonl
  runs = {}
  for name, own in RUNS.items():
    trainer = build_trainer(name, base, {**overrides, **own}, setup, policy, None, runs_dir)
    trainer.run()
    records = read_jsonl(trainer.writer.path)
    evals = read_jsonl(os.path.join(trainer.workdir, "rl_eval.jsonl"))
    rollouts = {0: 0, **{r["step"]: r["rollouts_total"] for r in records}}
    for e in evals:
      e["rollouts"] = rollouts[e["step"]]
      rec = {"kind": "eval", "run": name, "step": e["step"], "rollouts": e["rollouts"],
             "eval_accuracy": round(e["eval_accuracy"], 4)}
      say(json.dumps(rec))
      if out:
        out.write(json.dumps(rec) + "\n")
    if out:
      for r in records:
        out.write(json.dumps({"kind": "rl", "run": name, **{k: r.get(k) for k in (
            "step", "rollouts_total", "accuracy", "reward_mean", "prm_accuracy", "prm_loss",
            "token_reward_mean", "groups_dropped", "rollout_rounds", "step_time_s")}}) + "\n")
    runs[name] = {"records": records, "evals": evals}
  return runs


def rollouts_to_reach(evals: list[dict], target: float) -> float | None:
  """Rollouts at which the held-out accuracy first reaches `target` after RL started, linearly
  interpolated from the evaluation before when that one was below (None when it never does)."""
  for prev, cur in zip(evals, evals[1:]):
    if cur["eval_accuracy"] >= target:
      if prev["eval_accuracy"] >= target:  # only the SFT start (step 0) can be above already
        return float(cur["rollouts"])
      frac = (target - prev["eval_accuracy"]) / (cur["eval_accuracy"] - prev["eval_accuracy"])
      return float(prev["rollouts"] + frac * (cur["rollouts"] - prev["rollouts"]))
  return None


def summarize(runs: dict, target: float = 0.0) -> dict:
  """Sample efficiency and the final figures of both runs."""
  base, prime = runs["rloo"]["evals"], runs["prime"]["evals"]
  target = target or max(e["eval_accuracy"] for e in base[1:])  # the best RLOO reached
  need_base, need_prime = rollouts_to_reach(base, target), rollouts_to_reach(prime, target)
  prm = [r["prm_accuracy"] for r in runs["prime"]["records"] if r.get("prm_accuracy") is not None]
  half = len(prm) // 2
  out = {"target_accuracy": target, "sft_accuracy": base[0]["eval_accuracy"],
         "rollouts_to_target": {"rloo": need_base, "prime": need_prime},
         "sample_efficiency": (need_base / need_prime) if need_base and need_prime else None,
         "final_accuracy": {k: v["evals"][-1]["eval_accuracy"] for k, v in runs.items()},
         "best_accuracy": {k: max(e["eval_accuracy"] for e in v["evals"]) for k, v in runs.items()},
         "rollouts_total": {k: v["records"][-1]["rollouts_total"] for k, v in runs.items()},
         "prm_accuracy_first_half": float(np.mean(prm[:half])) if half else None,
         "prm_accuracy_second_half": float(np.mean(prm[half:])) if prm else None,
         "step_time_s": {k: float(np.median([r["step_time_s"] for r in v["records"]])) for k, v in runs.items()}}
  out["gain_over_sft_points"] = {k: 100 * (a - out["sft_accuracy"]) for k, a in out["final_accuracy"].items()}
  if need_prime is None:
    out["note"] = "PRIME never reached the target accuracy within its rollouts"
  return out


def _fmt0(x) -> str:
  return "not reached" if x is None else f"{x:.0f}"


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def write_markdown(path: str, summary: dict, runs: dict, args_line: str, elapsed: float) -> None:
  from tlt_jax.utils.metrics import markdown_table
  rows = []
  for name, v in runs.items():
    for e in v["evals"]:
      rows.append({"run": name, "step": e["step"], "rollouts": e["rollouts"], "eval_accuracy": e["eval_accuracy"]})
  s = summary
  eff = s["sample_efficiency"]
  md = ["# PRIME vs outcome-only RLOO (tiny scale)\n",
        f"{args_line}; {elapsed:.0f} s on this machine's CPU (shared, loaded: times are not benchmarks).\n",
        "## Summary\n",
        "| figure | RLOO (outcome only) | RLOO + PRIME | paper (7B, different scale) |",
        "|---|---|---|---|",
        f"| held-out sampled accuracy, SFT start | {s['sft_accuracy']:.3f} | {s['sft_accuracy']:.3f} | |",
        f"| final held-out accuracy | {s['final_accuracy']['rloo']:.3f} | {s['final_accuracy']['prime']:.3f} | |",
        f"| gain over SFT (points) | {s['gain_over_sft_points']['rloo']:+.1f} | {s['gain_over_sft_points']['prime']:+.1f} | +16.7 (PRIME, avg. of 7 benchmarks) |",
        f"| rollouts to reach {s['target_accuracy']:.3f} (RLOO's best) | {_fmt0(s['rollouts_to_target']['rloo'])} | "
        f"{_fmt0(s['rollouts_to_target']['prime'])} | |",
        f"| sample efficiency (RLOO / PRIME rollouts) | 1 | {'n/a' if eff is None else f'{eff:.2f}x'} | ~2.5x |",
        f"| rollouts sampled in all | {s['rollouts_total']['rloo']} | {s['rollouts_total']['prime']} | |",
        f"| PRM outcome-prediction accuracy (first / second half of the steps) | | "
        f"{_fmt(s['prm_accuracy_first_half'])} / {_fmt(s['prm_accuracy_second_half'])} | |",
        f"| median step time (s) | {s['step_time_s']['rloo']:.2f} | {s['step_time_s']['prime']:.2f} | |",
        "\n## Held-out accuracy per evaluation\n", markdown_table(rows, ["run", "step", "rollouts", "eval_accuracy"]),
        "\n## The paper\n", PAPER + "\n"]
  if s.get("note"):
    md.insert(3, f"**{s['note']}.**\n")
  with open(path, "w") as f:
    f.write("\n".join(md))


def plot(runs: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for name, v in runs.items():
    ev = v["evals"]
    axes[0].plot([e["step"] for e in ev], [e["eval_accuracy"] for e in ev], marker="o", label=name)
    axes[1].plot([e["rollouts"] for e in ev], [e["eval_accuracy"] for e in ev], marker="o", label=name)
  recs = runs["prime"]["records"]
  axes[2].plot([r["step"] for r in recs], [r.get("prm_accuracy") for r in recs], marker=".", label="PRM")
  axes[2].plot([r["step"] for r in recs], [max(r["accuracy"], 1 - r["accuracy"]) for r in recs], ls="--",
               label="majority-class baseline")
  for ax, (x, y, t) in zip(axes, (("RL step", "held-out sampled accuracy", "accuracy vs step"),
                                   ("rollouts (sampled responses)", "held-out sampled accuracy", "accuracy vs rollouts"),
                                   ("RL step", "outcome-prediction accuracy", "implicit PRM on fresh batches"))):
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(t)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  from absl import flags
  args = flags.FLAGS
  enable_compile_cache()
  from tlt_jax.utils.console import say
  base = args["config"].value
  setup, policy = ensure_policy(args.workdir, base, quick=args.quick)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  with open(os.path.join(args.out, "prime.jsonl"), "w") as out:
    runs = run_pair(base, setup, policy, os.path.join(args.workdir, "prime"),
                    run_overrides(args.steps, args.eval_every, args.eval_size), out)
    summary = summarize(runs, args.target)
    out.write(json.dumps({"kind": "summary", **summary}) + "\n")
  elapsed = time.perf_counter() - t0
  given = " ".join(a for a in sys.argv[1:] if a.startswith("--config")) or "configs/prime.py"
  args_line = (f"From the SFT policy of `{args.workdir}`; {args.steps} RL steps per run, {given}, "
               f"held-out evaluation of {args.eval_size} fixed prompts every {args.eval_every} steps")
  write_markdown(os.path.join(args.out, "prime.md"), summary, runs, args_line, elapsed)
  plot(runs, os.path.join(args.out, "prime.png"))
  say(json.dumps({"kind": "summary", **summary, "elapsed_s": round(elapsed, 1)}))


if __name__ == "__main__":
  from tlt_jax import cli
  cli.set_cpu_devices(sys.argv, minimum=2)  # a fake device per rollout group; before jax is imported
  define_flags()
  run_experiment(main)
