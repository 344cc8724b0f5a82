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
import numpy as np
import pytest

from tlt_jax.rl.trainer import TIMING_FIELDS
from tlt_jax.train.checkpoint import CheckpointError, Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RL_STEPS, KILL_AFTER = 4, 2
TINY = [
    "--config.model.num_layers=2", "--config.model.hidden_size=32",
    "--config.model.intermediate_size=64", "--config.model.num_heads=4",
    "--config.model.num_kv_heads=2", "--config.model.max_position_embeddings=128",
    "--config.task.max_digits=3",
    "--config.sft.steps=40", "--config.sft.batch_size=8", "--config.sft.max_len=96",
    "--config.sft.warmup_steps=4", "--config.sft.eval_every=40", "--config.sft.eval_size=8",
    "--config.sft.log_every=20", "--config.eval.max_new_tokens=48",
    "--config.drafter.warmup_steps=4", "--config.drafter.batch_size=4",
    "--config.drafter.num_batches=2", "--config.drafter.log_every=2",
    "--config.rollout.max_new_tokens=48", "--config.rollout.buckets=(8,)",  # few shapes: few compiles
    "--config.rl.length_bucket=64",
    f"--config.rl.steps={RL_STEPS}", "--config.rl.prompts_per_step=2", "--config.rl.group_size=4",
    "--config.rl.lr=3e-3", "--config.rl.kl_coef=0.01", "--config.rl.checkpoint_every=1",
    "--config.rl.eval_size=0", "--config.rl.sample_eval_every=2", "--config.rl.sample_eval_size=8",
    "--config.checkpoint.max_to_keep=3",
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
  cmd = [sys.executable, "-m", "tlt_jax.main", "--config=configs/default.py", f"--workdir={workdir}",
         *TINY, *extra]
  log = open(os.path.join(workdir, "stderr.log"), "a")
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)


def _finish(proc, workdir, timeout=120):
  rc = proc.wait(timeout=timeout)
  out = open(os.path.join(workdir, "stderr.log")).read()
  assert rc == 0, out[-3000:]
  return out


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _without_timing(records):
  return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory):
  """SFT + drafter warm-up once, on the tiny config."""
  workdir = str(tmp_path_factory.mktemp("warm"))
  _finish(_start(workdir, "--config.stages=sft,drafter"), workdir)
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


def test_killed_and_corrupted_run_resumes_exactly(warm_start, tmp_path):
  straight = _workdir_from(warm_start, tmp_path / "straight")
  killed = _workdir_from(warm_start, tmp_path / "killed")
  t0 = time.perf_counter()
  proc_straight = _start(straight)  # runs beside the one we kill
  proc = _start(killed)
  metrics = os.path.join(killed, "metrics.jsonl")
  while True:
    assert proc.poll() is None, open(os.path.join(killed, "stderr.log")).read()[-3000:]
    if os.path.exists(metrics) and any(r["step"] >= KILL_AFTER for r in _records(killed)):
      break
    assert time.perf_counter() - t0 < 120, "the RL run never reached the kill step"
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  ckpt_dir = os.path.join(killed, "ckpt_rl")
  steps = sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit())
  assert steps and steps[-1] >= KILL_AFTER and steps[-1] < RL_STEPS
  _corrupt(os.path.join(ckpt_dir, str(steps[-1])))

  out = _finish(_start(killed), killed)
  assert f"resumed RL from step {steps[-2]}" in out
  assert f"checkpoint at step {steps[-1]}" in out and "corrupt or partial" in out
  _finish(proc_straight, straight)

  expected, resumed = _records(straight), _records(killed)
  assert [r["step"] for r in expected] == list(range(1, RL_STEPS + 1))
  assert [r["step"] for r in resumed] == list(range(1, RL_STEPS + 1))
  assert _without_timing(resumed) == _without_timing(expected)
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
