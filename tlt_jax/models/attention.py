"""Causal attention over packed rows (segment ids), without a dense [L, L] mask.

A packed row holds several whole sequences; token i of the row attends to token j iff

    segment[i] == segment[j] > 0   and   j <= i                                  (1)

(segment 0 is padding). Materialising (1) as a [B, L, L] mask and the scores as [B, H, L, L]
costs O(L^2) memory per layer: 9216-token rows of a 7B policy would need ~4.6 GB of float32
scores per row and head group. Three implementations avoid it:

  "reference"  the exact math of `attention` (softmax(q k^T / sqrt(D) + mask) v,
               float32 scores) over query chunks of C rows: the chunk's mask [B, C, L] is made
               from the segment ids on the fly, and each chunk is rematerialised in the
               backward pass, so memory is O(C L) instead of O(L^2). With C >= L it is the
               dense computation itself, bit for bit (the CPU default).
  "xla"        the same chunking around XLA's `jax.nn.dot_product_attention` (GPU).
  "splash"     the TPU Pallas splash-attention kernel (Pope et al.'s blockwise flash attention,
               jax.experimental.pallas.ops.tpu.splash_attention) with a causal mask and
               `SegmentIds`, under `jax.shard_map` (Mosaic kernels cannot be auto-partitioned):
               batch split over ('data', 'fsdp'), KV-head groups over 'tensor'. Memory is
               O(block^2); fully masked (padding) rows come out as zeros.

`AttentionSpec` carries the choice and the mesh into the model's uncached forward.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
  """How an uncached forward attends within segments: `impl` (ModelConfig.ATTENTION_IMPLS, "auto"
  resolved by the mesh's platform), the query chunk of "reference"/"xla", and the mesh that
  splash's shard_map runs on (None: one device)."""

  impl: str = "auto"
  chunk: int = 1024
  mesh: Mesh | None = None
  # How a cached block of <= transformer.SELECT_BLOCK tokens attends (ModelConfig.cache_attention,
  # resolved): "xla" (`attention` over `cache_mask`), "pallas" or "interpret"
  # (models/cache_attention.py). The plain default: a forward given no spec runs XLA ops, which
  # any sharding partitions; the rollout's programs pass `for_cache(cfg, mesh)`.
  cache: str = "xla"

  def _platform(self) -> str:
    return self.mesh.devices.flat[0].platform if self.mesh is not None else jax.devices()[0].platform

  def resolved(self) -> str:
    if self.impl != "auto":
      return self.impl
    return {"tpu": "splash", "gpu": "xla", "cuda": "xla", "rocm": "xla"}.get(self._platform(), "reference")

  @classmethod
  def for_cache(cls, cfg, mesh: Mesh | None = None) -> "AttentionSpec":
    """The spec of a rollout program on `mesh` (None: one device) for a model of ModelConfig `cfg`:
    its packed-row kernel and chunk, and `cache` resolved ("auto": "pallas" on TPU, else "xla")."""
    spec = cls(cfg.attention, cfg.attention_chunk, mesh)
    cache = cfg.cache_attention
    if cache == "auto":
      cache = "pallas" if spec._platform() == "tpu" else "xla"
    return dataclasses.replace(spec, cache=cache)


def _chunk_mask(seg_q_BxC: Array, seg_k_BxL: Array, pos_q_C: Array) -> Array:
  """Mask (1) for a chunk of queries at row positions pos_q_C: [B, C, L]."""
  pos_k_L = jnp.arange(seg_k_BxL.shape[1])
  same = (seg_q_BxC[:, :, None] == seg_k_BxL[:, None, :]) & (seg_q_BxC[:, :, None] > 0)
  return same & (pos_k_L[None, None, :] <= pos_q_C[None, :, None])


def attention(q_BxTxHxD, k, v, mask_BxTxS, heads_first: bool = False) -> Array:
  """softmax(q k^T / sqrt(D) + mask) v with grouped-query heads (H = K * G); keys and values are
  [B, S, K, D], or [B, K, S, D] with `heads_first` (the cache's order)."""
  b, t, h, d = q_BxTxHxD.shape
  kv = k.shape[1 if heads_first else 2]
  kv_spec = "bksd" if heads_first else "bskd"
  q = q_BxTxHxD.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum(f"btkgd,{kv_spec}->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(d)
  scores = jnp.where(mask_BxTxS[:, None, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkgts,{kv_spec}->btkgd", probs, v)
  return out.reshape(b, t, h * d)


def chunked_segment_attention(q_BxLxHxD: Array, k_BxLxKxD: Array, v_BxLxKxD: Array,
                              segment_ids_BxL: Array, *, chunk: int, impl: str = "reference") -> Array:
  """Attention (1) over query chunks of `chunk` rows (see the module docstring); returns
  [B, L, H * D]. Each chunk is a `jax.checkpoint`: its scores are recomputed in the backward
  pass rather than kept, so no [L, L] array lives beyond one chunk's [C, L]."""
  b, length, h, d = q_BxLxHxD.shape
  c = min(int(chunk), length)
  num = -(-length // c)
  pad = num * c - length

  def one(q_BxCxHxD, seg_q_BxC, start):
    pos_q_C = start + jnp.arange(c)
    mask_BxCxL = _chunk_mask(seg_q_BxC, segment_ids_BxL, pos_q_C)
    if impl == "xla":
      out = jax.nn.dot_product_attention(q_BxCxHxD, k_BxLxKxD, v_BxLxKxD, mask=mask_BxCxL[:, None],
                                         implementation="xla")
      return out.reshape(b, c, h * d)
    return attention(q_BxCxHxD, k_BxLxKxD, v_BxLxKxD, mask_BxCxL)

  if num == 1:
    return one(q_BxLxHxD, segment_ids_BxL, 0)
  q = jnp.pad(q_BxLxHxD, ((0, 0), (0, pad), (0, 0), (0, 0)))
  seg_q = jnp.pad(segment_ids_BxL, ((0, 0), (0, pad)))
  q_NxBxCxHxD = q.reshape(b, num, c, h, d).swapaxes(0, 1)
  seg_NxBxC = seg_q.reshape(b, num, c).swapaxes(0, 1)
  starts_N = jnp.arange(num) * c
  body = jax.checkpoint(one, prevent_cse=False)
  out_NxBxCxF = jax.lax.map(lambda args: body(*args), (q_NxBxCxHxD, seg_NxBxC, starts_N))
  return out_NxBxCxF.swapaxes(0, 1).reshape(b, num * c, h * d)[:, :length]


def shard_axes(mesh: Mesh, batch: int, kv_heads: int):
  """(row axes, KV-head axis) of a kernel under shard_map on `mesh`, as the batch and the cache
  are sharded: rows over ('data', 'fsdp') when they divide `batch` (None: replicated), KV heads
  over 'tensor' when it divides them (None: replicated)."""
  rows = tuple(a for a in ("data", "fsdp") if mesh.shape[a] > 1)
  if batch % max(math.prod(mesh.shape[a] for a in rows), 1):
    rows = ()
  head = "tensor" if mesh.shape["tensor"] > 1 and kv_heads % mesh.shape["tensor"] == 0 else None
  return (rows if rows else None), head


def _block(length: int) -> int:
  """The largest splash tile of 512 / 256 / 128 that divides `length` (a multiple of 128)."""
  return next(blk for blk in (512, 256, 128) if length % blk == 0)


def splash_segment_attention(q_BxLxHxD: Array, k_BxLxKxD: Array, v_BxLxKxD: Array,
                             segment_ids_BxL: Array, mesh: Mesh | None) -> Array:
  """Attention (1) with the TPU splash kernel, per (batch row, KV head) an MQA call over the
  G = H / K query heads that share the KV head; under shard_map on `mesh`. Returns [B, L, H*D]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  b, length, h, d = q_BxLxHxD.shape
  pad = -length % 128
  if pad:  # rows padded to a multiple of 128 with segment 0 (which no real token attends to)
    widen = lambda x: jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    out = splash_segment_attention(widen(q_BxLxHxD), widen(k_BxLxKxD), widen(v_BxLxKxD),
                                   widen(segment_ids_BxL), mesh)
    return out[:, :length]
  kvh = k_BxLxKxD.shape[2]
  g = h // kvh
  blk = _block(length)
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                        block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk)
  kernel = sk.make_splash_mqa_single_device(
      sm.MultiHeadMask([sm.CausalMask((length, length)) for _ in range(g)]), block_sizes=sizes)

  def local(q, k, v, seg):
    bl, kl = q.shape[0], k.shape[2]
    q_BxKxGxLxD = (q * (1.0 / math.sqrt(d))).astype(q.dtype).reshape(bl, length, kl, g, d).transpose(0, 2, 3, 1, 4)
    k_BxKxLxD, v_BxKxLxD = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    per_head = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1))
    per_row = jax.vmap(per_head, in_axes=(0, 0, 0, None))
    out_BxKxGxLxD = jax.vmap(per_row)(q_BxKxGxLxD, k_BxKxLxD, v_BxKxLxD, seg)
    return out_BxKxGxLxD.transpose(0, 3, 1, 2, 4).reshape(bl, length, kl * g * d)

  if mesh is None:
    return local(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL)
  bspec, head_axis = shard_axes(mesh, b, kvh)
  qkv = P(bspec, None, head_axis, None)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(qkv, qkv, qkv, P(bspec, None)),
                     out_specs=P(bspec, None, head_axis), check_vma=False)
  return fn(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL)


def segment_attention(q_BxLxHxD: Array, k_BxLxKxD: Array, v_BxLxKxD: Array, segment_ids_BxL: Array,
                      spec: AttentionSpec | None = None) -> Array:
  """Causal attention within segments, (1), by `spec` (default: AttentionSpec())."""
  spec = spec or AttentionSpec()
  impl = spec.resolved()
  if impl == "splash":
    return splash_segment_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL, spec.mesh)
  return chunked_segment_attention(q_BxLxHxD, k_BxLxKxD, v_BxLxKxD, segment_ids_BxL,
                                   chunk=spec.chunk, impl=impl)


@functools.lru_cache(maxsize=None)
def remat_policy(name: str):
  """jax.checkpoint policy of ModelConfig.remat (None: no remat)."""
  cp = jax.checkpoint_policies
  return {"none": None, "full": cp.nothing_saveable, "dots": cp.checkpoint_dots,
          "dots_no_batch": cp.checkpoint_dots_with_no_batch_dims}[name]
