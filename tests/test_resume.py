"""Checkpoint fallback and EXACT resume of the main job (SFT -> drafter -> GRPO).

The main job runs in subprocesses on a tiny config. One run goes uninterrupted; another is
SIGKILLed after RL step K, its newest checkpoint is corrupted on top, and it is restarted on the
same workdir: it must fall back to the previous checkpoint and reproduce the uninterrupted
metrics bitwise (timing fields aside). SFT and the drafter warm-up run once and are shared.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
from filelock import FileLock
import numpy as np
import pytest

from tlt_jax.rl.trainer import TIMING_FIELDS
from tlt_jax.train.checkpoint import CheckpointError, Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL_STEPS, KILL_AFTER = 4, 2
TINY = [
    "--config=configs/default.py:tiny",  # 2-layer d=32 policy, 4 RL steps, a checkpoint per step
    "--config.rl.kl_coef=0.01",
    # Speculative sampling draws exact samples, but which ones depends on wall-clock time (the
    # bandit, the drafter's bubbles): off for a bitwise comparison. The drafter still trains in
    # the bubbles of the 2 rollout groups, and its state, version and buffer go through resume.
    "--config.tlt.speculative=False",
]


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the main job picks its device count (one per rollout group), as on the command line
  return env


def _start(workdir, *extra):
  own_file = any(e.startswith("--config=") for e in extra)  # another config file replaces TINY's
  base = [a for a in TINY if not (own_file and a.startswith("--config="))]
  cmd = [sys.executable, "-m", "tlt_jax.main", f"--workdir={workdir}", *([e for e in extra if e.startswith("--config=")]),
         *base, *[e for e in extra if not e.startswith("--config=")]]
  log = open(os.path.join(workdir, "stderr.log"), "a")
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, workdir, timeout=900):  # generous: busy 2-core machines
  rc = proc.wait(timeout=timeout)
  out = open(os.path.join(workdir, "stderr.log")).read()
  assert rc == 0, out[-3000:]
  return out


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.fixture(scope="session")
def warm_start(tmp_path_factory, worker_id):
  """SFT + drafter warm-up ONCE per test session on the tiny config, shared by the xdist workers
  (a file lock makes the first one build it; the tests only copy from it)."""
  base = tmp_path_factory.getbasetemp()
  root = base.parent if worker_id != "master" else base  # the session's directory under xdist
  workdir = str(root / "warm_start")
  with FileLock(str(root / "warm_start.lock")):
    if not os.path.exists(os.path.join(workdir, "done")):
      shutil.rmtree(workdir, ignore_errors=True)
      os.makedirs(workdir)
      _finish(_start(workdir, "--config.stages=sft,drafter"), workdir)
      open(os.path.join(workdir, "done"), "w").close()
  assert os.path.exists(os.path.join(workdir, "sft", "config.json"))
  assert os.listdir(os.path.join(workdir, "drafter"))
  return workdir


def _workdir_from(warm_start, path):
  os.makedirs(path)
  for sub in ("sft", "drafter"):
    shutil.copytree(os.path.join(warm_start, sub), os.path.join(path, sub))
  return str(path)


def _corrupt(step_dir):
  """Overwrites every file of a checkpoint step's array data with garbage."""
  n = 0
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage\xff" * 3)
      n += 1
  assert n > 0


def _kill_corrupt_resume(warm_start, tmp_path, extra=(), rl_steps=RL_STEPS):
  """An uninterrupted run and one SIGKILLed after RL step KILL_AFTER, its newest checkpoint
  corrupted, then resumed: (uninterrupted records, resumed records, resumed workdir)."""
  straight = _workdir_from(warm_start, tmp_path / "straight")
  killed = _workdir_from(warm_start, tmp_path / "killed")
  t0 = time.perf_counter()
  proc_straight = _start(straight, *extra)  # runs beside the one we kill
  proc = _start(killed, *extra)
  metrics = os.path.join(killed, "metrics.jsonl")
  while True:
    assert proc.poll() is None, open(os.path.join(killed, "stderr.log")).read()[-3000:]
    if os.path.exists(metrics) and any(r["step"] >= KILL_AFTER for r in _records(killed)):
      break
    assert time.perf_counter() - t0 < 600, "the RL run never reached the kill step"
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  ckpt_dir = os.path.join(killed, "ckpt_rl")
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  assert steps and steps[-1] >= KILL_AFTER and steps[-1] < rl_steps
  _corrupt(os.path.join(ckpt_dir, str(steps[-1])))

  out = _finish(_start(killed, *extra), killed)
  assert f"resumed RL from step {steps[-2]}" in out
  assert f"checkpoint at step {steps[-1]}" in out and "corrupt or partial" in out
  _finish(proc_straight, straight)

  expected, resumed = _records(straight), _records(killed)
  assert [r["step"] for r in expected] == list(range(1, rl_steps + 1))
  assert [r["step"] for r in resumed] == list(range(1, rl_steps + 1))
  assert _without_timing(resumed) == _without_timing(expected)
  return expected, resumed, killed


