"""One process of the two-process whole-RL-step test in test_multihost.py (not a test module).

Run as `python -m tests.multihost_rl_worker PORT PROCESS_ID OUT_DIR` (PORT 0 and PROCESS_ID 0: a
single process over 4 local devices, the reference). Builds the tiny default config's policy
(fixed seed, identical in every process) and runs ONE whole RL step, `RLTrainer.step(1)`:
rollout in 2 rollout groups, each spanning both processes (the mesh's data rows interleave the
processes' devices, as a v5p-64 group of 8 chips spans two hosts), rewards, advantages, the
old-log-prob forward and the sharded PPO update. Writes the step's record (timing fields aside)
and the updated params to OUT_DIR/rl_process_<id>.npz.
"""

from __future__ import annotations

import json
import sys

OVERRIDES = {"tlt.speculative": False, "tlt.train_drafter": False, "rl.track_kl": False,
             "rl.sample_eval_every": 0, "rl.steps": 1, "mesh.shape": (2, 2, 1),
             "rollout.buckets": (1, 2, 4, 8)}


def interleaved_devices(jax):
  """Data row g = (process 0's device g, process 1's device g): every row spans both processes
  (one process: the same pattern over its 4 devices)."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  half = len(devices) // 2
  return [devices[i + half * j] for i in range(half) for j in range(2)]


def main(port: int, process_id: int, out_dir: str) -> None:
  import jax
  import numpy as np
  from flax import nnx
  from jax.sharding import Mesh

  from experiments.common import load_config
  from tlt_jax import config as config_lib
  from tlt_jax.data.tokenizer import CharTokenizer
  from tlt_jax.models.config import ModelConfig
  from tlt_jax.models.transformer import Transformer
  from tlt_jax.parallel import hosts
  from tlt_jax.parallel import mesh as mesh_lib
  from tlt_jax.rl.trainer import TIMING_FIELDS, RLTrainer

  if port:
    assert hosts.initialize(hosts.Timeouts(lost_host_timeout_s=300, shutdown_timeout_s=900),  # busy cores
                            coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert jax.device_count() == 4
  config = config_lib.finalize(load_config("configs/default.py:tiny", OVERRIDES))
  task = config_lib.build_task(config)
  tokenizer = CharTokenizer(task.charset)
  mdict = dict(config.model, vocab_size=tokenizer.vocab_size)
  policy = Transformer(ModelConfig.from_dict(mdict), rngs=nnx.Rngs(5))
  mesh = Mesh(np.asarray(interleaved_devices(jax)).reshape(2, 2, 1), mesh_lib.MESH_AXES)
  trainer = RLTrainer(config, task, tokenizer, policy, f"{out_dir}/run", mesh=mesh)
  if port:
    assert not all(g.mesh.devices.flat[0].process_index == g.mesh.devices.flat[-1].process_index
                   for g in trainer.tlt.groups)  # each rollout group spans both processes
  record = trainer.step(1)
  record = {k: v for k, v in record.items() if k not in TIMING_FIELDS and isinstance(v, (int, float))}
  flat = nnx.to_flat_state(trainer.state.params)
  params = {"/".join(map(str, path)): mesh_lib.gather_to_host(v.get_value()) for path, v in flat}
  np.savez(f"{out_dir}/rl_process_{process_id}.npz", record=json.dumps(record), **params)
  if port:
    hosts.finish()  # a barrier of our own first: a slow process is not a failure


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
