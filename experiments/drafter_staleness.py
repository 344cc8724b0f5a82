"""Drafter staleness: accept length over RL steps, frozen drafter vs the bubble-trained one.

RL moves the policy away from the model the drafter was warmed up on; a frozen drafter's
proposals then match less and less, while TLT's adaptive drafter keeps training on the policy's
own features in the rollout bubbles (paper, 7B: accept length 4.59 -> 6.53 for the adaptive
drafter). One RL run with full TLT (the default config; `--config.rl.lr=...` moves the policy
faster); every `--probe_every` steps both drafters decode the SAME fixed probe prompts with the
CURRENT policy, one fixed strategy, no compaction (the tail regime), with the same RNG keys:

  accept_len = tokens committed per row per speculative round (1 + accepted draft tokens).

  python experiments/drafter_staleness.py [--quick] [--steps N] [--workdir runs/default] [--out DIR] \
      [--config.rl.lr=2e-4 ...]

Prints one JSON line per probe {"step", "frozen", "adaptive", "drafter_version", ...} and writes
DIR/drafter_staleness.{jsonl,md,png}.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tlt_jax import cli  # noqa: E402

cli.set_cpu_devices(sys.argv, minimum=2)  # a fake device per rollout group; before jax is imported

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments.common import (DEFAULT_CONFIG, Output, build_trainer, define_output_flags,  # noqa: E402
                                enable_compile_cache, ensure_policy_and_drafter, hard_prompts, pyplot,
                                run_experiment)

_CONFIG = cli.define_config_flag(DEFAULT_CONFIG)
define_output_flags("experiments/results/drafter_staleness", workdir="runs/default")
flags.DEFINE_integer("steps", 0, "RL steps (default: the config's rl.steps)")
flags.DEFINE_bool("quick", False, "8 RL steps, probes every 2")
flags.DEFINE_integer("probe_every", 0, "default: steps // 8 (at least 1)")
flags.DEFINE_integer("probe_prompts", 16, "fixed probe prompts")
flags.DEFINE_integer("probe_repeats", 2, "RNG keys per probe")
flags.DEFINE_string("strategy", "d4k1n4", "draft strategy of the probes")
flags.DEFINE_integer("max_new", 96, "new tokens per probe")


def main(argv):
  del argv
  args = flags.FLAGS
  enable_compile_cache()

  import jax
  from flax import nnx

  from tlt_jax.rollout.engine import FixedSelector, RolloutEngine
  from tlt_jax.rollout.speculative import SpeculativeDecoder, Strategy
  from tlt_jax.utils.console import progress, say
  from tlt_jax.utils.metrics import markdown_table

  base = _CONFIG.value
  steps = args.steps or (8 if args.quick else int(base.rl.steps))
  every = args.probe_every or (2 if args.quick else max(1, steps // 8))
  overrides = {"rl.steps": steps, "rl.eval_size": 0, "rl.sample_eval_every": 0,
               "tlt.speculative": True, "tlt.train_drafter": True}
  setup, policy, drafter = ensure_policy_and_drafter(args.workdir, quick=args.quick, config=base)
  output = Output(args.out)
  trainer = build_trainer("tlt", base, overrides, setup, policy, drafter, os.path.join(args.workdir, "drafter_staleness"))

  tok = setup.tokenizer
  graphdef = nnx.graphdef(policy)
  group = trainer.tlt.groups[0]
  strategy = Strategy.parse(args.strategy)
  decoder = SpeculativeDecoder(graphdef, nnx.graphdef(drafter), trainer.sampling, tok.eos_ids,
                               strategies=[strategy], rounds_per_chunk=8)
  probe = RolloutEngine(graphdef, trainer.sampling, tok.eos_ids, pad_id=tok.pad_id, chunk_size=16,
                        compact=False, max_context=policy.cfg.max_position_embeddings,
                        speculative=decoder, spec_threshold=1 << 30)
  prompts, plens = hard_prompts(setup, args.probe_prompts, seed=1)
  frozen = group.replicate(nnx.state(drafter, nnx.Param))

  def accept_len(params, dparams):
    lens = []
    for k in range(args.probe_repeats):
      res = probe.generate(params, prompts, plens, args.max_new, group.replicate(jax.random.key(1000 + k)),
                           drafter_params=dparams, selector=FixedSelector(strategy))
      lens.append(res.stats.spec_accept_len)
    return float(np.mean(lens))

  rows = []
  t0 = time.perf_counter()
  bar = progress(steps, "staleness")
  with output.jsonl("drafter_staleness.jsonl") as write:
    for step in range(0, steps + 1):
      if step:
        record = trainer.step(step)
        bar.update(1)
      if step % every == 0 or step == steps:
        params = group.replicate(trainer.state.params)
        version, adaptive = trainer.tlt.drafter_params(0)
        row = dict(step=step, frozen=accept_len(params, frozen), adaptive=accept_len(params, adaptive),
                   drafter_version=version,
                   reward_mean=None if not step else record.get("reward_mean"),
                   response_len_mean=None if not step else record.get("response_len_mean"),
                   buffer_rows=trainer.tlt.buffer_rows)
        rows.append(row)
        write(row)
        say(json.dumps(row))
        bar.set_postfix(frozen=f"{row['frozen']:.2f}", adaptive=f"{row['adaptive']:.2f}")
  bar.close()
  elapsed = time.perf_counter() - t0
  mode = ("in the rollout groups' bubbles" if trainer.tlt.trains_in_bubbles else
          f"between RL steps ({trainer.tlt.config.between_steps} drafter steps after each update)")

  md = ["# Drafter staleness: accept length over RL steps\n",
        f"Strategy {strategy.name}, {args.probe_prompts} fixed probe prompts x {args.probe_repeats} keys, "
        f"max_new {args.max_new}, temperature {trainer.sampling.temperature}; {steps} RL steps "
        f"(config {' '.join(a for a in sys.argv[1:] if a.startswith('--config')) or 'default'}; "
        f"experiment overrides {overrides}); {elapsed:.0f} s. `frozen` = the warmed-up drafter, `adaptive` = "
        f"TLT's drafter as trained so far {mode} (version = completed drafter steps).\n",
        markdown_table(rows, ["step", "frozen", "adaptive", "drafter_version", "buffer_rows", "reward_mean",
                              "response_len_mean"])]
  output.markdown("drafter_staleness.md", md)
  plot(rows, output, strategy.name)


def plot(rows, output: Output, strategy):
  fig, ax = pyplot().subplots(figsize=(6, 3.6))
  for key in ("frozen", "adaptive"):
    ax.plot([r["step"] for r in rows], [r[key] for r in rows], marker="o", label=key)
  ax.set_xlabel("RL step")
  ax.set_ylabel(f"accept length ({strategy})")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  output.figure(fig, "drafter_staleness.png")


if __name__ == "__main__":
  run_experiment(main)
