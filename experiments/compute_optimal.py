"""Compute-optimal sampling: weak-cheap (WC) vs strong-expensive (SE) synthetic data at matched
FLOPs, with exact false-positive rates (Bansal et al. 2024, "Smaller, Weaker, Yet Better:
Training LLM Reasoners via Compute-Optimal Sampling").

  1. Three policies SFT'd on mostly-short addition problems (configs/synth.py): SE, WC (~1/3 of
     SE's parameters) and a smaller student. Each is cached in WORKDIR/<role>/sft (a rerun skips it).
  2. Problems the policies are imperfect on (longer ones, `synth.min_digits..max_digits`): at each
     budget (SE samples per problem), WC draws as many samples as the same FLOPs buy
     (tlt_jax/synth/flops.py; attention included or not by `synth.include_attention`). Samples are
     drawn once at the largest budget (T = `synth.temperature`, rollout engine) and a budget of k
     samples uses the first k of each problem; every sample is checked step by step
     (`Task.check_trace`) and cached in WORKDIR/samples_<role>.jsonl.
  3. (a) Data metrics per budget and model: coverage, diversity, exact FPR; curves over k.
  4. (b) SFT on each answer-filtered dataset (WORKDIR/data/<source>_b<k>.jsonl, with provenance),
     the same steps x packed tokens per comparison, `synth.seeds` seeds, in three settings:
       kd              the student on WC data vs on SE data;
       self_improve    WC on its own data vs on SE's;
       weak_to_strong  SE on WC's data vs on its own.
     Each fine-tuned policy: greedy accuracy and pass@k on a fixed held-out set.
  5. (c) Accuracy gain over the base policy vs budget.

  python experiments/compute_optimal.py [--config=configs/synth.py] [--workdir=runs/compute_optimal]
      [--out=experiments/results/compute_optimal] [--config.synth.seeds=(0,1,2) ...]

Prints one JSON line per data-metrics row and per fine-tuning run; writes OUT/compute_optimal.
{jsonl,md} and OUT/compute_optimal_{data,gain}.png.
"""

from __future__ import annotations

import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

SETTINGS = (("kd", "student"), ("self_improve", "wc"), ("weak_to_strong", "se"))  # (setting, trained policy)
SOURCES = ("wc", "se")
# Bansal et al. (2024), Gemma2-9B (WC) vs Gemma2-27B (SE) on MATH and GSM8K, at matched sampling
# FLOPs: their qualitative findings, beside ours (a different, tiny scale).
PAPER = {
    "coverage": "WC higher than SE at the same budget",
    "diversity": "WC higher than SE (more unique correct solutions per problem)",
    "fpr": "WC higher than SE (estimated with human and LM judges)",
    "kd": "the student fine-tuned on WC data beats the student on SE data",
    "self_improve": "WC on its own data beats WC on SE data",
    "weak_to_strong": "SE on WC data beats SE on its own data",
}


def define_flags():
  """The command line (a function, so that notebooks import this module without flags)."""
  from absl import flags

  from tlt_jax import cli
  from experiments.common import define_output_flags
  define_output_flags("experiments/results/compute_optimal", workdir="runs/compute_optimal",
                      workdir_help="policies, samples, datasets and runs (reused)")
  flags.DEFINE_string("settings", "kd,self_improve,weak_to_strong",
                      "SFT settings to run (a subset, e.g. in parallel processes on one workdir; "
                      "a later run over all of them reuses their cached results)")
  return cli.define_config_flag(os.path.join(ROOT, "configs", "synth.py"))


def role_config(base, role: str):
  """The locked config of one policy: `base` with `model`, `sft.steps` and `sft.lr` of `role`
  (`synth.models`, `synth.base_steps`, `synth.base_lr`)."""
  from experiments.common import with_overrides
  from tlt_jax import config as config_lib
  s = base.synth
  overrides = {f"model.{k}": v for k, v in dict(s.models[role]).items()}
  overrides["sft.steps"] = int(s.base_steps[role])
  overrides["sft.lr"] = float(s.base_lr[role])
  return config_lib.finalize(with_overrides(base, overrides))


def train_policies(base, workdir: str, roles=("se", "wc", "student")):
  """{role: (setup, policy)}: each role's SFT policy, trained by the main job's SFT stage in
  WORKDIR/<role> (found there, it is loaded instead)."""
  from tlt_jax import run as run_lib
  out = {}
  for role in roles:
    setup = run_lib.build_setup(role_config(base, role), os.path.join(workdir, role))
    os.makedirs(setup.workdir, exist_ok=True)
    out[role] = (setup, run_lib.run_sft_stage(setup))
  return out