def test_killed_and_corrupted_prime_run_resumes_exactly(warm_start, tmp_path):
  """The same with PRIME (configs/prime.py:tiny on the shared warm start): the PRM's params and
  optimizer, the prompt filter's refill rounds and the iterator resume bitwise."""
  expected, _, killed = _kill_corrupt_resume(
      warm_start, tmp_path, ("--config=configs/prime.py:tiny", "--config.rl.steps=3",
                             "--config.rl.dynamic_sampling_rounds=1", "--config.prime.lr=3e-3"), rl_steps=3)
  assert all(r["prm_grad_norm"] > 0 for r in expected)  # the PRM trained at every step
  assert len({r["prm_loss"] for r in expected}) == 3 and expected[-1]["rollout_rounds"] == 2
  with open(os.path.join(killed, "ckpt_rl", "3", "state", "_METADATA")) as f:
    saved = f.read()
  assert "('scorers', 'prime', 'params'" in saved and "('scorers', 'prime', 'opt_state'" in saved  # the PRM


def test_killed_and_corrupted_run_resumes_exactly(warm_start, tmp_path):
  expected, _, killed = _kill_corrupt_resume(warm_start, tmp_path)
  # The run trained: the policy moved away from the reference and saw non-zero advantages.
  assert expected[-1]["kl"] > 0 and any(r["advantage_abs_mean"] > 0 for r in expected)
  # Outputs of the RL stage.
  for name in ("rl_curves.png", "rl_time.png", "summary.json"):
    assert os.path.exists(os.path.join(killed, name)), name
  assert any(f.startswith("events") for f in os.listdir(os.path.join(killed, "tb", "metrics")))
  summary = json.load(open(os.path.join(killed, "summary.json")))
  assert summary["rl"]["rl_steps"] == RL_STEPS


def test_checkpointer_falls_back_past_a_corrupt_latest_step(tmp_path, caplog):
  ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3)
  tree = lambda s: {"w": jnp.full((4, 3), float(s)), "step": jnp.asarray(s, jnp.int32)}  # noqa: E731
  for s in (1, 2, 3):
    ckpt.save(s, tree(s), {"step": s, "iterator": {"position": 10 * s}})
  ckpt.close()
  _corrupt(str(tmp_path / "ckpt" / "3"))
  ckpt = Checkpointer(str(tmp_path / "ckpt"), max_to_keep=3)
  with caplog.at_level(logging.WARNING, logger="tlt_jax.train.checkpoint"):
    step, state, meta = ckpt.restore_latest(tree(0))
  assert step == 2 and meta == {"step": 2, "iterator": {"position": 20}}
  np.testing.assert_array_equal(state["w"], np.full((4, 3), 2.0))
  assert "checkpoint at step 3" in caplog.text and "corrupt or partial" in caplog.text
  # The resumed run redoes step 3: saving it replaces the unreadable one.
  ckpt.save(3, tree(33), {"step": 3})
  step, state, _ = ckpt.restore_latest(tree(0))
  assert step == 3 and float(state["w"][0, 0]) == 33.0
  ckpt.close()
  # Every step unreadable: refuse to start from scratch.
  for s in (1, 2, 3):
    _corrupt(str(tmp_path / "ckpt" / str(s)))
  with pytest.raises(CheckpointError, match="Refusing to start from scratch"):
    Checkpointer(str(tmp_path / "ckpt")).restore_latest(tree(0))


# ---------------------------------------------------------------------------------------------
# Ctrl-C (SIGINT) in the middle of each stage, then the same command again: a one-line message,
# exit status 130, everything saved so far kept, and the rerun finishes the job.


def _signal_when(proc, workdir, ready, what, sig=signal.SIGINT, status=130, prefix="interrupted:",
                 timeout=600):
  """Sends `sig` once `ready()`; the run must exit with `status` and say one line starting with
  `prefix`, with no traceback. Returns (that line, the log)."""
  t0 = time.perf_counter()
  while not ready():
    assert proc.poll() is None, f"the run ended before {what}: " + open(os.path.join(workdir, "stderr.log")).read()[-3000:]
    assert time.perf_counter() - t0 < timeout, f"never reached {what}"
    time.sleep(0.05)
  os.kill(proc.pid, sig)
  rc = proc.wait(timeout=600)
  out = open(os.path.join(workdir, "stderr.log")).read()
  assert rc == status, out[-3000:]
  assert "Traceback" not in out, out[-3000:]
  said = [line for line in out.replace("\r", "\n").splitlines() if line.startswith(prefix)]
  assert len(said) == 1, out[-3000:]
  return said[0], out


