"""Pod scale on this CPU: the tiny default config's steps compiled ahead of time for a v5p-8
(XLA's TPU compiler from libtpu, the `tpu` extra), per-chip argument bytes checked against the
shardings asked for; segment attention without a dense mask; scan + remat equal to the loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.numerics import assert_close
from tests.tiny import random_state, tiny_config
from tlt_jax.data.batching import segment_mask
from tlt_jax.models.attention import chunked_segment_attention
from tlt_jax.models.transformer import attention


def _segments(rng, b, length):
  seg = np.zeros((b, length), np.int32)
  for i in range(b):
    col, s = 0, 1
    while col < length - 2:
      n = int(rng.integers(1, length - col))
      seg[i, col:col + n] = s
      col, s = col + n, s + 1
  return seg


@pytest.mark.parametrize("chunk,impl", [(64, "reference"), (5, "reference"), (7, "xla")])
def test_chunked_segment_attention_equals_dense_mask(chunk, impl):
  rng = np.random.default_rng(0)
  b, length, h, k, d = 2, 23, 4, 2, 8
  q, kk, v = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in
              ((b, length, h, d), (b, length, k, d), (b, length, k, d)))
  seg = _segments(rng, b, length)
  dense = attention(q, kk, v, segment_mask(seg))
  out = chunked_segment_attention(q, kk, v, jnp.asarray(seg), chunk=chunk, impl=impl)
  valid = (seg > 0)[..., None]
  assert_close(np.where(valid, out, 0), np.where(valid, dense, 0))
  if chunk >= length and impl == "reference":  # one chunk: the dense computation itself
    np.testing.assert_array_equal(np.asarray(out), np.asarray(dense))


def test_scan_remat_forward_and_gradient_equal_the_loop():
  cfg = tiny_config()
  graphdef, params = random_state(cfg, seed=3)
  rng = np.random.default_rng(1)
  seg = np.array([[1] * 5 + [2] * 4 + [0] * 3, [1] * 12], np.int32)
  pos = np.array([list(range(5)) + list(range(4)) + [0] * 3, list(range(12))], np.int32)
  tok = rng.integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)

  def loss(p, c, **kw):
    from tlt_jax.models.transformer import Transformer
    gd = nnx.graphdef(nnx.eval_shape(lambda: Transformer(c, rngs=nnx.Rngs(0))))
    logits, _, _ = nnx.merge(gd, p)(tok, pos, **kw)
    return jnp.sum(jnp.where(seg[..., None] > 0, logits, 0.0) ** 2)

  ref, g_ref = jax.value_and_grad(loss)(params, cfg, attn_mask_BxTxT=segment_mask(seg))
  for changes in (dict(scan_layers=True, remat="full", attention_chunk=5), dict(remat="dots")):
    val, grads = jax.value_and_grad(loss)(params, cfg.replace(**changes), segment_ids_BxT=seg)
    assert_close(val, ref)
    jax.tree.map(assert_close, grads, g_ref)


# ----------------------------------------------------------------------------- ahead of time


def _tiny_config():
  from experiments.common import load_config
  from tlt_jax import config as config_lib
  return config_lib.finalize(load_config("configs/default.py:tiny"))


def test_tiny_default_compiles_for_v5p8_with_the_requested_shardings():
  from tlt_jax.analysis import aot
  topo = aot.topology("v5p-8")
  devices = aot.topology_devices(topo)  # libtpu is a test dependency (README): never skipped
  assert len(devices) == 4 and devices[0].platform == "tpu"
  config = _tiny_config()
  steps, layout = aot.pod_steps(config, devices, windows=(64,))
  names = [n for n, _ in steps]
  assert names[0].startswith("prefill@") and "policy_update_step" in names
  assert "logprob_forward" in names and "drafter_train_step" in names
  assert any(n.startswith("decode_chunk@") for n in names)
  assert any(n.startswith("speculative_chunk[d3k1n3]@") for n in names)
  assert any(n.startswith("drafter_sync@") for n in names) and "draft_subhead" not in names  # full head
  assert layout["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and layout["rollout_groups"] == 2
  for name, build in steps:
    fn, args, note = build()
    report, _ = aot.compile_step(name, fn, args, topo)
    if name.startswith("decode_step@"):  # what a step must read: its weights and live KV, at least
      weights, kv = aot.decode_bytes_needed(*args, 64 if "window=" in name else None)
      assert f"{weights / 1e9:.3f} GB of weights + {kv / 1e9:.3f} GB of live KV" in note
      assert 0 < weights + kv <= report.bytes_accessed, (name, weights, kv, report.bytes_accessed)
    # Per chip, the arguments take what their shardings ask for, up to TPU tile padding (which
    # dominates at d=32): between the shards' bytes and the shards padded to (8|16, 128) tiles.
    asked, padded = aot.shard_bytes(args), aot.tpu_padded_bytes(args)
    assert asked <= report.argument_bytes <= padded, (name, asked, report.argument_bytes, padded)
    assert report.fits and report.flops > 0 and report.bytes_accessed > 0, name
    if name == "policy_update_step":  # batch split 4 ways over data: a quarter of it per chip
      batch = args[1]
      full = sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in batch.values())
      assert aot.shard_bytes([batch]) * 4 == full


def test_reduced_draft_vocab_compiles_its_subhead_once_and_passes_it_to_the_chunks():
  """With tlt.draft_vocab_size > 0 the sub-head gather is a step of its own, and the chunks take
  the ids and the sub-head [D, V_d] (sharded like the head's vocabulary dimension) as arguments."""
  from tlt_jax.analysis import aot
  topo = aot.topology("v5p-8")
  from experiments.common import load_config
  from tlt_jax import config as config_lib
  vd = 16
  config = config_lib.finalize(load_config("configs/default.py:tiny", {"tlt.draft_vocab_size": vd}))
  mcfg = aot.model_config_for(config)
  steps, _ = aot.pod_steps(config, aot.topology_devices(topo))
  names = [n for n, _ in steps]
  assert "draft_subhead" in names
  chunk = next(n for n in names if n.startswith("speculative_chunk["))
  for name in ("draft_subhead", chunk):
    fn, args, note = dict(steps)[name]()
    report, _ = aot.compile_step(name, fn, args, topo, note)
    assert report.fits and report.bytes_accessed > 0, name
    if name == chunk:
      ids, w = args[3:]
      assert ids.shape == (vd,) and w.shape == (mcfg.hidden_size, vd) and "vocab" in note
    else:
      head, ids = args
      assert ids.shape == (vd,) and mcfg.vocab_size in head.shape
      # the float32 sub-head whole on each chip here (up to TPU tile padding)
      assert mcfg.hidden_size * vd * 4 <= report.output_bytes <= 2 * mcfg.hidden_size * 128 * 4


def test_a_step_that_does_not_fit_names_step_bytes_and_hbm():
  from tlt_jax.analysis import aot
  r = aot.StepReport("decode_chunk@64", "v6e-64", 10 * aot.GiB, 0, 30 * aot.GiB, 0, 0, 40 * aot.GiB,
                     32 * aot.GiB, False, 1.0, 1.0, 1.0, 1.0, 1.0)
  with pytest.raises(aot.PodFitError, match=r"step decode_chunk@64 needs 40.00 GiB per chip .* v6e-64 "
                                            r"has 32 GiB of HBM per chip"):
    aot.check_fits([r])
  with pytest.raises(ValueError, match=r"--topology='v9-1' is not known; allowed: \["):
    aot.topology("v9-1")


def test_prefetch_bytes_counts_hbm_to_vmem_copies_only():
  from tlt_jax.analysis import aot
  hlo = "\n".join([
      # weights prefetched into VMEM (S(1)) from HBM: counted
      "  %copy-start = (bf16[3584,4736]{1,0:T(8,128)(2,1)S(1)}, bf16[3584,4736]{1,0:T(8,128)(2,1)}, "
      "u32[]{:S(2)}) copy-start(%param.18), cross_program_prefetch_index=0",
      "  %copy-start.31 = (bf16[896,3584]{1,0:T(8,128)(2,1)S(1)}, bf16[896,3584]{1,0:T(8,128)(2,1)}, "
      "u32[]{:S(2)}) copy-start(%param.16)",
      "  %copy-start.7 = (f32[8]{0:T(128)S(1)}, f32[8]{0:T(128)}, u32[]{:S(2)}) copy-start(%p.2)",
      # VMEM to HBM, and the matching copy-done: not counted
      "  %copy-start.201 = (s32[4]{0:T(128)}, s32[4]{0:T(128)S(1)}, u32[]{:S(2)}) copy-start(%gte.1582)",
      "  %copy-done.31 = bf16[896,3584]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start.31)",
      "  %fusion.1 = bf16[8,3584]{1,0} fusion(%a, %b), kind=kOutput, calls=%fused_computation.1",
  ])
  assert aot.prefetch_bytes(hlo) == 2 * (3584 * 4736 + 896 * 3584) + 4 * 8
  assert aot.prefetch_bytes("") == 0
