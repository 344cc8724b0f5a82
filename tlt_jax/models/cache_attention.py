"""Attention of a short block of new tokens over the KV cache, as one fused TPU kernel.

A decode step (T = 1) and a speculative verify block (T = 1 + the drafted nodes, at most
`transformer.SELECT_BLOCK` tokens) attend to the cache as

    query i of row b sees slot j  iff  j < start_b,  or  j = start_b + r with block[b, i, r]   (1)

(the committed prefix, then the block's own slots by its tree mask; `transformer.cache_mask`).
Written with XLA ops (`attention.attention` over the `cache_mask`), the TPU compiler writes the
float32 scores [B, K, G, T, S] to HBM and reads them back for the softmax's max, its sum and the
values matmul: for a 5-token verify block at 8 rows x 33,808 slots it counts 3.3x the bytes of the
keys and values it must read, and 1.4x for a decode step (experiments/results/spec_round_cost).

`cache_attention` is flash decoding (Dao et al., FlashAttention; the online softmax of Milakov &
Gimelshein, 2018) as a Pallas kernel: per (row, KV head) the T x G queries that share the head
stream the cache in chunks of `chunk` slots, keep the running max, sum and output in VMEM and
write only the output. Chunks past a row's live context (start_b + T) are neither fetched (their
block index repeats the last live one, so the pipeline skips the copy) nor computed, so a row
reads its live KV, not the window. The result is `attention.attention` over the `cache_mask` up to
rounding (the online softmax rescales partial sums; probabilities enter the values matmul
unnormalised), checked against it in the kernel's interpreter on CPU (tests/test_cache_attention.py).

Mosaic kernels cannot be partitioned by XLA: on a mesh the kernel runs under `jax.shard_map`, rows
split over ('data', 'fsdp') and KV heads over 'tensor' as the cache is sharded. The compiler
cannot see inside the kernel: its cost (`pl.CostEstimate`) is declared here as the bytes the
kernel's block copies move at the worst case (every row live up to the window), the flops of the
two matmuls and one exp per score.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import Mesh, PartitionSpec as P

from tlt_jax.models.attention import shard_axes

Array = jax.Array

# Slots per streamed chunk: [chunk, head_dim] keys and values per grid step, double-buffered in
# VMEM (2 x 2 x 512 KiB at head_dim 128 in bfloat16). Large, because every grid step has a fixed
# cost (about 0.35 us, the Pallas TPU matmul guide) that the compiler's estimate does not see:
# 17 steps per row and KV head over 33,808 slots instead of 67 at 512.
CHUNK = 2048
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def _kernel(start_ref, q_ref, blk_ref, k_ref, v_ref, o_ref, m_sc, l_sc, acc_sc, *, chunk: int, t: int,
            scale: float):
  """One (row, KV head, chunk) step. q_ref [M, D] (M = T x G queries, block position t = m // G),
  blk_ref [M, T] int32, k_ref / v_ref [chunk, D]; scratch m, l [M, 1], acc [M, D] float32."""
  b, c = pl.program_id(0), pl.program_id(2)
  start = start_ref[b]

  @pl.when(c == 0)
  def _init():
    m_sc[...] = jnp.full(m_sc.shape, _NEG, jnp.float32)
    l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
    acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

  @pl.when(c * chunk < start + t)
  def _step():
    q = q_ref[0, 0]
    k = k_ref[0, 0].astype(q.dtype)
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    rel = c * chunk + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1) - start
    blk = blk_ref[0]
    seen = rel < 0
    for r in range(t):
      seen = seen | ((rel == r) & (blk[:, r:r + 1] != 0))
    s = jnp.where(seen, s, _NEG)
    m_prev = m_sc[...]
    m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.where(seen, jnp.exp(s - m_new), 0.0)
    alpha = jnp.exp(m_prev - m_new)
    l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
    # slots past the live context (a partial last chunk holds whatever lies past the array) enter
    # the values matmul as zeros: p is 0 there, but 0 * NaN is not
    live = (c * chunk + jax.lax.broadcasted_iota(jnp.int32, (k.shape[0], 1), 0)) < start + t
    v = jnp.where(live, v_ref[0, 0], jnp.zeros((), v_ref.dtype)).astype(q.dtype)
    acc_sc[...] = alpha * acc_sc[...] + jax.lax.dot_general(
        p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    m_sc[...] = m_new

  @pl.when(c == pl.num_programs(2) - 1)
  def _done():
    l = l_sc[...]
    o_ref[0, 0] = jnp.where(l > 0, acc_sc[...] / jnp.where(l > 0, l, 1.0), 0.0).astype(o_ref.dtype)


def _call(q_BxKxMxD: Array, blk_BxMxT: Array, k_BxKxSxD: Array, v_BxKxSxD: Array, start_B: Array, *,
          width: int, t: int, chunk: int, interpret: bool) -> Array:
  b, kv, m, d = q_BxKxMxD.shape
  s = k_BxKxSxD.shape[2]
  chunk = s if s <= chunk else chunk  # a block is the whole slot axis or a multiple of 8 slots
  num = -(-width // chunk)

  def kv_block(bi, ki, ci, start_ref):  # past the live context: the last live chunk again (no copy)
    last = jax.lax.div(start_ref[bi] + t - 1, chunk)  # non-negative: truncation is the floor
    return bi, ki, jnp.minimum(ci, last), 0

  itemsize = jnp.dtype(k_BxKxSxD.dtype).itemsize
  cost = pl.CostEstimate(
      flops=4 * b * kv * m * width * d, transcendentals=b * kv * m * width,
      bytes_accessed=(2 * b * kv * width * d * itemsize + 2 * q_BxKxMxD.size * q_BxKxMxD.dtype.itemsize
                      + blk_BxMxT.size * 4 + b * 4))
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=(b, kv, num),
      in_specs=[pl.BlockSpec((1, 1, m, d), lambda bi, ki, ci, s: (bi, ki, 0, 0)),
                pl.BlockSpec((1, m, t), lambda bi, ki, ci, s: (bi, 0, 0)),
                pl.BlockSpec((1, 1, chunk, d), kv_block),
                pl.BlockSpec((1, 1, chunk, d), kv_block)],
      out_specs=pl.BlockSpec((1, 1, m, d), lambda bi, ki, ci, s: (bi, ki, 0, 0)),
      scratch_shapes=[pltpu.VMEM((m, 1), jnp.float32), pltpu.VMEM((m, 1), jnp.float32),
                      pltpu.VMEM((m, d), jnp.float32)])
  kernel = functools.partial(_kernel, chunk=chunk, t=t, scale=1.0 / math.sqrt(d))
  return pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct(q_BxKxMxD.shape, q_BxKxMxD.dtype),
      compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
      cost_estimate=cost, interpret=interpret,
  )(start_B.astype(jnp.int32), q_BxKxMxD, blk_BxMxT, k_BxKxSxD, v_BxKxSxD)


def cache_attention(q_BxTxHxD: Array, k_BxKxSxD: Array, v_BxKxSxD: Array, block_BxTxT: Array,
                    start_B: Array, width: int, *, mesh: Mesh | None = None, chunk: int = CHUNK,
                    interpret: bool = False) -> Array:
  """Attention (1) of the T-token block `q` over cache slots [0, width) (the block's own keys and
  values already written at start_b..start_b + T - 1); returns [B, T, H * D]. `mesh`: run under
  shard_map on it (None: one device). `interpret`: Pallas's interpreter (CPU tests)."""
  b, t, h, d = q_BxTxHxD.shape
  kv = k_BxKxSxD.shape[1]
  g = h // kv

  def local(q, blk, ck, cv, start):
    bl, kl = q.shape[0], ck.shape[1]
    q_BxKxMxD = q.reshape(bl, t, kl, g, d).transpose(0, 2, 1, 3, 4).reshape(bl, kl, t * g, d)
    blk_BxMxT = jnp.repeat(blk.astype(jnp.int32), g, axis=1)  # query m = t * G + g
    out = _call(q_BxKxMxD, blk_BxMxT, ck, cv, start, width=width, t=t, chunk=chunk, interpret=interpret)
    return out.reshape(bl, kl, t, g, d).transpose(0, 2, 1, 3, 4).reshape(bl, t, kl * g * d)

  if mesh is None:
    return local(q_BxTxHxD, block_BxTxT, k_BxKxSxD, v_BxKxSxD, start_B)
  rows, head_axis = shard_axes(mesh, b, kv)
  fn = jax.shard_map(local, mesh=mesh,
                     in_specs=(P(rows, None, head_axis, None), P(rows, None, None),
                               P(rows, head_axis, None, None), P(rows, head_axis, None, None), P(rows)),
                     out_specs=P(rows, None, head_axis), check_vma=False)
  return fn(q_BxTxHxD, block_BxTxT, k_BxKxSxD, v_BxKxSxD, start_B)