def _steps_of(path):
  return [r["step"] for r in _records_of(path)]


def _records_of(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_sigint_during_sft_then_resume(tmp_path):
  workdir = str(tmp_path / "sft")
  os.makedirs(workdir)
  cmd = ("--config.stages=sft", "--config.sft.steps=80", "--config.checkpoint.every=5",
         "--config.sft.log_every=5", "--config.sft.eval_every=80")
  ckpt = os.path.join(workdir, "ckpt_sft")
  proc = _start(workdir, *cmd)
  last, _ = _signal_when(proc, workdir, lambda: os.path.isdir(ckpt) and any(
      s.isdigit() and int(s) >= 10 for s in os.listdir(ckpt)), "an SFT checkpoint at step 10")
  assert last.startswith("interrupted: interrupted during the sft stage") and "Rerun the same command" in last
  saved = max(int(s) for s in os.listdir(ckpt) if s.isdigit())
  assert not os.path.exists(os.path.join(workdir, "sft", "config.json"))
  out = _finish(_start(workdir, *cmd), workdir)
  assert "resumed SFT from step" in out.split(last)[-1]
  resumed_from = int(out.split("resumed SFT from step ")[-1].split()[0])
  assert resumed_from >= saved > 0
  steps = _steps_of(os.path.join(workdir, "sft.jsonl"))
  assert steps == sorted(set(steps)) and steps[-1] == 80  # no step logged twice
  assert os.path.exists(os.path.join(workdir, "sft", "config.json"))


def test_sigint_during_drafter_warmup_then_resume(warm_start, tmp_path):
  workdir = str(tmp_path / "drafter")
  os.makedirs(workdir)
  shutil.copytree(os.path.join(warm_start, "sft"), os.path.join(workdir, "sft"))
  cmd = ("--config.stages=drafter", "--config.drafter.warmup_steps=200", "--config.drafter.log_every=2")
  log = os.path.join(workdir, "drafter.jsonl")
  proc = _start(workdir, *cmd)
  last, _ = _signal_when(proc, workdir, lambda: os.path.exists(log) and os.path.getsize(log) > 0,
                            "a drafter log record")
  assert last.startswith("interrupted: interrupted during the drafter stage") and "warm-up restarts" in last
  assert not os.listdir(os.path.join(workdir, "drafter")) if os.path.isdir(os.path.join(workdir, "drafter")) else True
  _finish(_start(workdir, *cmd), workdir)
  assert _steps_of(log) == list(range(2, 201, 2))  # the restarted warm-up, each step logged once
  assert any(s.isdigit() for s in os.listdir(os.path.join(workdir, "drafter")))


def test_sigint_during_rl_then_resume(warm_start, tmp_path):
  workdir = _workdir_from(warm_start, tmp_path / "rl")
  metrics = os.path.join(workdir, "metrics.jsonl")
  proc = _start(workdir)
  last, _ = _signal_when(proc, workdir, lambda: os.path.exists(metrics) and any(
      r["step"] >= 2 for r in _records_of(metrics)), "RL step 2")
  assert last.startswith("interrupted: interrupted during the rl stage") and "ckpt_rl" in last
  kept = _steps_of(metrics)
  assert kept and kept == list(range(1, len(kept) + 1))
  out = _finish(_start(workdir), workdir)
  assert "resumed RL from step" in out
  assert _steps_of(metrics) == list(range(1, RL_STEPS + 1))
  assert json.load(open(os.path.join(workdir, "summary.json")))["rl"]["rl_steps"] == RL_STEPS


# ---------------------------------------------------------------------------------------------
# SIGTERM (a Cloud TPU / GKE preemption notice) in the middle of a stage: the stage saves at its
# next step boundary, exits with status 75 and one line, and the same command resumes to exactly
# the records of an uninterrupted run.


def _sigterm_when(proc, workdir, ready, what):
  """SIGTERM once `ready()`: exit 75 and one `preempted:` line; returns (the saved step, the line)."""
  line, out = _signal_when(proc, workdir, ready, what, signal.SIGTERM, 75, "preempted:")
  assert "rerun the same command to resume" in line, out[-3000:]
  return int(line.split("saved step ")[1].split()[0]), line


def _no_time(records):
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS and k != "time_s"} for r in records]


