"""Entry point: python -m tlt_jax.main --config=configs/default.py [--config.a.b=v] --workdir=DIR

On CPU, TLT's rollout groups need one (fake) device each: unless XLA_FLAGS already sets
`--xla_force_host_platform_device_count`, this module sets it, before jax is imported, to
max(tlt.rollout_groups, the product of the fixed mesh.shape entries) (2 for the default). The
fake devices share the machine's cores.

TLT_COMPILE_CACHE=<dir> in the environment turns on JAX's persistent compilation cache there
(tlt_jax/utils/compile_cache.py): a second run skips most of the ~100 s of compiles.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from tlt_jax import config as config_lib

DEFAULT_CONFIG = "configs/default.py"


def _config_file_of(argv: list[str]):
  """The config that --config names in argv (`path[:arg]`), without overrides."""
  path = DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  file, *arg = path.split(":", 1)
  spec = importlib.util.spec_from_file_location("_tlt_config_file", file)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*arg)


def _exit_on_bad_override(argv: list[str], error: Exception):
  """ml_collections raises a bare AttributeError/KeyError for `--config.nonexistent=1`: name the
  key and the keys allowed where it was looked up, and exit with status 2."""
  try:
    config = _config_file_of(argv)
  except Exception:  # noqa: BLE001 - fall back to the bare message below
    config = None
  for arg in argv[1:]:
    if arg.startswith("--config.") and config is not None:
      message = config_lib.unknown_key_message(config, arg[len("--config."):].split("=", 1)[0])
      if message:
        print(f"config error: {arg}: {message}", file=sys.stderr)
        sys.exit(2)
  print(f"config error: could not apply the config overrides: {type(error).__name__}: {error}",
        file=sys.stderr)
  sys.exit(2)


def cpu_devices_needed(argv: list[str]) -> int:
  """Devices the config's mesh and TLT rollout groups need: max(tlt.rollout_groups, the product
  of the fixed mesh entries), with `--config.tlt.rollout_groups` / `--config.mesh.shape`
  overrides applied."""
  try:
    config = _config_file_of(argv)
  except Exception:  # noqa: BLE001 - a broken config file is reported by the flag parser
    return 1
  groups = int(config.tlt.rollout_groups) if "tlt" in config else 1
  shape = tuple(config.mesh.shape) if "mesh" in config else (-1,)
  for arg in argv[1:]:
    key, _, value = arg.partition("=")
    try:
      if key == "--config.tlt.rollout_groups":
        groups = int(value)
      elif key == "--config.mesh.shape":
        shape = tuple(int(v) for v in value.strip("()[] ").split(",") if v.strip())
    except ValueError:
      pass  # reported by the config validation
  fixed = 1
  for s in shape:
    fixed *= s if s > 0 else 1
  return max(groups, fixed, 1)


# On CPU, rollout groups need devices: the host platform gets as many (fake) devices as the config
# asks for, unless XLA_FLAGS already says how many. It must happen before jax is imported; the
# flag only concerns the CPU backend (TPU and GPU devices are unaffected).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  _needed = cpu_devices_needed(sys.argv)
  if _needed > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_needed}").strip()

try:  # the default config file is loaded (with the overrides) when the flag is defined
  _CONFIG = config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "ml_collections config file.",
                                            lock_config=True)
except (AttributeError, KeyError) as e:
  _exit_on_bad_override(sys.argv, e)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Output directory (resumes if it holds a checkpoint).")


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear error (exit 2) for an override of a key the config lacks."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    _exit_on_bad_override(argv, e)


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from tlt_jax.parallel.mesh import maybe_initialize_distributed
  from tlt_jax.utils import compile_cache
  if os.environ.get(compile_cache.ENV_VAR):  # opt-in: re-runs skip most compile time
    logging.info("persistent compilation cache in %s", compile_cache.enable_compile_cache())
  maybe_initialize_distributed()
  from tlt_jax import run as run_lib
  from tlt_jax.rl.trainer import TrainingDiverged
  try:
    summary = run_lib.run(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  except TrainingDiverged as e:
    print(f"training stopped: {e}", file=sys.stderr)
    sys.exit(3)
  print(json.dumps({"summary": summary}))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
