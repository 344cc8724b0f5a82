"""Efficient reasoning: a family of policies from one knob, the length penalty's alpha, over seeds.

Arora & Zanette (2025), "Training Language Models to Reason Efficiently": RL with the reward

  r_i = 1[correct_i] * (1 - alpha * sigmoid((len_i - mean) / (std + 1e-7)))

(mean and std over the lengths of the CORRECT responses to the same prompt; a response without
EOS scores 0; `rl/rewards.py:length_penalty_reward`), RLOO advantages whitened over the batch,
the loss averaged per sequence and a KL of 0.001 to the SFT policy (configs/efficient_reasoning.py),
one RL run per alpha, gives a family of models that trade accuracy for length.

Here, from ONE SFT policy (the main job's `--workdir`, made there when missing):

  1. LR sweep (`--lrs`): alpha = 0 at each LR (the first seed). The family then uses the largest
     LR at which alpha = 0 keeps its SFT accuracy: sampled AND greedy accuracy on the held-out set
     not below the SFT policy's by more than one binomial standard error. Without `--lrs`, the
     config's rl.lr.
  2. The family: every alpha in `--alphas` (0 included) at `--seeds` seeds (config.seed + k:
     prompts and sampling; the alphas of one seed share them).

Each final policy is evaluated on one fixed held-out set stratified by digits (`--eval_per_digit`
per digit count), greedy and sampled (T = the rollout temperature, `--samples` per prompt):
mean response tokens and accuracy, overall and per difficulty band (easy 1-2, medium 3-5, hard
6-8 digits), re-checks per response. Against alpha = 0 of the same seed: the paired token and
accuracy changes, mean and sd over seeds; a change "exceeds the spread" when |mean| > 2 sd / sqrt(seeds).

  python experiments/efficient_reasoning.py [--workdir runs/er] [--alphas 0,0.1,0.4] [--seeds 3] \
      [--lrs 1e-5,2e-5,5e-5] [--out DIR] [--config=configs/efficient_reasoning.py:small --config.rl.steps=15 ...]

RL steps and every other RL setting come from the config only. Prints JSON lines and writes
DIR/efficient_reasoning.jsonl, DIR/efficient_reasoning_tables.md and the figures
DIR/efficient_reasoning_{pareto,difficulty}.png. The RL runs live in WORKDIR/efficient_reasoning/.
Speculative decoding is lossless, so it is off here (it changes the time, not the results).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments.common import (ROOT, Output, build_trainer, define_output_flags,  # noqa: E402
                                enable_compile_cache, pyplot, run_experiment, with_overrides)

ER_CONFIG = os.path.join(ROOT, "configs", "efficient_reasoning.py")


def define_flags():
  """The command line (a function, so that notebooks import this module without flags)."""
  from absl import flags

  from tlt_jax import cli
  define_output_flags("experiments/results/efficient_reasoning", workdir="runs/er",
                      workdir_help="main-job workdir holding sft/ (made there when missing)")
  flags.DEFINE_string("alphas", "0,0.1,0.4", "length-penalty alphas, one RL run each per seed (0 added)")
  flags.DEFINE_integer("seeds", 3, "seeds per alpha (config.seed + 0, 1, ...)")
  flags.DEFINE_string("lrs", "", "alpha = 0 LR sweep; the family takes the largest LR that keeps the "
                      "SFT accuracy (empty: the config's rl.lr)")
  flags.DEFINE_integer("eval_per_digit", 16, "held-out prompts per digit count")
  flags.DEFINE_integer("samples", 1, "sampled responses per held-out prompt")
  flags.DEFINE_bool("quick", False, "150 SFT steps when the policy is missing")
  return cli.define_config_flag(ER_CONFIG + ":small")


DIFFICULTY_BANDS = (("easy", 1, 2), ("medium", 3, 5), ("hard", 6, 8))
BANDS = ("all",) + tuple(b for b, _, _ in DIFFICULTY_BANDS)
METRICS = ("sampled_tokens", "sampled_acc", "greedy_tokens", "greedy_acc", "rechecks")
# Arora & Zanette (2025), sec. 5 / fig. 1 (DeepSeek-R1-Distill-Qwen-1.5B and 7B, alpha 0.05-0.4).
PAPER = ("7B distilled reasoners, alpha 0.05-0.4: about 50 % fewer tokens on MATH500 and AIME for "
         "a small accuracy drop at the middle alphas; the largest savings on the easiest set "
         "(GSM8K); larger alpha = shorter and less accurate (a monotone family); alpha = 0 keeps "
         "the distilled model's accuracy.")


def rl_overrides(alpha: float, seed: int, lr: float) -> dict:
  """One run of the family: its alpha, seed and LR; no drafter, no speculative decoding."""
  return {"seed": seed, "rl.lr": float(lr), "rl.reward_kwargs.length_penalty.alpha": float(alpha),
          "rl.eval_size": 0, "rl.sample_eval_every": 0, "tlt.speculative": False, "tlt.train_drafter": False}


def ensure_policy(workdir: str, config, quick: bool = False):
  """(setup, SFT policy) of the main job's `workdir`, its SFT stage run there when missing."""
  from tlt_jax import config as config_lib
  from tlt_jax import run as run_lib
  config = config_lib.finalize(with_overrides(config, {"stages": "sft", **({"sft.steps": 150} if quick else {})}))
  setup = run_lib.build_setup(config, workdir)
  return setup, run_lib.run_sft_stage(setup)


