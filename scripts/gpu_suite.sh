#!/usr/bin/env bash
# The GPU suite: TLT measured where decoding is memory-bound. One prepared run, <= ~8 min on one
# H200; writes JSON, markdown and PNG under OUT.
#
#   bash scripts/gpu_suite.sh OUT [--tiny]
#
# 1. the main job's SFT and drafter warm-up of configs/gpu_suite.py (d=512, 12 layers, responses
#    up to ~470 tokens with a long tail);
# 2. experiments/cost_bench.py     plain-decode cost vs batch, verify rounds, drafter step  -> OUT/cost_bench.json
# 3. experiments/rollout_speedup.py  speculative vs plain per active batch                 -> OUT/rollout_speedup/
# 4. experiments/e2e_speedup.py    plain / static / TLT RL steps, interleaved, + traces    -> OUT/e2e_speedup/
# 5. experiments/pod_sim.py --validate: the simulator replays step 4 at step 2's costs    -> OUT/pod_sim_validate/
# then prints the plain-decode cost vs batch beside the speed-ups (OUT/summary.md).
#
# --tiny runs the same pipeline on configs/gpu_suite.py:tiny at seconds scale (on a CPU too;
# tests/test_gpu_suite.py runs it). On the GPU machine (jax with CUDA preinstalled, no network)
# the packages it lacks are installed from scripts/gpu_wheels/ (ml-collections).
set -euo pipefail
OUT=${1:?usage: bash scripts/gpu_suite.sh OUT [--tiny]}
MODE=${2:-}
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import ml_collections" 2>/dev/null; then
  "$PY" -m pip install --no-index --find-links scripts/gpu_wheels ml-collections
fi
mkdir -p "$OUT"
WORK="$OUT/work"
if [[ "$MODE" == "--tiny" ]]; then
  CFG=configs/gpu_suite.py:tiny
  BENCH=(--tiny --repeats=1 --ctx=24,40 --spec_ctx=24 --prefill_len=16)
  ROLL=(--batches=1 --strategies=d3k1n3 --max_new=12 --repeats=1)
  E2E=(--steps=2 --warmup=0)
  SKIP=0
else
  CFG=configs/gpu_suite.py
  BENCH=(--repeats=5 --ctx=64,256,512 --spec_ctx=256 --prefill_len=64)
  ROLL=(--batches=1,2,4,8,16,32,64 --strategies=d3k1n3,d5k1n5,d4k2n6 --max_new=384 --repeats=2)
  E2E=(--steps=12 --warmup=3)
  SKIP=3
fi
"$PY" -c "import jax; print('devices:', jax.devices())"
"$PY" -m tlt_jax.main --config="$CFG" --config.stages=sft,drafter --workdir="$WORK"
"$PY" experiments/cost_bench.py --config="$CFG" --out="$OUT/cost_bench.json" "${BENCH[@]}"
"$PY" experiments/rollout_speedup.py --config="$CFG" --workdir="$WORK" --out="$OUT/rollout_speedup" "${ROLL[@]}"
"$PY" experiments/e2e_speedup.py --config="$CFG" --workdir="$WORK" --out="$OUT/e2e_speedup" "${E2E[@]}"
"$PY" experiments/pod_sim.py --validate --trace="$OUT/e2e_speedup/traces.jsonl" \
  --measured="$OUT/cost_bench.json" --e2e="$OUT/e2e_speedup/e2e_speedup.jsonl" --out="$OUT/pod_sim_validate" --skip=$SKIP
"$PY" - "$OUT" <<'PYEOF'
import json, os, sys
out = sys.argv[1]
bench = json.load(open(os.path.join(out, "cost_bench.json")))
lines = [f"# GPU suite summary ({bench['device']})", "", "Plain decode step (ms) by live context and batch:", ""]
ctxs = sorted(bench["decode"], key=int)
batches = sorted(bench["decode"][ctxs[0]], key=int)
lines += ["| ctx \\ batch | " + " | ".join(batches) + " |", "|---" * (len(batches) + 1) + "|"]
for c in ctxs:
  lines.append(f"| {c} | " + " | ".join(f"{1e3 * bench['decode'][c][b]:.2f}" for b in batches) + " |")
lines += ["", f"Drafter train step: {1e3 * bench['drafter_train_s']:.1f} ms; host overhead per chunk "
          f"{1e3 * bench['chunk_overhead_s']:.2f} ms.", ""]
for name in ("rollout_speedup/rollout_speedup.md", "e2e_speedup/e2e_speedup.md", "pod_sim_validate/pod_sim_validate.md"):
  path = os.path.join(out, name)
  if os.path.exists(path):
    lines += [f"## {name}", "", open(path).read(), ""]
open(os.path.join(out, "summary.md"), "w").write("\n".join(lines))
print("\n".join(lines[:len(ctxs) + 8]))
print(f"wrote {out}/summary.md")
PYEOF
