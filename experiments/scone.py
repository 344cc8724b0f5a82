"""SCONE at tiny scale: validation perplexity against |V_f| and the f-gram model's size at a fixed
main model, the inference FLOPs (identical by construction), the host table's memory and the
decode cost of the host lookup.

Yu et al. (2025), "Scaling Embedding Layers in Language Models" (models/scone.py). Steps:
  1. the offline corpus (Python stdlib docstrings, /usr/share/doc text, arith traces;
     data/fgram_corpus.py) is prepared into `corpus.dir` when absent;
  2. all n-grams (2..max_n) of the training stream are counted once, streamed in chunks through
     the bounded-memory counter; each |V_f| takes the top f-grams of that ranking;
  3. longest-suffix matching throughput (host positions / s) is measured on the largest V_f;
  4. per (|V_f|, f-gram model): train main + f-gram model jointly (same seed, same batches),
     export the table, and measure validation perplexity through the table (inference's path);
     |V_f| = 0 is the plain baseline;
  5. inference FLOPs of the main forward with and without the table (XLA cost analysis), table
     bytes in host RAM, and greedy decode tokens/s through the rollout engine with the host
     lookup against without it (same main params, same prompts, timed side by side).

  python experiments/scone.py [--config=configs/scone.py[:tiny]] [--config.train.steps=600] [--out DIR]

Prints one JSON line per record; writes OUT/scone.{jsonl,md} and OUT/scone.png.
"""

from __future__ import annotations

import dataclasses
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

cli.skip_absent_tpu()

_CONFIG = cli.define_config_flag(os.path.join(ROOT, "configs", "scone.py"))
define_output_flags("experiments/results/scone")

PAPER = ("Paper (Yu et al., 2025; 0.7B-1.9B main models on the OLMo / WebText corpora, up to 1B f-grams, "
         "a different scale): perplexity falls as |V_f| grows and as the f-gram model grows, at fixed "
         "inference FLOPs; with both scaled a 1B model beats a 1.9B baseline at about half the "
         "inference FLOPs; f-gram embeddings in main memory add negligible decode latency (vLLM, "
         "one A100), NVMe storage slows it slightly.")


def parse_fgram_model(spec: str) -> tuple[int, int]:
  from tlt_jax.errors import ConfigError
  try:
    layers, width = (int(x) for x in spec.lower().split("x"))
    return layers, width
  except ValueError:
    raise ConfigError(f"experiment.fgram_models entry {spec!r} must be '<layers>x<width>', e.g. '1x64'") from None


def plain_config(cfg, spec: str):
  """The main model's config at "<layers>x<hidden>" (intermediate 3 x hidden, the same number of
  heads, head_dim = hidden / heads: every projection widens with the model)."""
  from tlt_jax.errors import ConfigError
  layers, hidden = parse_fgram_model(spec)
  if hidden % cfg.num_heads:
    raise ConfigError(f"experiment.plain_models entry {spec!r}: hidden {hidden} is not a multiple of "
                      f"model.num_heads={cfg.num_heads}")
  return dataclasses.replace(cfg, num_layers=layers, hidden_size=hidden, intermediate_size=3 * hidden,
                             head_dim=hidden // cfg.num_heads)


def grid_rows(c, cfg, sizes, base):
  """(|V_f|, f-gram model spec, SconeConfig or None, main ModelConfig) of every row: the main
  model plain, the larger plain baselines, then every (|V_f| > 0, f-gram model)."""
  from tlt_jax.models import scone
  rows = [(0, "-", None, cfg)] if 0 in sizes else []
  rows += [(0, "-", None, plain_config(cfg, spec)) for spec in c.experiment.plain_models]
  for k in (k for k in sizes if k > 0):
    for spec in c.experiment.fgram_models:
      layers, width = parse_fgram_model(spec)
      rows.append((k, spec, scone.SconeConfig(**{**base, "fgram_vocab_size": k, "fgram_layers": layers,
                                                 "fgram_hidden": width}), cfg))
  return rows


def row_name(k: int, spec: str, mcfg, cfg) -> str:
  shape = f"{mcfg.num_layers}x{mcfg.hidden_size}"
  if k:
    return f"SCONE {shape} + |V_f| {k} f-gram {spec}"
  return f"plain {shape}" + (" (main)" if mcfg == cfg else "")


def _say(rec: dict, out_file) -> None:
  line = json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in rec.items()})
  print(line, flush=True)
  out_file.write(line + "\n")
  out_file.flush()


