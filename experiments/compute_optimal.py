"""Compute-optimal sampling: weak-cheap (WC) vs strong-expensive (SE) synthetic data at matched
FLOPs, with exact false-positive rates (Bansal et al. 2024, "Smaller, Weaker, Yet Better:
Training LLM Reasoners via Compute-Optimal Sampling").

  1. Three base policies SFT'd on gold addition traces of every length in 1..6 digits but the one
     the experiment samples and evaluates (configs/synth.py, `task.skip_digits`): SE, WC (~1/3 of
     SE's FLOPs per sample) and a student. Each is cached in WORKDIR/<role>/sft (a rerun skips it).
     No policy ever sees a gold solution of the evaluated length; fine-tuning starts from these.
  2. Problems of that length (`synth.min_digits..max_digits`; three disjoint sets: sampling,
     validation, held-out): at each budget (SE samples per problem), WC draws as many samples as
     the same FLOPs buy (tlt_jax/synth/flops.py; attention included or not by
     `synth.include_attention`). Samples are drawn once at the largest budget (T =
     `synth.temperature`, rollout engine) and a budget of k samples uses the first k of each
     problem; every sample is checked step by step (`Task.check_trace`) and cached in
     WORKDIR/samples_<role>.jsonl.
  3. (a) Data metrics per budget and model: coverage, diversity, exact FPR; curves over k.
  4. (b) SFT on each answer-filtered dataset (WORKDIR/data/<source>_b<k>.jsonl, with provenance)
     at the role's LR and steps (`synth.finetune`, chosen on the validation set by `--select`),
     `synth.seeds` seeds, in three settings:
       kd              the student on WC data vs on SE data;
       self_improve    WC on its own data vs on SE's;
       weak_to_strong  SE on WC's data vs on its own.
     Each fine-tuned policy: greedy accuracy and pass@k on the held-out set.
  5. (c) Accuracy gain over the base policy vs budget.

  python experiments/compute_optimal.py [--config=configs/synth.py] [--workdir=runs/compute_optimal]
      [--out=experiments/results/compute_optimal] [--select] [--config.synth.seeds=(0,1,2) ...]

With --select, steps 1-2 and the fine-tuning grid `synth.select` (each role on both sources at
the largest budget, seed 0, scored on the validation set): OUT/compute_optimal_select.{jsonl,md}.
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
  flags.DEFINE_bool("select", False, "run the fine-tuning grid (synth.select) on the validation set instead "
                    "of the experiment; writes OUT/compute_optimal_select.{jsonl,md}")
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


def problems(task, n: int, lo: int, hi: int, seed: int, exclude=()):
  """n fixed, distinct problems with lo..hi digits (uniform), none of them in `exclude` (problem
  sets), prompt ids 0..n-1."""
  rng = np.random.default_rng([seed, 31])
  seen = {e.prompt for group in exclude for e in group}
  out = []
  while len(out) < n:
    ex = task.sample(rng, num_digits=int(rng.integers(lo, hi + 1)))
    if ex.prompt not in seen:
      seen.add(ex.prompt)
      out.append(ex.with_id(len(out)))
  return out


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
  """Greedy accuracy and pass@`samples` (T = 1, unbiased; left out when `samples` is 0) on `examples`."""
  from tlt_jax.synth import coverage_at_k, sample_solutions
  from tlt_jax.synth.sampling import group_by_problem
  common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, show_progress=False, compact=compact)
  greedy = sample_solutions(policy, setup.tokenizer, setup.task, examples, 1, model_name="eval",
                            temperature=0.0, **common)
  if not samples:
    return {"greedy_acc": float(np.mean([x.answer_correct for x in greedy]))}
  drawn = sample_solutions(policy, setup.tokenizer, setup.task, examples, samples, model_name="eval",
                           temperature=1.0, seed=seed, **common)
  return {"greedy_acc": float(np.mean([x.answer_correct for x in greedy])),
          f"pass@{samples}": coverage_at_k(group_by_problem(drawn), samples)}


class FineTuner:
  """SFT of one policy on a dataset at one (LR, steps): one compiled step (every run has the same
  optimizer and batch shape), the same steps x packed tokens for every dataset. `ft` holds the
  shared batch shape and warmup (`synth.finetune`)."""

  def __init__(self, setup, policy, ft, lr: float, steps: int):
    from flax import nnx

    from tlt_jax.train import optim
    from tlt_jax.train.sft import make_sft_step
    from tlt_jax.train.state import create_train_state
    self.setup, self.ft, self.steps = setup, ft, int(steps)
    self.graphdef, self.params = nnx.split(policy)
    self.tx = optim.make_optimizer(dict(lr=float(lr), steps=self.steps, schedule="cosine",
                                        warmup_steps=int(ft.warmup_steps), final_lr=0.1 * float(lr)))
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
                                self.steps, state=state, step_fn=self.step_fn, log_every=self.steps,
                                show_progress=False)
    return model, history[-1]["loss"]


def _cache(directory: str):
  """cached(name, make): the JSON record DIRECTORY/<name>.json, made by make() when absent."""
  os.makedirs(directory, exist_ok=True)

  def cached(name, make):
    path = os.path.join(directory, name + ".json")
    if os.path.exists(path):
      with open(path) as f:
        return json.load(f)
    rec = make()
    with open(path + ".tmp", "w") as f:
      json.dump(rec, f)
    os.replace(path + ".tmp", path)
    return rec
  return cached


def base_rows(s, policies, eval_set, val_set, workdir: str, max_new_tokens: int, batch_size: int) -> list[dict]:
  """Each base policy (before fine-tuning) on the held-out set (greedy, pass@k) and on the
  validation set (greedy), cached in WORKDIR/finetune/base_<role>.json."""
  from tlt_jax.utils.console import say
  cached = _cache(os.path.join(workdir, "finetune"))
  k_eval, rows = int(s.eval_samples), []
  for role in ("se", "wc", "student"):
    if role not in policies:
      continue
    setup, policy = policies[role]

    def make():
      common = dict(max_new_tokens=max_new_tokens, batch_size=batch_size, seed=int(s.eval_seed),
                    compact=bool(s.compact_rollouts))
      held = evaluate(policy, setup, eval_set, k_eval, **common)
      return {"kind": "base", "policy": role, **held,
              "val_greedy_acc": evaluate(policy, setup, val_set, 0, **common)["greedy_acc"]}
    rows.append(cached(f"base_{role}", make))
    say(json.dumps(rows[-1]))
  return rows


def finetune_rows(s, policies, datasets, counts, eval_set, workdir: str, max_new_tokens: int,
                  batch_size: int, jsonl=None, settings=None) -> list[dict]:
  """(b): every (budget, setting, source, seed) run at its role's `synth.finetune` LR and steps,
  scored on the held-out set, cached in WORKDIR/finetune/<...>.json."""
  from tlt_jax.utils.console import say
  cached = _cache(os.path.join(workdir, "finetune"))
  k_eval = int(s.eval_samples)
  chosen = [(name, role) for name, role in SETTINGS if settings is None or name in settings]
  rows = []
  tuners = {}
  for c in counts:
    for setting, role in chosen:
      lr, steps = float(s.finetune.lr[role]), int(s.finetune.steps[role])
      for m in SOURCES:
        for seed in s.seeds:
          def run():
            setup, policy = policies[role]
            if role not in tuners:
              tuners[role] = FineTuner(setup, policy, s.finetune, lr, steps)
            examples = datasets[(m, c["budget"])]
            if not examples:
              return {"greedy_acc": None, f"pass@{k_eval}": None, "final_loss": None, "time_s": 0.0}
            t0 = time.perf_counter()
            model, loss = tuners[role](examples, int(seed))
            res = evaluate(model, setup, eval_set, k_eval, max_new_tokens, batch_size, seed=int(s.eval_seed),
                           compact=bool(s.compact_rollouts))
            return {**res, "final_loss": float(loss), "time_s": time.perf_counter() - t0}
          name = f"{setting}_{m}_b{c['budget']}_s{seed}_lr{lr:g}_st{steps}"
          rec = {"kind": "finetune", "setting": setting, "policy": role, "source": m, "budget": c["budget"],
                 "seed": int(seed), "lr": lr, "steps": steps, "dataset": len(datasets[(m, c["budget"])]),
                 **cached(name, run)}
          rows.append(rec)
          say(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()}))
          if jsonl is not None:
            jsonl.write(json.dumps(rec) + "\n")
  return rows


def select_rows(s, policies, datasets, counts, val_set, workdir: str, max_new_tokens: int, batch_size: int,
                roles) -> list[dict]:
  """The fine-tuning grid (`synth.select`): each role fine-tuned at every (LR, steps) on both
  sources' data at the largest budget (seed 0), scored by greedy accuracy on the validation set
  (never the held-out one); cached in WORKDIR/select/<...>.json."""
  from tlt_jax.utils.console import say
  cached = _cache(os.path.join(workdir, "select"))
  budget = counts[-1]["budget"]
  rows = []
  for role in roles:
    setup, policy = policies[role]
    for lr in s.select.lrs:
      for steps in s.select.steps:
        tuner = None
        for m in SOURCES:
          def run():
            nonlocal tuner
            examples = datasets[(m, budget)]
            if not examples:
              return {"val_greedy_acc": None}
            if tuner is None:
              tuner = FineTuner(setup, policy, s.finetune, float(lr), int(steps))
            model, loss = tuner(examples, 0)
            return {"val_greedy_acc": evaluate(model, setup, val_set, 0, max_new_tokens, batch_size, seed=0,
                                               compact=bool(s.compact_rollouts))["greedy_acc"],
                    "final_loss": float(loss)}
          rec = {"kind": "select", "policy": role, "lr": float(lr), "steps": int(steps), "source": m,
                 "budget": budget, "dataset": len(datasets[(m, budget)]),
                 **cached(f"{role}_{m}_b{budget}_lr{float(lr):g}_st{int(steps)}", run)}
          rows.append(rec)
          say(json.dumps(rec))
  return rows


def selection(rows) -> list[dict]:
  """Per role and (LR, steps): the validation accuracy on each source and their mean; `best`
  marks each role's highest mean (ties: fewer steps, then the lower LR)."""
  out = []
  for role in dict.fromkeys(r["policy"] for r in rows):
    cells = {}
    for r in rows:
      if r["policy"] == role and r["val_greedy_acc"] is not None:
        cells.setdefault((r["steps"], r["lr"]), {})[r["source"]] = r["val_greedy_acc"]
    role_rows = [{"policy": role, "lr": lr, "steps": steps, **{f"val_{m}": v.get(m) for m in SOURCES},
                  "val_mean": float(np.mean(list(v.values())))} for (steps, lr), v in sorted(cells.items())]
    if role_rows:
      best = max(role_rows, key=lambda r: (r["val_mean"], -r["steps"], -r["lr"]))
      for r in role_rows:
        r["best"] = "yes" if r is best else ""
    out.extend(role_rows)
  return out


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
  """Per (setting, budget, source): greedy accuracy on the held-out set over seeds (mean, sample
  std, min, max, per seed), the gain over the base policy, pass@k; on the WC rows, WC - SE (mean)
  and the range of the per-seed differences (seed s on WC data minus seed s on SE data)."""
  base = {r["policy"]: r for r in ft_rows if r["kind"] == "base"}
  runs = [r for r in ft_rows if r["kind"] == "finetune" and r["greedy_acc"] is not None]
  out = []
  keys = sorted({(r["setting"], r["budget"], r["source"]) for r in runs},
                key=lambda t: ([s for s, _ in SETTINGS].index(t[0]), t[1], SOURCES.index(t[2])))
  for setting, budget, m in keys:
    rs = sorted((r for r in runs if (r["setting"], r["budget"], r["source"]) == (setting, budget, m)),
                key=lambda r: r["seed"])
    accs = [r["greedy_acc"] for r in rs]
    role = rs[0]["policy"]
    out.append({"setting": setting, "policy": role, "budget": budget, "source": m, "dataset": rs[0]["dataset"],
                "lr": rs[0]["lr"], "steps": rs[0]["steps"],
                "base_acc": base[role]["greedy_acc"], "greedy_acc": float(np.mean(accs)),
                "std": float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0,
                "min": float(min(accs)), "max": float(max(accs)),
                "seeds": " / ".join(f"{a:.3f}" for a in accs), "by_seed": {r["seed"]: r["greedy_acc"] for r in rs},
                "gain": float(np.mean(accs)) - base[role]["greedy_acc"],
                f"pass@{k_eval}": float(np.mean([r[f"pass@{k_eval}"] for r in rs])),
                "base_pass": base[role][f"pass@{k_eval}"]})
  by = {(r["setting"], r["budget"], r["source"]): r for r in out}
  for r in out:
    other = by.get((r["setting"], r["budget"], "se"))
    if r["source"] == "wc" and other is not None:
      r["wc_minus_se"] = r["greedy_acc"] - other["greedy_acc"]
      diffs = [a - other["by_seed"][seed] for seed, a in r["by_seed"].items() if seed in other["by_seed"]]
      r["diff_min"], r["diff_max"] = float(min(diffs)), float(max(diffs))
      r["diff_range"] = f"{min(diffs):+.3f} .. {max(diffs):+.3f}"
  for r in out:
    r.pop("by_seed")
  return out


