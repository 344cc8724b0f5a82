"""Rollout speed-up of speculative decoding per active batch size, measured side by side.

For each active batch size and draft strategy (depth, topk, num_verify) it times plain decoding
and speculative decoding of the same prompts in the same process, alternating runs, with the
SFT-trained default policy and its warmed-up EAGLE drafter (taken from the main job's workdir,
made there by the `sft` and `drafter` stages when missing). Rows decode without compaction, so
the batch size is the active batch size throughout: this is the regime of the rollout tail.

  python experiments/rollout_speedup.py [--quick] [--workdir runs/default] [--out DIR]

Prints one JSON line per (batch, strategy):
  {"batch", "strategy", "plain_tok_s", "spec_tok_s", "speedup", "accept_len"}
where strategy "auto" is the engine choosing on its own (BEG-MAB over the strategies and plain
decoding; its line adds the median over alternating pairs, the bandit's final choice and its
decode time per arm), and writes DIR/rollout_speedup.{jsonl,md,png}. Rates are the best of the alternating
repeats: other processes on the machine only ever slow a run down.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.common import (DEFAULT_CONFIG, Output, cpu_peak_gflops, define_output_flags,  # noqa: E402
                                enable_compile_cache, ensure_policy_and_drafter, hard_prompts, pyplot,
                                run_experiment, timed)
from tlt_jax import cli  # noqa: E402

_CONFIG = cli.define_config_flag(DEFAULT_CONFIG)
define_output_flags("experiments/results/rollout_speedup", workdir="runs/default")
flags.DEFINE_bool("quick", False, "reduced sweep (< 3 min once the policy exists)")
flags.DEFINE_string("batches", "1,2,4,8,16,32,64", "active batch sizes")
flags.DEFINE_string("strategies", "d3k1n3,d5k1n5,d4k2n6,d6k2n8", "draft strategies d<depth>k<topk>n<verify>")
flags.DEFINE_float("temperature", 1.0, "sampling temperature")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
flags.DEFINE_integer("max_new", 96, "new tokens per prompt")
flags.DEFINE_integer("repeats", 3, "alternating repeats (the best counts)")
flags.DEFINE_integer("auto_repeats", 6, "alternating plain / auto pairs per batch, after the bandit's exploration")


def main(argv):
  del argv
  args = flags.FLAGS
  if args.quick:
    args.batches, args.strategies, args.repeats = "1,4,16,64", "d3k1n3,d5k1n5,d4k2n6", 1
  enable_compile_cache()

  import jax
  from flax import nnx

  from tlt_jax.rollout.engine import PLAIN, FixedSelector, RolloutEngine
  from tlt_jax.rollout.sampling import SamplingParams
  from tlt_jax.rollout.speculative import SpeculativeDecoder, Strategy
  from tlt_jax.tlt.bandit import BegMab
  from tlt_jax.utils.console import say, track
  from tlt_jax.utils.metrics import markdown_table

  setup, policy, drafter = ensure_policy_and_drafter(args.workdir, quick=args.quick, config=_CONFIG.value)
  tok = setup.tokenizer
  graphdef, params = nnx.split(policy)
  dgraph, dparams = nnx.split(drafter)
  sp = SamplingParams(temperature=args.temperature, top_p=args.top_p)
  strategies = [Strategy.parse(s) for s in args.strategies.split(",")]
  batches = [int(b) for b in args.batches.split(",")]
  decoder = SpeculativeDecoder(graphdef, dgraph, sp, tok.eos_ids, strategies=strategies, rounds_per_chunk=8)
  plain = RolloutEngine(graphdef, sp, tok.eos_ids, pad_id=tok.pad_id, chunk_size=16, compact=False,
                        max_context=policy.cfg.max_position_embeddings)
  spec = RolloutEngine(graphdef, sp, tok.eos_ids, pad_id=tok.pad_id, chunk_size=16, compact=False,
                       max_context=policy.cfg.max_position_embeddings, speculative=decoder,
                       spec_threshold=1 << 30)

  def tok_s(result):
    t = result.stats.time_s
    return result.stats.num_tokens / (t["decode"] + t["speculative"]), result.stats.spec_accept_len

  output = Output(args.out)
  rows = []
  write = output.jsonl("rollout_speedup.jsonl")
  t_start = time.perf_counter()
  seed = 0
  for b in track(batches, "batches", unit="batch"):
    prompts, plens = hard_prompts(setup, b, seed=b)
    run_plain = lambda k: plain.generate(params, prompts, plens, args.max_new, jax.random.key(k))
    run_plain(0)  # compile
    plain_runs = []
    for s in strategies:
      sel = FixedSelector(s)
      spec.generate(params, prompts, plens, args.max_new, jax.random.key(0), drafter_params=dparams, selector=sel)
      p_rates, s_rates, accepts = [], [], []
      for _ in range(args.repeats):
        seed += 1
        p_rates.append(tok_s(run_plain(seed))[0])
        rate, acc = tok_s(spec.generate(params, prompts, plens, args.max_new, jax.random.key(seed),
                                        drafter_params=dparams, selector=sel))
        s_rates.append(rate)
        accepts.append(acc)
      plain_runs += p_rates
      rec = dict(batch=b, strategy=s.name, plain_tok_s=float(np.max(p_rates)),
                 spec_tok_s=float(np.max(s_rates)), accept_len=float(np.mean(accepts)))
      rec["speedup"] = rec["spec_tok_s"] / rec["plain_tok_s"]
      rows.append(rec)
      write(rec)
      say(json.dumps(rec))
    # The engine on its own: BEG-MAB over plain decoding and every strategy; after its
    # exploration, time it against plain decoding side by side.
    tlt_cfg = _CONFIG.value.tlt  # the engine's own bandit settings (configs/default.py: tlt.bandit_*)
    bandit = BegMab([PLAIN] + [tuple(s) for s in strategies], buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                    epsilon=float(tlt_cfg.bandit_epsilon), window=int(tlt_cfg.bandit_window), seed=b)
    for i in range(len(strategies) + 1):  # one chunk sequence per arm at least
      spec.generate(params, prompts, plens, args.max_new, jax.random.key(100 + i), drafter_params=dparams,
                    selector=bandit)
    p_rates, s_rates, accepts, arms = [], [], [], {}
    for _ in range(max(args.auto_repeats, 2)):
      seed += 1
      p_rates.append(tok_s(run_plain(seed))[0])
      res = spec.generate(params, prompts, plens, args.max_new, jax.random.key(seed), drafter_params=dparams,
                          selector=bandit)
      s_rates.append(tok_s(res)[0])
      accepts.append(res.stats.spec_accept_len or 1.0)
      for c in res.stats.chunks:  # decode time per arm: what auto spent its time on
        name = c.strategy or "plain"
        arms[name] = arms.get(name, 0.0) + c.time_s
    best = bandit.best(b)
    total = sum(arms.values())
    rec = dict(batch=b, strategy="auto", plain_tok_s=float(np.max(p_rates)), spec_tok_s=float(np.max(s_rates)),
               accept_len=float(np.mean(accepts)),
               chosen="plain" if best in (None, PLAIN) else Strategy(*best).name,
               pair_median=float(np.median(np.asarray(s_rates) / np.asarray(p_rates))),
               time_share=" ".join(f"{k}:{v / total:.2f}" for k, v in sorted(arms.items(), key=lambda kv: -kv[1])))
    rec["speedup"] = rec["spec_tok_s"] / rec["plain_tok_s"]
    rec["plain_step_ms"] = 1000.0 * b / float(np.max(plain_runs + p_rates))
    rows.append(rec)
    write(rec)
    say(json.dumps(rec))
  verify = verify_cost(policy, [1, 2, 3, 5, 9])
  draft = draft_level_cost(policy, drafter, [1, 8])
  peak = cpu_peak_gflops()
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  auto = {r["batch"]: r for r in rows if r["strategy"] == "auto"}
  regime = []
  for b in batches:  # dense FLOPs of a decode step (2 x params x rows) against the measured peak
    ms = auto[b]["plain_step_ms"]
    gflops = 2.0 * n_params * b / (ms / 1000.0) / 1e9
    regime.append(dict(batch=b, plain_step_ms=ms, plain_tok_s=auto[b]["plain_tok_s"], gflop_s=gflops,
                       frac_of_peak=gflops / peak))
  for rec in regime + draft + [dict(regime="cpu_peak", gflop_s=peak, params=n_params)]:
    write(dict(rec, regime=rec.get("regime", "plain_step")))
  for rec in verify:
    write(rec)
    say(json.dumps(rec))
  write.close()
  elapsed = time.perf_counter() - t_start

  md = ["# Rollout speed-up of speculative decoding (side by side, one process)\n",
        f"Policy `{args.workdir}/sft`, drafter `{args.workdir}/drafter`, temperature {args.temperature}, "
        f"top_p {args.top_p}, max_new {args.max_new}, best of {args.repeats} alternating repeat(s) "
        f"({args.auto_repeats} for auto), {elapsed:.0f} s in all. tok/s counts decode time (prefill excluded, "
        "identical in both). For auto: `pair_median` is the median over the alternating pairs of "
        "auto / plain, `chosen` the bandit's greedy arm at the end, `time_share` its decode time per arm.\n",
        markdown_table(rows, ["batch", "strategy", "plain_tok_s", "spec_tok_s", "speedup", "pair_median",
                              "accept_len", "chosen", "time_share"]),
        "\n## Plain decoding cost per step vs batch (the regime)\n",
        f"GFLOP/s = 2 x {n_params:,} parameters x batch / step time (dense, attention left out); the "
        f"CPU's peak measured in the same run: a 2048x2048 float32 matmul under jax.jit, {peak:.0f} GFLOP/s.\n",
        markdown_table(regime, ["batch", "plain_step_ms", "plain_tok_s", "gflop_s", "frac_of_peak"]),
        "\n## Target forward cost vs tokens per call at batch 1 (what verifying n drafts costs)\n",
        markdown_table(verify, ["tokens", "ms", "vs_1_token"]),
        "\n## One draft level (drafter layer + the shared LM head, one token per row)\n",
        "A d-deep chain costs d of these plus one verify of d + 1 tokens per round.\n",
        markdown_table(draft, ["batch", "ms", "vs_target_1_token"])]
  output.markdown("rollout_speedup.md", md)
  plot(rows, batches, strategies, output)
  say(json.dumps({"plain_tok_s_batch1": auto[batches[0]]["plain_tok_s"],
                    "plain_tok_s_batch_max": auto[batches[-1]]["plain_tok_s"], "elapsed_s": elapsed}))


def draft_level_cost(policy, drafter, batches, rounds: int = 50, repeats: int = 15):
  """ms per draft level at each batch: the drafter's cached one-token pass and the shared LM head
  (min over repeats of a jitted loop), and its ratio to a 1-token target forward at batch 1."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tlt_jax.models.transformer import KVCache
  tgraph, tparams = nnx.split(policy)
  dgraph, dparams = nnx.split(drafter)
  d = policy.cfg.hidden_size
  base = verify_cost(policy, [1], rounds=rounds, repeats=repeats)[0]["ms"]
  out = []
  for b in batches:
    cache = KVCache.init(drafter.cfg, b, 192).replace(lengths=jnp.full((b,), 64, jnp.int32))

    @jax.jit
    def loop(tp, dp, c):
      target, draft = nnx.merge(tgraph, tp), nnx.merge(dgraph, dp)

      def body(i, carry):
        c, f = carry
        tok = jnp.argmax(target.logits(f), axis=-1).astype(jnp.int32)
        f2, c2 = draft(target.embed(tok), f, cache=c)
        return c2.replace(lengths=c.lengths), f2
      return jax.lax.fori_loop(0, rounds, body, (c, jnp.zeros((b, 1, d), jnp.float32)))

    ms = 1000 * min(timed(lambda: loop(tparams, dparams, cache), repeats)) / rounds
    out.append({"regime": "draft_level", "batch": b, "ms": ms, "vs_target_1_token": ms / base})
  return out


