"""One process of the two-process CPU test in test_multihost.py (not a test module itself).

Run as `python -m tests.multihost_worker PORT PROCESS_ID OUT_DIR` from the repository root with
XLA_FLAGS=--xla_force_host_platform_device_count=2 and JAX_PLATFORMS=cpu. It joins the
coordinator at 127.0.0.1:PORT, builds meshes over the 4 global devices, runs a sharded forward
of the tiny model (weights and batch drawn from fixed seeds, identical in every process),
gathers the result with process_allgather and writes it to OUT_DIR/process_<id>.npz.
"""

from __future__ import annotations

import sys

MESH_SHAPES = ((2, 1, 2), (1, 2, 2))  # data across processes / fsdp (weights) across processes
WEIGHT_SEED, BATCH_SEED, BATCH, LENGTH = 11, 12, 4, 10


def batch_tokens(vocab: int):
  import numpy as np
  return np.random.default_rng(BATCH_SEED).integers(0, vocab, (BATCH, LENGTH)).astype(np.int32)


def main(port: int, process_id: int, out_dir: str) -> None:
  import jax
  import numpy as np
  from flax import nnx
  from jax.experimental import multihost_utils

  from tlt_jax.parallel import hosts
  from tlt_jax.parallel import mesh as mesh_lib
  from tests.tiny import random_state, tiny_config

  assert hosts.initialize(hosts.Timeouts(lost_host_timeout_s=300, shutdown_timeout_s=900),  # busy cores
                            coordinator=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  assert (jax.process_count(), jax.process_index()) == (2, process_id)
  assert (jax.device_count(), jax.local_device_count()) == (4, 2)

  cfg = tiny_config()
  graphdef, params = random_state(cfg, seed=WEIGHT_SEED)
  tokens = batch_tokens(cfg.vocab_size)

  @jax.jit
  def forward(p, t):
    logits, hidden, _ = nnx.merge(graphdef, p)(t)
    return logits, hidden

  out = {}
  for shape in MESH_SHAPES:
    mesh = mesh_lib.make_mesh(shape)
    sharded_params = mesh_lib.shard_state(params, mesh)
    sharded_tokens = mesh_lib.shard_batch(tokens, mesh)
    assert not sharded_tokens.is_fully_addressable  # the batch really spans both processes
    logits, hidden = forward(sharded_params, sharded_tokens)
    name = "x".join(map(str, shape))
    out[f"logits_{name}"] = multihost_utils.process_allgather(logits, tiled=True)
    out[f"hidden_{name}"] = multihost_utils.process_allgather(hidden, tiled=True)
  np.savez(f"{out_dir}/process_{process_id}.npz", **out)
  hosts.finish()  # a barrier of our own first: a slow process is not a failure


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