def held_out(task, per_digit: int, seed: int = 11):
  """A fixed held-out set: `per_digit` problems of each digit count (the task's whole range)."""
  rng = np.random.default_rng([seed, 23])
  examples = []
  for digits in range(task.min_digits, task.max_digits + 1):
    examples += [task.sample(rng, num_digits=digits) for _ in range(per_digit)]
  return [ex.with_id(i) for i, ex in enumerate(examples)]


def band_of(digits: int) -> str:
  for name, lo, hi in DIFFICULTY_BANDS:
    if lo <= digits <= hi:
      return name
  return "other"


def evaluate(policy, setup, examples, samples: int) -> dict:
  """Greedy and sampled accuracy, tokens and re-checks per response, overall and per band."""
  from tlt_jax.data.tasks.arith import RECHECK_MARKER
  from tlt_jax.run import generate_responses

  ev = setup.config.eval
  temperature = float(setup.config.rollout.temperature)
  greedy = generate_responses(policy, setup, examples, ev.max_new_tokens, batch_size=ev.batch_size)
  sampled = [generate_responses(policy, setup, examples, ev.max_new_tokens, temperature=temperature,
                                seed=1000 + k, batch_size=ev.batch_size) for k in range(samples)]
  bands = [band_of(ex.meta["difficulty"]) for ex in examples]
  out = {}
  for band in ["all"] + [b for b, _, _ in DIFFICULTY_BANDS]:
    rows = [i for i, b in enumerate(bands) if band in ("all", b)]
    if not rows:
      continue  # e.g. a task without hard problems
    picked = [s[i] for s in sampled for i in rows]
    out[band] = dict(
        greedy_acc=float(np.mean([greedy[i].correct for i in rows])),
        greedy_tokens=float(np.mean([greedy[i].length for i in rows])),
        sampled_acc=float(np.mean([r.correct for r in picked])),
        sampled_tokens=float(np.mean([r.length for r in picked])),
        rechecks=float(np.mean([r.text.count(RECHECK_MARKER) for r in picked])),
        n=len(rows))
  return out


def train_and_evaluate(name, base, overrides, setup, policy, examples, samples, runs_dir, write):
  """One RL run from `policy`, its final policy evaluated on `examples`: {band: stats}."""
  from flax import nnx
  trainer = build_trainer(name, base, overrides, setup, policy, None, runs_dir)
  trainer.run()
  with open(trainer.writer.path) as f:
    for line in f:
      r = json.loads(line)
      write({"kind": "rl", "run": name, **{k: r.get(k) for k in (
          "step", "reward_mean", "accuracy", "response_len_mean", "kl")}})
  return evaluate(nnx.merge(trainer.graphdef, trainer.state.params), setup, examples, samples)


def keeps_sft(stats: dict, sft: dict) -> bool:
  """alpha = 0 keeps its SFT accuracy: sampled and greedy accuracy (all bands) not below SFT's by
  more than one binomial standard error."""
  ok = True
  for key in ("sampled_acc", "greedy_acc"):
    p, n = sft["all"][key], sft["all"]["n"] * (1 if key == "greedy_acc" else sft["all"].get("samples", 1))
    ok &= stats["all"][key] >= p - np.sqrt(max(p * (1 - p), 1e-12) / n)
  return bool(ok)


def summarize(family: dict, sft: dict, seeds: list[int]) -> list[dict]:
  """Rows (alpha, band): each metric's mean and sd over seeds, and the paired change against
  alpha = 0 of the same seed (mean, sd, exceeds = |mean| > 2 sd / sqrt(seeds))."""
  rows = [{"alpha": "sft", "band": band, **{f"{m}_mean": sft[band][m] for m in METRICS}} for band in BANDS if band in sft]
  for alpha in sorted(family):
    for band in BANDS:
      if band not in family[alpha][seeds[0]]:
        continue
      row = {"alpha": alpha, "band": band}
      for m in METRICS:
        xs = np.array([family[alpha][s][band][m] for s in seeds])
        row[f"{m}_mean"], row[f"{m}_sd"] = float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0
        if alpha != 0.0 and m != "rechecks":
          ref = np.array([family[0.0][s][band][m] for s in seeds])
          d = xs / ref - 1.0 if m.endswith("tokens") else xs - ref
          sd = float(d.std(ddof=1)) if len(d) > 1 else 0.0
          row[f"{m}_change"], row[f"{m}_change_sd"] = float(d.mean()), sd
          row[f"{m}_change_exceeds"] = bool(len(d) > 1 and abs(d.mean()) > 2 * sd / np.sqrt(len(d)))
      rows.append(row)
  return rows


