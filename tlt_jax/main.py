"""Entry point: python -m tlt_jax.main --config=configs/default.py [--config.a.b=v] --workdir=DIR

On CPU, TLT's rollout groups need one (fake) device each: unless XLA_FLAGS already sets
`--xla_force_host_platform_device_count`, this module sets it, before jax is imported, to
max(tlt.rollout_groups, the product of the fixed mesh.shape entries) (2 for the default). The
fake devices share the machine's cores.

Exit status: 0 done; 2 bad input (one line, nothing written); 3 training diverged; 75 preempted
(SIGTERM: every host saved the same step; rerun the same command); 76 a host of a multi-host run
was lost (rerun the same command); 130 Ctrl-C.

TLT_COMPILE_CACHE=<dir> in the environment turns on JAX's persistent compilation cache there
(tlt_jax/utils/compile_cache.py): a second run skips most of the ~100 s of compiles.
"""

from __future__ import annotations

import logging
import os
import sys

from tlt_jax import cli

cli.set_cpu_devices(sys.argv)  # before jax is imported

from absl import app, flags  # noqa: E402

_CONFIG = cli.define_config_flag("configs/default.py")
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Output directory (resumes if it holds a checkpoint).")


def main(argv):
  del argv
  from tlt_jax.utils.console import setup_logging, summary_line
  setup_logging()
  from tlt_jax.errors import InputError
  from tlt_jax.parallel import hosts
  from tlt_jax.utils import compile_cache
  if os.environ.get(compile_cache.ENV_VAR):  # opt-in: re-runs skip most compile time
    logging.info("persistent compilation cache in %s", compile_cache.enable_compile_cache())
  hosts.initialize(hosts.Timeouts.from_config(_CONFIG.value))
  from tlt_jax import run as run_lib
  from tlt_jax.rl.trainer import TrainingDiverged
  try:
    summary = run_lib.run(_CONFIG.value, _WORKDIR.value)
  except InputError as e:
    cli.exit_on_input_error(e)
  except hosts.Preempted as e:  # every host saved the same step
    hosts.finish()
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(hosts.EXIT_PREEMPTED)
  except run_lib.Interrupted as e:
    print(f"interrupted: {e}", file=sys.stderr, flush=True)
    sys.exit(130)
  except KeyboardInterrupt:  # before any stage started: nothing to keep
    print("interrupted before any stage started; nothing was written", file=sys.stderr, flush=True)
    sys.exit(130)
  except TrainingDiverged as e:
    print(f"training stopped: {e}", file=sys.stderr)
    sys.exit(3)
  except Exception:
    hosts.on_failure()  # a lost host: the watch names it and exits 76
    raise
  hosts.finish()
  print(summary_line(summary), flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
