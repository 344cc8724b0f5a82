"""Every step of a run compiled ahead of time for a TPU pod slice, on this (CPU) machine.

  python experiments/pod_compile.py --config=configs/qwen2_5_7b_gsm8k.py --topology=v5p-64 \
      [--config.a.b=v ...] [--out experiments/results/pod_compile] [--windows 1024,8192]

Needs the TPU compiler: `pip install -e .[tpu]` (libtpu==0.0.42, the one jax 0.10.2 pairs with).
Builds the run's mesh over the slice's devices, abstract params / optimizer state / caches /
batches with the shardings the run uses, and compiles prefill, decode and speculative chunks per
bucket, the drafter step, the log-prob forward and the policy update (tlt_jax/analysis/aot.py).
Prints one JSON line per step and writes DIR/<config>_<topology>.{jsonl,md,png}. Exits 1 with one
line naming the step, the bytes it needs and the HBM per chip when a step does not fit.

Times are the TPU compiler's cost model (`optimal_seconds`, and bytes accessed / HBM bandwidth),
not measurements on a TPU.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Compile-only: jax stays on the CPU; libtpu is loaded for its compiler (STACK-NOTES.md).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from tlt_jax import cli  # noqa: E402
from absl import flags  # noqa: E402

from experiments.common import run_experiment  # noqa: E402

_CONFIG = cli.define_config_flag("configs/qwen2_5_7b_gsm8k.py")
flags.DEFINE_string("topology", "v5p-64", "TPU slice by name (tlt_jax/analysis/aot.TOPOLOGIES)")
flags.DEFINE_string("out", "experiments/results/pod_compile", "output directory")
flags.DEFINE_string("windows", "1024,8192", "live attention windows to compile the largest decode "
                    "bucket at (bytes accessed vs live context); empty: none")
flags.DEFINE_string("only", "", "comma-separated step-name prefixes to compile (default: all)")
flags.DEFINE_string("name", "", "output file stem (default: <config file>_<topology>)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from tlt_jax import config as config_lib
  from tlt_jax.analysis import aot

  topo = aot.topology(FLAGS.topology)
  for k, v in aot.tpu_env(topo).items():
    os.environ.setdefault(k, v)
  try:
    config = config_lib.finalize(_CONFIG.value)
  except config_lib.ConfigError as e:
    if not str(e).startswith("config.task"):
      raise
    # Compiling needs the task's lengths from the config, not its data (e.g. /data/gsm8k on the pod).
    print(f"pod_compile: the task's data is not on this machine (compiling without it): {e}", flush=True)
    import ml_collections
    config = _CONFIG.value
    config.lock()
    config = ml_collections.FrozenConfigDict(config)
  windows = [int(w) for w in FLAGS.windows.split(",") if w.strip()]
  only = [o for o in FLAGS.only.split(",") if o.strip()]
  t0 = time.perf_counter()
  reports, layout = aot.compile_pod(config, topo, windows=windows, only=only,
                                    on_report=lambda r: print(json.dumps(r.to_json()), flush=True))
  layout["pod_compile_s"] = time.perf_counter() - t0
  stem = FLAGS.name or (os.path.splitext(os.path.basename(cli.config_path_of(sys.argv).split(":")[0]))[0]
                        + "_" + topo.name)
  paths = aot.write_outputs(reports, layout, FLAGS.out, stem)
  print(aot.markdown_table(reports))
  print(f"compiled {len(reports)} steps for {topo.name} in {layout['pod_compile_s']:.0f} s; wrote "
        + ", ".join(paths), flush=True)
  try:
    aot.check_fits(reports)
  except aot.PodFitError as e:
    print(f"pod_compile: {e}", file=sys.stderr, flush=True)
    sys.exit(1)


if __name__ == "__main__":
  run_experiment(main)
