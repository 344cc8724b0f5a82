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


# A hand-written optimized-HLO excerpt in the compiler's printing: weights prefetched into VMEM
# (S(1)), a fusion that reads a window of a cache through a nested fusion, an in-place cache
# update, a while loop whose body updates a carried buffer, a tuple-shaped fusion.
_HLO = """HloModule jit_step, is_scheduled=true

%slice_window (param_0.1: bf16[4,64,128]) -> bf16[4,16,128] {
  %param_0.1 = bf16[4,64,128]{2,1,0:T(8,128)(2,1)} parameter(0)
  ROOT %slice.1 = bf16[4,16,128]{2,1,0:T(8,128)(2,1)} slice(%param_0.1), slice={[0:4], [0:16], [0:128]}
}

%fused_scores (param_0.2: bf16[4,128], param_1.2: bf16[4,64,128]) -> (f32[4], f32[4,16]) {
  %param_1.2 = bf16[4,64,128]{2,1,0:T(8,128)(2,1)} parameter(1)
  %fusion.9 = bf16[4,16,128]{2,1,0:T(8,128)(2,1)} fusion(%param_1.2), kind=kLoop, calls=%slice_window
  %param_0.2 = bf16[4,128]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %conv.1 = f32[4,16]{1,0:T(8,128)} convolution(%fusion.9, %param_0.2), dim_labels=bf_io->bf
  %c0 = f32[]{:T(128)} constant(0)
  %reduce.1 = f32[4]{0:T(128)} reduce(%conv.1, %c0), dimensions={1}, to_apply=%add
  ROOT %tuple.1 = (f32[4]{0:T(128)}, f32[4,16]{1,0:T(8,128)}) tuple(%reduce.1, %conv.1)
}

%fused_matmul (param_0.3: bf16[4,256], param_1.3: bf16[256,128]) -> bf16[4,128] {
  %param_0.3 = bf16[4,256]{1,0:T(8,128)(2,1)} parameter(0)
  %param_1.3 = bf16[256,128]{1,0:T(8,128)(2,1)S(1)} parameter(1)
  ROOT %conv.2 = bf16[4,128]{1,0:T(8,128)(2,1)} convolution(%param_0.3, %param_1.3), dim_labels=bf_io->bf
}

%body (p.0: (s32[], bf16[4,64,128], bf16[1,1,128])) -> (s32[], bf16[4,64,128], bf16[1,1,128]) {
  %p.0 = (s32[]{:T(128)}, bf16[4,64,128]{2,1,0:T(8,128)(2,1)}, bf16[1,1,128]{2,1,0:T(2,128)(2,1)}) parameter(0)
  %gte.0 = s32[]{:T(128)} get-tuple-element(%p.0), index=0
  %gte.1 = bf16[4,64,128]{2,1,0:T(8,128)(2,1)} get-tuple-element(%p.0), index=1
  %gte.2 = bf16[1,1,128]{2,1,0:T(2,128)(2,1)} get-tuple-element(%p.0), index=2
  %dus.2 = bf16[4,64,128]{2,1,0:T(8,128)(2,1)} dynamic-update-slice(%gte.1, %gte.2, %gte.0, %gte.0, %gte.0)
  ROOT %tuple.2 = (s32[]{:T(128)}, bf16[4,64,128]{2,1,0:T(8,128)(2,1)}, bf16[1,1,128]{2,1,0:T(2,128)(2,1)}) tuple(%gte.0, %dus.2, %gte.2)
}

%cond (p.1: (s32[], bf16[4,64,128], bf16[1,1,128])) -> pred[] {
  %p.1 = (s32[]{:T(128)}, bf16[4,64,128]{2,1,0:T(8,128)(2,1)}, bf16[1,1,128]{2,1,0:T(2,128)(2,1)}) parameter(0)
  %gte.3 = s32[]{:T(128)} get-tuple-element(%p.1), index=0
  %c4 = s32[]{:T(128)} constant(4)
  ROOT %lt.1 = pred[]{:T(512)} compare(%gte.3, %c4), direction=LT
}

ENTRY %main (w: bf16[256,128], x: bf16[4,256], k: bf16[4,64,128], i: s32[]) -> (bf16[4,64,128], f32[4,16]) {
  %w = bf16[256,128]{1,0:T(8,128)(2,1)} parameter(0), metadata={op_name="p[\\'layers\\'][0][\\'kernel\\']"}
  %x = bf16[4,256]{1,0:T(8,128)(2,1)} parameter(1), metadata={op_name="s.x"}
  %k = bf16[4,64,128]{2,1,0:T(8,128)(2,1)} parameter(2), metadata={op_name="s.cache.k[0]"}
  %i = s32[]{:T(128)} parameter(3)
  %copy-start = (bf16[256,128]{1,0:T(8,128)(2,1)S(1)}, bf16[256,128]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%w)
  %copy-done = bf16[256,128]{1,0:T(8,128)(2,1)S(1)} copy-done(%copy-start)
  %fusion.1 = bf16[4,128]{1,0:T(8,128)(2,1)} fusion(%x, %copy-done), kind=kOutput, calls=%fused_matmul, metadata={op_name="jit(step)/dot_general"}
  %bitcast.1 = bf16[1,4,128]{2,1,0:T(2,128)(2,1)} bitcast(%fusion.1)
  %slice.2 = bf16[1,1,128]{2,1,0:T(2,128)(2,1)} slice(%bitcast.1), slice={[0:1], [0:1], [0:128]}
  %dus.1 = bf16[4,64,128]{2,1,0:T(8,128)(2,1)} dynamic-update-slice(%k, %slice.2, %i, %i, %i)
  %tuple.3 = (s32[]{:T(128)}, bf16[4,64,128]{2,1,0:T(8,128)(2,1)}, bf16[1,1,128]{2,1,0:T(2,128)(2,1)}) tuple(%i, %dus.1, %slice.2)
  %while.1 = (s32[]{:T(128)}, bf16[4,64,128]{2,1,0:T(8,128)(2,1)}, bf16[1,1,128]{2,1,0:T(2,128)(2,1)}) while(%tuple.3), condition=%cond, body=%body
  %gte.4 = bf16[4,64,128]{2,1,0:T(8,128)(2,1)} get-tuple-element(%while.1), index=1
  %fusion.2 = (f32[4]{0:T(128)}, f32[4,16]{1,0:T(8,128)}) fusion(%fusion.1, %gte.4), kind=kOutput, calls=%fused_scores, metadata={op_name="jit(step)/scores"}
  %gte.5 = f32[4,16]{1,0:T(8,128)} get-tuple-element(%fusion.2), index=1
  ROOT %tuple.4 = (bf16[4,64,128]{2,1,0:T(8,128)(2,1)}, f32[4,16]{1,0:T(8,128)}) tuple(%gte.4, %gte.5)
}
"""


