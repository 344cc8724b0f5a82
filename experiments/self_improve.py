"""Self-improvement for length generalisation: accuracy by digits over rounds, per label filter.

Lee et al. (2025), "Self-Improving Transformers Overcome Easy-to-Hard and Length Generalization
Challenges": a NoPE transformer trained on short reverse additions labels problems one digit
longer than it has seen, keeps the labels that pass its filters, trains on them, and repeats.
Their 10-digit-trained model reaches 100+ digits, and filtering (length + majority vote) is what
keeps label errors from compounding.

Here, at a scale that runs on 2 CPU cores: k models (configs/self_improve.py) trained on
1..initial_digits digits (round 0, one WSD phase, shared by every variant), then `rounds` rounds
per filter variant:

  none          every model trains on its own raw greedy answers;
  length        ... only on its answers that end with EOS and have the expected length;
  length+vote   ... only on problems where >= vote_threshold of the k models agree (the
                consensus label), after the length filter.

The variants advance round by round in turn (so a time limit cuts them at the same round). Each
round reports the held-out accuracy for 1..eval_max_digits digits (mean over the k models), the
reach (largest n with accuracy >= reach_accuracy at every length up to n), and the labels kept and
dropped by each filter with the error rate of the kept labels against the true sums.

  python experiments/self_improve.py [--config=configs/self_improve.py] [--filters=none,length,length+vote] \\
      [--workdir runs/self_improve] [--out experiments/results/self_improve] [--time_budget_s 1800] \\
      [--config.self_improve.rounds=6 ...]

Writes OUT/self_improve.jsonl (one line per variant and round), OUT/self_improve.md (the tables,
beside the paper's figures) and OUT/self_improve_heatmap.png (accuracy by digits x round, one
panel per variant). The runs live in WORKDIR/<variant>/ and resume where they stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from experiments.common import (ROOT, define_output_flags, enable_compile_cache, run_experiment,  # noqa: E402
                                with_overrides)

DEFAULT_CONFIG = os.path.join(ROOT, "configs", "self_improve.py")
VARIANTS = ("none", "length", "length+vote")
# Lee et al. (2025), the reverse-addition results (their Figs. on length generalisation), in
# words we could check. Ours are a different (tiny, CPU) scale.
PAPER = ("6-layer d=384 NoPE Llama-style model, 3-5 seeds voting at 70 %: trained on 1-10 digits, "
         "self-improvement reaches 100+ digits (one digit per round, no apparent saturation; "
         "the fast schedule gets there in fewer rounds). Without filtering, label errors compound "
         "and accuracy collapses after some rounds; length filtering and majority voting keep the "
         "label error rate near zero and give exponential out-of-distribution gains.")


def define_flags():
  """The command line (a function, so that notebooks import this module without flags)."""
  from absl import flags

  from tlt_jax import cli
  define_output_flags("experiments/results/self_improve", workdir="runs/self_improve",
                      workdir_help="runs of every variant (resumed when present)")
  flags.DEFINE_string("filters", ",".join(VARIANTS), "filter variants to run, comma-separated")
  flags.DEFINE_integer("time_budget_s", 0, "start no new round after this many seconds (0: no limit)")
  flags.DEFINE_list("gather", [], "instead of running: self_improve.jsonl files of whole-ensemble repeats "
                    "(runs with different --config.seed); writes OUT/ensembles.md, the spread across them")
  return cli.define_config_flag(DEFAULT_CONFIG)


def variant_dir(workdir: str, variant: str) -> str:
  return os.path.join(workdir, variant.replace("+", "_"))


def run_variants(config, variants, workdir: str, on_record=None, time_budget_s: float = 0.0
                 ) -> dict[str, list[dict]]:
  """Round 0 once (in WORKDIR/round0), copied into each variant's run; then the variants' rounds
  in turn, one round each per pass. Returns {variant: records}."""
  from tlt_jax.curriculum import self_improve as si
  t0 = time.perf_counter()
  base_dir = os.path.join(workdir, "round0")
  si.run_self_improve(config, base_dir, stop_after_round=0)
  histories = {}
  for v in variants:
    vdir = variant_dir(workdir, v)
    if not os.path.exists(os.path.join(vdir, "ckpt")):
      shutil.copytree(os.path.join(base_dir, "ckpt"), os.path.join(vdir, "ckpt"))
    histories[v] = []
  rounds = int(config.self_improve.rounds)
  for r in range(0, rounds + 1):
    for v in variants:
      if r > 0 and time_budget_s and time.perf_counter() - t0 > time_budget_s:
        return histories
      cfg = with_overrides(config, {"self_improve.filter": v})
      seen = len(histories[v])
      hist = si.run_self_improve(cfg, variant_dir(workdir, v), stop_after_round=r)
      for rec in hist[seen:]:
        if on_record is not None:
          on_record(v, rec)
      histories[v] = hist
  return histories


def table_rows(histories: dict[str, list[dict]]) -> list[dict]:
  rows = []
  for v, hist in histories.items():
    for rec in hist:
      lab = rec.get("labels") or {}
      acc = rec["acc"]
      rows.append({"filter": v, "round": rec["round"],
                   "labelled_digits": "-" if rec["label_digits"] is None else
                   "-".join(str(d) for d in sorted(set(rec["label_digits"]))),
                   "reach": rec["reach"],
                   "acc_frontier": acc.get(str(rec["frontier"])),
                   "acc_frontier+1": acc.get(str(rec["frontier"] + 1)),
                   "answers": lab.get("answers"), "dropped_length": lab.get("dropped_length"),
                   "dropped_vote": lab.get("dropped_vote"), "kept": lab.get("kept"),
                   "raw_error": lab.get("answer_error_rate"),
                   "kept_error": lab.get("kept_error_rate")})
  return [{k: ("-" if v is None else v) for k, v in row.items()} for row in rows]


def write_markdown(path: str, histories, config, elapsed: float, argv_overrides: str) -> None:
  from tlt_jax.utils.metrics import markdown_table
  si, m = config.self_improve, config.model
  cols = ["filter", "round", "labelled_digits", "reach", "acc_frontier", "acc_frontier+1", "answers",
          "dropped_length", "dropped_vote", "kept", "raw_error", "kept_error"]
  md = [f"# Self-improvement for length generalisation ({config.task.name}, NoPE)\n",
        f"Task `{config.task.name}`; {si.num_models} models (d={m.hidden_size}, {m.num_layers} layers, position_embedding="
        f"{m.position_embedding!r}) trained on 1..{si.initial_digits} digits in round 0 "
        f"({config.sft.round0_steps} steps at lr {config.sft.lr}), then one WSD phase of "
        f"{config.sft.round_steps} steps per round (peak {config.sft.round_lr or config.sft.lr}, "
        f"cooldown share {config.sft.round_decay_frac}; " + (
            f"{si.newest_frac} of each batch from the newest round's labels, the rest earlier labels and "
            f"fresh problems, weighted as if the initial data were {si.initial_size} problems"
            if si.mixture == "newest" else
            f"pool labels at most {si.pool_frac} of a batch, mixed as if the initial data were "
            f"{si.initial_size} problems") + f"); {si.problems_per_round} problems labelled per round, {si.digits_per_round} new digit(s) "
        f"per round, vote threshold {si.vote_threshold}; held-out: {si.eval_per_digit} problems per "
        f"length 1..{si.eval_max_digits}, greedy exact match, mean over the models. {argv_overrides}. "
        f"{elapsed:.0f} s in all on this (shared, loaded) 2-core CPU.\n",
        "`reach`: the largest n with mean accuracy >= "
        f"{si.reach_accuracy} at every length 1..n. `acc_frontier(+1)`: accuracy at the longest trained "
        "length and one past it. Label counts are model answers (k per problem); `raw_error`: share of "
        "all answers that are wrong; `kept_error`: share of the kept labels that are wrong (against the "
        "true sums).\n", markdown_table(table_rows(histories), cols), "\n## Accuracy by digits\n"]
  for v, hist in histories.items():
    digits = sorted(int(d) for d in hist[0]["acc"]) if hist else []
    rows = [{"round": rec["round"], **{str(d): round(rec["acc"][str(d)], 2) for d in digits}} for rec in hist]
    md += [f"\n### {v}\n", markdown_table(rows, ["round"] + [str(d) for d in digits])]
  md += ["\n## The paper (different scale)\n", PAPER + "\n"]
  with open(path, "w") as f:
    f.write("\n".join(md))


def read_histories(path: str) -> dict[str, dict[int, dict]]:
  """{variant: {round: record}} from a self_improve.jsonl (the last record of a round wins)."""
  out: dict[str, dict[int, dict]] = {}
  with open(path) as f:
    for line in f:
      rec = json.loads(line)
      if rec.get("kind") == "round":
        out.setdefault(rec["variant"], {})[int(rec["round"])] = rec
  return out


def ensemble_rows(runs: list[dict[str, dict[int, dict]]]) -> list[dict]:
  """Per (filter, round) over whole-ensemble repeats: the reach of each repeat, and mean (min-max)
  of the accuracy at the frontier, one past it, and the kept-label error. A (filter, round)
  missing from any repeat is left out."""
  def spread(values):
    values = [v for v in values if v is not None]
    if not values:
      return "-"
    return f"{np.mean(values):.2f} [{min(values):.2f}-{max(values):.2f}]"
  rows = []
  for v in VARIANTS:
    rounds = sorted(set.intersection(*[set(run.get(v, {})) for run in runs])) if runs else []
    for r in rounds:
      recs = [run[v][r] for run in runs]
      labs = [rec.get("labels") or {} for rec in recs]
      rows.append({"filter": v, "round": r,
                   "reach per repeat": " / ".join(str(rec["reach"]) for rec in recs),
                   "acc_frontier": spread([rec["acc"].get(str(rec["frontier"])) for rec in recs]),
                   "acc_frontier+1": spread([rec["acc"].get(str(rec["frontier"] + 1)) for rec in recs]),
                   "kept_error": spread([lab.get("kept_error_rate") for lab in labs])})
  return rows


def write_ensembles(path: str, sources: list[str]) -> list[dict]:
  from tlt_jax.utils.metrics import markdown_table
  rows = ensemble_rows([read_histories(s) for s in sources])
  cols = ["filter", "round", "reach per repeat", "acc_frontier", "acc_frontier+1", "kept_error"]
  md = ["# Self-improvement: whole-ensemble repeats\n",
        "Each repeat is a full run (round 0 and every round of every filter) of a 5-model ensemble "
        "with its own seeds; sources, in the order of the `reach per repeat` column: "
        + ", ".join(f"`{os.path.basename(s)}`" for s in sources) + ". Accuracies: held-out greedy "
        "exact match, each repeat's mean over its 5 models, then mean [min-max] over the repeats. "
        "`kept_error`: share of the kept labels that are wrong.\n", markdown_table(rows, cols)]
  with open(path, "w") as f:
    f.write("\n".join(md) + "\n")
  return rows


def plot_heatmap(histories, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  variants = [v for v in histories if histories[v]]
  fig, axes = plt.subplots(1, len(variants), figsize=(4.2 * len(variants), 3.4), squeeze=False)
  for ax, v in zip(axes[0], variants):
    hist = histories[v]
    digits = sorted(int(d) for d in hist[0]["acc"])
    grid = np.array([[rec["acc"][str(d)] for d in digits] for rec in hist])
    im = ax.imshow(grid, aspect="auto", origin="lower", vmin=0, vmax=1, cmap="viridis",
                   extent=(digits[0] - 0.5, digits[-1] + 0.5, -0.5, len(hist) - 0.5))
    ax.plot([rec["frontier"] for rec in hist], range(len(hist)), "w--", lw=1, label="trained up to")
    ax.set_title(f"filter: {v}")
    ax.set_xlabel("digits")
    ax.set_ylabel("round")
    ax.legend(fontsize=7, loc="upper left")
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="held-out accuracy")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  plt.close(fig)


def main(argv):
  del argv
  from absl import flags

  from tlt_jax.curriculum import self_improve as si
  from tlt_jax.utils.console import say
  args = flags.FLAGS
  if args.gather:
    missing = [p for p in args.gather if not os.path.isfile(p)]
    if missing:
      from tlt_jax.errors import ConfigError
      raise ConfigError(f"--gather: no such file: {', '.join(missing)}")
    os.makedirs(args.out, exist_ok=True)
    rows = write_ensembles(os.path.join(args.out, "ensembles.md"), list(args.gather))
    say(json.dumps({"kind": "gathered", "repeats": len(args.gather), "rows": len(rows)}))
    return
  enable_compile_cache()
  config = args["config"].value
  si.validate(config)
  variants = [v for v in args.filters.split(",") if v]
  bad = [v for v in variants if v not in si.FILTERS]
  if bad:
    from tlt_jax.errors import ConfigError
    raise ConfigError(f"--filters={args.filters!r} is not allowed; allowed: a comma-separated subset of {si.FILTERS}")
  os.makedirs(args.out, exist_ok=True)
  jsonl = open(os.path.join(args.out, "self_improve.jsonl"), "w")

  def on_record(variant, rec):
    line = {"kind": "round", "variant": variant, **rec}
    jsonl.write(json.dumps(line) + "\n")
    jsonl.flush()
    lab = rec.get("labels") or {}
    say(json.dumps({"variant": variant, "round": rec["round"], "label_digits": rec["label_digits"],
                    "reach": rec["reach"], "kept": lab.get("kept"), "kept_error_rate": lab.get("kept_error_rate"),
                    "time_s": rec["time_s"]}))

  t0 = time.perf_counter()
  histories = run_variants(config, variants, args.workdir, on_record, args.time_budget_s)
  elapsed = time.perf_counter() - t0
  jsonl.close()
  given = " ".join(a for a in sys.argv[1:] if a.startswith("--")) or "defaults"
  write_markdown(os.path.join(args.out, "self_improve.md"), histories, config, elapsed, f"Flags: `{given}`")
  plot_heatmap(histories, os.path.join(args.out, "self_improve_heatmap.png"))
  say(json.dumps({"kind": "done", "elapsed_s": round(elapsed, 1),
                  "reach": {v: [r["reach"] for r in h] for v, h in histories.items()}}))


if __name__ == "__main__":
  define_flags()
  run_experiment(main)
