"""Multi-process JAX on one machine: two CPU processes with 2 devices each form 4 global devices
(jax.distributed over gloo), run a sharded forward, and agree with a single-process reference."""

import os
import pathlib
import socket
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from tests import multihost_worker as worker
from tests.tiny import random_state, tiny_config
from tests.numerics import assert_close

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