def verify_cost(policy, token_counts, rounds: int = 50, repeats: int = 15):
  """ms per cached target forward of T tokens at batch 1 (min over repeats of a jitted loop)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from tlt_jax.models.transformer import KVCache
  graphdef, params = nnx.split(policy)
  cache = KVCache.init(policy.cfg, 1, 192).replace(lengths=jnp.full((1,), 64, jnp.int32))
  out = []
  for t in token_counts:
    @jax.jit
    def loop(p, c, t=t):
      model = nnx.merge(graphdef, p)

      def body(i, c):  # the tokens depend on the carry, so nothing is hoisted out of the loop
        logits, _, c2 = model(jnp.ones((1, t), jnp.int32) * (c.lengths[:, None] % 7), cache=c)
        return c2.replace(lengths=c.lengths + (logits[:, 0, 0] > 1e9).astype(jnp.int32))

      return jax.lax.fori_loop(0, rounds, body, c)

    ms = 1000 * min(timed(lambda: loop(params, cache), repeats)) / rounds
    out.append({"regime": "verify_tokens", "tokens": t, "ms": ms})
  for rec in out:
    rec["vs_1_token"] = rec["ms"] / out[0]["ms"]
  return out


def plot(rows, batches, strategies, output: Output):
  fig, (ax1, ax2) = pyplot().subplots(1, 2, figsize=(11, 4))
  for name in [s.name for s in strategies] + ["auto"]:
    pts = [(r["batch"], r["speedup"]) for r in rows if r["strategy"] == name]
    ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, lw=2.5 if name == "auto" else 1)
  ax1.axhline(1.0, color="gray", ls="--")
  ax1.set_xscale("log", base=2)
  ax1.set_xlabel("active batch size")
  ax1.set_ylabel("speed-up over plain decoding")
  ax1.legend()
  ax1.set_title("speculative vs plain (tok/s ratio)")
  auto = [r for r in rows if r["strategy"] == "auto"]
  ax2.plot([r["batch"] for r in auto], [r["plain_step_ms"] for r in auto], marker="o")
  ax2.set_xscale("log", base=2)
  ax2.set_xlabel("batch size")
  ax2.set_ylabel("ms per plain decode step")
  ax2.set_title("plain decode step cost vs batch")
  fig.tight_layout()
  output.figure(fig, "rollout_speedup.png")


if __name__ == "__main__":
  run_experiment(main)