def _pm(row, key, scale=1.0, fmt="{:.3f}"):
  if f"{key}_mean" not in row:
    return ""
  sd = row.get(f"{key}_sd")
  return fmt.format(scale * row[f"{key}_mean"]) + ("" if sd is None else " ± " + fmt.format(scale * sd))


def _chg(row, key, pct):
  if f"{key}_change" not in row:
    return ""
  m, sd = row[f"{key}_change"], row[f"{key}_change_sd"]
  txt = f"{100 * m:+.1f}% ± {100 * sd:.1f}" if pct else f"{m:+.3f} ± {sd:.3f}"
  return txt + (" *" if row[f"{key}_change_exceeds"] else "")


def tables_markdown(rows: list[dict]) -> str:
  out = []
  for band in BANDS:
    sel = [r for r in rows if r["band"] == band]
    if not sel:
      continue
    out += [f"\n### {band}\n", "| alpha | sampled tokens | vs α=0 | sampled acc | vs α=0 | greedy tokens | vs α=0 | "
            "greedy acc | vs α=0 | re-checks |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sel:
      out.append(f"| {r['alpha']} | {_pm(r, 'sampled_tokens', fmt='{:.1f}')} | {_chg(r, 'sampled_tokens', True)} | "
                 f"{_pm(r, 'sampled_acc')} | {_chg(r, 'sampled_acc', False)} | {_pm(r, 'greedy_tokens', fmt='{:.1f}')} | "
                 f"{_chg(r, 'greedy_tokens', True)} | {_pm(r, 'greedy_acc')} | {_chg(r, 'greedy_acc', False)} | "
                 f"{_pm(r, 'rechecks', fmt='{:.2f}')} |")
  return "\n".join(out) + "\n"


def plot_pareto(rows, output: Output):
  """Accuracy vs tokens per alpha (mean over seeds, bars: sd), all problems and per band."""
  bands = [b for b in BANDS if any(r["band"] == b for r in rows)]
  fig, axes = pyplot().subplots(1, len(bands), figsize=(4 * len(bands), 3.6))
  for ax, band in zip(axes, bands):
    for kind, marker in (("sampled", "o"), ("greedy", "s")):
      pts = [r for r in rows if r["band"] == band and r["alpha"] != "sft"]
      xs, ys = [r[f"{kind}_tokens_mean"] for r in pts], [r[f"{kind}_acc_mean"] for r in pts]
      line = ax.errorbar(xs, ys, xerr=[r[f"{kind}_tokens_sd"] for r in pts], yerr=[r[f"{kind}_acc_sd"] for r in pts],
                         marker=marker, ms=4, capsize=2, label=kind)
      for r in pts:
        ax.annotate(f"α={r['alpha']:g}", (r[f"{kind}_tokens_mean"], r[f"{kind}_acc_mean"]), fontsize=7,
                    textcoords="offset points", xytext=(3, 3))
      sft = [r for r in rows if r["band"] == band and r["alpha"] == "sft"]
      if sft:
        ax.plot(sft[0][f"{kind}_tokens_mean"], sft[0][f"{kind}_acc_mean"], marker="*", ms=10, ls="",
                color=line[0].get_color(), label=f"SFT ({kind})")
    ax.set_xlabel("mean response tokens (held-out)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{band}: accuracy vs tokens")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  output.figure(fig, "efficient_reasoning_pareto.png")


def plot_bands(rows, output: Output):
  """Paired changes against alpha = 0 per band (mean over seeds, bars: sd)."""
  present = {r["band"] for r in rows}
  bands = [b for b, _, _ in DIFFICULTY_BANDS if b in present]
  alphas = sorted({r["alpha"] for r in rows if r["alpha"] not in ("sft", 0.0)})
  fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.6))
  width = 0.8 / max(len(alphas), 1)
  for k, alpha in enumerate(alphas):
    sel = {r["band"]: r for r in rows if r["alpha"] == alpha}
    xs = np.arange(len(bands)) + k * width
    axes[0].bar(xs, [100 * sel[b]["sampled_tokens_change"] for b in bands], width,
                yerr=[100 * sel[b]["sampled_tokens_change_sd"] for b in bands], capsize=2, label=f"α={alpha:g}")
    axes[1].bar(xs, [100 * sel[b]["sampled_acc_change"] for b in bands], width,
                yerr=[100 * sel[b]["sampled_acc_change_sd"] for b in bands], capsize=2, label=f"α={alpha:g}")
  for ax, title in zip(axes, ("sampled tokens vs α=0 (%)", "sampled accuracy vs α=0 (points)")):
    ax.set_xticks(np.arange(len(bands)) + width * (len(alphas) - 1) / 2, bands)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  output.figure(fig, "efficient_reasoning_difficulty.png")


