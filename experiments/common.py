"""Shared pieces of the experiments: the default policy and drafter, prompts, compile cache."""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import numpy as np

from tlt_jax.utils.compile_cache import enable_compile_cache  # noqa: F401  (re-exported for the experiments)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_overrides(pairs) -> dict:
  """`--set key=value` strings -> {key: value}; a value that looks like JSON (a number, list,
  dict, true/false/null) is parsed as JSON, anything else stays a string."""
  out = {}
  for kv in pairs:
    key, value = kv.split("=", 1)
    out[key] = json.loads(value) if value[:1] in "[{0123456789-tfn" else value
  return out


def load_config(path: str = "configs/default.py", overrides: dict | None = None):
  spec = importlib.util.spec_from_file_location("tlt_config", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in (overrides or {}).items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def ensure_policy_and_drafter(workdir: str, quick: bool = False, config=None):
  """(setup, policy, drafter) of the main job's `workdir`; runs its `sft` and `drafter` stages
  there first when their outputs are missing (the default config; fewer SFT steps with quick)."""
  from tlt_jax import config as config_lib
  from tlt_jax import run as run_lib

  logging.basicConfig(level=logging.WARNING)
  if config is None:
    config = load_config(overrides={"sft.steps": 150} if quick else None)
  config.stages = "sft,drafter"  # the stages run here (the RL stage's rollout groups need not fit)
  config = config_lib.finalize(config)
  setup = run_lib.build_setup(config, workdir)
  policy = run_lib.run_sft_stage(setup)
  drafter = run_lib.run_drafter_stage(setup, policy)
  return setup, policy, drafter


def hard_prompts(setup, n: int, seed: int = 0, min_digits: int | None = None):
  """n right-padded prompts of the long problems (the rollout tail): digits in the upper half."""
  from tlt_jax.data.batching import encode_prompts
  task = setup.task
  lo = min_digits or max(1, task.max_digits // 2 + 1)
  rng = np.random.default_rng([seed, 17])
  examples = [task.sample(rng, num_digits=int(rng.integers(lo, task.max_digits + 1))).with_id(i) for i in range(n)]
  width = max(len(setup.tokenizer.encode(e.prompt)) for e in examples) + 1
  return encode_prompts(examples, setup.tokenizer, width)