def _forward_flops(main, table, seq_len: int) -> float:
  import jax
  import jax.numpy as jnp
  from flax import nnx
  g, p = nnx.split(main)

  def fwd(p, toks):
    m = nnx.merge(g, p)
    if table is None:
      return m(toks)[0]
    pos = jnp.broadcast_to(jnp.arange(toks.shape[1], dtype=jnp.int32), toks.shape)
    return m(toks, input_embeds_BxTxD=table.embed_positions(m, toks, pos))[0]

  cost = jax.jit(fwd).lower(p, jnp.zeros((1, seq_len), jnp.int32)).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", float("nan")))


def _decode_rate(main, table, prompts, plen, new_tokens: int, repeats: int) -> dict:
  """Greedy decode tokens/s of the rollout engine (median of `repeats` after a compile run)."""
  import jax
  import numpy as np
  from flax import nnx
  from tlt_jax.rollout.engine import RolloutEngine
  from tlt_jax.rollout.sampling import SamplingParams
  g, params = nnx.split(main)
  # EOS = PAD (never a training target): every row decodes exactly `new_tokens`.
  eng = RolloutEngine(g, SamplingParams(temperature=0.0), eos_ids=(0,), chunk_size=16, compact=False,
                      input_embedder=table)
  eng.generate(params, prompts, plen, new_tokens, jax.random.key(0))
  times, tokens = [], 0
  for r in range(repeats):
    t0 = time.perf_counter()
    out = eng.generate(params, prompts, plen, new_tokens, jax.random.key(r))
    times.append(time.perf_counter() - t0)
    tokens = int(out.lengths.sum())
  t = float(np.median(times))
  return {"tokens": tokens, "time_s": t, "tok_per_s": tokens / t}