def main(argv):
  del argv
  from absl import flags
  args = flags.FLAGS
  enable_compile_cache()
  from tlt_jax.utils.console import say

  base = args["config"].value
  setup, policy = ensure_policy(args.workdir, base, quick=args.quick)
  examples = held_out(setup.task, args.eval_per_digit)
  output = Output(args.out)
  runs_dir = os.path.join(args.workdir, "efficient_reasoning")
  seeds = [int(base.seed) + k for k in range(args.seeds)]
  alphas = sorted(set([0.0] + [float(a) for a in args.alphas.split(",") if a]))
  t0 = time.perf_counter()
  with output.jsonl("efficient_reasoning.jsonl") as write:
    sft = evaluate(policy, setup, examples, args.samples)
    for band in sft.values():
      band["samples"] = args.samples
    write({"kind": "eval", "alpha": "sft", "stats": sft})
    lr, sweep = float(base.rl.lr), []
    family = {a: {} for a in alphas}
    for sweep_lr in [float(x) for x in args.lrs.split(",") if x]:
      stats = train_and_evaluate(f"alpha_0_lr{sweep_lr:g}_s{seeds[0]}", base, rl_overrides(0.0, seeds[0], sweep_lr),
                                 setup, policy, examples, args.samples, runs_dir, write)
      keeps = keeps_sft(stats, sft)
      sweep.append({"lr": sweep_lr, "keeps_sft": keeps, **{k: stats["all"][k] for k in METRICS}})
      write({"kind": "sweep", "lr": sweep_lr, "keeps_sft": keeps, "stats": stats})
      say(json.dumps({"kind": "sweep", **sweep[-1]}))
      family.setdefault("sweep", {})[sweep_lr] = stats
    if sweep:
      passing = [s["lr"] for s in sweep if s["keeps_sft"]]
      lr = max(passing) if passing else min(s["lr"] for s in sweep)
      family[0.0][seeds[0]] = family.pop("sweep")[lr]
    family.pop("sweep", None)
    for seed in seeds:
      for alpha in alphas:
        if seed in family[alpha]:
          continue
        family[alpha][seed] = train_and_evaluate(f"alpha_{alpha:g}_lr{lr:g}_s{seed}", base,
                                                 rl_overrides(alpha, seed, lr), setup, policy, examples,
                                                 args.samples, runs_dir, write)
        write({"kind": "eval", "alpha": alpha, "seed": seed, "lr": lr, "stats": family[alpha][seed]})
        say(json.dumps({"kind": "eval", "alpha": alpha, "seed": seed,
                        **{k: round(v, 4) for k, v in family[alpha][seed]["all"].items() if k in METRICS}}))
    rows = summarize(family, sft, seeds)
    elapsed = time.perf_counter() - t0
    write({"kind": "summary", "lr": lr, "sweep": sweep, "seeds": seeds, "rows": rows,
           "elapsed_s": round(elapsed, 1), "rl.steps": int(base.rl.steps),
           "eval_per_digit": args.eval_per_digit, "samples": args.samples})
  sweep_md = ["| rl.lr | keeps SFT accuracy | sampled acc | greedy acc | sampled tokens |", "|---|---|---|---|---|",
              f"| (SFT) | | {sft['all']['sampled_acc']:.3f} | {sft['all']['greedy_acc']:.3f} | {sft['all']['sampled_tokens']:.1f} |"]
  sweep_md += [f"| {s['lr']:g} | {'yes' if s['keeps_sft'] else 'no'} | {s['sampled_acc']:.3f} | {s['greedy_acc']:.3f} | "
               f"{s['sampled_tokens']:.1f} |" for s in sweep]
  output.markdown("efficient_reasoning_tables.md", (
      f"## LR sweep (alpha = 0, seed {seeds[0]}); the family's LR: {lr:g}\n\n" + "\n".join(sweep_md) + "\n"
      f"\n## The family: mean ± sd over seeds {seeds}; changes paired against alpha = 0 of the same seed "
      "(* : |mean| > 2 sd / sqrt(seeds))\n" + tables_markdown(rows)))
  plot_pareto(rows, output)
  plot_bands(rows, output)
  say(json.dumps({"kind": "done", "lr": lr, "elapsed_s": round(elapsed, 1)}))


if __name__ == "__main__":
  from tlt_jax import cli
  cli.set_cpu_devices(sys.argv, minimum=2)  # a fake device per rollout group; before jax is imported
  define_flags()
  run_experiment(main)