def prepare(base, workdir: str, roles) -> dict:
  """Everything before fine-tuning: the base policies of `roles` (trained or found), the three
  problem sets, the price list and budgets, the samples (drawn or found) and the datasets."""
  s = base.synth
  t0 = time.perf_counter()
  policies = train_policies(base, workdir, roles)
  timings = {"policies_s": time.perf_counter() - t0}
  task = policies["se"][0].task
  lo, hi = int(s.min_digits), int(s.max_digits)
  examples = problems(task, int(s.problems), lo, hi, int(s.problem_seed))
  val_set = problems(task, int(s.val_problems), lo, hi, int(s.val_seed), exclude=(examples,))
  eval_set = problems(task, int(s.eval_problems), lo, hi, int(s.eval_seed), exclude=(examples, val_set))
  costs = sample_costs({m: policies[m] for m in SOURCES}, examples, bool(s.include_attention))
  counts = budget_counts(s, costs)
  max_new, batch = int(base.rollout.max_new_tokens), int(base.eval.batch_size)
  t0 = time.perf_counter()
  samples = draw_samples(s, policies, examples, counts, workdir, max_new, batch)
  timings["sampling_s"] = time.perf_counter() - t0
  return {"policies": policies, "examples": examples, "val_set": val_set, "eval_set": eval_set, "costs": costs,
          "counts": counts, "samples": samples, "datasets": build_datasets(samples, examples, counts, workdir),
          "max_new": max_new, "batch": batch, "timings": timings}


