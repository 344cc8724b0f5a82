"""Every step of a run compiled ahead of time for a TPU pod slice, on this (CPU) machine; or,
for a one-GPU config, the memory estimate against the GPU's memory.

  python experiments/pod_compile.py --config=configs/qwen2_5_7b_gsm8k.py --topology=v5p-64 \
      [--config.a.b=v ...] [--out experiments/results/pod_compile] [--windows 1024,8192] [--window_buckets 1,8] \
      [--breakdown 15]
  python experiments/pod_compile.py --config=configs/qwen2_5_1_5b_instruct_gsm8k.py:gpu-80gb --gpu_gib=80

GPU (--gpu_gib > 0): no compiler runs. The estimate counts the parameters exactly (the model and
the drafter built abstractly, nothing allocated) and the rest from the config's shapes:
  persistent  policy params, the reference policy (rl.kl_coef > 0 or rl.track_kl), Adam's two
              moments (optax keeps them in the parameters' dtype), the drafter with its Adam state;
  rollout     KV cache: rows a group decodes x cache capacity x layers x 2 x KV heads x head dim,
              in the activation dtype; prefill temporaries of the largest bucket (one layer's MLP
              and attention scores at a time, plus the layer outputs);
  update      gradients (float32, accumulated over micro-batches), the checkpointed layer inputs of
              one micro-batch (remat), one layer's recomputed activations, and the float32 logits
              with their log-softmax and gradient (3 x rows x pack_len x vocab x 4 bytes).
Peak = persistent + max(rollout, update), the two phases never holding their memory at once.
It is arithmetic over the config, not a measurement: XLA's fusion and buffer reuse change the
temporaries (usually downwards), and the allocator's fragmentation adds some.

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

from experiments.common import define_output_flags, run_experiment  # noqa: E402

_CONFIG = cli.define_config_flag("configs/qwen2_5_7b_gsm8k.py")
flags.DEFINE_string("topology", "v5p-64", "TPU slice by name (tlt_jax/analysis/aot.TOPOLOGIES)")
define_output_flags("experiments/results/pod_compile")
flags.DEFINE_string("windows", "1024,8192", "live attention windows to compile the largest decode "
                    "bucket at (bytes accessed vs live context); empty: none")
flags.DEFINE_string("window_buckets", "", "comma-separated buckets to compile the one-step decodes "
                    "at (whole cache and each --windows); empty: the largest bucket")
flags.DEFINE_string("only", "", "comma-separated step-name prefixes to compile (default: all)")
flags.DEFINE_integer("breakdown", 0, "> 0: also break each program's bytes down per instruction "
                     "(aot.hlo_instruction_bytes), with this many top instructions and sources, into "
                     "the .jsonl and .md")
flags.DEFINE_string("name", "", "output file stem (default: <config file>_<topology>)")
flags.DEFINE_float("gpu_gib", 0.0, "> 0: print the one-GPU memory estimate against this many GiB "
                   "instead of compiling for a TPU slice")
FLAGS = flags.FLAGS


GiB = 1024 ** 3


def _bytes_of(dtype: str) -> int:
  import numpy as np
  from tlt_jax.models.config import to_dtype
  return int(np.dtype(to_dtype(dtype)).itemsize)


def _param_count(module_fn) -> int:
  import math

  import jax
  from flax import nnx
  state = nnx.state(nnx.eval_shape(module_fn), nnx.Param)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def gpu_memory_estimate(config) -> tuple[list[tuple[str, str, float, str]], dict]:
  """[(phase, component, bytes, formula)] of one RL step of `config` on one device, and totals
  (see the module docstring)."""
  from flax import nnx

  from tlt_jax.drafter.eagle import EagleDrafter, drafter_config
  from tlt_jax.models.config import ModelConfig
  from tlt_jax.models.transformer import Transformer
  from tlt_jax.analysis.aot import round_up

  cfg = ModelConfig.from_dict(dict(config.model))
  r, rl, t = config.rollout, config.rl, config.tlt
  pb, ab = _bytes_of(cfg.param_dtype), _bytes_of(cfg.dtype)
  n = _param_count(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  nd = _param_count(lambda: EagleDrafter(cfg, rngs=nnx.Rngs(0)))
  nd_own = nd  # fc + one decoder layer; it shares the policy's embedding and head
  head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_heads
  width = round_up(int(r.max_prompt_len) + 1, 8)
  new = int(r.max_new_tokens)
  capacity = round_up(width + new + 6, 16)  # + the speculative verify margin (engine.capacity_for)
  rows = int(rl.prompts_per_step) * int(rl.group_size) // int(t.rollout_groups)
  pack = int(rl.pack_len) or round_up(width + new, int(rl.length_bucket))
  update_rows = max(1, int(rl.prompts_per_step) * int(rl.group_size) // int(rl.micro_batches))
  prefill_rows = max(int(b) for b in r.buckets if int(b) <= rows) if r.buckets else rows
  chunk = int(cfg.attention_chunk or width)
  ref = bool(rl.get("kl_coef", 0.0)) or bool(rl.get("track_kl", False))
  L, h, i, V = cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
  rows_out = [
      ("persistent", "policy params", n * pb, f"{n / 1e9:.3f} B params x {pb} B"),
      ("persistent", "reference policy", n * pb if ref else 0,
       f"{'rl.track_kl / kl_coef: a frozen copy' if ref else 'none (kl_coef = 0, track_kl off)'}"),
      ("persistent", "Adam moments", 2 * n * pb, f"2 x params x {pb} B"),
      ("persistent", "drafter + its Adam", 3 * nd_own * pb, f"{nd_own / 1e6:.0f} M own params x 3 x {pb} B"),
      ("rollout", "KV cache", rows * capacity * L * 2 * cfg.num_kv_heads * head_dim * ab,
       f"{rows} rows x {capacity} slots x {L} layers x 2 x {cfg.num_kv_heads} x {head_dim} x {ab} B"),
      ("rollout", "prefill temporaries",
       prefill_rows * width * (3 * i * ab + 2 * h * ab + chunk * cfg.num_heads * 4),
       f"{prefill_rows} rows x {width} tokens x (3 x {i} MLP + 2 x {h} + {chunk} x {cfg.num_heads} heads "
       "x 4 B scores)"),
      ("rollout", "decode logits", rows * V * 4, f"{rows} rows x {V} x 4 B"),
      ("update", "gradients (float32)", n * 4, "params x 4 B"),
      ("update", "checkpointed layer inputs", update_rows * pack * L * h * ab,
       f"{update_rows} row(s) x {pack} tokens x {L} layers x {h} x {ab} B"),
      ("update", "one layer recomputed",
       update_rows * pack * (3 * i * ab + 4 * h * ab) + update_rows * chunk * pack * cfg.num_heads * 4,
       f"{update_rows} x {pack} x (3 x {i} + 4 x {h}) x {ab} B + {chunk} x {pack} x {cfg.num_heads} x 4 B "
       "scores"),
      ("update", "logits, log-softmax, gradient", 3 * update_rows * pack * V * 4,
       f"3 x {update_rows} x {pack} x {V} x 4 B"),
  ]
  phase = {p: sum(b for q, _, b, _ in rows_out if q == p) for p in ("persistent", "rollout", "update")}
  totals = dict(phase, peak=phase["persistent"] + max(phase["rollout"], phase["update"]), params=n,
                drafter_params=nd_own, rows_per_group=rows, capacity=capacity, pack_len=pack,
                update_rows_per_micro_batch=update_rows)
  return rows_out, totals


def gpu_report(config, gib: float, stem: str, out_dir: str) -> bool:
  """Prints (and writes `<stem>.md`) the estimate; True when the peak fits in `gib`."""
  rows, totals = gpu_memory_estimate(config)
  lines = [f"# {stem}: one-GPU memory estimate\n",
           f"Arithmetic over the config (experiments/pod_compile.py --gpu_gib), not a measurement; "
           f"parameters counted exactly. Peak = persistent + max(rollout, update).\n",
           f"Command: `python experiments/pod_compile.py {' '.join(sys.argv[1:])}`\n",
           "| phase | component | GiB | formula |", "|---|---|---|---|"]
  for phase, name, b, formula in rows:
    lines.append(f"| {phase} | {name} | {b / GiB:.2f} | {formula} |")
  for phase in ("persistent", "rollout", "update"):
    lines.append(f"| **{phase}** | total | **{totals[phase] / GiB:.2f}** | |")
  fits = totals["peak"] <= gib * GiB
  lines.append(f"| **peak** | | **{totals['peak'] / GiB:.2f} / {gib:.0f}** | {'fits' if fits else 'DOES NOT FIT'} |")
  text = "\n".join(lines) + "\n"
  print(text)
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
    f.write(text)
  return fits


def main(argv):
  del argv
  from tlt_jax import config as config_lib
  from tlt_jax.analysis import aot

  if FLAGS.gpu_gib > 0:
    import ml_collections
    config = _CONFIG.value
    stem = FLAGS.name or os.path.splitext(os.path.basename(cli.config_path_of(sys.argv).split(":")[0]))[0]
    arg = cli.config_path_of(sys.argv).partition(":")[2]
    stem += f"_{arg}" if arg else "_gpu"
    if not gpu_report(ml_collections.FrozenConfigDict(config), FLAGS.gpu_gib, stem, FLAGS.out):
      print(f"pod_compile: the estimated peak does not fit in {FLAGS.gpu_gib:.0f} GiB", file=sys.stderr)
      sys.exit(1)
    return
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
  window_buckets = [int(b) for b in FLAGS.window_buckets.split(",") if b.strip()]
  t0 = time.perf_counter()
  reports, layout = aot.compile_pod(config, topo, windows=windows, window_buckets=window_buckets, only=only,
                                    breakdown=FLAGS.breakdown,
                                    on_report=lambda r: print(json.dumps({k: v for k, v in r.to_json().items()
                                                                          if k != "breakdown"}), flush=True))
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