def test_sigterm_during_sft_saves_and_resumes_exactly(tmp_path):
  cmd = ("--config.stages=sft", "--config.sft.steps=30", "--config.checkpoint.every=20",
         "--config.sft.log_every=2", "--config.sft.eval_every=30")
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  for d in (straight, stopped):
    os.makedirs(d)
  proc_straight = _start(straight, *cmd)
  proc = _start(stopped, *cmd)
  log = os.path.join(stopped, "sft.jsonl")
  saved, line = _sigterm_when(proc, stopped, lambda: os.path.exists(log) and any(
      r["step"] >= 4 for r in _records_of(log)), "SFT step 4")
  assert "of the sft stage" in line and 4 <= saved < 20  # saved at the boundary, not at checkpoint.every
  assert str(saved) in os.listdir(os.path.join(stopped, "ckpt_sft"))
  out = _finish(_start(stopped, *cmd), stopped)
  assert f"resumed SFT from step {saved}" in out
  _finish(proc_straight, straight)
  expected, resumed = _records_of(os.path.join(straight, "sft.jsonl")), _records_of(log)
  assert [r["step"] for r in resumed] == list(range(2, 31, 2))
  assert _no_time(resumed) == _no_time(expected)


def test_sigterm_during_rl_above_the_bucket_ladder_saves_and_resumes_exactly(warm_start, tmp_path):
  """RL with rollout groups of 8 rows over a bucket ladder that stops at 4 (the group decodes
  at its own size until its live rows fit), no periodic checkpoint before the end: the SIGTERM
  save is the one the resumed run starts from, and its records equal an uninterrupted run's."""
  extra = ("--config.rollout.buckets=(1,2,4)", "--config.rl.prompts_per_step=4",
           "--config.rl.checkpoint_every=100")
  straight = _workdir_from(warm_start, tmp_path / "straight")
  stopped = _workdir_from(warm_start, tmp_path / "stopped")
  proc_straight = _start(straight, *extra)
  proc = _start(stopped, *extra)
  metrics = os.path.join(stopped, "metrics.jsonl")
  saved, line = _sigterm_when(proc, stopped, lambda: os.path.exists(metrics) and any(
      r["step"] >= 1 for r in _records_of(metrics)), "RL step 1")
  assert "of the rl stage" in line and 1 <= saved < RL_STEPS
  assert sorted(int(s) for s in os.listdir(os.path.join(stopped, "ckpt_rl")) if s.isdigit()) == [saved]
  out = _finish(_start(stopped, *extra), stopped)
  assert f"resumed RL from step {saved}" in out
  _finish(proc_straight, straight)
  expected, resumed = _records(straight), _records(stopped)
  assert [r["step"] for r in resumed] == list(range(1, RL_STEPS + 1))
  traces = _records_of(os.path.join(straight, "traces.jsonl"))
  assert max(t[0] for r in traces for t in r["active_trace"]) > 4  # a group above the ladder
  assert _without_timing(resumed) == _without_timing(expected)


_IN_FLIGHT = """
import os, signal, sys
import jax.numpy as jnp
from tlt_jax.train.checkpoint import Checkpointer
ckpt = Checkpointer(sys.argv[1], max_to_keep=3, async_save=True)
ckpt.save(1, {"w": jnp.full((4, 3), 1.0), "big": jnp.zeros((8,), jnp.float32)}, {"step": 1}, wait=True)
ckpt.save(2, {"w": jnp.full((4, 3), 2.0), "big": jnp.arange(48 * 2**20, dtype=jnp.float32)}, {"step": 2})
print("in flight", flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_sigkill_during_an_asynchronous_save_keeps_the_previous_checkpoint(tmp_path):
  """An asynchronous save (orbax writes in the background) killed before it finished: the
  previous step restores, and the unfinished one is not taken for a checkpoint."""
  directory = str(tmp_path / "ckpt")
  proc = subprocess.run([sys.executable, "-c", _IN_FLIGHT, directory], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == -signal.SIGKILL and "in flight" in proc.stdout, proc.stderr[-3000:]
  assert "2" not in os.listdir(directory) and any(n.startswith("2.") for n in os.listdir(directory))
  ckpt = Checkpointer(directory)
  step, state, meta = ckpt.restore_latest({"w": jnp.zeros((4, 3)), "big": jnp.zeros((8,), jnp.float32)})
  ckpt.close()
  assert step == 1 and meta == {"step": 1}
  np.testing.assert_array_equal(state["w"], np.full((4, 3), 1.0))
