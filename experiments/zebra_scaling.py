"""ZebraLogic's curse of complexity at tiny scale: SFT then RL of a tiny policy on small logic grids,
evaluated across sizes with best-of-N and majority-of-N (Lin et al. 2025, "ZebraLogic: On the
Scaling Limits of LLMs for Logical Reasoning").

  1. SFT of the tiny policy on solver traces (tasks/zebra.py, compact style) of N x M puzzles with
     N, M in the config's task range (2..4 x 2..4 by default);
  2. RL from the SFT policy, one run per variant: `grpo` (verifier + format reward) and
     `grpo_cells` (+ cell accuracy as partial credit, rl/rewards.py `partial_credit`);
  3. every policy evaluated on fixed puzzles of each size in `zebra.eval_sizes` (including sizes
     beyond the training range): `zebra.samples` samples per puzzle at the rollout temperature,
     giving puzzle and cell accuracy for N = 1 (mean over samples), best-of-N (an oracle picks
     any correct sample: the unbiased pass@N of Chen et al. 2021 from all samples) and
     majority-of-N (the most frequent answer among N samples, over disjoint groups of N),
     reported per size, per search-space bucket and per Z3-conflict bin.

  python experiments/zebra_scaling.py [--config=configs/zebra.py] [--config.rl.steps=20]
      [--workdir=runs/zebra_scaling] [--out=experiments/results/zebra_scaling]

Prints one JSON line per (policy, size) and per (policy, bucket), and writes
OUT/zebra_scaling.{jsonl,md,png}. The SFT policy and each RL run are kept in WORKDIR (a rerun
reuses them and only evaluates again).
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import flags  # noqa: E402

from experiments.common import define_output_flags, run_experiment  # noqa: E402
from tlt_jax import cli  # noqa: E402

_CONFIG = cli.define_config_flag(os.path.join(ROOT, "configs", "zebra.py"))
cli.set_cpu_devices(sys.argv)  # before jax is imported
define_output_flags("experiments/results/zebra_scaling", workdir="runs/zebra_scaling",
                    workdir_help="where the SFT policy and RL runs live")

# Published ZebraLogic results (Lin et al. 2025, Table 1 and sec. 3): puzzle accuracy in %, on
# 1,000 puzzles of 2x2 .. 6x6, by models of ~1e10-1e12 parameters with natural-language prompts.
PAPER_RESULTS = (
    {"model": "o1 (paper)", "overall": 81.0, "xl": 42.5},
    {"model": "Qwen2.5-7B-Instruct (paper)", "overall": 12.0, "xl": None},
)
Z3_BINS = ((0, 0), (1, 5), (6, 15), (16, 50), (51, 10**9))


def parse_sizes(text: str) -> list[tuple[int, int]]:
  sizes = []
  for item in str(text).split(","):
    try:
      n, m = (int(x) for x in item.strip().lower().split("x"))
    except ValueError:
      raise ValueError(f"config.zebra.eval_sizes: {item!r} is not allowed; allowed: 'NxM' items, "
                       "comma-separated, e.g. '2x2,3x3'") from None
    sizes.append((n, m))
  return sizes


def z3_bin(conflicts: int) -> str:
  for lo, hi in Z3_BINS:
    if lo <= conflicts <= hi:
      return f"{lo}" if lo == hi else (f"{lo}-{hi}" if hi < 10**9 else f">={lo}")
  raise ValueError(conflicts)


def eval_examples(task, sizes, per_size: int, seed: int):
  """`per_size` fixed puzzles of each size, puzzle k of N x M from default_rng([seed, N, M, k]),
  as examples of `task` with their Z3 conflict counts."""
  import dataclasses

  import numpy as np

  from tlt_jax.data.zebra.generate import generate_puzzle
  task = dataclasses.replace(task, z3=True)
  out = []
  for n, m in sizes:
    for k in range(per_size):
      puzzle = generate_puzzle(np.random.default_rng([seed, n, m, k]), n, m, seed_info=f"eval-{n}x{m}-{k}",
                               recipe=task.recipe)
      out.append(task.make_example(puzzle).with_id(len(out)))
  return out


def sample_responses(params, graphdef, setup, examples, samples: int, temperature: float,
                     max_new_tokens: int, batch_size: int, seed: int):
  """`samples` responses per example at `temperature` through the rollout engine:
  [(text, finished)] per example."""
  import jax
  import numpy as np

  from tlt_jax.data.batching import encode_prompts
  from tlt_jax.rollout.engine import RolloutEngine
  from tlt_jax.rollout.sampling import SamplingParams

  tok = setup.tokenizer
  engine = RolloutEngine(graphdef, SamplingParams(temperature=temperature), eos_ids=tok.eos_ids,
                         pad_id=tok.pad_id, chunk_size=16,
                         max_context=setup.model_cfg.max_position_embeddings)
  rows = [ex for ex in examples for _ in range(samples)]
  width = -(-(max(len(ex.prompt) for ex in examples) + 1) // 16) * 16
  out = []
  for i in range(0, len(rows), batch_size):
    chunk = rows[i:i + batch_size]
    prompts, lens = encode_prompts(chunk, tok, width)
    res = engine.generate(params, prompts, lens, max_new_tokens, jax.random.key(seed + i))
    for j in range(len(chunk)):
      out.append((tok.decode(res.tokens[j, :res.lengths[j]]), bool(res.finished[j])))
  return [out[k * samples:(k + 1) * samples] for k in range(len(examples))]


def pass_at(n: int, c: int, k: int) -> float:
  """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al. 2021)."""
  if n - c < k:
    return 1.0
  return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def majority_at(answers, correct, k: int) -> float:
  """Majority-of-k: over disjoint groups of k samples, the share whose most frequent extracted
  answer (ties: the earliest; no answer never wins) is correct."""
  scores = []
  for g in range(0, len(answers) - k + 1, k):
    group = [(a, ok) for a, ok in zip(answers[g:g + k], correct[g:g + k]) if a is not None]
    if not group:
      scores.append(0.0)
      continue
    counts = collections.Counter(a for a, _ in group)
    best = max(counts.values())
    winner = next(a for a, _ in group if counts[a] == best)
    scores.append(float(next(ok for a, ok in group if a == winner)))
  return sum(scores) / len(scores)


def score_puzzles(task, examples, responses, best_of) -> list[dict]:
  """Per puzzle: puzzle / cell accuracy at N=1 (mean), best-of-N, majority-of-N, and the right /
  total cell counts that `aggregate` pools as ZeroEval does."""
  from tlt_jax.data.zebra import render
  rows = []
  for ex, samples in zip(examples, responses):
    answers = [task.extract_answer(t) if f else None for t, f in samples]
    correct = [a is not None and task.answers_match(a, ex.answer) for a in answers]
    cells = [task.cell_accuracy_of(a, ex.answer) for a in answers]
    reference = json.loads(ex.answer)
    counts = [render.cell_counts(None if a is None else json.loads(a), reference) for a in answers]
    n, c = len(samples), sum(correct)
    row = {"size": ex.meta["size"], "bucket": ex.meta["bucket"], "search_space": ex.meta["search_space"],
           "z3_conflicts": ex.meta["z3_conflicts"], "z3_bin": z3_bin(ex.meta["z3_conflicts"]),
           "puzzle_acc": c / n, "cell_acc": sum(cells) / n, "answered": sum(a is not None for a in answers) / n,
           "cells_right": sum(r for r, _ in counts), "cells_total": sum(t for _, t in counts),
           # a uniformly random grid: right with probability 1 / (N!)^M, each cell with 1 / N
           "chance_puzzle": 1.0 / ex.meta["search_space"], "chance_cell": 1.0 / ex.meta["num_houses"]}
    for k in best_of:
      row[f"best_of_{k}"] = pass_at(n, c, k)
      row[f"majority_of_{k}"] = majority_at(answers, correct, k)
      row[f"best_cell_of_{k}"] = max(cells[:k])
    rows.append(row)
  return rows


def aggregate(rows, key: str, policy: str, best_of) -> list[dict]:
  groups = collections.OrderedDict()
  for r in rows:
    groups.setdefault(r[key], []).append(r)
  fields = ["puzzle_acc", "cell_acc", "answered", "chance_puzzle", "chance_cell"] + [f"{p}_{k}" for k in best_of
                                                     for p in ("best_of", "majority_of", "best_cell_of")]
  fields += [f for f in ("greedy_acc", "greedy_cell_acc") if rows and f in rows[0]]  # one greedy sample
  out = []
  for name, rs in groups.items():
    rec = {"policy": policy, key: name, "puzzles": len(rs),
           "search_space": min(r["search_space"] for r in rs),
           "z3_mean": sum(r["z3_conflicts"] for r in rs) / len(rs)}
    rec.update({f: sum(r[f] for r in rs) / len(rs) for f in fields})
    # ZeroEval's pooling: right cells over all cells of all samples, unparsed answers counting 0
    rec["cell_acc_pooled"] = sum(r["cells_right"] for r in rs) / max(1, sum(r["cells_total"] for r in rs))
    out.append(rec)
  return out


def build_trainer(base_config, variant: str, setup, policy, workdir: str):
  """An RLTrainer from `policy` for `variant`: "grpo" (the config's rewards) or "grpo_cells" (plus
  zebra.cell_reward_weight * partial_credit, the cell accuracy)."""
  import jax
  from flax import nnx

  from tlt_jax import config as config_lib
  from tlt_jax.rl.trainer import RLTrainer

  config = base_config.as_configdict()  # a mutable copy of the frozen run config
  if variant == "grpo_cells":
    config.rl.rewards.partial_credit = float(config.zebra.cell_reward_weight)
  elif variant != "grpo":
    raise ValueError(f"config.zebra.variants: {variant!r} is not allowed; allowed: 'grpo', 'grpo_cells'")
  config = config_lib.finalize(config)
  reference = jax.tree.map(lambda x: x.copy(), nnx.state(policy))
  return RLTrainer(config, setup.task, setup.tokenizer, policy, os.path.join(workdir, variant),
                   mesh=setup.mesh, reference_params=reference,
                   reference_source=os.path.join(workdir, "sft"))


def main(argv):
  del argv
  import numpy as np
  from flax import nnx

  from tlt_jax import config as config_lib
  from tlt_jax import run as run_lib
  from tlt_jax.models import hf
  from tlt_jax.utils.compile_cache import enable_compile_cache

  enable_compile_cache()
  raw = _CONFIG.value
  z = raw.zebra
  sizes = parse_sizes(z.eval_sizes)
  best_of = tuple(int(k) for k in z.best_of)
  if any(z.samples % k for k in best_of):
    raise config_lib.ConfigError(f"config.zebra.best_of={best_of} is not allowed; allowed: divisors of "
                     f"config.zebra.samples={z.samples}")
  config = config_lib.finalize(raw)
  workdir, out_dir = flags.FLAGS.workdir, flags.FLAGS.out
  os.makedirs(workdir, exist_ok=True)
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  setup = run_lib.build_setup(config, workdir)
  examples = eval_examples(setup.task, sizes, int(z.eval_per_size), int(z.eval_seed))

  t0 = time.perf_counter()
  sft_policy = run_lib.run_sft_stage(setup)
  timings = {"sft_s": time.perf_counter() - t0}
  policies = {"sft": sft_policy}
  summaries = {}
  for variant in [v.strip() for v in str(z.variants).split(",") if v.strip()]:
    t0 = time.perf_counter()
    done = os.path.join(workdir, variant, "policy")
    if os.path.exists(os.path.join(done, "config.json")):
      policies[variant] = hf.from_pretrained(done)
    else:
      trainer = build_trainer(config, variant, setup, sft_policy, workdir)
      summaries[variant] = trainer.run()
      policies[variant] = nnx.merge(trainer.graphdef, trainer.state.params)
      hf.save_pretrained(policies[variant], done)
    timings[f"rl_{variant}_s"] = time.perf_counter() - t0
    print(json.dumps({"variant": variant, "rl_time_s": round(timings[f"rl_{variant}_s"], 1),
                      **{k: v for k, v in summaries.get(variant, {}).items() if isinstance(v, (int, float))}}),
          flush=True)

  records, by_size, by_bucket, by_z3 = [], [], [], []
  for name, policy in policies.items():
    t0 = time.perf_counter()
    graphdef, params = nnx.split(policy)
    responses = sample_responses(params, graphdef, setup, examples, int(z.samples),
                                 float(config.rollout.temperature), int(config.eval.max_new_tokens),
                                 int(config.eval.batch_size), seed=int(z.eval_seed))
    rows = score_puzzles(setup.task, examples, responses, best_of)
    greedy = sample_responses(params, graphdef, setup, examples, 1, 0.0, int(config.eval.max_new_tokens),
                              int(config.eval.batch_size), seed=int(z.eval_seed))
    for row, g in zip(rows, score_puzzles(setup.task, examples, greedy, (1,))):
      row["greedy_acc"], row["greedy_cell_acc"] = g["puzzle_acc"], g["cell_acc"]
    timings[f"eval_{name}_s"] = time.perf_counter() - t0
    for kind, key, sink in (("size", "size", by_size), ("bucket", "bucket", by_bucket), ("z3", "z3_bin", by_z3)):
      for rec in aggregate(rows, key, name, best_of):
        rec = {"kind": kind, **rec}
        sink.append(rec)
        records.append(rec)
        if kind != "z3":
          print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
    overall = aggregate([{**r, "all": "all"} for r in rows], "all", name, best_of)[0]
    records.append({"kind": "overall", **overall})
    print(json.dumps({"kind": "overall", **{k: (round(v, 4) if isinstance(v, float) else v)
                                            for k, v in overall.items()}}), flush=True)
  timings["total_s"] = time.perf_counter() - t_start
  records.append({"kind": "timings", **timings})
  with open(os.path.join(out_dir, "zebra_scaling.jsonl"), "w") as f:
    for rec in records:
      f.write(json.dumps(rec) + "\n")
  write_markdown(os.path.join(out_dir, "zebra_scaling.md"), config, records, best_of, timings, summaries)
  plot(os.path.join(out_dir, "zebra_scaling.png"), by_size, by_z3, best_of)
  print(json.dumps({"kind": "timings", **{k: round(v, 1) for k, v in timings.items()}}), flush=True)


def write_markdown(path, config, records, best_of, timings, summaries):
  from tlt_jax.utils.metrics import markdown_table

  top = max(best_of)
  pct = lambda v: None if v is None else round(100 * v, 1)  # noqa: E731
  greedy = ["greedy_acc"] if any("greedy_acc" in r for r in records) else []
  cols = ["policy", "size", "bucket", "search_space", "z3_mean", "puzzles", "puzzle_acc", *greedy, "chance_puzzle",
          "cell_acc", "cell_acc_pooled", "chance_cell"]
  cols += [f"best_of_{k}" for k in best_of if k > 1] + [f"majority_of_{k}" for k in best_of if k > 1]
  size_rows = []
  for r in records:
    if r["kind"] == "size":
      row = dict(r)
      row["bucket"] = _bucket(r["search_space"])
      for c in cols:
        if c.startswith(("puzzle_acc", "greedy", "cell_acc", "best_of", "majority_of", "chance")):  # cell_acc_pooled too
          row[c] = pct(r[c])
      size_rows.append(row)
  bucket_cols = ["policy", "bucket", "puzzles", "puzzle_acc", *greedy, "chance_puzzle", "cell_acc", "cell_acc_pooled",
                 "chance_cell"] + [
      f"{p}_{k}" for k in best_of if k > 1 for p in ("best_of", "majority_of")]
  bucket_rows = [{**r, **{c: pct(r[c]) for c in bucket_cols[3:]}} for r in records
                 if r["kind"] in ("bucket", "overall")]
  for r in bucket_rows:
    if r["kind"] == "overall":
      r["bucket"] = "overall"
  z3_cols = ["policy", "z3_bin", "puzzles", "puzzle_acc", "cell_acc", "cell_acc_pooled", f"best_of_{top}", f"majority_of_{top}"]
  z3_rows = [{**r, **{c: pct(r[c]) for c in z3_cols[3:]}} for r in records if r["kind"] == "z3"]
  t = config.task
  lines = [
      "# ZebraLogic at tiny scale: accuracy vs puzzle size (the curse of complexity)\n",
      f"Policy: {config.model.num_layers} layers, d={config.model.hidden_size}, char tokenizer, compact "
      f"puzzles. SFT {config.sft.steps} steps on solver traces of N x M puzzles, N in "
      f"{t.min_houses}..{t.max_houses}, M in {t.min_attributes}..{t.max_attributes}; RL {config.rl.steps} "
      f"GRPO steps of {config.rl.prompts_per_step} x {config.rl.group_size} per variant (`grpo`: verifier + "
      f"{config.rl.rewards.format} * format; `grpo_cells`: + {config.zebra.cell_reward_weight} * cell "
      f"accuracy). Evaluation: {config.zebra.eval_per_size} fixed puzzles per size, {config.zebra.samples} "
      f"samples each at T={config.rollout.temperature}. Accuracies in %: puzzle_acc and cell_acc are single "
      "samples (N=1, averaged over the samples); greedy_acc is one greedy answer per puzzle; cell_acc_pooled is ZeroEval's pooling (right cells over all "
      "cells of all samples, unparsed answers counting 0); best_of_N is the oracle pass@N; majority_of_N the "
      "most frequent answer of N; chance_puzzle and chance_cell are a uniformly random grid's "
      "(1 / (N!)^M per puzzle, 1 / N per cell, averaged over the puzzles). Sizes with N above the "
      "training range are out of distribution.\n",
      "## By size\n", markdown_table(size_rows, cols),
      "## By search-space bucket (small < 1e3 <= medium < 1e6 <= large < 1e10 <= XL)\n",
      markdown_table(bucket_rows, bucket_cols),
      "## By Z3 conflicts\n", markdown_table(z3_rows, z3_cols),
      "## The paper's numbers (a different scale)\n",
      "Lin et al. (2025) evaluate models of billions of parameters, prompted in natural language, on "
      "1,000 puzzles of 2x2..6x6; puzzle accuracy in %. Not comparable in scale with a ~1M-parameter "
      "policy trained on the task; shown for the shape of the curve.\n",
      markdown_table([{k: ("-" if v is None else v) for k, v in r.items()} for r in PAPER_RESULTS],
                     ["model", "overall", "xl"]),
      "## RL runs\n",
  ]
  for variant, s in summaries.items():
    lines.append(f"- `{variant}`: training reward {s.get('reward_first5', float('nan')):.3f} -> "
                 f"{s.get('reward_last5', float('nan')):.3f}, training accuracy "
                 f"{s.get('accuracy_first5', float('nan')):.3f} -> {s.get('accuracy_last5', float('nan')):.3f} "
                 "(means of the first and last 5 steps)")
  lines.append("\nTimes (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()) + "\n")
  with open(path, "w") as f:
    f.write("\n".join(lines))


def _bucket(space):
  from tlt_jax.data.zebra.puzzle import size_bucket
  return size_bucket(space)


def plot(path, by_size, by_z3, best_of):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  top = max(best_of)
  policies = list(dict.fromkeys(r["policy"] for r in by_size))
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for policy in policies:
    rs = sorted((r for r in by_size if r["policy"] == policy), key=lambda r: r["search_space"])
    xs = [r["search_space"] for r in rs]
    line, = axes[0].plot(xs, [100 * r["puzzle_acc"] for r in rs], marker="o", label=f"{policy} N=1")
    axes[0].plot(xs, [100 * r[f"best_of_{top}"] for r in rs], marker="^", ls="--", color=line.get_color(),
                 label=f"{policy} best-of-{top}")
    axes[0].plot(xs, [100 * r[f"majority_of_{top}"] for r in rs], marker="s", ls=":", color=line.get_color(),
                 label=f"{policy} majority-of-{top}")
    axes[1].plot(xs, [100 * r["cell_acc"] for r in rs], marker="o", color=line.get_color(), label=policy)
    zs = [r for r in by_z3 if r["policy"] == policy]
    zs.sort(key=lambda r: r["z3_mean"])
    axes[2].plot([r["z3_bin"] for r in zs], [100 * r["puzzle_acc"] for r in zs], marker="o",
                 color=line.get_color(), label=policy)
  for ax, title, xlabel in ((axes[0], "puzzle accuracy (%)", "search space (N!)^M"),
                            (axes[1], "cell accuracy (%), N=1", "search space (N!)^M"),
                            (axes[2], "puzzle accuracy (%), N=1", "Z3 conflicts (bin)")):
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
    ax.set_ylim(-3, 103)
  for ax in axes[:2]:
    ax.set_xscale("log")
    for x in (1e3, 1e6):
      ax.axvline(x, color="grey", lw=0.8)
  axes[0].legend(fontsize=7)
  axes[2].legend(fontsize=7)
  fig.suptitle("ZebraLogic at tiny scale: the curse of complexity")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  run_experiment(main)