def problems(task, n: int, lo: int, hi: int, seed: int):
  """n fixed problems with lo..hi digits (uniform), prompt ids 0..n-1."""
  rng = np.random.default_rng([seed, 31])
  return [task.sample(rng, num_digits=int(rng.integers(lo, hi + 1))).with_id(i) for i in range(n)]


def sample_costs(policies, examples, include_attention: bool) -> dict[str, int]:
  """FLOPs per sample of each policy at the problems' mean lengths (BOS + prompt, reference trace
  + EOS): the price list of the budget."""
  from tlt_jax.synth import sequence_flops
  tok = next(iter(policies.values()))[0].tokenizer
  p = round(np.mean([len(tok.encode(e.prompt)) + 1 for e in examples]))
  r = round(np.mean([len(tok.encode(e.trace)) + 1 for e in examples]))
  return {role: sequence_flops(policy.cfg, p, r, include_attention) for role, (_, policy) in policies.items()}


def budget_counts(s, costs) -> list[dict]:
  """Per budget (SE samples per problem): the FLOPs per problem and each source's sample count."""
  from tlt_jax.synth import matched_sample_counts
  rows = []
  for k_se in s.budgets:
    budget = int(k_se) * costs["se"]
    counts = matched_sample_counts({m: costs[m] for m in SOURCES}, budget)
    rows.append({"budget": int(k_se), "flops_per_problem": budget, **{f"k_{m}": counts[m] for m in SOURCES}})
  return rows


def draw_samples(s, policies, examples, counts, workdir: str, max_new_tokens: int, batch_size: int):
  """{source: samples} at the largest budget, cached in WORKDIR/samples_<source>.jsonl."""
  from tlt_jax.synth import read_samples, sample_solutions, write_jsonl
  out = {}
  for m in SOURCES:
    k = max(c[f"k_{m}"] for c in counts)
    path = os.path.join(workdir, f"samples_{m}.jsonl")
    if os.path.exists(path):
      cached = read_samples(path)
      if len(cached) == k * len(examples):
        out[m] = cached
        continue
    setup, policy = policies[m]
    out[m] = sample_solutions(policy, setup.tokenizer, setup.task, examples, k, model_name=m,
                              temperature=float(s.temperature), max_new_tokens=max_new_tokens,
                              batch_size=batch_size, seed=int(s.problem_seed),
                              include_attention=bool(s.include_attention), compact=bool(s.compact_rollouts))
    write_jsonl(out[m], path)
  return out


def data_rows(samples, counts) -> list[dict]:
  """(a): coverage, diversity, FPR of each source at each budget's sample count."""
  from tlt_jax.synth import data_metrics
  rows = []
  for c in counts:
    for m in SOURCES:
      rows.append({"kind": "data", "budget": c["budget"], "source": m, **data_metrics(samples[m], c[f"k_{m}"])})
  return rows


def evaluate(policy, setup, examples, samples: int, max_new_tokens: int, batch_size: int, seed: int,
             compact: bool = True) -> dict:
  """Greedy accuracy and pass@`samples` (T = 1, unbiased) on the held-out `examples`."""
  from tlt_jax.synth import coverage_at_k, sample_solutions
  from tlt_jax.synth.sampling import group_by_problem
  common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=False, compact=compact)
  greedy = sample_solutions(policy, setup.tokenizer, setup.task, examples, 1, model_name="eval",
                            temperature=0.0, **common)
  drawn = sample_solutions(policy, setup.tokenizer, setup.task, examples, samples, model_name="eval",
                           temperature=1.0, seed=seed, **common)
  return {"greedy_acc": float(np.mean([x.answer_correct for x in greedy])),
          f"pass@{samples}": coverage_at_k(group_by_problem(drawn), samples)}


