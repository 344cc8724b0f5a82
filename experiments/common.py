"""Shared pieces of the experiments: the command line (the config flags, --out, --workdir), the
output writer (JSONL, markdown, PNG), the timing loop, the default policy and drafter, prompts,
the compile cache.

Every experiment takes the main job's config flags, on the same locked, validated config:

  python experiments/<name>.py --config=configs/default.py[:arg] --config.rl.lr=2e-4 [own flags]

An override of a key the config lacks, or a bad value, exits with one `config error:` line.
Variants inside an experiment apply their own overrides with `with_overrides` (also checked).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from typing import Any, Callable, Iterable, Sequence

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


# ------------------------------------------------------------------------------ the harness


def define_output_flags(out: str, workdir: str | None = None, *, out_help: str = "output directory",
                        workdir_help: str = "main-job workdir holding sft/ and drafter/") -> None:
  """The flags the experiments share: --out (default `out`) and, for one that builds on the main
  job's stages, --workdir (default `workdir`). They count as the calling script's own flags
  (its --help lists them)."""
  from absl import flags
  caller = sys._getframe(1).f_globals.get("__name__", "")
  module = sys.argv[0] if caller == "__main__" else caller  # how absl names a script's flags
  flags.DEFINE_string("out", out, out_help, module_name=module)
  if workdir is not None:
    flags.DEFINE_string("workdir", workdir, workdir_help, module_name=module)


def pyplot():
  """matplotlib's pyplot, drawing to files only (the Agg backend)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


class JsonlWriter:
  """`write(record)` appends one JSON line and flushes it; `close()` (or the end of a `with`)."""

  def __init__(self, path: str, append: bool = False):
    self.path = path
    self._file = open(path, "a" if append else "w")

  def __call__(self, record: Any) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()

  def __enter__(self) -> "JsonlWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class Output:
  """An experiment's output directory: JSONL records (one line each, flushed, so the finished
  part of a long run survives an interruption), markdown pages and PNG figures."""

  def __init__(self, directory: str):
    self.dir = directory
    os.makedirs(directory, exist_ok=True)

  def path(self, name: str) -> str:
    return os.path.join(self.dir, name)

  def jsonl(self, name: str, append: bool = False) -> "JsonlWriter":
    """A writer of DIR/`name` (truncated first unless `append`); `with output.jsonl(...) as write`."""
    return JsonlWriter(self.path(name), append)

  def write_jsonl(self, name: str, records: Iterable[Any]) -> str:
    with self.jsonl(name) as write:
      for r in records:
        write(r)
    return self.path(name)

  def json(self, name: str, obj: Any) -> str:
    """DIR/`name` holding `obj` as indented JSON."""
    with open(self.path(name), "w") as f:
      json.dump(obj, f, indent=1)
    return self.path(name)

  def markdown(self, name: str, text: str | Sequence[str]) -> str:
    """DIR/`name` holding `text` (a sequence of blocks is joined with newlines)."""
    body = text if isinstance(text, str) else "\n".join(text)
    with open(self.path(name), "w") as f:
      f.write(body if body.endswith("\n") else body + "\n")
    return self.path(name)

  def figure(self, fig, name: str, dpi: int = 100) -> str:
    """Saves `fig` as DIR/`name` and closes it."""
    fig.savefig(self.path(name), dpi=dpi)
    pyplot().close(fig)
    return self.path(name)


def timed(fn: Callable[[], Any], repeats: int, *, warm: bool = True) -> list[float]:
  """Wall seconds of `repeats` calls of `fn`, each up to its result being ready
  (jax.block_until_ready); with `warm`, one untimed call first (compiles)."""
  import jax
  if warm:
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times