def test_instruction_bytes_of_a_hand_written_hlo():
  from tlt_jax.analysis import aot
  comps, entry = aot.parse_hlo(_HLO)
  assert entry == "main" and set(comps) == {"slice_window", "fused_scores", "fused_matmul", "body", "cond", "main"}
  assert aot.hlo_arrays("(bf16[4,16]{1,0:T(8,128)(2,1)S(1)}, u32[]{:S(2)})") == [(8 * 128 * 2, 1), (4, 2)]
  assert aot.hlo_arrays("bf16[4,16]{1,0:T(8,128)(2,1)}", padded=False) == [(4 * 16 * 2, 0)]
  assert aot.hlo_arrays("f32[3,5]{0,1:T(8,128)}") == [(8 * 128 * 4, 0)]  # dim 0 minor: 3 -> 128
  rows = {r.name: r for r in aot.hlo_instruction_bytes(_HLO, aot.DECODE_LABELS)}
  assert set(rows) == {"copy-start", "copy-done", "fusion.1", "slice.2", "dus.1", "fusion.2",  # entry
                       "dus.2", "lt.1"}  # while body and condition, once each
  w, cache, row = 256 * 128 * 2, 4 * 64 * 128 * 2, 2 * 128 * 2  # [1,1,128] padded to 2 rows
  # a prefetched weight: read once from HBM, its start's tuple written whole, the done writes VMEM
  assert rows["copy-start"].operands[0][1:] == ("weight", w, w, 0) and rows["copy-start"].written == 2 * w + 4
  assert (rows["copy-done"].read, rows["copy-done"].written, rows["copy-done"].label) == (0, w, "weight")
  assert rows["fusion.1"].operands[1][1:] == ("weight", w, w, 1)  # the matmul reads it from VMEM
  assert [o[1] for o in rows["fusion.1"].operands] == ["state", "weight"]
  # in-place cache updates: the buffer is not read, only the update is written
  for name in ("dus.1", "dus.2"):
    assert rows[name].operands[0][1:4] == ("kv", cache, 0) and rows[name].written == row, name
    assert rows[name].label == "kv"
  # the scores fusion reads its window of the cache (16 of 64 slots, through a nested fusion)
  # and writes both tuple elements
  assert rows["fusion.2"].operands[1][1:4] == ("kv", cache, cache // 4)
  assert rows["fusion.2"].written == 128 * 4 + 8 * 128 * 4 and rows["fusion.2"].op_name == "jit(step)/scores"
  assert rows["copy-done"].op_name == "p['layers'][0]['kernel']"  # a copy takes its operand's source
  b = aot.bytes_breakdown(list(rows.values()), top=3)
  assert b["total"] == sum(r.read + r.written for r in rows.values())
  assert b["access"]["on-chip write"]["weight"] == w and b["access"]["async start result"]["weight"] == 2 * w + 4
  assert b["access"]["HBM read"]["weight"] == w and b["access"]["HBM read"]["kv"] == cache // 4
  assert b["by_source"]["p['layers'][*]['kernel']"]["count"] == 2 and len(b["top"]) == 3
  b["needed"] = {"weights": w, "kv": cache // 4}
  excess = aot.decode_excess(b, b["total"] + 100)
  assert excess["weight copies beyond one HBM read"] == w + 2 * w + 4 + w  # VMEM read, start, done
  assert excess["weights read from HBM beyond the share"] == 0 and excess["not attributed"] == 100
  assert excess["KV beyond the live window"] == 2 * row  # the two in-place writes
  assert sum(excess.values()) == b["total"] + 100 - w - cache // 4


def test_instruction_bytes_sum_to_the_compilers_count_on_a_tpu_program():
  """A step that prefetches, updates a donated cache in place and reads a window of it, compiled
  for one v5p chip: the instructions' bytes sum to the compiler's "bytes accessed" (within 1 %),
  the cache is read over its window only and written by its update only."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from tlt_jax.analysis import aot
  devices = aot.topology_devices(aot.topology("v5p-8"))
  rep = NamedSharding(Mesh(np.array(devices[:1]), ("x",)), P())
  b, d, s, w = 8, 512, 4096, 1024

  def step(wt, x, cache, i):
    y = x @ wt
    cache = jax.lax.dynamic_update_slice(cache, y[:, None], (0, i, 0))
    return cache, jnp.einsum("bd,bsd->bs", y, cache[:, :w], preferred_element_type=jnp.float32)

  args = [jax.ShapeDtypeStruct(shape, dt, sharding=rep) for shape, dt in
          (((d, d), jnp.bfloat16), ((b, d), jnp.bfloat16), ((b, s, d), jnp.bfloat16), ((), jnp.int32))]
  compiled = jax.jit(step, donate_argnums=(2,)).lower(*args).compile()
  text = compiled.as_text()
  rows = aot.hlo_instruction_bytes(text, {"weight": "^wt$", "kv": "^cache$"})
  br = aot.bytes_breakdown(rows)
  counted = aot._cost(compiled)["bytes accessed"]
  assert abs(br["total"] - counted) <= 0.01 * counted, (br["total"], counted)
  assert br["access"]["HBM read"]["weight"] == d * d * 2  # read once
  assert br["access"]["HBM read"]["kv"] == b * w * d * 2  # the live window, not the whole cache
  assert 0 < sum(br["access"]["HBM write"].get(k, 0) for k in ("kv",)) <= 2 * b * d * 2  # the update
  assert sum(br["access"]["async start result"].values()) >= 2 * aot.prefetch_bytes(text)


@pytest.mark.parametrize("t", [1, 5, 40])  # 40 > SELECT_BLOCK: the gather
def test_cache_mask_equals_brute_force(t):
  from tlt_jax.models.transformer import SELECT_BLOCK, cache_mask
  assert (t <= SELECT_BLOCK) == (t < 40)
  rng = np.random.default_rng(t)
  b, capacity = 3, 64
  block = rng.random((b, t, t)) < 0.6
  start = np.array([0, 7, capacity - t], np.int32)
  got = np.asarray(cache_mask(jnp.asarray(block), jnp.asarray(start), capacity))
  want = np.zeros((b, t, capacity), bool)
  for r in range(b):
    for i in range(t):
      for j in range(capacity):
        rel = j - start[r]
        want[r, i, j] = rel < 0 or (rel < t and block[r, i, rel])
  np.testing.assert_array_equal(got, want)


def test_a_decode_steps_cache_mask_costs_what_it_holds_on_a_tpu():
  """At 32 rows x 32,768 slots the TPU compiler counted 1.6 GB for the gather form of the 1 MB
  decode mask (its [B, S, 1] int32 indices padded to 128 lanes); the select form counts ~the mask."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from tlt_jax.analysis import aot
  from tlt_jax.models.transformer import cache_mask
  rep = NamedSharding(Mesh(np.array(aot.topology_devices(aot.topology("v5p-8"))[:1]), ("x",)), P())
  rows, slots = 32, 32768
  compiled = jax.jit(lambda m, s: cache_mask(m, s, slots)).lower(
      jax.ShapeDtypeStruct((rows, 1, 1), jnp.bool_, sharding=rep),
      jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=rep)).compile()
  assert aot._cost(compiled)["bytes accessed"] < 2 * rows * slots  # bools: 1 MB, counted once or so