def run(config, out_dir: str, command: str) -> list[dict]:
  import numpy as np
  from tlt_jax.data import fgram_corpus
  from tlt_jax.data.fgram import FgramVocab, NgramCounter, sequence_contexts
  from tlt_jax.models import scone
  from tlt_jax.models.config import ModelConfig
  from tlt_jax.models.scone_train import eval_lm, eval_windows, train_lm

  c = config
  os.makedirs(out_dir, exist_ok=True)
  t_start = time.perf_counter()
  jsonl = open(os.path.join(out_dir, "scone.jsonl"), "w")
  records = []

  def emit(rec):
    records.append(rec)
    _say(rec, jsonl)

  corpus_dir = c.corpus.dir if os.path.isabs(c.corpus.dir) else os.path.join(ROOT, c.corpus.dir)
  if not os.path.exists(os.path.join(corpus_dir, "corpus.json")):
    fgram_corpus.prepare(corpus_dir, tuple(s for s in c.corpus.sources.split(",") if s),
                         c.corpus.max_chars_per_source, c.corpus.num_traces)
  train, val, manifest = fgram_corpus.load(corpus_dir)
  emit({"record": "corpus", "dir": os.path.relpath(corpus_dir, ROOT), "train_tokens": int(train.size),
        "val_tokens": int(val.size), **{f"{k}_chars": v["chars"] for k, v in manifest["sources"].items()},
        **{f"{k}_sha256": v["sha256"][:16] for k, v in manifest["sources"].items()}})

  cfg = ModelConfig(vocab_size=manifest["tokenizer"]["vocab_size"], **c.model.to_dict())
  base = dict(c.scone.to_dict())
  sizes = sorted(int(k) for k in c.experiment.vocab_sizes)

  # 2. Streaming count over the training stream in 64 chunks (bounded memory: count_capacity).
  t0 = time.perf_counter()
  counter = NgramCounter(base["max_n"], base["count_capacity"])
  for chunk in np.array_split(np.asarray(train), 64):
    counter.update(chunk)
  count_s = time.perf_counter() - t0
  full = counter.top(max(sizes))
  emit({"record": "count", "max_n": base["max_n"], "ngrams_seen": counter.total,
        "distinct_kept": int(counter.keys.size), "error_bound": counter.error_bound,
        "count_s": count_s, "tokens_per_s": train.size / count_s,
        "min_count_in_largest_vf": int(full.counts_F[-1]) if full.size else 0})

  def vocab_of(k):
    return FgramVocab(full.tokens_FxN[:k], full.counts_F[:k])

  # 3. Matching throughput on the largest vocabulary.
  rng = np.random.default_rng(0)
  big = vocab_of(max(sizes))
  starts = rng.integers(0, len(train) - 256, 64)
  ctx = sequence_contexts(np.stack([np.asarray(train[s:s + 256]) for s in starts]), base["max_n"])
  big.match(ctx)
  t0 = time.perf_counter()
  reps = 5
  for _ in range(reps):
    ids = big.match(ctx)
  match_s = (time.perf_counter() - t0) / reps
  emit({"record": "match", "fgram_vocab_size": big.size, "positions": int(ids.size),
        "positions_per_s": ids.size / match_s, "match_rate": float((ids >= 0).mean()),
        "mean_matched_len": float(big.lengths_F[ids[ids >= 0]].mean()) if (ids >= 0).any() else 0.0})

  # 4. The grid: every row with every seed (same seed, same batches across rows).
  tr, ex = c.train, c.experiment
  val_tokens = eval_windows(val, tr.eval_batches * tr.batch_size, tr.seq_len)
  best = None
  for seed in (int(s) for s in ex.seeds):
    for k, spec, scfg, mcfg in grid_rows(c, cfg, sizes, base):
      model = scone.build_model(mcfg, scfg, seed=seed)
      vocab = vocab_of(k) if k else None
      stats = train_lm(model, vocab, train, steps=tr.steps, batch_size=tr.batch_size, seq_len=tr.seq_len,
                       lr=tr.lr, warmup_steps=tr.warmup_steps, weight_decay=tr.weight_decay, seed=seed,
                       log_every=max(tr.steps // 4, 1))
      main = model.main if k else model
      table = scone.build_table(model, vocab) if k else None
      ev = eval_lm(main, table, val_tokens, tr.batch_size)
      fl = _forward_flops(main, table, tr.seq_len)
      val_match = float((vocab.match_sequences(val_tokens) >= 0).mean()) if k else 0.0
      rec = {"record": "run", "seed": seed, "row": row_name(k, spec, mcfg, cfg), "fgram_vocab_size": k,
             "fgram_model": spec, "fgram_params": scfg.fgram_params(cfg) if scfg else 0,
             "main_params": mcfg.num_params, "main_nonembed_params": mcfg.num_params - mcfg.vocab_size * mcfg.hidden_size,
             "params_over_main": mcfg.num_params / cfg.num_params,
             "inference_flops_per_seq": fl, "seq_len": tr.seq_len, "train_tokens_seen": tr.steps * tr.batch_size * tr.seq_len,
             "table_host_bytes": table.nbytes if table else 0, **ev, **stats, "val_match_rate": val_match}
      emit(rec)
      if k and seed == int(ex.seeds[0]) and (best is None or (k, scfg.fgram_params(cfg)) > best[0]):
        best = ((k, scfg.fgram_params(cfg)), main, table, spec)

  # 5. Decode cost of the host lookup (the largest V_f, the largest f-gram model, the first seed).
  if best is not None:
    _, main, table, spec = best
    prompts = eval_windows(val[len(val) // 2:], ex.decode_batch, ex.decode_prompt)
    plen = np.full((len(prompts),), ex.decode_prompt, np.int32)
    rates = {}
    for name, tab in (("plain", None), ("scone", table)):
      rates[name] = _decode_rate(main, tab, prompts, plen, ex.decode_tokens, ex.decode_repeats)
    one = sequence_contexts(prompts[:, -1:], base["max_n"])
    t0 = time.perf_counter()
    for _ in range(100):
      table.lookup(one)
    emit({"record": "decode", "fgram_vocab_size": table.vocab.size, "fgram_model": spec,
          "batch": int(len(prompts)), "new_tokens": ex.decode_tokens,
          "plain_tok_per_s": rates["plain"]["tok_per_s"], "scone_tok_per_s": rates["scone"]["tok_per_s"],
          "scone_over_plain": rates["scone"]["tok_per_s"] / rates["plain"]["tok_per_s"],
          "host_lookup_us_per_step": (time.perf_counter() - t0) / 100 * 1e6,
          "table_host_bytes": table.nbytes})
  emit({"record": "total", "time_s": time.perf_counter() - t_start})
  jsonl.close()
  with open(os.path.join(out_dir, "scone.md"), "w") as f:
    f.write(report(records, command))
  plot(records, out_dir)
  return records


def _mean_sd(xs) -> tuple[float, float]:
  import numpy as np
  xs = np.asarray(xs, float)
  return float(xs.mean()), float(xs.std(ddof=1)) if len(xs) > 1 else 0.0


def summarize(records: list[dict]) -> list[dict]:
  """One row per grid row: mean and sample SD over seeds of val ppl, FLOPs and sizes."""
  runs = [r for r in records if r["record"] == "run"]
  names = list(dict.fromkeys(r["row"] for r in runs))
  main = next((r for r in runs if r["row"].endswith("(main)")), None)
  out = []
  for name in names:
    rs = [r for r in runs if r["row"] == name]
    ppl, sd = _mean_sd([r["val_ppl"] for r in rs])
    rel = None
    if main is not None:  # paired by seed against the plain main model
      by_seed = {r["seed"]: r["val_ppl"] for r in runs if r["row"] == main["row"]}
      rel = _mean_sd([(r["val_ppl"] / by_seed[r["seed"]] - 1) * 100 for r in rs if r["seed"] in by_seed])
    out.append({"row": name, "seeds": sorted(r["seed"] for r in rs), "val_ppl": ppl, "val_ppl_sd": sd,
                "val_ppl_min": min(r["val_ppl"] for r in rs), "val_ppl_max": max(r["val_ppl"] for r in rs),
                "vs_main_pct": rel[0] if rel else None, "vs_main_pct_sd": rel[1] if rel else None,
                **{k: rs[0][k] for k in ("fgram_vocab_size", "fgram_model", "fgram_params", "main_params",
                                         "params_over_main", "inference_flops_per_seq", "train_flops",
                                         "train_tokens_seen", "table_host_bytes")},
                "train_s": _mean_sd([r["train_s"] for r in rs])[0]})
  return out


def report(records: list[dict], command: str) -> str:
  runs = [r for r in records if r["record"] == "run"]
  one = {r["record"]: r for r in records if r["record"] != "run"}
  rows = summarize(records)
  seeds = sorted({r["seed"] for r in runs})
  lines = [f"# SCONE at tiny scale\n\nCommand: `{command}` ({one['total']['time_s'] / 60:.1f} min), seeds "
           f"{seeds}. Val ppl: mean ± sample SD over the seeds [min, max]; vs main: the per-seed change "
           "against the plain main model, mean ± SD. Timings are from a shared, loaded 2-core CPU machine.\n",
           "| model | params (x main) | f-gram params | val ppl | vs main | inference FLOPs / seq | "
           "training FLOPs | table host MB | train s |",
           "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    rel = f"{r['vs_main_pct']:+.1f} ± {r['vs_main_pct_sd']:.1f} %" if r["vs_main_pct"] is not None else ""
    lines.append(f"| {r['row']} | {r['main_params']:,} ({r['params_over_main']:.2f}x) | {r['fgram_params']:,} | "
                 f"{r['val_ppl']:.3f} ± {r['val_ppl_sd']:.3f} [{r['val_ppl_min']:.3f}, {r['val_ppl_max']:.3f}] | "
                 f"{rel} | {r['inference_flops_per_seq']:.4g} | {r['train_flops']:.3g} | "
                 f"{r['table_host_bytes'] / 2**20:.2f} | {r['train_s']:.0f} |")
  lines += ["", "Per seed:", "", "| model | seed | val ppl | val bits/char | train loss | val match rate |",
            "|:---|---:|---:|---:|---:|---:|"]
  for r in runs:
    lines.append(f"| {r['row']} | {r['seed']} | {r['val_ppl']:.3f} | {r['val_bits_per_char']:.3f} | "
                 f"{r['train_loss']:.3f} | {r['val_match_rate']:.2f} |")
  cnt, m = one["count"], one["match"]
  lines += ["", f"Every model sees {runs[0]['train_tokens_seen']:,} training tokens. Inference FLOPs per "
            f"{runs[0]['seq_len']}-token forward and training FLOPs (one step x steps: forward, backward and "
            "update, the f-gram model included for SCONE) from XLA's cost analysis; the f-gram model never "
            "runs at inference.", "",
            f"Counting: {cnt['ngrams_seen']:,} n-grams (2..{cnt['max_n']}) streamed in 64 chunks, "
            f"{cnt['tokens_per_s']:,.0f} tokens/s, {cnt['distinct_kept']:,} distinct kept, error bound "
            f"{cnt['error_bound']}; the largest V_f's rarest f-gram occurs {cnt['min_count_in_largest_vf']} times.",
            f"Longest-suffix matching (|V_f| = {m['fgram_vocab_size']:,}): {m['positions_per_s']:,.0f} positions/s "
            f"on the host, match rate {m['match_rate']:.2f}, mean matched length {m['mean_matched_len']:.2f}."]
  if "decode" in one:
    d = one["decode"]
    lines += [f"Decode (rollout engine, greedy, batch {d['batch']}, {d['new_tokens']} new tokens, |V_f| = "
              f"{d['fgram_vocab_size']:,}, f-gram model {d['fgram_model']}): {d['plain_tok_per_s']:,.0f} tok/s "
              f"without the table, {d['scone_tok_per_s']:,.0f} tok/s with the host lookup "
              f"({d['scone_over_plain']:.2f}x); one host lookup for the batch takes "
              f"{d['host_lookup_us_per_step']:.0f} us; table + matcher {d['table_host_bytes'] / 2**20:.2f} MB of host RAM."]
  lines += ["", PAPER]
  return "\n".join(lines) + "\n"


def plot(records: list[dict], out_dir: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = summarize(records)
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, label in ((axes[0], "inference_flops_per_seq", "inference FLOPs per sequence"),
                         (axes[1], "train_flops", "training FLOPs (whole run)")):
    for r in rows:
      color = "C0" if r["fgram_vocab_size"] else "grey"
      ax.errorbar([r[key]], [r["val_ppl"]], yerr=[[r["val_ppl"] - r["val_ppl_min"]], [r["val_ppl_max"] - r["val_ppl"]]],
                  fmt="o", color=color, capsize=3)
      ax.annotate(r["row"].replace(" + ", "\n+ "), (r[key], r["val_ppl"]), fontsize=6, xytext=(4, 2),
                  textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("validation perplexity (per char)")
  axes[0].set_title("SCONE (blue) vs plain models (grey): mean, seed range")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "scone.png"), dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  command = "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
  out = flags.FLAGS.out if os.path.isabs(flags.FLAGS.out) else os.path.join(ROOT, flags.FLAGS.out)
  run(_CONFIG.value, out, command)
  with open(os.path.join(out, "scone.md")) as f:
    print(f.read(), flush=True)


if __name__ == "__main__":
  run_experiment(main)
