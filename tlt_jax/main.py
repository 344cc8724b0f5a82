"""Entry point: python -m tlt_jax.main --config=configs/default.py [--config.a.b=v] --workdir=DIR"""

from __future__ import annotations

import json
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from tlt_jax import config as config_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/default.py", "ml_collections config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Output directory (resumes if it holds a checkpoint).")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax._src"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  from tlt_jax.parallel.mesh import maybe_initialize_distributed
  maybe_initialize_distributed()
  from tlt_jax import run as run_lib
  try:
    summary = run_lib.run(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    print(f"config error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps({"summary": summary}))


if __name__ == "__main__":
  app.run(main)
