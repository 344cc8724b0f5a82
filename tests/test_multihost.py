"""Multi-process JAX on one machine: two CPU processes with 2 devices each form 4 global devices
(jax.distributed over gloo), run a sharded forward, and agree with a single-process reference."""

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import json
import signal
import time

import jax
import numpy as np
import pytest
from flax import nnx

from tests import multihost_worker as worker
from tests.tiny import random_state, tiny_config
from tests.numerics import assert_close

from tests.test_resume import warm_start  # noqa: F401 - the shared SFT + drafter warm start

# Multi-process tests run one at a time on one xdist worker (tests/conftest.py sets --dist
# loadgroup): two of them side by side would put 4 processes on 2 cores.
pytestmark = pytest.mark.xdist_group("multiprocess")

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # loaded 2-core machines: the whole-step workers take ~1 min of CPU each


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_workers(out_dir: pathlib.Path, module: str = "tests.multihost_worker", processes: int = 2):
  devices = 4 // processes
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  port = _free_port() if processes > 1 else 0
  procs = [subprocess.Popen([sys.executable, "-m", module, str(port), str(i), str(out_dir)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(processes)]
  logs = []
  try:
    for p in procs:
      logs.append(p.communicate(timeout=TIMEOUT_S)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise AssertionError(f"multihost workers did not finish within {TIMEOUT_S} s")
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"worker {i} exited with {p.returncode}:\n{log[-4000:]}"


def test_two_process_sharded_forward_equals_single_process(tmp_path):
  _run_workers(tmp_path)

  cfg = tiny_config()
  graphdef, params = random_state(cfg, seed=worker.WEIGHT_SEED)
  tokens = worker.batch_tokens(cfg.vocab_size)
  one = jax.devices()[0]
  ref_logits, ref_hidden, _ = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(
      jax.device_put(params, one), jax.device_put(tokens, one))

  results = [np.load(tmp_path / f"process_{i}.npz") for i in range(2)]
  for shape in worker.MESH_SHAPES:
    name = "x".join(map(str, shape))
    for r in results:  # both processes gather the same global arrays
      assert r[f"logits_{name}"].shape == (worker.BATCH, worker.LENGTH, cfg.vocab_size)
      assert_close(r[f"logits_{name}"], ref_logits)
      assert_close(r[f"hidden_{name}"], ref_hidden)


def test_two_process_whole_rl_step_equals_one_process(tmp_path):
  """One whole RL step (rollout in 2 groups that each span both processes, rewards, update) in
  2 processes of 2 CPU devices equals the same step in 1 process of 4: the host reads only
  replicated or fully addressable values (rollout/engine.py, parallel/mesh.host_value)."""
  import json
  one, two = tmp_path / "one", tmp_path / "two"
  one.mkdir()
  two.mkdir()
  _run_workers(one, "tests.multihost_rl_worker", processes=1)
  _run_workers(two, "tests.multihost_rl_worker", processes=2)
  ref = np.load(one / "rl_process_0.npz")
  ref_record = json.loads(str(ref["record"]))
  assert ref_record["num_tokens"] > 0 and ref_record["rollout_groups"] == 2
  for i in range(2):
    got = np.load(two / f"rl_process_{i}.npz")
    record = json.loads(str(got["record"]))
    assert set(record) == set(ref_record)
    for k, v in ref_record.items():
      if isinstance(v, float):
        assert_close(record[k], v, err_msg=k)
      else:
        assert record[k] == v, k
    for name in ref.files:
      if name != "record":
        assert_close(got[name], ref[name])


# --------------------------------------------------------------------------------------------
# The main job in 2 processes (2 CPU devices each, one rollout group spanning both): preemption
# and a lost host.

TWO_PROCESS = ["--config=configs/default.py:tiny", "--config.stages=rl", "--config.mesh.shape=(2,2,1)",
               "--config.tlt.rollout_groups=1", "--config.tlt.speculative=False",
               "--config.tlt.train_drafter=False", "--config.rl.sample_eval_every=0",
               "--config.rl.eval_size=0", "--config.distributed.lost_host_timeout_s=30"]
RL_STEPS = 4


def _start_two(workdir: pathlib.Path, *extra):
  port = _free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(i))
    log = open(workdir / f"process_{i}.log", "a")
    procs.append(subprocess.Popen([sys.executable, "-m", "tlt_jax.main", f"--workdir={workdir}", *TWO_PROCESS, *extra],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
  return procs


def _log(workdir, i):
  return (workdir / f"process_{i}.log").read_text()


def _wait_all(procs, workdir, timeout=TIMEOUT_S):
  try:
    return [p.wait(timeout=timeout) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def _steps(workdir):
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _when(procs, workdir, ready, what, timeout=TIMEOUT_S):
  t0 = time.perf_counter()
  while not ready():
    for i, p in enumerate(procs):
      assert p.poll() is None, f"process {i} ended before {what}:\n{_log(workdir, i)[-3000:]}"
    assert time.perf_counter() - t0 < timeout, f"never reached {what}"
    time.sleep(0.1)


def _two_process_workdir(warm_start, path):  # noqa: F811
  path.mkdir()
  shutil.copytree(os.path.join(warm_start, "sft"), path / "sft")  # no drafter: speculation is off
  return path


def _resume_completes(workdir, *extra, steps=RL_STEPS):
  codes = _wait_all(_start_two(workdir, *extra), workdir)
  assert codes == [0, 0], [_log(workdir, i)[-3000:] for i in range(2)]
  assert _steps(workdir) == list(range(1, steps + 1))
  assert json.loads((workdir / "summary.json").read_text())["rl"]["rl_steps"] == steps
  return _log(workdir, 0)


def test_sigterm_on_one_process_saves_the_same_step_on_both(warm_start, tmp_path):  # noqa: F811
  """SIGTERM reaches process 1 only (as a maintenance notice reaches one VM): both processes agree
  on the next step boundary (JAX's preemption sync point), save that step together, exit 75 with
  one line each, and the same command on both resumes from it to the end."""
  workdir = _two_process_workdir(warm_start, tmp_path / "run")
  steps = 12  # tiny steps take about a second: room for the notice to reach both before the end
  extra = ("--config.rl.checkpoint_every=100", f"--config.rl.steps={steps}")
  procs = _start_two(workdir, *extra)
  _when(procs, workdir, lambda: len(_steps(workdir)) >= 1, "RL step 1")
  procs[1].send_signal(signal.SIGTERM)
  codes = _wait_all(procs, workdir)
  logs = [_log(workdir, i) for i in range(2)]
  assert codes == [75, 75], [log[-3000:] for log in logs]
  said = [[line for line in log.replace("\r", "\n").splitlines() if line.startswith("preempted:")] for log in logs]
  assert all(len(s) == 1 for s in said), logs
  saved = {int(s[0].split("saved step ")[1].split()[0]) for s in said}
  assert len(saved) == 1, said  # the same step on both
  step = saved.pop()
  assert sorted(int(s) for s in os.listdir(workdir / "ckpt_rl") if s.isdigit()) == [step] and step < steps
  assert f"resumed RL from step {step}" in _resume_completes(workdir, *extra, steps=steps)


def test_lost_process_stops_the_other_with_one_line_and_the_run_resumes(warm_start, tmp_path):  # noqa: F811
  """Process 1 is killed in the middle of the run; process 0 exits 76 within the bounded time
  (config.distributed.lost_host_timeout_s=30 here) with one line naming process 1, instead of
  hanging in a collective or aborting with a stack trace; the last checkpoint restores and the
  same command completes the run."""
  workdir = _two_process_workdir(warm_start, tmp_path / "run")
  procs = _start_two(workdir)
  _when(procs, workdir, lambda: len(_steps(workdir)) >= 2, "RL step 2")
  procs[1].kill()
  t0 = time.perf_counter()
  codes = _wait_all(procs, workdir, timeout=300)
  waited = time.perf_counter() - t0
  log = _log(workdir, 0)
  assert codes[0] == 76, log[-3000:]
  assert waited < 120, waited
  said = [line for line in log.replace("\r", "\n").splitlines() if line.startswith("distributed error:")]
  assert len(said) == 1 and said[0].startswith("distributed error: lost process 1 of 2"), log[-3000:]
  saved = sorted(int(s) for s in os.listdir(workdir / "ckpt_rl") if s.isdigit())
  assert saved and saved[-1] >= 2
  assert "resumed RL from step" in _resume_completes(workdir)