def _roles(settings) -> list[str]:
  return list(SOURCES) + [role for name, role in SETTINGS if (settings is None or name in settings)
                          and role not in SOURCES]


def run_all(base, workdir: str, jsonl=None, settings=None) -> dict:
  """The whole experiment (module docstring) on the locked config `base`; returns its tables."""
  from tlt_jax.synth import metric_curves_of
  s = base.synth
  t_start = time.perf_counter()
  p = prepare(base, workdir, _roles(settings))
  policies, counts, samples = p["policies"], p["counts"], p["samples"]
  timings = p["timings"]
  data = data_rows(samples, counts)
  curves = {m: metric_curves_of(samples[m]) for m in SOURCES}
  t0 = time.perf_counter()
  bases = base_rows(s, policies, p["eval_set"], p["val_set"], workdir, p["max_new"], p["batch"])
  ft = bases + finetune_rows(s, policies, p["datasets"], counts, p["eval_set"], workdir, p["max_new"], p["batch"],
                             jsonl, settings)
  timings["finetune_s"] = time.perf_counter() - t0
  timings["total_s"] = time.perf_counter() - t_start
  timings["finetune_runs_own_s"] = sum(r.get("time_s") or 0.0 for r in ft if r["kind"] == "finetune")
  params = {role: policies[role][1].cfg.num_params if role in policies else None
            for role in ("se", "wc", "student")}
  return {"params": params, "costs": p["costs"], "counts": counts, "data": data, "curves": curves,
          "finetune": ft, "summary": summarize(ft, int(s.eval_samples)), "timings": timings}


