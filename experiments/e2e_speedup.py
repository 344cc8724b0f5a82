"""End-to-end RL speed-up of TLT: the same RL run three ways, side by side.

  plain   no speculative decoding            (tlt.speculative=False, tlt.train_drafter=False)
  static  speculative tails, frozen drafter  (tlt.speculative=True,  tlt.train_drafter=False)
  tlt     speculative tails, drafter trained in the rollout groups' bubbles (the default)

All three start from the main job's SFT policy and warmed-up drafter (taken from `--workdir`,
made there by its `sft` and `drafter` stages when missing), use the same seeds, config, rollout
groups and number of steps, and run in ONE process with their steps interleaved (step 1 of
each, then step 2 of each, the order rotating), so that the load of a shared machine drifts over
all three alike and none always profits from compilations another one left in the cache. Sampling is lossless, so the reward and accuracy curves
agree in distribution (not sample for sample: speculative sampling draws other random numbers).

  python experiments/e2e_speedup.py [--quick] [--steps N] [--workdir runs/default] [--out DIR] \
      [--config=configs/default.py] [--config.a.b=v ...]   (overrides for all variants)

Prints one JSON line per (variant, step), then one per variant:
  {"variant", "median_step_s", "median_rollout_s", "speedup_step", "speedup_rollout", ...}
and writes DIR/e2e_speedup.{jsonl,md,png}. Medians skip the first `--warmup` steps of each
variant (compilation).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tlt_jax import cli  # noqa: E402

cli.set_cpu_devices(sys.argv, minimum=2)  # a fake device per rollout group; before jax is imported

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments.common import (DEFAULT_CONFIG, Output, build_trainer, define_output_flags,  # noqa: E402
                                enable_compile_cache, ensure_policy_and_drafter, pyplot, run_experiment)

_CONFIG = cli.define_config_flag(DEFAULT_CONFIG)
define_output_flags("experiments/results/e2e_speedup", workdir="runs/default")
flags.DEFINE_integer("steps", 0, "RL steps per variant (default: the config's rl.steps)")
flags.DEFINE_bool("quick", False, "8 steps per variant")
flags.DEFINE_integer("warmup", 5, "first steps left out of the medians (compiles)")
flags.DEFINE_string("variants", "plain,static,tlt", "comma-separated variants")
flags.DEFINE_bool("report_only", False, "rebuild the table and plot from DIR's jsonl")

VARIANTS = {
    "plain": {"tlt.speculative": False, "tlt.train_drafter": False},
    "static": {"tlt.speculative": True, "tlt.train_drafter": False},
    "tlt": {"tlt.speculative": True, "tlt.train_drafter": True},
}


def main(argv):
  del argv
  args = flags.FLAGS
  if args.report_only:
    return report_from_jsonl(args)
  enable_compile_cache()

  import jax

  from tlt_jax.utils.console import progress, say

  base = _CONFIG.value
  steps = args.steps or (8 if args.quick else int(base.rl.steps))
  common = {"rl.steps": steps, "rl.eval_size": 0, "rl.sample_eval_every": 0}
  setup, policy, drafter = ensure_policy_and_drafter(args.workdir, quick=args.quick, config=base)
  names = args.variants.split(",")
  output = Output(args.out)
  runs = os.path.join(args.workdir, "e2e_speedup")  # the trainers' own files (beside the main job's)
  trainers = {n: build_trainer(n, base, {**common, **VARIANTS[n]}, setup, policy, drafter, runs)
              for n in names}
  print(json.dumps({"devices": len(jax.devices()), "mesh": dict(setup.mesh.shape),
                    "rollout_groups": int(base.tlt.rollout_groups), "steps": steps}), flush=True)

  records = {n: [] for n in names}
  keep = ("step", "step_time_s", "rollout_time_s", "update_time_s", "logprob_time_s", "reward_mean",
          "accuracy", "response_len_mean", "response_len_max", "accept_len", "spec_frac", "tail_frac", "tail_time_frac", "bubble_s",
          "bubble_utilisation", "drafter_steps", "drafter_version", "idle_group_s", "drafter_train_s",
          "preempt_wait_s")
  t_start = time.perf_counter()
  bar = progress(steps * len(names), "e2e")
  with output.jsonl("e2e_speedup.jsonl") as write:
    for step in range(1, steps + 1):
      for n in names[(step - 1) % len(names):] + names[:(step - 1) % len(names)]:  # rotate who goes first
        record = trainers[n].step(step)
        rec = {"variant": n, **{k: record.get(k) for k in keep}}
        records[n].append(rec)
        write(rec)
        say(json.dumps(rec))
        bar.update(1)
        bar.set_postfix(variant=n, step=step, t=f"{rec['step_time_s']:.2f}s")
  bar.close()
  elapsed = time.perf_counter() - t_start
  collect_traces(runs, names, steps, output)

  summary = summarise(records, names, args.warmup)
  for row in summary:
    print(json.dumps(row), flush=True)
  write_report(args, summary, records, names, steps, elapsed)
  plot(records, names, output)


def collect_traces(runs: str, names, steps: int, output: Output) -> None:
  """Every variant's per-step rollout traces (the trainers' `traces.jsonl`, TLTRuntime.trace),
  tagged with the variant, into one file for `experiments/pod_sim.py --validate`."""
  with output.jsonl("traces.jsonl") as write:
    for n in names:
      src = os.path.join(runs, n, "traces.jsonl")
      if not os.path.exists(src):
        continue
      latest = {}
      with open(src) as f:
        for line in f:
          tr = json.loads(line)
          if tr["step"] <= steps:
            latest[tr["step"]] = tr  # a rerun's step replaces an earlier run's
      for step in sorted(latest):
        write({"variant": n, **latest[step]})


def report_from_jsonl(args):
  from tlt_jax.errors import ConfigError
  path = os.path.join(args.out, "e2e_speedup.jsonl")
  if not os.path.isfile(path):
    raise ConfigError(f"--report_only: {path} does not exist; allowed: an --out directory holding the "
                      "e2e_speedup.jsonl of an earlier run")
  records: dict[str, list] = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      records.setdefault(rec["variant"], []).append(rec)
  names = [n for n in args.variants.split(",") if n in records]
  summary = summarise(records, names, args.warmup)
  for row in summary:
    print(json.dumps(row), flush=True)
  steps = len(records[names[0]])
  write_report(args, summary, records, names, steps, float("nan"))
  plot(records, names, Output(args.out))


def summarise(records, names, warmup):
  med = lambda n, k: float(np.median([r[k] for r in records[n][warmup:] if r.get(k) is not None] or [np.nan]))  # noqa: E731
  mean = lambda n, k: float(np.mean([r[k] for r in records[n] if isinstance(r.get(k), (int, float))] or [np.nan]))  # noqa: E731
  base = names[0]
  rows = []
  for n in names:
    step_s, roll_s = med(n, "step_time_s"), med(n, "rollout_time_s")
    rows.append(dict(
        variant=n, median_step_s=step_s, median_rollout_s=roll_s,
        speedup_step=med(base, "step_time_s") / step_s, speedup_rollout=med(base, "rollout_time_s") / roll_s,
        rollout_frac=roll_s / step_s, amdahl_bound=1.0 / max(1.0 - roll_s / step_s, 1e-9),
        reward_mean=mean(n, "reward_mean"), accuracy=mean(n, "accuracy"),
        accept_len=mean(n, "accept_len"), spec_frac=mean(n, "spec_frac"), tail_frac=mean(n, "tail_frac"),
        tail_time_frac=mean(n, "tail_time_frac"),
        bubble_s=mean(n, "bubble_s"), bubble_utilisation=mean(n, "bubble_utilisation"),
        drafter_steps=sum(r["drafter_steps"] or 0 for r in records[n]),
        preempt_wait_s=mean(n, "preempt_wait_s")))
  return rows


def write_report(args, summary, records, names, steps, elapsed):
  from tlt_jax.utils.metrics import markdown_table

  cols = ["variant", "median_step_s", "median_rollout_s", "speedup_step", "speedup_rollout", "rollout_frac",
          "amdahl_bound", "reward_mean", "accuracy", "accept_len", "tail_frac", "tail_time_frac", "spec_frac", "bubble_s",
          "bubble_utilisation", "drafter_steps", "preempt_wait_s"]
  given = [a for a in sys.argv[1:] if a.startswith("--config")]
  extra = f" Config: {' '.join(given)}." if given else ""
  md = ["# End-to-end RL speed-up of TLT (interleaved, one process)\n",
        f"Policy/drafter from `{args.workdir}`; {steps} RL steps per variant, medians over steps "
        f"> {args.warmup}; {elapsed:.0f} s in all.{extra} speedup_* are over `{names[0]}`; amdahl_bound = "
        "1 / (1 - rollout share of the step): the most any rollout speed-up can give end to end.\n",
        markdown_table(summary, cols), limits(summary, names)]
  Output(args.out).markdown("e2e_speedup.md", md)


def limits(summary, names) -> str:
  """What bounds the speed-up, from the measured numbers."""
  row = {r["variant"]: r for r in summary}
  base = row[names[0]]
  lines = ["\n## What limits the speed-up here\n",
           f"- Rollout is {100 * base['rollout_frac']:.0f}% of a `{names[0]}` step (the rest is the policy "
           f"update and the old/ref log-prob forwards), so even an infinitely fast rollout gives at most "
           f"{base['amdahl_bound']:.2f}x end to end (Amdahl). TLT's premise is a rollout of ~85% of the step.",
           f"- Per-group bubbles: {base['bubble_s']:.2f} s of idle group time per step without "
           "training (each group holds half the prompts and so its own long tail)."]
  for n in names[1:]:
    r = row[n]
    lines.append(f"- `{n}`: {100 * r['tail_frac']:.1f}% of the tokens (taking {100 * r['tail_time_frac']:.1f}% "
                 f"of the groups' decode time) are decoded at an active batch <= "
                 f"rollout.spec_threshold (the tail where speculation may run; BEG-MAB picks speculation or "
                 f"plain decoding there), {100 * r['spec_frac']:.1f}% speculatively, at a mean accept length "
                 f"of {r['accept_len']:.2f} tokens per round.")
    if r["drafter_steps"]:
      lines.append(f"- `{n}`: {r['drafter_steps']} drafter steps in the bubbles, bubble utilisation "
                   f"{r['bubble_utilisation']:.2f}, preemption wait {1000 * r['preempt_wait_s']:.1f} ms per step.")
  lines.append("- The rollout groups are fake devices over the same 2 cores: an idle group's training takes "
               "cores from the decoding group, and a decode step's cost grows with the batch beyond a few rows "
               "(experiments/rollout_speedup.py), so the tail is cheap and little remains to speed up.")
  return "\n".join(lines) + "\n"


def plot(records, names, output: Output):
  panels = [("step_time_s", "step time (s)"), ("rollout_time_s", "rollout time (s)"),
            ("reward_mean", "reward (mean over the batch)"), ("accuracy", "accuracy (verifier)")]
  fig, axes = pyplot().subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
  for ax, (key, title) in zip(axes, panels):
    for n in names:
      pts = [(r["step"], r[key]) for r in records[n] if isinstance(r.get(key), (int, float))]
      ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=n, alpha=0.85)
    ax.set_title(title)
    ax.set_xlabel("RL step")
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.tight_layout()
  output.figure(fig, "e2e_speedup.png")


if __name__ == "__main__":
  run_experiment(main)
