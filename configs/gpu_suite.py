"""The GPU suite's policy (scripts/gpu_suite.sh): sized for an accelerator's regime.

A d=512, 12-layer policy (~40M parameters) on the default chain-of-thought task with a longer,
heavier tail: sums of up to 40 digits (P(n) ~ n^-1.5, most short) and up to 6 re-checks, so that
responses run up to ~470 tokens and the last few rows of a rollout decode alone. On a GPU a
decoding step of this model costs about the same at any batch (launch- and memory-bound), the
regime TLT is built for; speculation starts at 16 active rows.

  configs/gpu_suite.py        the suite on one GPU (~8 min on an H200)
  configs/gpu_suite.py:tiny   the same pipeline at seconds scale (a CPU test runs it)
"""

import os

from tlt_jax.cli import config_of

SIZES = ("", "tiny")


def _default(arg=""):
  return config_of(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"), arg)


def get_config(arg: str = ""):
  if arg not in SIZES:
    raise ValueError(f"configs/gpu_suite.py:{arg}: unknown argument {arg!r}; allowed: {SIZES[1:]} "
                     "(or none, for the GPU size)")
  if arg == "tiny":
    c = _default("tiny")  # the pipeline, not the results: as few steps as every stage needs
    c.sft.update(steps=4, eval_every=4, eval_size=4, log_every=2, warmup_steps=1)
    c.drafter.update(warmup_steps=2, num_batches=1, log_every=1)
    c.rollout.spec_threshold = 4
    c.rl.steps = 2
    return c
  c = _default()
  c.model.update(hidden_size=512, intermediate_size=1536, num_layers=12, num_heads=8, num_kv_heads=4,
                 max_position_embeddings=640)
  c.task.update(max_digits=40, alpha=1.5, max_rechecks=6)
  c.sft.update(steps=400, batch_size=64, max_len=576, warmup_steps=40, eval_every=400, eval_size=64)
  c.eval.max_new_tokens = 480
  c.drafter.update(warmup_steps=800, batch_size=32, num_batches=64)
  c.rollout.update(max_new_tokens=480, chunk_size=32, spec_threshold=16,
                   buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
  c.rl.update(steps=12, prompts_per_step=32, group_size=8, eval_size=0, sample_eval_every=0)
  c.tlt.update(strategies=("d3k1n3", "d5k1n5", "d4k2n6", "plain"), buffer_capacity=512)
  return c