def run_select(base, workdir: str, settings=None) -> dict:
  """The fine-tuning grid on the validation set (`select_rows`) for the roles of `settings`."""
  s = base.synth
  roles = [role for name, role in SETTINGS if settings is None or name in settings]
  p = prepare(base, workdir, _roles(settings))
  rows = select_rows(s, p["policies"], p["datasets"], p["counts"], p["val_set"], workdir, p["max_new"], p["batch"],
                     roles)
  return {"rows": rows, "selection": selection(rows)}


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
  if args.select:
    sel = run_select(base, args.workdir, settings)
    with open(os.path.join(args.out, "compute_optimal_select.jsonl"), "w") as f:
      for r in sel["rows"]:
        f.write(json.dumps(r) + "\n")
    write_select_markdown(os.path.join(args.out, "compute_optimal_select.md"), base, sel)
    for r in sel["selection"]:
      say(json.dumps(r))
    return
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
      d = wc["wc_minus_se"]
      word = "yes" if wc["diff_min"] > 0 else ("no" if wc["diff_max"] < 0 else "mixed across seeds")
      verdicts.append(f"b{b}: {word} ({d:+.3f}; per seed {wc['diff_range']})")
    out[setting] = "; ".join(verdicts)
  return out


def write_select_markdown(path, base, sel):
  from tlt_jax.utils.metrics import markdown_table
  s = base.synth
  lines = [
      "# Compute-optimal sampling: the fine-tuning grid on the validation set\n",
      f"Each role fine-tuned (seed 0) on each source's answer-filtered data at the largest budget "
      f"({s.budgets[-1]} SE samples per problem), {s.finetune.batch_size} packed rows x {s.finetune.max_len} "
      f"tokens per step, cosine LR with {s.finetune.warmup_steps} warmup steps; greedy accuracy on the "
      f"{s.val_problems} validation problems ({s.min_digits}-{s.max_digits} digits, disjoint from the sampling "
      "and held-out sets). `best`: the highest mean over the two sources (ties: fewer steps, lower LR).\n",
      markdown_table(sel["selection"], ["policy", "lr", "steps", "val_wc", "val_se", "val_mean", "best"]),
      "\nIn the config (`synth.finetune`): " + ", ".join(
          f"{role} lr {s.finetune.lr[role]:g} steps {s.finetune.steps[role]}" for role in ("se", "wc", "student")) + ".\n",
  ]
  with open(path, "w") as f:
    f.write("\n".join(lines))


