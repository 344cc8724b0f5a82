"""The GPU suite's --tiny path on this CPU: every stage runs, the simulator replays the recorded
run at the measured costs, and the summary prints plain-decode cost vs batch."""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_tiny(tmp_path):
  out = tmp_path / "suite"
  env = dict(os.environ, PYTHON=sys.executable)
  r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_suite.sh"), str(out), "--tiny"],
                     cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
  assert r.returncode == 0, (r.stdout[-4000:], r.stderr[-4000:])
  bench = json.load(open(out / "cost_bench.json"))
  cells = [v for ctx in bench["decode"].values() for v in ctx.values()]
  assert cells and all(v > 0 for v in cells)
  assert bench["spec"] and all(v > 0 for s in bench["spec"].values() for v in s.values())
  assert bench["drafter_train_s"] > 0 and "shared_gain" in bench
  traces = [json.loads(line) for line in open(out / "e2e_speedup" / "traces.jsonl")]
  assert {t["variant"] for t in traces} == {"plain", "static", "tlt"}
  for t in traces:  # every row of the step is in its group's lengths; chunks emit exactly them
    assert sum(len(g) for g in t["lengths"]) == 8  # tiny: 2 prompts x 4 samples
    assert sum(c[3] for c in t["chunks"]) == sum(sum(g) - len(g) for g in t["lengths"])  # + 1 each: prefill
  rows = [json.loads(line) for line in open(out / "pod_sim_validate" / "pod_sim_validate.jsonl")]
  assert {r["variant"] for r in rows} == {"plain", "static", "tlt"}
  assert all(math.isfinite(r["step_error"]) and r["predicted_step_s"] > 0 for r in rows)
  summary = open(out / "summary.md").read()
  assert "Plain decode step (ms)" in summary and "e2e_speedup.md" in summary
