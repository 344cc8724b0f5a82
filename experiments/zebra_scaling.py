"""ZebraLogic's curse of complexity at tiny scale: SFT then RL of a tiny policy on small logic grids,
evaluated across sizes against the chance rate of each size, with best-of-N and majority-of-N
(Lin et al. 2025, "ZebraLogic: On the Scaling Limits of LLMs for Logical Reasoning").

For each training seed in `zebra.seeds` (model init, SFT data and RL prompts), in WORKDIR/seed<S>:
  1. SFT of the tiny policy on the task's targets (tasks/zebra.py `trace`: "facts", each value's
     house; "answer", the grid; "deduction", the solver's steps then the grid) of N x M puzzles
     with N, M in the config's task range. With `zebra.holdout` no training draw is an
     evaluation puzzle (the same size and clue set, in any order);
  2. RL from the SFT policy, one run per variant: `grpo` (verifier + format reward) and
     `grpo_cells` (+ cell accuracy as partial credit, rl/rewards.py `partial_credit`);
  3. every policy evaluated on fixed puzzles (`zebra.eval_seed`, the same for every training seed)
     of each size in `zebra.eval_sizes`: `zebra.samples` samples per puzzle at the rollout
     temperature and one greedy answer, giving puzzle and cell accuracy for N = 1 (mean over
     samples), best-of-N (an oracle picks any correct sample: the unbiased pass@N of Chen et al.
     2021 from all samples) and majority-of-N (the most frequent answer among N samples, over
     disjoint groups of N), per size, per search-space bucket and per Z3-conflict bin, beside the
     chance rate of a uniformly random grid (1 / (N!)^M per puzzle, 1 / N per cell).
Across seeds: the mean, standard deviation, minimum and maximum of each accuracy.

  python experiments/zebra_scaling.py [--config=configs/zebra.py] [--config.zebra.seeds=0,1,2]
      [--workdir=runs/zebra_scaling] [--out=experiments/results/zebra_scaling]

Prints one JSON line per (seed, policy, size) and per (seed, policy, bucket), and writes
OUT/zebra_scaling.{jsonl,md,png}. The SFT policy, each RL run and each policy's scored puzzles
are kept in WORKDIR/seed<S>; a rerun reuses them (so seeds run as separate processes can be
gathered by one run over all of them, which only reads).
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


def parse_seeds(text) -> list[int]:
  try:
    seeds = [int(x) for x in str(text).split(",") if x.strip()]
  except ValueError:
    seeds = []
  if not seeds:
    raise ValueError(f"config.zebra.seeds={text!r} is not allowed; allowed: training seeds, comma-separated, "
                     "e.g. '0,1,2'")
  return seeds


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _write_json(path, obj):
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f)
  os.replace(path + ".tmp", path)


def run_seed(raw, seed: int, workdir: str, sizes, best_of):
  """SFT, the RL variants and the evaluation of every policy for training seed `seed`, in
  `workdir`. Each piece is kept there (the SFT policy, each RL policy and its summary, each
  policy's scored puzzles) and reused by a rerun with the same evaluation settings. Training
  draws never return an evaluation puzzle when zebra.holdout is set. Returns (rows by policy,
  RL summaries, timings)."""
  import dataclasses

  from flax import nnx

  from tlt_jax import config as config_lib
  from tlt_jax import run as run_lib
  from tlt_jax.models import hf

  z = raw.zebra
  cfg = raw.copy_and_resolve_references()
  cfg.seed = int(seed)
  config = config_lib.finalize(cfg)
  os.makedirs(workdir, exist_ok=True)
  setup = run_lib.build_setup(config, workdir)
  examples = eval_examples(setup.task, sizes, int(z.eval_per_size), int(z.eval_seed))
  if z.holdout:  # training (SFT, RL prompts) never draws an evaluation puzzle
    task = dataclasses.replace(setup.task, holdout=frozenset(ex.meta["key"] for ex in examples))
    setup = dataclasses.replace(setup, task=task)
  eval_settings = {"sizes": [f"{n}x{m}" for n, m in sizes], "per_size": int(z.eval_per_size),
                   "eval_seed": int(z.eval_seed), "samples": int(z.samples), "best_of": list(best_of),
                   "temperature": float(config.rollout.temperature),
                   "max_new_tokens": int(config.eval.max_new_tokens)}
  timings_path = os.path.join(workdir, "timings.json")  # the times of the parts as they were run
  timings = _read_json(timings_path) if os.path.exists(timings_path) else {}
  t0 = time.perf_counter()
  reused = os.path.exists(os.path.join(workdir, "sft", "config.json"))
  sft_policy = run_lib.run_sft_stage(setup)
  if not reused or "sft_s" not in timings:
    timings["sft_s"] = time.perf_counter() - t0
  policies = {"sft": sft_policy}
  summaries = {}
  for variant in [v.strip() for v in str(z.variants).split(",") if v.strip()]:
    t0 = time.perf_counter()
    done = os.path.join(workdir, variant, "policy")
    summary_path = os.path.join(workdir, variant, "summary.json")
    if os.path.exists(os.path.join(done, "config.json")):
      policies[variant] = hf.from_pretrained(done)
      if os.path.exists(summary_path):
        summaries[variant] = _read_json(summary_path)
      timings.setdefault(f"rl_{variant}_s", time.perf_counter() - t0)
    else:
      trainer = build_trainer(config, variant, setup, sft_policy, workdir)
      summary = trainer.run()
      summaries[variant] = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
      policies[variant] = nnx.merge(trainer.graphdef, trainer.state.params)
      hf.save_pretrained(policies[variant], done)
      _write_json(summary_path, summaries[variant])
      timings[f"rl_{variant}_s"] = time.perf_counter() - t0
    print(json.dumps({"seed": seed, "variant": variant, "rl_time_s": round(timings[f"rl_{variant}_s"], 1),
                      **summaries.get(variant, {})}), flush=True)

  rows_by_policy = {}
  for name, policy in policies.items():
    cache = os.path.join(workdir, f"eval_{name}.json")
    if os.path.exists(cache) and _read_json(cache)["settings"] == eval_settings:
      rows_by_policy[name] = _read_json(cache)["rows"]
      continue
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
    _write_json(cache, {"settings": eval_settings, "rows": rows})
    rows_by_policy[name] = rows
  _write_json(timings_path, timings)
  return rows_by_policy, summaries, timings


SPREAD_FIELDS = ("puzzle_acc", "greedy_acc", "cell_acc", "cell_acc_pooled", "greedy_cell_acc", "answered")


def across_seeds(records, kind: str, key: str, best_of) -> list[dict]:
  """Per (policy, key) over the seeds' records of `kind`: mean, std (population), min and max of
  each accuracy; the chance rates and the search space are the seeds' common values."""
  import numpy as np

  fields = list(SPREAD_FIELDS) + [f"{p}_{k}" for k in best_of if k > 1 for p in ("best_of", "majority_of")]
  groups = collections.OrderedDict()
  for r in records:
    if r["kind"] == kind:
      groups.setdefault((r["policy"], r[key]), []).append(r)
  out = []
  for (policy, name), rs in groups.items():
    rec = {"kind": f"{kind}_seeds", "policy": policy, key: name, "seeds": [r["seed"] for r in rs],
           "puzzles": rs[0]["puzzles"], "search_space": rs[0]["search_space"],
           "chance_puzzle": rs[0]["chance_puzzle"], "chance_cell": rs[0]["chance_cell"]}
    for f in fields:
      if all(f in r for r in rs):
        v = np.array([r[f] for r in rs], float)
        rec.update({f"{f}_mean": float(v.mean()), f"{f}_std": float(v.std()), f"{f}_min": float(v.min()),
                    f"{f}_max": float(v.max())})
    out.append(rec)
  return out


def main(argv):
  del argv
  from tlt_jax import config as config_lib
  from tlt_jax.utils.compile_cache import enable_compile_cache

  enable_compile_cache()
  raw = _CONFIG.value
  z = raw.zebra
  sizes = parse_sizes(z.eval_sizes)
  best_of = tuple(int(k) for k in z.best_of)
  if any(z.samples % k for k in best_of):
    raise config_lib.ConfigError(f"config.zebra.best_of={best_of} is not allowed; allowed: divisors of "
                     f"config.zebra.samples={z.samples}")
  try:
    seeds = parse_seeds(z.seeds)
  except ValueError as e:
    raise config_lib.ConfigError(str(e)) from None
  config = config_lib.finalize(raw)
  workdir, out_dir = flags.FLAGS.workdir, flags.FLAGS.out
  os.makedirs(workdir, exist_ok=True)
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  records, all_summaries, all_timings = [], {}, {}
  for seed in seeds:
    rows_by_policy, summaries, timings = run_seed(raw, seed, os.path.join(workdir, f"seed{seed}"), sizes, best_of)
    all_summaries[seed], all_timings[seed] = summaries, timings
    for name, rows in rows_by_policy.items():
      for kind, key in (("size", "size"), ("bucket", "bucket"), ("z3", "z3_bin")):
        for rec in aggregate(rows, key, name, best_of):
          rec = {"kind": kind, "seed": seed, **rec}
          records.append(rec)
          if kind != "z3":
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
      overall = aggregate([{**r, "all": "all"} for r in rows], "all", name, best_of)[0]
      records.append({"kind": "overall", "seed": seed, **overall})
  spread = []
  for kind, key in (("size", "size"), ("bucket", "bucket"), ("overall", "all")):
    spread += across_seeds(records, kind, key, best_of)
  records += spread
  for seed, timings in all_timings.items():
    records.append({"kind": "timings", "seed": seed, **timings})
  for seed, summaries in all_summaries.items():
    for variant, s in summaries.items():
      records.append({"kind": "rl_summary", "seed": seed, "variant": variant, **s})
  total_s = time.perf_counter() - t_start
  with open(os.path.join(out_dir, "zebra_scaling.jsonl"), "w") as f:
    for rec in records:
      f.write(json.dumps(rec) + "\n")
  write_markdown(os.path.join(out_dir, "zebra_scaling.md"), config, seeds, records, best_of, all_timings,
                 all_summaries)
  plot(os.path.join(out_dir, "zebra_scaling.png"), [r for r in spread if r["kind"] == "size_seeds"])
  print(json.dumps({"kind": "done", "seeds": seeds, "total_s": round(total_s, 1)}), flush=True)


def _spread(rec, field) -> str:
  """"mean (min-max)" of a seed-spread record's field, in %; the mean alone for one seed."""
  if f"{field}_mean" not in rec:
    return "-"
  mean, lo, hi = (100 * rec[f"{field}_{s}"] for s in ("mean", "min", "max"))
  return f"{mean:.1f}" if len(rec["seeds"]) == 1 else f"{mean:.1f} ({lo:.1f}-{hi:.1f})"


def write_markdown(path, config, seeds, records, best_of, timings, summaries):
  from tlt_jax.utils.metrics import markdown_table

  top = max(best_of)
  pct = lambda v: None if v is None else round(100 * v, 1)  # noqa: E731
  t, z = config.task, config.zebra

  def spread_rows(kind, key):
    rows = []
    for r in records:
      if r["kind"] == f"{kind}_seeds":
        rows.append({"policy": r["policy"], key: r[key], "search_space": r["search_space"],
                     "puzzles": r["puzzles"], "puzzle_acc": _spread(r, "puzzle_acc"),
                     "greedy_acc": _spread(r, "greedy_acc"), "chance_puzzle": pct(r["chance_puzzle"]),
                     "cell_acc": _spread(r, "cell_acc"), "cell_acc_pooled": _spread(r, "cell_acc_pooled"),
                     "chance_cell": pct(r["chance_cell"]), f"best_of_{top}": _spread(r, f"best_of_{top}"),
                     f"majority_of_{top}": _spread(r, f"majority_of_{top}")})
    return rows

  spread_cols = ["puzzles", "puzzle_acc", "greedy_acc", "chance_puzzle", "cell_acc", "cell_acc_pooled",
                 "chance_cell", f"best_of_{top}", f"majority_of_{top}"]
  seed_cols = ["policy", "seed", "size", "puzzle_acc", "greedy_acc", "chance_puzzle", "cell_acc", "cell_acc_pooled",
               "chance_cell", f"best_of_{top}", f"majority_of_{top}"]
  seed_rows = [{**r, **{c: pct(r[c]) for c in seed_cols[3:]}} for r in records if r["kind"] == "size"]
  z3_cols = ["policy", "seed", "z3_bin", "puzzles", "puzzle_acc", "cell_acc", f"best_of_{top}"]
  z3_rows = [{**r, **{c: pct(r[c]) for c in z3_cols[4:]}} for r in records if r["kind"] == "z3"]
  lines = [
      "# ZebraLogic at tiny scale: accuracy against puzzle size and against chance\n",
      f"Training seeds {', '.join(map(str, seeds))}. Policy: {config.model.num_layers} layers, "
      f"d={config.model.hidden_size}, char tokenizer, compact puzzles. SFT {config.sft.steps} steps "
      f"({config.sft.batch_size} packed rows of {config.sft.max_len}, lr {config.sft.lr}, "
      f"{config.sft.schedule}) on `{t.trace}` targets of N x M puzzles, N in {t.min_houses}..{t.max_houses}, "
      f"M in {t.min_attributes}..{t.max_attributes} (recipe `{t.recipe}`"
      f"{', evaluation puzzles held out of training' if z.holdout else ''}); RL {config.rl.steps} GRPO "
      f"steps of {config.rl.prompts_per_step} x {config.rl.group_size} (lr {config.rl.lr}; `grpo`: verifier "
      f"+ {config.rl.rewards.format} * format; `grpo_cells`: + {z.cell_reward_weight} * cell accuracy). "
      f"Evaluation: {z.eval_per_size} fixed puzzles per size (seed {z.eval_seed}), {z.samples} samples "
      f"each at T={config.rollout.temperature} and one greedy answer.\n",
      "Accuracies in %, as `mean (min-max)` over the seeds: puzzle_acc and cell_acc are single samples "
      "(averaged over the samples); greedy_acc is the greedy answer; cell_acc_pooled is ZeroEval's "
      "pooling (right cells over all cells of all samples, unparsed answers counting 0); best_of_N is "
      "the oracle pass@N; majority_of_N the most frequent answer of N; chance_puzzle and chance_cell are "
      "a uniformly random grid's (1 / (N!)^M per puzzle, 1 / N per cell, averaged over the puzzles).\n",
      "## By search-space bucket, across seeds (small < 1e3 <= medium < 1e6 <= large < 1e10 <= XL)\n",
      markdown_table(spread_rows("bucket", "bucket") + [{**r, "bucket": "overall"} for r in spread_rows("overall", "all")],
                     ["policy", "bucket"] + spread_cols),
      "## By size, across seeds\n",
      markdown_table(spread_rows("size", "size"), ["policy", "size", "search_space"] + spread_cols),
      "## By size, per seed\n", markdown_table(seed_rows, seed_cols),
      "## By Z3 conflicts, per seed\n", markdown_table(z3_rows, z3_cols),
      "## The paper's numbers (a different scale)\n",
      "Lin et al. (2025) evaluate models of billions of parameters, prompted in natural language, on "
      "1,000 puzzles of 2x2..6x6; puzzle accuracy in %. Not comparable in scale with a ~1M-parameter "
      "policy trained on the task; shown for the shape of the curve.\n",
      markdown_table([{k: ("-" if v is None else v) for k, v in r.items()} for r in PAPER_RESULTS],
                     ["model", "overall", "xl"]),
      "## RL runs\n",
  ]
  nan = float("nan")
  for seed, by_variant in summaries.items():
    for variant, s in by_variant.items():
      lines.append(f"- seed {seed}, `{variant}`: training reward {s.get('reward_first5', nan):.3f} -> "
                   f"{s.get('reward_last5', nan):.3f}, training accuracy {s.get('accuracy_first5', nan):.3f} -> "
                   f"{s.get('accuracy_last5', nan):.3f} (means of the first and last 5 steps)")
  lines.append("\nTimes (s, of each part when it ran; seeds run side by side share the CPU):\n")
  for seed, tm in timings.items():
    lines.append(f"- seed {seed}: " + ", ".join(f"{k} {v:.0f}" for k, v in tm.items()))
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


def _bucket(space):
  from tlt_jax.data.zebra.puzzle import size_bucket
  return size_bucket(space)


def plot(path, by_size):
  """Puzzle and cell accuracy by search space, the seeds' mean with their min-max as bars, beside
  the chance rates."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  policies = list(dict.fromkeys(r["policy"] for r in by_size))
  for i, policy in enumerate(policies):
    rs = sorted((r for r in by_size if r["policy"] == policy), key=lambda r: r["search_space"])
    xs = [r["search_space"] * (1.06 ** i) for r in rs]  # side by side
    for ax, field in ((axes[0], "puzzle_acc"), (axes[1], "cell_acc")):
      mean = [100 * r[f"{field}_mean"] for r in rs]
      err = [[100 * (r[f"{field}_mean"] - r[f"{field}_min"]) for r in rs],
             [100 * (r[f"{field}_max"] - r[f"{field}_mean"]) for r in rs]]
      ax.errorbar(xs, mean, yerr=err, marker="o", capsize=3, label=f"{policy} (T=1 sample)")
  rs = sorted((r for r in by_size if r["policy"] == policies[0]), key=lambda r: r["search_space"]) if policies else []
  for ax, field in ((axes[0], "chance_puzzle"), (axes[1], "chance_cell")):
    ax.plot([r["search_space"] for r in rs], [100 * r[field] for r in rs], color="grey", ls="--",
            label="random grid")
  for ax, title in ((axes[0], "puzzle accuracy (%)"), (axes[1], "cell accuracy (%)")):
    ax.set_title(title)
    ax.set_xlabel("search space (N!)^M")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=7)
  fig.suptitle("ZebraLogic at tiny scale: mean and min-max over training seeds")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  run_experiment(main)