def write_markdown(path, base, res):
  from tlt_jax.utils.metrics import markdown_table
  s = base.synth
  k_eval = int(s.eval_samples)
  p = res["params"]
  lines = [
      "# Compute-optimal sampling at tiny scale: WC vs SE data at matched FLOPs\n",
      f"Policies SFT'd on gold reversed addition with P(n digits) ∝ n^-{base.task.alpha} on 1..{base.task.max_digits}"
      f"{' less ' + ', '.join(map(str, base.task.skip_digits)) + ' digits' if base.task.skip_digits else ''}: "
      f"SE {p['se']:,} parameters, WC {p['wc']:,} (SE/WC = {p['se'] / p['wc']:.2f}), student {'-' if p['student'] is None else format(p['student'], ',')}. "
      f"Problems ({s.min_digits}-{s.max_digits} digits, no gold trace of that length in any policy's SFT): "
      f"{s.problems} for sampling, {s.val_problems} for validation, {s.eval_problems} held out, disjoint. "
      f"Sampling at T={s.temperature}; FLOPs per sample "
      f"{'with' if s.include_attention else 'without'} attention at the problems' mean lengths: "
      + ", ".join(f"{m} {res['costs'][m]:.3g}" for m in SOURCES) + f" (ratio {res['costs']['se'] / res['costs']['wc']:.2f}).\n",
      "## Budgets (samples per problem at matched FLOPs)\n",
      markdown_table(res["counts"], ["budget", "flops_per_problem", "k_se", "k_wc"]),
      f"\n## Base policies (after their SFT, before fine-tuning): greedy accuracy on the validation and the "
      f"held-out set, pass@{k_eval} (T=1) on the held-out set, accuracy per sample on the sampling problems "
      "(coverage@1 at T=1)\n",
      markdown_table([{**r, "params": p[r["policy"]], "sft_steps": int(s.base_steps[r["policy"]]),
                       "sft_lr": float(s.base_lr[r["policy"]]),
                       "sample_acc": next((c["coverage"] for c in res["curves"].get(r["policy"], []) if c["k"] == 1),
                                          None)} for r in res["finetune"] if r["kind"] == "base"],
                     ["policy", "params", "sft_steps", "sft_lr", "val_greedy_acc", "greedy_acc", f"pass@{k_eval}",
                      "sample_acc"]),
      "\n## (a) Data metrics (FPR exact: every step checked)\n",
      markdown_table(res["data"], ["budget", "source", "k", "coverage", "diversity", "fpr", "correct_samples",
                                   "flops_per_problem"]),
      f"\n## (b) SFT on each dataset: greedy accuracy on the held-out set (mean, sample std, min and max over "
      f"seeds {tuple(s.seeds)}), pass@{k_eval} (T=1)\n",
      f"Every run of a role: its `lr` and `steps` (chosen on the validation set), {s.finetune.batch_size} packed rows "
      f"x {s.finetune.max_len} tokens per step, cosine, the same for both sources. `gain` is over the base policy; "
      "`wc_minus_se` compares the two datasets at the same budget, `diff_range` its per-seed values (seed s on WC "
      "data minus seed s on SE data).\n",
      markdown_table(res["summary"], ["setting", "policy", "budget", "source", "dataset", "lr", "steps", "base_acc",
                                      "greedy_acc", "std", "min", "max", "seeds", "gain", "wc_minus_se", "diff_range",
                                      f"pass@{k_eval}"]),
      "\n## The paper (Gemma2-9B vs 27B on MATH/GSM8K) beside ours (a ~10^5-parameter scale)\n",
      f"The premise (the paper's SE, Gemma2-27B, is the stronger model) {premise(res)}. "
      "Data metrics: `yes` when WC's value is the higher; SFT: `yes` / `no` when WC data beats / loses to SE data "
      "on every seed (paired by seed), `mixed` otherwise.\n",
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