class FineTuner:
  """SFT of one role's policy on a dataset: one compiled step per role (every run of the role has
  the same optimizer and batch shape), the same steps x packed tokens for every dataset."""

  def __init__(self, setup, policy, ft):
    from flax import nnx

    from tlt_jax.train import optim
    from tlt_jax.train.sft import make_sft_step
    from tlt_jax.train.state import create_train_state
    self.setup, self.ft = setup, ft
    self.graphdef, self.params = nnx.split(policy)
    self.tx = optim.make_optimizer(dict(lr=ft.lr, steps=ft.steps, schedule="cosine",
                                        warmup_steps=ft.warmup_steps, final_lr=0.1 * ft.lr))
    self.step_fn = make_sft_step(self.graphdef, self.tx, create_train_state(self._copy(), self.tx, None), None)

  def _copy(self):
    import jax
    import jax.numpy as jnp
    return jax.tree.map(jnp.copy, self.params)

  def __call__(self, examples, seed: int):
    from flax import nnx

    from tlt_jax.data.batching import pack_sft_batch
    from tlt_jax.synth.sampling import dataset_sampler
    from tlt_jax.train.sft import run_sft
    from tlt_jax.train.state import create_train_state
    ft, tok = self.ft, self.setup.tokenizer
    draw = dataset_sampler(examples, seed)
    model = nnx.merge(self.graphdef, self._copy())
    state = create_train_state(nnx.state(model), self.tx, None)
    model, _, history = run_sft(model, self.tx, lambda step: pack_sft_batch(draw(step), tok, ft.batch_size, ft.max_len),
                                int(ft.steps), state=state, step_fn=self.step_fn, log_every=int(ft.steps),
                                show_progress=False)
    return model, history[-1]["loss"]


