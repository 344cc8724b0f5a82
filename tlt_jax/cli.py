"""The command line shared by the main job and the experiments: `--config=path[:arg]` with
`--config.a.b=v` overrides on a locked, validated ml_collections config, and one-line errors.

  define_config_flag(default)   the --config flag (call before absl parses argv)
  parse_flags(argv)             absl parsing; a missing config file, a refused get_config
                                argument or an override of a key the config lacks exits 2 with
                                one line naming it and what is allowed
  set_cpu_devices(argv)         on CPU, as many fake devices as the config's rollout groups /
                                mesh need (before jax is imported)
  exit_on_input_error(e)        prints `<kind>: <message>` and exits 2 (no traceback)
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import flags
from ml_collections import config_flags

from tlt_jax import config as config_lib

DEFAULT_CONFIG = "configs/default.py"
# The process's --config flag: its default file and FlagHolder (absl flags are process-global).
_FLAG = {"default": DEFAULT_CONFIG, "holder": None}


def config_path_of(argv: list[str]) -> str:
  """The `path[:arg]` that --config names in argv (the default config when absent)."""
  path = _FLAG["default"]
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def load_config_file(path: str):
  """`get_config(arg)` of the config file `path[:arg]`; ConfigError naming the file when it does
  not exist, has no get_config, or refuses the argument."""
  file, *arg = path.split(":", 1)
  return config_of(file, *arg, flag=f"--config={path}")


def config_of(file: str, arg: str = "", flag: str = ""):
  """`get_config(arg)` of the config file `file`; derived configs load their base with it
  (e.g. `config_of(os.path.join(os.path.dirname(__file__), "default.py"))`)."""
  flag = flag or f"config file {file}"
  if not os.path.isfile(file):
    raise config_lib.ConfigError(f"{flag}: no such config file {file!r}; allowed: a Python file "
                                 "with get_config(), e.g. configs/default.py or configs/default.py:tiny")
  spec = importlib.util.spec_from_file_location("_tlt_config_file", file)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - any failure of the user's config file
    raise config_lib.ConfigError(f"{flag}: the config file failed to load: "
                                 f"{type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise config_lib.ConfigError(f"{flag}: {file!r} defines no get_config(); allowed: a config "
                                 "file like configs/default.py")
  try:
    return module.get_config(arg) if arg else module.get_config()
  except (ValueError, TypeError) as e:
    raise config_lib.ConfigError(f"{flag}: {e}") from None


def _config_file_of(argv: list[str]):
  """The config that --config names in argv, without overrides."""
  return load_config_file(config_path_of(argv))


def exit_on_input_error(error: Exception, code: int = 2):
  """Prints `<kind>: <message>` (one line, no traceback) to stderr and exits."""
  from tlt_jax.errors import one_line
  print(one_line(error), file=sys.stderr, flush=True)
  sys.exit(code)


def exit_on_bad_override(argv: list[str], error: Exception):
  """ml_collections raises a bare AttributeError/KeyError for `--config.nonexistent=1`: name the
  key and the keys allowed where it was looked up, and exit with status 2."""
  try:
    config = _config_file_of(argv)
  except config_lib.ConfigError as e:
    exit_on_input_error(e)
  except Exception:  # noqa: BLE001 - fall back to the bare message below
    config = None
  for arg in argv[1:]:
    if arg.startswith("--config.") and config is not None:
      message = config_lib.unknown_key_message(config, arg[len("--config."):].split("=", 1)[0])
      if message:
        exit_on_input_error(config_lib.ConfigError(f"{arg}: {message}"))
  exit_on_input_error(config_lib.ConfigError(
      f"could not apply the config overrides: {type(error).__name__}: {error}"))


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


def skip_absent_tpu() -> None:
  """With libtpu installed (the `tpu` extra, for compiling pod programs here) but no TPU chip on
  this machine, `import jax` would try the TPU first, print init errors and fall back after ~2.5
  s: say JAX_PLATFORMS=cpu instead, unless the user chose platforms or the machine has
  accelerator device files (TPU /dev/accel*, /dev/vfio/<n>; GPU /dev/nvidia*)."""
  import glob
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if any(glob.glob(p) for p in ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*")):
    return
  os.environ["JAX_PLATFORMS"] = "cpu"


def set_cpu_devices(argv: list[str], minimum: int = 1) -> None:
  """On CPU, TLT's rollout groups need devices: the host platform gets as many (fake) devices as
  the config asks for (at least `minimum`), unless XLA_FLAGS already says how many. It must run
  before jax is imported; the flag only concerns the CPU backend (TPU and GPU are unaffected)."""
  skip_absent_tpu()
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return
  needed = max(cpu_devices_needed(argv), minimum)
  if needed > 1:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={needed}").strip()


def define_config_flag(default: str = DEFAULT_CONFIG):
  """The --config flag (a locked config: overrides of unknown keys are refused). Defining it
  loads the default config file with argv's overrides, so a bad one exits here already."""
  if _FLAG["holder"] is not None:
    return _FLAG["holder"]
  _FLAG["default"] = default
  try:  # the default config file is loaded (with the overrides) when the flag is defined
    holder = config_flags.DEFINE_config_file("config", default, "ml_collections config file.",
                                             lock_config=True)
  except (AttributeError, KeyError) as e:
    exit_on_bad_override(sys.argv, e)
  except Exception as e:  # noqa: BLE001 - a config file that does not load: say which and why
    try:
      _config_file_of(sys.argv)
    except config_lib.ConfigError as bad:
      exit_on_input_error(bad)
    raise e
  _FLAG["holder"] = holder
  return holder


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing, with a clear error (exit 2) for a config file that does not exist or
  load, and for an override of a key the config lacks."""
  try:
    _config_file_of(argv)  # the file and its argument, named in the error
  except config_lib.ConfigError as e:
    exit_on_input_error(e)
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    exit_on_bad_override(argv, e)
  except flags.Error as e:
    exit_on_input_error(config_lib.ConfigError(str(e)))


