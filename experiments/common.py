"""Shared pieces of the experiments: the command line, the default policy and drafter, prompts,
the compile cache.

Every experiment takes the main job's config flags, on the same locked, validated config:

  python experiments/<name>.py --config=configs/default.py[:arg] --config.rl.lr=2e-4 [own flags]

An override of a key the config lacks, or a bad value, exits with one `config error:` line.
Variants inside an experiment apply their own overrides with `with_overrides` (also checked).
"""

from __future__ import annotations

import copy
import os
import sys
import time

import numpy as np

from tlt_jax.utils.compile_cache import enable_compile_cache  # noqa: F401  (re-exported for the experiments)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, "configs", "default.py")


def with_overrides(config, overrides: dict | None = None):
  """A copy of `config` with `overrides` ({"rl.lr": 2e-4, ...}) set; a key the config lacks
  raises ConfigError naming it and the keys allowed there (a typo never adds a key)."""
  from tlt_jax import config as config_lib
  config = copy.deepcopy(config)
  for key, value in (overrides or {}).items():
    message = config_lib.unknown_key_message(config, key)
    if message:
      raise config_lib.ConfigError(message)
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    try:
      node[leaf] = value
    except (TypeError, ValueError) as e:
      raise config_lib.ConfigError(f"config.{key}={value!r} is not allowed: {e}") from None
  return config


def load_config(path: str = DEFAULT_CONFIG, overrides: dict | None = None):
  """The locked config of the file `path[:arg]` (relative paths from the repository root) with
  `overrides` applied by `with_overrides`."""
  from tlt_jax import cli
  file = path if os.path.isabs(path.split(":", 1)[0]) else os.path.join(ROOT, path)
  config = cli.load_config_file(file)
  config.lock()
  return with_overrides(config, overrides)


def run_experiment(main, argv=None) -> None:
  """absl's app.run over `main(argv)` with the main job's flag parsing and console: a bad flag,
  config file or input exits with one line naming it; logging goes above the progress bars."""
  from absl import app

  from tlt_jax import cli
  from tlt_jax.errors import InputError
  from tlt_jax.utils.console import setup_logging

  def wrapped(args):
    setup_logging()
    try:
      return main(args)
    except InputError as e:
      cli.exit_on_input_error(e)

  app.run(wrapped, argv=argv or sys.argv, flags_parser=cli.parse_flags)


def build_trainer(name: str, config, overrides: dict, setup, policy, drafter, workdir: str):
  """An RLTrainer of `config` with `overrides`, from the main job's policy and drafter; its own
  metrics, TensorBoard files and (unused) checkpoint directory go to `workdir`/`name`."""
  import jax
  from flax import nnx

  from tlt_jax import config as config_lib
  from tlt_jax.rl.trainer import RLTrainer
  from tlt_jax.run import drafter_bundle

  config = config_lib.finalize(with_overrides(config, overrides))
  reference = jax.tree.map(lambda x: x.copy(), nnx.state(policy))
  return RLTrainer(config, setup.task, setup.tokenizer, policy, os.path.join(workdir, name),
                   mesh=setup.mesh, reference_params=reference, drafter=drafter_bundle(config, drafter))


def ensure_policy_and_drafter(workdir: str, quick: bool = False, config=None):
  """(setup, policy, drafter) of the main job's `workdir`; runs its `sft` and `drafter` stages
  there first when their outputs are missing (`config`, default the default config; 150 SFT
  steps with quick)."""
  from tlt_jax import config as config_lib
  from tlt_jax import run as run_lib

  if config is None:
    config = load_config()
  config = with_overrides(config, {"stages": "sft,drafter", **({"sft.steps": 150} if quick else {})})
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


def cpu_peak_gflops(n: int = 2048, repeats: int = 5) -> float:
  """The CPU's dense float32 matmul rate under jax.jit (best of `repeats`), GFLOP/s."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  jax.block_until_ready(mm(a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(mm(a))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n ** 3 / best / 1e9
