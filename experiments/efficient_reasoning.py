"""Efficient reasoning: a family of policies from one knob, the length penalty's alpha.

Arora & Zanette (2025), "Training Language Models to Reason Efficiently": RL with the reward

  r_i = 1[correct_i] * (1 - alpha * sigmoid((len_i - mean) / (std + 1e-7)))

(mean and std over the lengths of the CORRECT responses to the same prompt; a response without
EOS scores 0; `rl/rewards.py:length_penalty_reward`) and RLOO advantages, one RL run per alpha,
gives a family of models that trade accuracy for length: large token savings for most of the
accuracy, the savings largest on easy problems.

Here: from ONE SFT policy (the main job's `--workdir`, made there when missing), one RL run per
alpha in `--alphas` with the same seeds, steps and prompts (RL prompts of every difficulty,
1..8 digits, long-tailed: many easy, few hard). The default task's SFT traces carry random
redundant re-checks ("|R:<step>") that a length penalty can remove. Each policy is then
evaluated on a fixed held-out set stratified by digits (`--eval_per_digit` per digit count),
greedy and sampled (T = the rollout temperature, `--samples` per prompt):

  tokens    mean response length (tokens), overall and per difficulty (easy 1-2, medium 3-5,
            hard 6-8 digits)
  accuracy  greedy and sampled, overall and per difficulty
  rechecks  re-checks per response
  and, against alpha = 0, the relative token reduction and the accuracy change.

  python experiments/efficient_reasoning.py [--workdir runs/default] [--alphas 0,0.05,0.1,0.2,0.4] \\
      [--steps N] [--out DIR] [--config.rl.lr=2e-4 ...]

Prints one JSON line per (alpha, RL step) and per (alpha, difficulty), and writes
DIR/efficient_reasoning.{jsonl,md} and DIR/efficient_reasoning_{pareto,difficulty}.png. The RL
runs live in WORKDIR/efficient_reasoning/alpha_<a>/ (a rerun reuses finished ones). Speculative
decoding is lossless, so it is off here (it changes the time, not the results).
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments.common import (DEFAULT_CONFIG, build_trainer, enable_compile_cache,  # noqa: E402
                                ensure_policy_and_drafter, run_experiment)


def define_flags():
  """The command line (a function, so that notebooks import this module without flags)."""
  from absl import flags

  from tlt_jax import cli
  flags.DEFINE_string("workdir", "runs/default", "main-job workdir holding sft/ (made there when missing)")
  flags.DEFINE_string("out", "experiments/results/efficient_reasoning", "output directory")
  flags.DEFINE_string("alphas", "0,0.05,0.1,0.2,0.4", "length-penalty alphas, one RL run each")
  flags.DEFINE_integer("steps", 0, "RL steps per alpha (default: the config's rl.steps)")
  flags.DEFINE_string("advantage", "rloo", "advantage estimator (the paper: rloo)")
  flags.DEFINE_integer("eval_per_digit", 32, "held-out prompts per digit count")
  flags.DEFINE_integer("samples", 2, "sampled responses per held-out prompt")
  flags.DEFINE_bool("quick", False, "150 SFT steps when the policy is missing")
  return cli.define_config_flag(DEFAULT_CONFIG)

DIFFICULTY_BANDS = (("easy", 1, 2), ("medium", 3, 5), ("hard", 6, 8))
# Arora & Zanette (2025), sec. 5 / fig. 1 (DeepSeek-R1-Distill-Qwen-7B, alpha in {0.05 .. 0.4}):
# what the family shows at the 7B scale, in words we could check; numbers per dataset are in the
# paper's figures. Ours are a different scale (a 1.6M-parameter policy on reversed addition).
PAPER = ("7B distilled reasoners, alpha 0.05-0.4: 50 % fewer tokens on MATH500 and AIME for a "
         "small accuracy drop at the middle alphas; the largest savings on the easiest set (GSM8K); "
         "larger alpha = shorter and less accurate (a monotone family).")


def rl_overrides(alpha: float, steps: int, advantage: str) -> dict:
  """One run of the family: the verifier replaced by the length-penalised reward at `alpha`."""
  return {"rl.steps": steps, "rl.advantage": advantage, "rl.min_difficulty": 1,
          "rl.rewards.verifier": 0.0, "rl.rewards.format": 0.0, "rl.rewards.length_penalty": 1.0,
          "rl.reward_kwargs.length_penalty.alpha": float(alpha),
          "rl.eval_size": 0, "rl.sample_eval_every": 0,
          "tlt.speculative": False, "tlt.train_drafter": False}


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


def run_family(base, setup, policy, drafter, alphas, steps: int, advantage: str, examples,
               samples: int, runs_dir: str, jsonl_path: str | None = None):
  """One RL run per alpha from `policy` (same seeds, steps, prompts), each evaluated on
  `examples`; returns (results {alpha: {band: stats}}, the SFT policy's {band: stats})."""
  from flax import nnx

  from tlt_jax.utils.console import say
  alphas = sorted(set([0.0] + [float(a) for a in alphas]))  # alpha = 0: the reference
  out = open(jsonl_path, "w") if jsonl_path else None
  results = {}
  for alpha in alphas:
    trainer = build_trainer(f"alpha_{alpha:g}", base, rl_overrides(alpha, steps, advantage), setup,
                            policy, drafter, runs_dir)
    trainer.run()
    with open(trainer.writer.path) as f:
      for line in f:
        r = json.loads(line)
        if out:
          out.write(json.dumps({"kind": "rl", "alpha": alpha, **{k: r.get(k) for k in (
              "step", "reward_mean", "accuracy", "response_len_mean")}}) + "\n")
    final = nnx.merge(trainer.graphdef, trainer.state.params)
    results[alpha] = evaluate(final, setup, examples, samples)
    for band, stats in results[alpha].items():
      rec = {"kind": "eval", "alpha": alpha, "band": band, **stats}
      if out:
        out.write(json.dumps(rec) + "\n")
      say(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
  sft = evaluate(policy, setup, examples, samples)
  if out:
    for band, stats in sft.items():
      out.write(json.dumps({"kind": "eval", "alpha": "sft", "band": band, **stats}) + "\n")
    out.close()
  return results, sft


def main(argv):
  del argv
  from absl import flags
  args = flags.FLAGS
  enable_compile_cache()
  from tlt_jax.utils.console import say

  base = args["config"].value
  steps = args.steps or int(base.rl.steps)
  setup, policy, drafter = ensure_policy_and_drafter(args.workdir, quick=args.quick, config=base)
  examples = held_out(setup.task, args.eval_per_digit)
  os.makedirs(args.out, exist_ok=True)
  t_start = time.perf_counter()
  results, sft = run_family(base, setup, policy, drafter, args.alphas.split(","), steps, args.advantage,
                            examples, args.samples, os.path.join(args.workdir, "efficient_reasoning"),
                            os.path.join(args.out, "efficient_reasoning.jsonl"))
  elapsed = time.perf_counter() - t_start
  rows = table_rows(results, sft)
  write_markdown(args, rows, steps, elapsed, base)
  plot_pareto(rows, os.path.join(args.out, "efficient_reasoning_pareto.png"))
  plot_bands(rows, os.path.join(args.out, "efficient_reasoning_difficulty.png"))
  say(json.dumps({"kind": "done", "elapsed_s": round(elapsed, 1)}))


def table_rows(results: dict, sft: dict) -> list[dict]:
  """One row per (policy, band) with the changes against alpha = 0 (same band)."""
  ref = results[0.0]
  rows = []
  for alpha, by_band in [("sft", sft)] + sorted(results.items()):
    for band, s in by_band.items():
      r = ref[band]
      rows.append({"alpha": alpha, "band": band, **s,
                   "token_change": s["sampled_tokens"] / r["sampled_tokens"] - 1.0,
                   "greedy_token_change": s["greedy_tokens"] / r["greedy_tokens"] - 1.0,
                   "acc_change": s["sampled_acc"] - r["sampled_acc"],
                   "greedy_acc_change": s["greedy_acc"] - r["greedy_acc"]})
  return rows


def write_markdown(args, rows, steps, elapsed, base):
  from tlt_jax.utils.metrics import markdown_table
  given = " ".join(a for a in sys.argv[1:] if a.startswith("--config")) or "the default config"
  cols = ["alpha", "sampled_tokens", "token_change", "sampled_acc", "acc_change", "greedy_tokens",
          "greedy_token_change", "greedy_acc", "greedy_acc_change", "rechecks"]
  md = ["# Efficient reasoning: one alpha per policy (length-penalised RL)\n",
        f"From the SFT policy of `{args.workdir}`; {steps} RL steps per alpha ({args.advantage} "
        f"advantages, rl.lr {base.rl.lr}, same seeds and prompts); {given}; held-out set: "
        f"{args.eval_per_digit} problems per digit count, greedy and {args.samples} samples each at "
        f"T={base.rollout.temperature}; {elapsed:.0f} s in all on this machine's CPU. `token_change` "
        "and `acc_change` are against alpha = 0 (the verifier reward alone), same band.\n",
        "## All problems\n", markdown_table([r for r in rows if r["band"] == "all"], cols)]
  for band, lo, hi in DIFFICULTY_BANDS:
    md += [f"\n## {band} ({lo}-{hi} digits)\n", markdown_table([r for r in rows if r["band"] == band], cols)]
  md += ["\n## The paper (different scale)\n", PAPER + "\n"]
  with open(os.path.join(args.out, "efficient_reasoning.md"), "w") as f:
    f.write("\n".join(md))


def plot_pareto(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for kind, marker in (("sampled", "o"), ("greedy", "s")):
    pts = [r for r in rows if r["band"] == "all" and r["alpha"] != "sft"]
    ax.plot([r[f"{kind}_tokens"] for r in pts], [r[f"{kind}_acc"] for r in pts], marker=marker, label=kind)
    for r in pts:
      ax.annotate(f"α={r['alpha']:g}", (r[f"{kind}_tokens"], r[f"{kind}_acc"]), fontsize=7,
                  textcoords="offset points", xytext=(3, 3))
  ax.set_xlabel("mean response tokens (held-out)")
  ax.set_ylabel("accuracy")
  ax.set_title("Length-penalised RL: one alpha per policy")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_bands(rows, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  bands = [b for b, _, _ in DIFFICULTY_BANDS]
  alphas = [r["alpha"] for r in rows if r["band"] == "all" and r["alpha"] not in ("sft", 0.0)]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  width = 0.8 / max(len(alphas), 1)
  for k, alpha in enumerate(alphas):
    sel = {r["band"]: r for r in rows if r["alpha"] == alpha}
    xs = np.arange(len(bands)) + k * width
    axes[0].bar(xs, [100 * sel[b]["token_change"] for b in bands], width, label=f"α={alpha:g}")
    axes[1].bar(xs, [100 * sel[b]["acc_change"] for b in bands], width, label=f"α={alpha:g}")
  for ax, title in zip(axes, ("tokens vs α=0 (%)", "sampled accuracy vs α=0 (points)")):
    ax.set_xticks(np.arange(len(bands)) + width * (len(alphas) - 1) / 2, bands)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  from tlt_jax import cli
  cli.set_cpu_devices(sys.argv, minimum=2)  # a fake device per rollout group; before jax is imported
  define_flags()
  run_experiment(main)
