"""TLT's speed-up where its regime is real, by simulation (analysis/sim.py) at measured or compiled costs.

Two modes:

  python experiments/pod_sim.py --config=configs/qwen2_5_7b_gsm8k.py [--costs=roofline|compiled]
      Predicts one RL step of the config on its TPU slice (Qwen2.5-7B on v5p-64: 4 rollout groups
      of 8 chips by default) for plain / static drafter / TLT, and sweeps the speculation
      threshold, the number of rollout groups, the drafter's accept rate, its staleness and the
      tail's shape. Costs: `roofline` (analysis/costs.RooflineCosts: weights + live KV bytes over HBM
      bandwidth, FLOPs over peak x MFU) or `compiled` (the TPU compiler's per-step estimates in
      experiments/results/pod_compile/, the roofline where they are missing). Response lengths:
      a lognormal long tail cut at rollout.max_new_tokens (parameters in the `sim` flags below).

  python experiments/pod_sim.py --validate [--trace=... --measured=... --e2e=...]
      Replays a recorded CPU run (the traces an `experiments/e2e_speedup.py` run wrote) at the
      costs `experiments/cost_bench.py` measured on this CPU, and prints the prediction error of
      the median step and rollout times of each variant against the run's measurements.

Writes DIR/pod_sim.{jsonl,md,png} (or pod_sim_validate.*). Every time in the pod table is a
model's prediction, never a measurement on a TPU.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments.common import ROOT, run_experiment  # noqa: E402
from tlt_jax import cli  # noqa: E402

_CONFIG = cli.define_config_flag("configs/qwen2_5_7b_gsm8k.py")
flags.DEFINE_string("out", "experiments/results/pod_sim", "output directory (--validate: DIR/../pod_sim_validate when left at the default)")
flags.DEFINE_string("costs", "roofline", "pod cost source: roofline or compiled")
flags.DEFINE_string("topology", "", "TPU slice (default: the config's, v5p-64 or v6e-64)")
flags.DEFINE_string("compiled", "", "pod_compile JSONL (default: experiments/results/pod_compile/<config>_<topology>.jsonl)")
flags.DEFINE_integer("steps", 12, "RL steps simulated per variant (medians over all but the first 2)")
flags.DEFINE_float("median_len", 1500.0, "lognormal response-length median (tokens)")
flags.DEFINE_float("sigma", 0.7, "lognormal log-scale sigma (the tail's weight)")
flags.DEFINE_float("alpha", 0.75, "per-token draft acceptance of a freshly trained drafter")
flags.DEFINE_float("decay", 0.97, "a static drafter's (accept - 1) multiplier per RL step of staleness")
flags.DEFINE_integer("refresh_steps", 8, "drafter steps per RL step that keep TLT's drafter fresh")
flags.DEFINE_float("mfu", 0.5, "fraction of peak FLOP/s of the update and prefill (roofline)")
flags.DEFINE_float("decode_efficiency", 0.7, "fraction of HBM bandwidth a decode step reaches (roofline)")
flags.DEFINE_bool("sweeps", True, "run the sweeps (threshold, groups, alpha, staleness, tail)")
flags.DEFINE_bool("validate", False, "replay a recorded CPU run instead (module docstring)")
flags.DEFINE_string("trace", "experiments/results/e2e_speedup_traced/traces.jsonl", "--validate: recorded traces")
flags.DEFINE_string("measured", "experiments/results/cost_bench/cpu.json", "--validate: measured costs")
flags.DEFINE_integer("skip", 5, "--validate: first steps left out of the medians (compiles), as e2e_speedup's --warmup")
flags.DEFINE_string("e2e", "experiments/results/e2e_speedup_traced/e2e_speedup.jsonl", "--validate: the run's measurements")
FLAGS = flags.FLAGS

PAPER = "TLT (Hu et al., 2025): 1.7-2.1x end to end on GPUs (measured there)"


# ------------------------------------------------------------------------------ pod prediction


def _pod_costs(config, topo, kind: str, groups: int):
  import jax
  from flax import nnx

  from tlt_jax.drafter.eagle import EagleDrafter
  from tlt_jax.analysis import aot
  from tlt_jax.analysis import costs as costs_lib

  cfg = aot.model_config_for(config)
  drafter = nnx.eval_shape(lambda: EagleDrafter(cfg, rngs=nnx.Rngs(0)))
  dparams = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(drafter, nnx.Param)))
  head = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
  gen = topo.name.split("-")[0]
  roof = dict(params=int(cfg.num_params), layers=cfg.num_layers, kv_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_heads, group_chips=topo.chips // groups,
              total_chips=topo.chips, hbm_bandwidth=topo.hbm_bandwidth, peak_flops=costs_lib.PEAK_BF16_FLOPS[gen],
              drafter_params=dparams, head_params=head, mfu=FLAGS.mfu, decode_efficiency=FLAGS.decode_efficiency,
              drafter_train_tokens=int(config.tlt.drafter_batch_size) * int(config.tlt.get("buffer_seq_len", 0) or 9216))
  if kind == "roofline":
    return costs_lib.RooflineCosts(**roof, source=f"roofline model ({topo.name}, {topo.chips // groups} chips/group)")
  if kind == "compiled":
    stem = os.path.splitext(os.path.basename(cli.config_path_of(sys.argv).split(":")[0]))[0]
    path = FLAGS.compiled or os.path.join(ROOT, "experiments", "results", "pod_compile", f"{stem}_{topo.name}.jsonl")
    if not os.path.exists(path):
      from tlt_jax.errors import ConfigError
      raise ConfigError(f"--costs=compiled: {path} does not exist; run experiments/pod_compile.py for "
                        f"{topo.name} first, or use --costs=roofline")
    return costs_lib.CompiledCosts.from_jsonl(path, **roof, source=f"compiler estimates ({topo.name})")
  from tlt_jax.errors import ConfigError
  raise ConfigError(f"--costs={kind!r} is not allowed; allowed: roofline, compiled")


def _pod_case(config, costs, groups: int, threshold: int, alpha: float, decay: float, sigma: float,
              median: float, seed: int = 0):
  from tlt_jax.analysis import sim

  n = int(config.rl.prompts_per_step) * int(config.rl.group_size)
  prompt_len = int(config.rollout.max_prompt_len) + 1
  lengths = sim.LogNormalLengths(median, sigma, int(config.rollout.max_new_tokens))
  rng = np.random.default_rng(seed)
  steps = [sim.split_groups(lengths.sample(rng, n), groups, int(config.rl.group_size)) for _ in range(FLAGS.steps)]
  spec = sim.RolloutSpec.from_config(config, prompt_len)
  spec = type(spec)(**{**spec.__dict__, "spec_threshold": threshold})
  accept = sim.AcceptModel(alpha=alpha, decay=decay)
  out = {}
  for v in sim.VARIANTS:
    recs = sim.simulate_run(steps, spec, costs, accept, v, refresh_steps=FLAGS.refresh_steps, seed=seed)
    out[v.name] = sim.summarize(recs, skip=2)
  base = out["plain"]["step_time_s"]
  for v in out.values():
    v["speedup"] = base / v["step_time_s"]
    v["rollout_share"] = v["rollout_time_s"] / v["step_time_s"]
  return out


def predict_pod(config):
  from tlt_jax.analysis import aot

  groups0 = int(config.tlt.rollout_groups)
  name = FLAGS.topology or ("v6e-64" if groups0 == 8 else "v5p-64")
  topo = aot.topology(name)
  base = dict(groups=groups0, threshold=int(config.rollout.spec_threshold), alpha=FLAGS.alpha,
              decay=FLAGS.decay, sigma=FLAGS.sigma, median=FLAGS.median_len)
  rows = []

  def run(label, **kw):
    case = {**base, **kw}
    costs = _pod_costs(config, topo, FLAGS.costs, case["groups"])
    res = _pod_case(config, costs, **case)
    for variant, r in res.items():
      row = dict(sweep=label, topology=topo.name, costs=costs.source, variant=variant, **case, **r)
      print(json.dumps(row), flush=True)
      rows.append(row)

  run("main")
  if FLAGS.sweeps:
    for th in (2, 4, 16, 32):
      run("threshold", threshold=th)
    for g in (2, 8):
      if g != groups0 and topo.chips % g == 0:
        run("groups", groups=g)
    for a in (0.5, 0.65, 0.85):
      run("alpha", alpha=a)
    for d in (1.0, 0.9):
      run("staleness", decay=d)
    for s in (0.4, 1.0):
      run("tail", sigma=s)
  return rows, topo


def _write_pod(rows, topo, out: str):
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "pod_sim.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  main = [r for r in rows if r["sweep"] == "main"]
  lines = [f"# TLT step simulator: Qwen2.5-7B on {topo.name} (predicted, not measured)", "",
           f"Costs: {main[0]['costs']}. Lengths: lognormal, median {main[0]['median']:.0f} tokens, "
           f"sigma {main[0]['sigma']}, cut at the config's max_new_tokens. Drafter: per-token acceptance "
           f"{main[0]['alpha']}, a static drafter's drafted part x{main[0]['decay']} per RL step of staleness. "
           f"Paper beside ours: {PAPER}.", "",
           "| sweep | value | variant | step s | rollout s | rollout share | speed-up vs plain | bubble util. | "
           "drafter steps | accept len | spec frac |", "|---|---|---|---|---|---|---|---|---|---|---|"]
  keyof = {"main": "groups", "threshold": "threshold", "groups": "groups", "alpha": "alpha", "staleness": "decay",
           "tail": "sigma"}
  fmt = lambda v, p=3: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
  for r in rows:
    lines.append(f"| {r['sweep']} | {r[keyof[r['sweep']]]} | {r['variant']} | {fmt(r['step_time_s'], 2)} | "
                 f"{fmt(r['rollout_time_s'], 2)} | {fmt(r['rollout_share'], 2)} | **{r['speedup']:.2f}x** | "
                 f"{fmt(r['bubble_utilisation'], 2)} | {fmt(r['drafter_steps'], 0)} | {fmt(r['accept_len'], 2)} | "
                 f"{fmt(r['spec_frac'], 3)} |")
  with open(os.path.join(out, "pod_sim.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(14, 4))
  for ax, sweep, xkey in zip(axes, ("threshold", "alpha", "tail"), ("threshold", "alpha", "sigma")):
    pts = [r for r in rows if r["sweep"] in (sweep, "main")]
    for variant in ("static", "tlt"):
      vs = sorted((r[xkey], r["speedup"]) for r in pts if r["variant"] == variant)
      ax.plot([x for x, _ in vs], [y for _, y in vs], "o-", label=variant)
    ax.axhspan(1.7, 2.1, color="grey", alpha=0.2, label="paper 1.7-2.1x (GPU)")
    ax.set_xlabel(xkey)
    ax.set_ylabel("predicted speed-up vs plain")
    ax.legend(fontsize=8)
  fig.suptitle(f"Qwen2.5-7B on {topo.name}: simulated, {rows[0]['costs']}")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "pod_sim.png"), dpi=110)
  return os.path.join(out, "pod_sim.md")


# ------------------------------------------------------------------------------ validation


def _read_jsonl(path: str) -> list[dict]:
  from tlt_jax.errors import DataError
  if not os.path.exists(path):
    raise DataError(f"{path} does not exist; record it first (module docstring of experiments/pod_sim.py)")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def replay_variant(traces: list[dict], costs, skip: int = 5, seed: int = 0) -> tuple[list[dict], dict]:
  """Replays one variant's recorded steps: its lengths per group, its scheduling parameters and
  its recorded accept lengths per strategy, at `costs`. Returns (records, summary)."""
  from tlt_jax.analysis import sim
  from tlt_jax.analysis.costs import parse_strategy
  t0 = traces[0]
  sp = t0["spec"]
  spec = sim.RolloutSpec(chunk_size=sp["chunk_size"], buckets=tuple(sp["buckets"]),
                         spec_threshold=sp["spec_threshold"] if t0["speculative"] else 0,
                         rounds_per_chunk=sp["rounds_per_chunk"],
                         arms=tuple(parse_strategy(a) for a in sp["arms"]) or ((3, 1, 3),),
                         prompt_len=int(t0["prompt_width"]), compact=sp["compact"], seed=seed,
                         train_in_bubbles=bool(t0.get("train_in_bubbles", True)),
                         between_steps=int(t0.get("between_steps", 0)))
  samples: dict[str, list[float]] = {}
  for tr in traces:
    for _, _, strategy, tokens, _, row_rounds, _ in tr["chunks"]:
      if strategy is not None and row_rounds:
        samples.setdefault(strategy, []).append(tokens / row_rounds)
  accept = sim.AcceptModel(samples=samples)
  variant = sim.Variant(t0.get("variant", "?"), bool(t0["speculative"]), bool(t0["train_drafter"]))
  steps = [[np.asarray(g) for g in tr["lengths"]] for tr in traces]
  tokens = [sum(len(g) * spec.prompt_len + int(np.sum(g)) for g in tr["lengths"]) for tr in traces]
  recs = sim.simulate_run(steps, spec, costs, accept, variant, update_tokens=tokens, seed=seed)
  return recs, sim.summarize(recs, skip=skip)


def validate(trace_path: str, measured_path: str, e2e_path: str, out: str, skip: int = 5) -> list[dict]:
  """Predicted vs measured median step and rollout times per variant (module docstring)."""
  from tlt_jax.analysis.costs import MeasuredCosts
  traces = _read_jsonl(trace_path)
  measured = _read_jsonl(e2e_path)
  with open(measured_path) as f:
    data = json.load(f)
  by_variant: dict[str, list[dict]] = {}
  for tr in traces:
    by_variant.setdefault(tr["variant"], []).append(tr)
  # the update + log-prob cost per token, from the plain run's own steps (not a rollout cost)
  plain_m = {r["step"]: r for r in measured if r["variant"] == "plain"}
  per_tok = []
  for tr in by_variant.get("plain", []):
    m = plain_m.get(tr["step"])
    if m and tr["step"] > skip:
      tok = sum(len(g) * int(tr["prompt_width"]) + int(np.sum(g)) for g in tr["lengths"])
      per_tok.append((m["step_time_s"] - m["rollout_time_s"]) / tok)
  data = dict(data, update_s_per_token=float(np.median(per_tok)) if per_tok else 0.0)
  costs = MeasuredCosts(data)
  rows = []
  for variant, trs in by_variant.items():
    trs.sort(key=lambda x: x["step"])
    _, pred = replay_variant(trs, costs, skip=skip)
    ms = [r for r in measured if r["variant"] == variant and r["step"] > skip]
    meas = {k: float(np.median([r[k] for r in ms])) for k in ("step_time_s", "rollout_time_s")}
    row = dict(variant=variant, costs=costs.source, steps=len(ms),
               measured_step_s=meas["step_time_s"], predicted_step_s=pred["step_time_s"],
               step_error=pred["step_time_s"] / meas["step_time_s"] - 1,
               measured_rollout_s=meas["rollout_time_s"], predicted_rollout_s=pred["rollout_time_s"],
               rollout_error=pred["rollout_time_s"] / meas["rollout_time_s"] - 1,
               predicted_bubble_utilisation=pred["bubble_utilisation"], predicted_drafter_steps=pred["drafter_steps"])
    print(json.dumps(row), flush=True)
    rows.append(row)
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "pod_sim_validate.jsonl"), "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  lines = ["# Step simulator vs a measured CPU run", "",
           f"Replayed: {trace_path} (recorded lengths, chunks' accept lengths, scheduling parameters) "
           f"at {costs.source} ({measured_path}; shared-core gain {costs.shared_gain}); the update's "
           "cost per token is the plain run's own (step - rollout) / tokens. Medians over steps > "
           f"{skip}.", "",
           "| variant | measured step s | predicted | error | measured rollout s | predicted | error |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {r['measured_step_s']:.3f} | {r['predicted_step_s']:.3f} | "
                 f"{r['step_error']:+.1%} | {r['measured_rollout_s']:.3f} | {r['predicted_rollout_s']:.3f} | "
                 f"{r['rollout_error']:+.1%} |")
  with open(os.path.join(out, "pod_sim_validate.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  x = np.arange(len(rows))
  for i, (key, label) in enumerate((("measured_step_s", "measured step"), ("predicted_step_s", "predicted step"),
                                    ("measured_rollout_s", "measured rollout"),
                                    ("predicted_rollout_s", "predicted rollout"))):
    ax.bar(x + (i - 1.5) * 0.2, [r[key] for r in rows], 0.2, label=label)
  ax.set_xticks(x, [r["variant"] for r in rows])
  ax.set_ylabel("seconds (median)")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "pod_sim_validate.png"), dpi=110)
  worst = max(max(abs(r["step_error"]), abs(r["rollout_error"])) for r in rows)
  print(f"largest prediction error {worst:.1%} (target <= 15%); wrote {out}/pod_sim_validate.md", flush=True)
  return rows


def main(argv):
  del argv
  import ml_collections
  config = _CONFIG.value
  if FLAGS.validate:
    out = FLAGS.out if FLAGS.out != "experiments/results/pod_sim" else "experiments/results/pod_sim_validate"
    validate(FLAGS.trace, FLAGS.measured, FLAGS.e2e, out, skip=FLAGS.skip)
    return
  config = ml_collections.FrozenConfigDict(config)
  rows, topo = predict_pod(config)
  path = _write_pod(rows, topo, FLAGS.out)
  for r in rows:
    if r["sweep"] == "main":
      print(f"{r['variant']:>6}: step {r['step_time_s']:.2f} s, rollout {r['rollout_time_s']:.2f} s "
            f"({r['rollout_share']:.0%}), {r['speedup']:.2f}x vs plain", flush=True)
  print(f"wrote {path} (+ .jsonl, .png); {PAPER}", flush=True)


if __name__ == "__main__":
  run_experiment(main)