def finetune_rows(s, policies, datasets, counts, eval_set, workdir: str, max_new_tokens: int,
                  batch_size: int, jsonl=None, settings=None) -> list[dict]:
  """(b): every (budget, setting, source, seed) run, cached in WORKDIR/finetune/<...>.json; and
  each base policy's evaluation (WORKDIR/finetune/base_<role>.json)."""
  from tlt_jax.utils.console import say
  ft_dir = os.path.join(workdir, "finetune")
  os.makedirs(ft_dir, exist_ok=True)
  k_eval = int(s.eval_samples)
  chosen = [(name, role) for name, role in SETTINGS if settings is None or name in settings]
  rows = []

  def cached(name, make):
    path = os.path.join(ft_dir, name + ".json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    rec = make()
    with open(path + ".tmp", "w") as f:
      json.dump(rec, f)
    os.replace(path + ".tmp", path)
    return rec

  for _, role in chosen:
    setup, policy = policies[role]
    rec = cached(f"base_{role}", lambda: {"kind": "base", "policy": role, **evaluate(
        policy, setup, eval_set, k_eval, max_new_tokens, batch_size, seed=int(s.eval_seed),
        compact=bool(s.compact_rollouts))})
    rows.append(rec)
    say(json.dumps(rec))
  tuners = {}
  for c in counts:
    for setting, role in chosen:
      for m in SOURCES:
        for seed in s.seeds:
          def run():
            setup, policy = policies[role]
            if role not in tuners:
              tuners[role] = FineTuner(setup, policy, s.finetune)
            examples = datasets[(m, c["budget"])]
            if not examples:
              return {"greedy_acc": None, f"pass@{k_eval}": None, "final_loss": None, "time_s": 0.0}
            t0 = time.perf_counter()
            model, loss = tuners[role](examples, int(seed))
            res = evaluate(model, setup, eval_set, k_eval, max_new_tokens, batch_size, seed=int(s.eval_seed),
                           compact=bool(s.compact_rollouts))
            return {**res, "final_loss": float(loss), "time_s": time.perf_counter() - t0}
          name = f"{setting}_{m}_b{c['budget']}_s{seed}"
          rec = {"kind": "finetune", "setting": setting, "policy": role, "source": m, "budget": c["budget"],
                 "seed": int(seed), "dataset": len(datasets[(m, c["budget"])]), **cached(name, run)}
          rows.append(rec)
          say(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
          if jsonl is not None:
            jsonl.write(json.dumps(rec) + "\n")
  return rows


def build_datasets(samples, examples, counts, workdir: str):
  """{(source, budget): SFT examples}: the answer-correct samples among each budget's first k,
  saved as WORKDIR/data/<source>_b<budget>.jsonl (fields SFT reads + provenance) and read back."""
  from tlt_jax.synth import filter_correct, read_sft_examples, write_jsonl
  out = {}
  for c in counts:
    for m in SOURCES:
      path = os.path.join(workdir, "data", f"{m}_b{c['budget']}.jsonl")
      write_jsonl(filter_correct(samples[m], examples, k=c[f"k_{m}"]), path)
      out[(m, c["budget"])] = read_sft_examples(path)
  return out


def summarize(ft_rows, k_eval: int) -> list[dict]:
  """Per (setting, budget, source): mean greedy accuracy / pass@k over seeds, the seed spread
  (max - min) and the per-seed values, the gain over the base policy, and WC - SE."""
  base = {r["policy"]: r for r in ft_rows if r["kind"] == "base"}
  runs = [r for r in ft_rows if r["kind"] == "finetune" and r["greedy_acc"] is not None]
  out = []
  keys = sorted({(r["setting"], r["budget"], r["source"]) for r in runs},
                key=lambda t: ([s for s, _ in SETTINGS].index(t[0]), t[1], SOURCES.index(t[2])))
  for setting, budget, m in keys:
    rs = [r for r in runs if (r["setting"], r["budget"], r["source"]) == (setting, budget, m)]
    accs = [r["greedy_acc"] for r in rs]
    role = rs[0]["policy"]
    out.append({"setting": setting, "policy": role, "budget": budget, "source": m, "dataset": rs[0]["dataset"],
                "base_acc": base[role]["greedy_acc"], "greedy_acc": float(np.mean(accs)),
                "spread": float(max(accs) - min(accs)), "seeds": " / ".join(f"{a:.3f}" for a in accs),
                "gain": float(np.mean(accs)) - base[role]["greedy_acc"],
                f"pass@{k_eval}": float(np.mean([r[f"pass@{k_eval}"] for r in rs])),
                "base_pass": base[role][f"pass@{k_eval}"]})
  by = {(r["setting"], r["budget"], r["source"]): r for r in out}
  for r in out:
    other = by.get((r["setting"], r["budget"], "se"))
    if r["source"] == "wc" and other is not None:
      r["wc_minus_se"] = r["greedy_acc"] - other["greedy_acc"]
  return out


def run_all(base, workdir: str, jsonl=None, settings=None) -> dict:
  """The whole experiment (module docstring) on the locked config `base`; returns its tables."""
  from tlt_jax.synth import metric_curves_of
  s = base.synth
  t_start = time.perf_counter()
  timings = {}
  roles = list(SOURCES) + [role for name, role in SETTINGS if (settings is None or name in settings)
                          and role not in SOURCES]
  policies = train_policies(base, workdir, roles)
  timings["policies_s"] = time.perf_counter() - t_start
  setup = policies["se"][0]
  task, tok = setup.task, setup.tokenizer
  examples = problems(task, int(s.problems), int(s.min_digits), int(s.max_digits), int(s.problem_seed))
  eval_set = problems(task, int(s.eval_problems), int(s.min_digits), int(s.max_digits), int(s.eval_seed))
  costs = sample_costs({m: policies[m] for m in SOURCES}, examples, bool(s.include_attention))
  counts = budget_counts(s, costs)
  max_new, batch = int(base.rollout.max_new_tokens), int(base.eval.batch_size)
  t0 = time.perf_counter()
  samples = draw_samples(s, policies, examples, counts, workdir, max_new, batch)
  timings["sampling_s"] = time.perf_counter() - t0
  data = data_rows(samples, counts)
  curves = {m: metric_curves_of(samples[m]) for m in SOURCES}
  datasets = build_datasets(samples, examples, counts, workdir)
  t0 = time.perf_counter()
  ft = finetune_rows(s, policies, datasets, counts, eval_set, workdir, max_new, batch, jsonl, settings)
  timings["finetune_s"] = time.perf_counter() - t0
  timings["total_s"] = time.perf_counter() - t_start
  timings["finetune_runs_own_s"] = sum(r.get("time_s") or 0.0 for r in ft if r["kind"] == "finetune")
  params = {role: policies[role][1].cfg.num_params if role in policies else None
            for role in ("se", "wc", "student")}
  return {"params": params, "costs": costs, "counts": counts, "data": data, "curves": curves,
          "finetune": ft, "summary": summarize(ft, int(s.eval_samples)), "timings": timings}


def main(argv):
  del argv
  from absl import flags

  from experiments.common import enable_compile_cache
  from tlt_jax import config as config_lib
  from tlt_jax.utils.console import say
  args = flags.FLAGS
  enable_compile_cache()
  base = args["config"].value
  config_lib.finalize(base)  # every key checked before any work
  settings = [x.strip() for x in args.settings.split(",") if x.strip()]
  unknown = sorted(set(settings) - {name for name, _ in SETTINGS})
  if unknown or not settings:
    raise config_lib.ConfigError(f"--settings={args.settings!r} is not allowed; allowed: a comma-separated "
                                 f"subset of {tuple(name for name, _ in SETTINGS)}")
  os.makedirs(args.out, exist_ok=True)
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.out, "compute_optimal.jsonl"), "w") as jsonl:
    res = run_all(base, args.workdir, jsonl, settings)
    for r in res["data"]:
      jsonl.write(json.dumps(r) + "\n")
      say(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
    for r in res["summary"]:
      jsonl.write(json.dumps({"kind": "summary", **r}) + "\n")
    jsonl.write(json.dumps({"kind": "timings", **res["timings"]}) + "\n")
  write_markdown(os.path.join(args.out, "compute_optimal.md"), base, res)
  plot_data(os.path.join(args.out, "compute_optimal_data.png"), res)
  plot_gain(os.path.join(args.out, "compute_optimal_gain.png"), res, int(base.synth.eval_samples))
  say(json.dumps({"kind": "timings", **{k: round(v, 1) for k, v in res["timings"].items()}}))


def premise(res) -> str:
  """The paper's premise, from our base policies: SE is the stronger model (held-out greedy)."""
  base = {r["policy"]: r for r in res["finetune"] if r["kind"] == "base"}
  if "se" not in base or "wc" not in base:
    return "n/a (the base SE and WC are each evaluated only in the settings that fine-tune them)"
  se, wc = base["se"]["greedy_acc"], base["wc"]["greedy_acc"]
  verdict = "holds" if se > wc else "does not hold"
  return f"{verdict}: held-out greedy accuracy SE {se:.3f} vs WC {wc:.3f}"


def agreement(res) -> dict:
  """Per finding: does the tiny setting agree with the paper, at each budget (from our rows)."""
  out = {}
  data = {(r["budget"], r["source"]): r for r in res["data"]}
  budgets = sorted({b for b, _ in data})
  for metric in ("coverage", "diversity", "fpr"):
    verdicts = []
    for b in budgets:
      wc, se = data[(b, "wc")][metric], data[(b, "se")][metric]
      verdicts.append("n/a" if wc is None or se is None else
                      f"b{b}: {'yes' if wc > se else 'no'} ({wc:.3f} vs {se:.3f})")
    out[metric] = "; ".join(verdicts)
  summ = {(r["setting"], r["budget"], r["source"]): r for r in res["summary"]}
  for setting, _ in SETTINGS:
    verdicts = []
    for b in budgets:
      wc, se = summ.get((setting, b, "wc")), summ.get((setting, b, "se"))
      if wc is None or se is None:
        verdicts.append(f"b{b}: n/a")
        continue
      d = wc["greedy_acc"] - se["greedy_acc"]
      noise = max(wc["spread"], se["spread"])
      word = "yes" if d > noise else ("no" if d < -noise else "within seed spread")
      verdicts.append(f"b{b}: {word} ({d:+.3f})")
    out[setting] = "; ".join(verdicts)
  return out


def write_markdown(path, base, res):
  from tlt_jax.utils.metrics import markdown_table
  s = base.synth
  k_eval = int(s.eval_samples)
  p = res["params"]
  lines = [
      "# Compute-optimal sampling at tiny scale: WC vs SE data at matched FLOPs\n",
      f"Policies SFT'd on reversed addition with P(n digits) ∝ n^-{base.task.alpha} on 1..{base.task.max_digits}: "
      f"SE {p['se']:,} parameters, WC {p['wc']:,} (SE/WC = {p['se'] / p['wc']:.2f}), student {'-' if p['student'] is None else format(p['student'], ',')}. "
      f"Problems: {s.problems} for sampling, {s.eval_problems} held out, {s.min_digits}-{s.max_digits} digits. "
      f"Sampling at T={s.temperature}; FLOPs per sample "
      f"{'with' if s.include_attention else 'without'} attention at the problems' mean lengths: "
      + ", ".join(f"{m} {res['costs'][m]:.3g}" for m in SOURCES) + f" (ratio {res['costs']['se'] / res['costs']['wc']:.2f}).\n",
      "## Budgets (samples per problem at matched FLOPs)\n",
      markdown_table(res["counts"], ["budget", "flops_per_problem", "k_se", "k_wc"]),
      f"\n## Base policies (after their SFT, before fine-tuning) on the held-out set: greedy accuracy, pass@{k_eval} (T=1)\n",
      markdown_table([{**r, "params": p[r["policy"]], "sft_steps": int(s.base_steps[r["policy"]]),
                       "sft_lr": float(s.base_lr[r["policy"]])} for r in res["finetune"] if r["kind"] == "base"],
                     ["policy", "params", "sft_steps", "sft_lr", "greedy_acc", f"pass@{k_eval}"]),
      "\n## (a) Data metrics (FPR exact: every step checked)\n",
      markdown_table(res["data"], ["budget", "source", "k", "coverage", "diversity", "fpr", "correct_samples",
                                   "flops_per_problem"]),
      f"\n## (b) SFT on each dataset: greedy accuracy on the held-out set (mean over seeds {tuple(s.seeds)}; "
      f"spread = max - min), pass@{k_eval} (T=1)\n",
      f"Every run: {s.finetune.steps} steps of {s.finetune.batch_size} packed rows x {s.finetune.max_len} tokens "
      f"(the same SFT budget), lr {s.finetune.lr} cosine. `gain` is over the base policy; `wc_minus_se` compares "
      "the two datasets at the same budget.\n",
      markdown_table(res["summary"], ["setting", "policy", "budget", "source", "dataset", "base_acc", "greedy_acc",
                                      "spread", "seeds", "gain", "wc_minus_se", f"pass@{k_eval}", "base_pass"]),
      "\n## The paper (Gemma2-9B vs 27B on MATH/GSM8K) beside ours (a ~10^5-parameter scale)\n",
      f"The premise (the paper's SE, Gemma2-27B, is the stronger model) {premise(res)}. "
      "Data metrics: `yes` when WC's value is the higher; SFT: `yes` / `no` when WC data's mean greedy accuracy "
      "is higher / lower than SE data's by more than the larger seed spread of the two.\n",
  ]
  agree = agreement(res)
  rows = [{"finding": k, "paper (qualitative)": PAPER[k], "ours: WC > SE? (per budget)": agree[k]} for k in PAPER]
  lines.append(markdown_table(rows, ["finding", "paper (qualitative)", "ours: WC > SE? (per budget)"]))
  lines.append("\nTimes of this invocation (s): " + ", ".join(f"{k} {v:.0f}" for k, v in res["timings"].items())
               + " (a shared, loaded 2-core CPU; stages found in the workdir cost ~0, and "
               "`finetune_runs_own_s` sums the times the fine-tuning runs recorded when they ran).\n")
  with open(path, "w") as f:
    f.write("\n".join(lines))


def plot_data(path, res):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
  for m, color in (("wc", "tab:blue"), ("se", "tab:red")):
    cs = res["curves"][m]
    xs = [c["flops_per_problem"] for c in cs]
    for ax, key in zip(axes, ("coverage", "diversity", "fpr")):
      ax.plot(xs, [np.nan if c[key] is None else c[key] for c in cs], marker="o", ms=3, color=color,
              label=f"{m.upper()} (k = 1..{cs[-1]['k']})")
  for c in res["counts"]:
    for ax in axes:
      ax.axvline(c["flops_per_problem"], color="grey", lw=0.8, ls="--")
  for ax, title in zip(axes, ("coverage@k", "diversity@k (unique correct)", "FPR@k (exact)")):
    ax.set_xscale("log")
    ax.set_xlabel("sampling FLOPs per problem")
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle("WC vs SE data at matched compute (dashed: the budgets)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_gain(path, res, k_eval: int):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharey=True)
  runs = [r for r in res["finetune"] if r["kind"] == "finetune" and r["greedy_acc"] is not None]
  base = {r["policy"]: r["greedy_acc"] for r in res["finetune"] if r["kind"] == "base"}
  for ax, (setting, role) in zip(axes, SETTINGS):
    for m, color in (("wc", "tab:blue"), ("se", "tab:red")):
      rows = [r for r in res["summary"] if r["setting"] == setting and r["source"] == m]
      xs = [r["budget"] for r in rows]
      ax.plot(xs, [r["gain"] for r in rows], marker="o", color=color, label=f"on {m.upper()} data (mean)")
      pts = [r for r in runs if r["setting"] == setting and r["source"] == m]
      ax.scatter([r["budget"] for r in pts], [r["greedy_acc"] - base[role] for r in pts], color=color, s=12,
                 alpha=0.5)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_title(f"{setting} ({role} fine-tuned)")
    ax.set_xlabel("budget (SE samples per problem)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("greedy accuracy gain over the base")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == "__main__":
  from experiments.common import run_experiment
  from tlt_jax import cli
  cli.set_cpu_devices(sys.argv)  # before jax is imported (one device: no rollout groups here)
  define_flags()
  run_experiment(main)
