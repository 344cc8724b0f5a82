"""PRIME vs outcome-only RLOO: sample efficiency of implicit process rewards, over seeds.

Cui et al. (2025), "Process Reinforcement through Implicit Rewards" (PRIME): an implicit PRM
(a language model pi_psi against the frozen SFT policy, r_t = beta log pi_psi / pi_ref), trained
online on outcome labels only, adds dense token rewards to RLOO. The paper reports ~2.5x sample
efficiency over outcome-only RLOO and +16.7 points average over its SFT model (Eurus-2-7B-PRIME,
7 math/coding benchmarks).

Here, from ONE SFT policy (the main job's `--workdir`, made there when missing), two arms with
the same config (configs/prime.py), differing only in the PRM, each run with `--seeds` seeds
(config.seed = base seed + k: prompts, sampling and the held-out set; arm k of RLOO and of PRIME
share them):

  rloo    rloo_returns with rl.token_rewards.prime = 0: RLOO on the verifier's outcome, whitened
  prime   rloo_returns + the implicit PRM's process rewards (prime.*, prime.process_norm =
          batch_norm as in the official code), the paper's recipe

Both keep the groups whose accuracy lies in rl.accuracy_band (PRIME's online filter), refilled
from fresh prompts, so rollouts per step vary: curves are drawn against steps and against the
sampled responses (`rollouts_total`, dropped groups included). Measured:

  held-out sampled accuracy (T = 1, a fixed set per seed, one key: the arms' samples coupled)
            every rl.sample_eval_every steps, rl.sample_eval_size prompts
  target    fixed before any RL run: the seed's SFT held-out accuracy (step 0) + `--target_margin`
  sample efficiency  per seed, rollouts RLOO needs to reach the target / rollouts PRIME needs
            (linear interpolation between evaluations; a run that never reaches it is censored)
  PRM pairwise accuracy  within-group ranking accuracy of the PRM's scores on each batch, before
            and after its update on it (chance 0.5), and the sign accuracy beside it

  python experiments/prime.py [--workdir runs/prime] [--seeds 3] [--target_margin 0.02] [--out DIR] \
      [--config=configs/prime.py:small --config.rl.steps=30 --config.prime.lr=3e-4 ...]

RL steps, evaluation period and size come from the config only (rl.steps, rl.sample_eval_every,
rl.sample_eval_size). Prints JSON lines and writes DIR/prime.{jsonl,png}. The RL runs live in
WORKDIR/prime/<arm>_s<seed>/. Speculative decoding and the drafter are off (lossless: they change
the time, not the results).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

if __package__ in (None, ""):
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import (ROOT, Output, build_trainer, define_output_flags, enable_compile_cache,  # noqa: E402
                                pyplot, run_experiment, with_overrides)

PRIME_CONFIG = os.path.join(ROOT, "configs", "prime.py")
RUNS = {"rloo": {"rl.token_rewards.prime": 0.0}, "prime": {}}
ARMS = tuple(RUNS)
PAPER = ("Paper (Eurus-2-7B-SFT -> Eurus-2-7B-PRIME, Qwen2.5-Math-7B base, 7 math/coding "
         "benchmarks): PRIME reaches RLOO's final training reward with ~40% of the steps (about "
         "2.5x sample efficiency) and improves the SFT model by +16.7 points on average. A 7B "
         "model, thousands of prompts per step; ours is a tiny policy (configs/prime.py:small: 4 "
         "layers, d=64) on reversed addition of up to 4 digits: a different scale.")


def define_flags():
  from absl import flags
  define_output_flags("experiments/results/prime", workdir="runs/prime",
                      workdir_help="main-job workdir holding sft/ (made there when missing)")
  flags.DEFINE_integer("seeds", 3, "seeds per arm (config.seed + 0, 1, ...)")
  flags.DEFINE_float("target_margin", 0.02, "target = the seed's SFT held-out accuracy + this")
  flags.DEFINE_string("prime_run", "prime", "run-directory name of the PRIME arm (a variant of prime.* "
                      "gets its own; the RLOO runs are shared and reused)")
  flags.DEFINE_integer("length_check", 0, "only sample this many training batches from the SFT policy and "
                       "print the within-group ranking accuracy of 'the shorter response is the correct one'")
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


def run_overrides(seed: int, checkpoint_every: int) -> dict:
  """What every run changes in the config: its seed; no drafter, no speculative decoding."""
  return {"seed": seed, "rl.eval_size": 0, "rl.checkpoint_every": max(checkpoint_every, 1),
          "tlt.speculative": False, "tlt.train_drafter": False}


RECORD_KEYS = ("step", "rollouts_total", "accuracy", "reward_mean", "prm_pairwise_acc_before",
               "prm_pairwise_acc_after", "prm_sign_accuracy", "prm_loss", "prm_score_mean",
               "token_reward_mean", "groups_dropped", "rollout_rounds", "step_time_s")


def run_arms(base, setup, policy, runs_dir: str, seeds: list[int], write=None, prime_run: str = "prime") -> dict:
  """Both arms at every seed from `policy`: {arm: {seed: {"records": ..., "evals": ...}}}; the
  runs live in runs_dir/<arm>_s<seed> (the PRIME arm's under `prime_run`), finished ones reused."""
  from tlt_jax.utils.console import say
  from tlt_jax.utils.metrics import read_jsonl
  runs = {arm: {} for arm in ARMS}
  for seed in seeds:
    for arm, own in RUNS.items():
      name = f"{prime_run if arm == 'prime' else arm}_s{seed}"
      trainer = build_trainer(name, base, {**run_overrides(seed, int(base.rl.steps)), **own}, setup, policy, None,
                              runs_dir)
      trainer.run()
      records = read_jsonl(trainer.writer.path)
      evals = read_jsonl(os.path.join(trainer.workdir, "rl_eval.jsonl"))
      rollouts = {0: 0, **{r["step"]: r["rollouts_total"] for r in records}}
      for e in evals:
        e["rollouts"] = rollouts[e["step"]]
        rec = {"kind": "eval", "run": arm, "seed": seed, "step": e["step"], "rollouts": e["rollouts"],
               "eval_accuracy": round(e["eval_accuracy"], 4)}
        say(json.dumps(rec))
        if write:
          write(rec)
      if write:
        for r in records:
          write({"kind": "rl", "run": arm, "seed": seed, **{k: r.get(k) for k in RECORD_KEYS}})
      runs[arm][seed] = {"records": records, "evals": evals}
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


def length_ranking(base, setup, policy, runs_dir: str, batches: int, seed: int) -> dict:
  """Within-group pairwise accuracy (rl/prime.pairwise_accuracy) of the score -length against the
  verifier, on `batches` training batches sampled from `policy` (the filter included): how far
  response length alone ranks correct above wrong answers."""
  from tlt_jax.rl import stages
  from tlt_jax.rl.prime import pairwise_accuracy
  trainer = build_trainer(f"length_check_s{seed}", base, {**run_overrides(seed, 1), "rl.token_rewards.prime": 0.0,
                                                          "rl.sample_eval_every": 0}, setup, policy, None, runs_dir)
  g = int(base.rl.group_size)
  accs = []
  for step in range(1, batches + 1):
    rollout, scores = trainer.sample(step, stages.StageClock())
    lengths = np.asarray(rollout.result.lengths, float).reshape(-1, g)
    accs.append(pairwise_accuracy(-lengths, np.asarray(scores.correct_B, float).reshape(-1, g)))
  return {"kind": "length_check", "seed": seed, "batches": batches, "shorter_is_correct": float(np.nanmean(accs)),
          "per_batch": [round(a, 4) for a in accs]}


def _mean_sd(xs) -> dict:
  xs = [float(x) for x in xs if x is not None and np.isfinite(x)]
  return {"mean": float(np.mean(xs)) if xs else None, "sd": float(np.std(xs, ddof=1)) if len(xs) > 1 else None,
          "n": len(xs), "values": xs}


def summarize(runs: dict, margin: float) -> dict:
  """Per seed: the target (SFT + margin), rollouts to it per arm, their ratio; final accuracies;
  the PRM's pairwise accuracy against chance. Then mean and sd over seeds."""
  seeds = sorted(runs["rloo"])
  per_seed = []
  for seed in seeds:
    base, prime = runs["rloo"][seed]["evals"], runs["prime"][seed]["evals"]
    sft = base[0]["eval_accuracy"]
    target = sft + margin
    need = {arm: rollouts_to_reach(runs[arm][seed]["evals"], target) for arm in ARMS}
    prm = [r for r in runs["prime"][seed]["records"] if r.get("prm_pairwise_acc_before") is not None]
    half = len(prm) // 2
    per_seed.append({
        "seed": seed, "sft_accuracy": sft, "prime_sft_accuracy": prime[0]["eval_accuracy"], "target": target,
        "rollouts_to_target": need,
        "sample_efficiency": need["rloo"] / need["prime"] if need["rloo"] and need["prime"] else None,
        "final_accuracy": {arm: runs[arm][seed]["evals"][-1]["eval_accuracy"] for arm in ARMS},
        "best_accuracy": {arm: max(e["eval_accuracy"] for e in runs[arm][seed]["evals"]) for arm in ARMS},
        "rollouts_total": {arm: runs[arm][seed]["records"][-1]["rollouts_total"] for arm in ARMS},
        "prm_pairwise_before": float(np.mean([r["prm_pairwise_acc_before"] for r in prm])) if prm else None,
        "prm_pairwise_after": float(np.mean([r["prm_pairwise_acc_after"] for r in prm])) if prm else None,
        "prm_pairwise_before_second_half": float(np.mean([r["prm_pairwise_acc_before"] for r in prm[half:]])) if prm else None,
        "prm_sign_accuracy": float(np.mean([r["prm_sign_accuracy"] for r in runs["prime"][seed]["records"]])),
        "batch_accuracy": float(np.mean([r["accuracy"] for r in runs["prime"][seed]["records"]])),
        "step_time_s": {arm: float(np.median([r["step_time_s"] for r in runs[arm][seed]["records"]])) for arm in ARMS}})
  out = {"seeds": seeds, "target_rule": f"the seed's SFT held-out sampled accuracy + {margin:g}", "per_seed": per_seed}
  for key in ("sft_accuracy", "sample_efficiency", "prm_pairwise_before", "prm_pairwise_after",
              "prm_pairwise_before_second_half", "prm_sign_accuracy", "batch_accuracy"):
    out[key] = _mean_sd([s[key] for s in per_seed])
  for key in ("final_accuracy", "best_accuracy", "rollouts_to_target", "rollouts_total", "step_time_s"):
    out[key] = {arm: _mean_sd([s[key][arm] for s in per_seed]) for arm in ARMS}
  out["final_gain_prime_minus_rloo"] = _mean_sd([s["final_accuracy"]["prime"] - s["final_accuracy"]["rloo"]
                                                 for s in per_seed])
  out["reached"] = {arm: sum(s["rollouts_to_target"][arm] is not None for s in per_seed) for arm in ARMS}
  # All PRM batches of all seeds: how often the ranking beats chance.
  prm = [r["prm_pairwise_acc_before"] for seed in seeds for r in runs["prime"][seed]["records"]
         if r.get("prm_pairwise_acc_before") is not None]
  out["prm_batches"] = {"n": len(prm), "above_chance": int(np.sum(np.asarray(prm) > 0.5)),
                        "at_chance": int(np.sum(np.asarray(prm) == 0.5)),
                        "mean": float(np.mean(prm)) if prm else None,
                        "se": float(np.std(prm, ddof=1) / np.sqrt(len(prm))) if len(prm) > 1 else None}
  return out


def _band(ax, xs_SxN, ys_SxN, label):
  x, y = np.mean(xs_SxN, 0), np.asarray(ys_SxN, float)
  line, = ax.plot(x, y.mean(0), marker="o", ms=3, label=f"{label} (mean of {len(y)})")
  ax.fill_between(x, y.min(0), y.max(0), color=line.get_color(), alpha=0.2)


def plot(runs: dict, summary: dict, output: Output) -> None:
  """Held-out accuracy vs step and vs rollouts (mean over seeds, band: min-max), the PRM's
  pairwise accuracy before / after its update per step (mean over seeds, band: min-max)."""
  fig, axes = pyplot().subplots(1, 3, figsize=(14, 3.8))
  seeds = summary["seeds"]
  for arm in ARMS:
    evals = [runs[arm][s]["evals"] for s in seeds]
    n = min(len(e) for e in evals)
    steps = [[e["step"] for e in ev[:n]] for ev in evals]
    rolls = [[e["rollouts"] for e in ev[:n]] for ev in evals]
    accs = [[e["eval_accuracy"] for e in ev[:n]] for ev in evals]
    _band(axes[0], steps, accs, arm)
    _band(axes[1], rolls, accs, arm)
  target = np.mean([s["target"] for s in summary["per_seed"]])
  for ax in axes[:2]:
    ax.axhline(target, color="k", ls=":", lw=0.8, label="target (mean over seeds)")
  for key, label in (("prm_pairwise_acc_before", "before its update"), ("prm_pairwise_acc_after", "after its update")):
    recs = [[r.get(key) for r in runs["prime"][s]["records"]] for s in seeds]
    n = min(len(r) for r in recs)
    y = np.array([[np.nan if v is None else v for v in r[:n]] for r in recs], float)
    x = np.arange(1, n + 1)
    line, = axes[2].plot(x, np.nanmean(y, 0), marker=".", label=label)
    axes[2].fill_between(x, np.nanmin(y, 0), np.nanmax(y, 0), color=line.get_color(), alpha=0.2)
  axes[2].axhline(0.5, color="k", ls=":", lw=0.8, label="chance")
  for ax, (xl, yl, t) in zip(axes, (("RL step", "held-out sampled accuracy", "accuracy vs step"),
                                    ("rollouts (sampled responses, mean over seeds)", "held-out sampled accuracy",
                                     "accuracy vs rollouts"),
                                    ("RL step", "pairwise ranking accuracy", "implicit PRM, within-group ranking"))):
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(t)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  output.figure(fig, "prime.png")


def main(argv):
  del argv
  from absl import flags
  args = flags.FLAGS
  enable_compile_cache()
  from tlt_jax.utils.console import say
  base = args["config"].value
  setup, policy = ensure_policy(args.workdir, base, quick=args.quick)
  output = Output(args.out)
  seeds = [int(base.seed) + k for k in range(args.seeds)]
  if args.length_check:
    say(json.dumps(length_ranking(base, setup, policy, os.path.join(args.workdir, "prime"), args.length_check,
                                  seeds[0])))
    return
  t0 = time.perf_counter()
  with output.jsonl("prime.jsonl") as write:
    runs = run_arms(base, setup, policy, os.path.join(args.workdir, "prime"), seeds, write, args.prime_run)
    summary = summarize(runs, args.target_margin)
    summary["elapsed_s"] = round(time.perf_counter() - t0, 1)
    summary["config"] = {"rl.steps": int(base.rl.steps), "rl.sample_eval_every": int(base.rl.sample_eval_every),
                         "rl.sample_eval_size": int(base.rl.sample_eval_size), "prime": base.prime.to_dict(),
                         "rl.advantage_kwargs": base.rl.advantage_kwargs.to_dict(), "rl.lr": float(base.rl.lr)}
    write({"kind": "summary", **summary})
  plot(runs, summary, output)
  say(json.dumps({"kind": "summary", **{k: v for k, v in summary.items() if k != "per_seed"}}))


if __name__ == "__main__":
  from tlt_jax import cli
  cli.set_cpu_devices(sys.argv, minimum=2)  # a fake device per rollout group; before jax is imported
  define_flags()
  run_experiment(main)
