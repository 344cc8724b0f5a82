"""Decoder-only Llama / Qwen2 transformer in flax.nnx, with a functional KV cache.

One module serves Llama (untied or tied, Llama-3 RoPE scaling) and Qwen2 (q/k/v bias).
`__call__` returns float32 logits, the final normed hidden state (EAGLE's feature `f_t`) and,
when a cache is given, the updated cache.

Cache semantics (right-padded batches, per-sequence positions):
  * `KVCache.lengths[b]` counts the committed tokens of sequence b; slots >= lengths[b] hold
    garbage and are never attended to.
  * A call with T new tokens writes their keys/values at slots lengths[b] .. lengths[b]+T-1 and
    lets query i attend to every committed slot plus the new slots allowed by
    `attn_mask_BxTxT[b, i]` (default: causal). The returned cache has lengths + T; a caller that
    accepts fewer tokens (speculative verification, padded prefill) sets lengths itself.
"""

from __future__ import annotations

import math

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from tlt_jax.models.attention import AttentionSpec, attention, remat_policy, segment_attention  # noqa: F401
from tlt_jax.models.config import ModelConfig

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  """Per-layer key/value buffers `[B, K, S, Dh]` and committed lengths `[B]`.

  KV heads come before slots: a cached step's attention contracts each head's slots as one
  contiguous [S, Dh] block, so XLA reads the cache in place. In the [B, S, K, Dh] order it copied
  the whole cache into this order at every decode step (measured on CPU: 43 % of a d=256 step at
  batch 64)."""

  k: tuple[Array, ...]
  v: tuple[Array, ...]
  lengths: Array  # int32 [B]

  @property
  def capacity(self) -> int:
    return self.k[0].shape[2]

  @property
  def batch_size(self) -> int:
    return self.k[0].shape[0]

  @classmethod
  def init(cls, cfg: ModelConfig, batch_size: int, capacity: int, dtype=None) -> "KVCache":
    dtype = dtype or cfg.jnp_dtype
    shape = (batch_size, cfg.num_kv_heads, capacity, cfg.head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    return cls(k=zeros, v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
               lengths=jnp.zeros((batch_size,), jnp.int32))

  def take(self, idx_B: Array) -> "KVCache":
    """Rows `idx_B` of the cache (batch compaction / reordering)."""
    return jax.tree.map(lambda x: jnp.take(x, idx_B, axis=0), self)


def rope_inv_freq(cfg: ModelConfig) -> Array:
  """Inverse RoPE frequencies theta^(-2i/D), with optional linear or Llama-3 scaling."""
  dh = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  sc = cfg.rope_scaling
  if sc is None or sc.rope_type == "default":
    return inv_freq
  if sc.rope_type == "linear":
    return inv_freq / sc.factor
  # llama3: low frequencies are divided by factor, high ones kept, the band between interpolated.
  old_len = sc.original_max_position_embeddings
  low_wavelen = old_len / sc.low_freq_factor
  high_wavelen = old_len / sc.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
  smooth = (old_len / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
  smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
  medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x_BxTxNxD: Array, positions_BxT: Array, inv_freq: Array) -> Array:
  """Rotary embedding in the HF 'rotate_half' layout: x*cos + rotate_half(x)*sin."""
  angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * inv_freq
  cos = jnp.cos(angles_BxTxF)[:, :, None, :]
  sin = jnp.sin(angles_BxTxF)[:, :, None, :]
  x = x_BxTxNxD.astype(jnp.float32)
  x1, x2 = jnp.split(x, 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxTxNxD.dtype)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init="normal", scale=0.02):
  if init == "ones":
    value = jnp.ones(shape, dtype)
  elif init == "zeros":
    value = jnp.zeros(shape, dtype)
  else:
    value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
  return nnx.Param(value, logical_axes=axes)


class RMSNorm(nnx.Module):
  """y = x / sqrt(mean(x^2) + eps) * w   (Zhang & Sennrich, 2019), computed in float32."""

  def __init__(self, dim: int, eps: float, dtype, *, rngs: nnx.Rngs):
    self.weight = _param(rngs, (dim,), ("norm",), dtype, init="ones")
    self.eps = eps

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.weight[...].astype(jnp.float32)).astype(x.dtype)


class Linear(nnx.Module):
  """y = x W (+ b), W stored [in, out] with logical axes."""

  def __init__(self, din, dout, axes, dtype, *, bias=False, rngs: nnx.Rngs, scale=0.02):
    self.kernel = _param(rngs, (din, dout), axes, dtype, scale=scale)
    self.bias = _param(rngs, (dout,), axes[1:], dtype, init="zeros") if bias else None

  def __call__(self, x: Array) -> Array:
    y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    return y


class Attention(nnx.Module):

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = cfg.jnp_param_dtype
    d, h, k, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    self.q_proj = Linear(d, h * hd, ("embed", "heads"), pd, bias=cfg.qkv_bias, rngs=rngs)
    self.k_proj = Linear(d, k * hd, ("embed", "kv_heads"), pd, bias=cfg.qkv_bias, rngs=rngs)
    self.v_proj = Linear(d, k * hd, ("embed", "kv_heads"), pd, bias=cfg.qkv_bias, rngs=rngs)
    self.o_proj = Linear(h * hd, d, ("heads", "embed"), pd, rngs=rngs)
    self.num_heads, self.num_kv_heads, self.head_dim = h, k, hd

  def __call__(self, x_BxTxD, positions_BxT, inv_freq, mask_BxTxT, kv_cache=None, start_B=None,
               kv_mask_BxTxS=None, segment_ids_BxT=None, attn_spec=None, kv_window=None):
    """`kv_mask_BxTxS`, when given with a cache, replaces the committed-prefix + block mask: query
    i sees exactly the cache slots it marks (tree drafting over slots written by earlier calls).
    `segment_ids_BxT` (no cache) replaces `mask_BxTxT` by causal attention within segments,
    computed without a dense mask (models/attention.py, by `attn_spec`). `kv_window` (static,
    with a cache) attends to slots [0, kv_window) only: the caller guarantees that every
    committed and new slot lies below it, so a decode step reads the live part of the cache, not
    its whole capacity."""
    b, t, _ = x_BxTxD.shape
    q = self.q_proj(x_BxTxD).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x_BxTxD).reshape(b, t, self.num_kv_heads, self.head_dim)
    if inv_freq is not None:  # None: NoPE (cfg.position_embedding == "none")
      q = apply_rope(q, positions_BxT, inv_freq)
      k = apply_rope(k, positions_BxT, inv_freq)
    if kv_cache is None:
      if segment_ids_BxT is not None:
        return self.o_proj(segment_attention(q, k, v, segment_ids_BxT, attn_spec)), None
      out = attention(q, k, v, mask_BxTxT)
      return self.o_proj(out), None
    ck, cv = kv_cache  # [B, K, S, D]
    ck, cv = write_slots(ck, k.swapaxes(1, 2), start_B), write_slots(cv, v.swapaxes(1, 2), start_B)
    width = ck.shape[2] if kv_window is None else min(int(kv_window), ck.shape[2])
    if (kv_mask_BxTxS is None and t <= SELECT_BLOCK and attn_spec is not None
        and attn_spec.cache in ("pallas", "interpret")):
      from tlt_jax.models.cache_attention import cache_attention
      out = cache_attention(q, ck, cv, mask_BxTxT, start_B, width, mesh=attn_spec.mesh,
                            interpret=attn_spec.cache == "interpret")
      return self.o_proj(out), (ck, cv)
    if kv_mask_BxTxS is None:
      kv_mask_BxTxS = cache_mask(mask_BxTxT, start_B, width)
    else:
      kv_mask_BxTxS = kv_mask_BxTxS[:, :, :width]
    out = attention(q, ck[:, :, :width].astype(q.dtype), cv[:, :, :width].astype(q.dtype), kv_mask_BxTxS,
                    heads_first=True)
    return self.o_proj(out), (ck, cv)


def write_slots(c_BxKxSxD: Array, new_BxKxTxD: Array, start_B: Array) -> Array:
  """c[b, :, start_b : start_b + T] = new[b]. A batch of one is one slice update: the per-row
  (vmapped) form becomes a scatter there, which XLA CPU turned into copies of the cache."""
  new_BxKxTxD = new_BxKxTxD.astype(c_BxKxSxD.dtype)
  if c_BxKxSxD.shape[0] == 1:
    return jax.lax.dynamic_update_slice(c_BxKxSxD, new_BxKxTxD, (0, 0, start_B[0], 0))
  return jax.vmap(lambda c, new, s: jax.lax.dynamic_update_slice(c, new, (0, s, 0)))(
      c_BxKxSxD, new_BxKxTxD, start_B)


# Blocks up to this many tokens (a decode step's 1, a verify block) build their cache mask with one
# select per block position instead of a gather. XLA's TPU gather takes [B, S, 1] int32 indices
# laid out with the minor dim padded to 128 lanes: for a decode step at 32 rows x 32,768 slots the
# compiler counted 1.6 GB (and 0.69 ms) for a 1 MB mask.
SELECT_BLOCK = 32


def cache_mask(block_mask_BxTxT: Array, start_B: Array, capacity: int) -> Array:
  """Query i of row b sees slot j if j < start_b, or j = start_b + r with block_mask[b, i, r]."""
  t = block_mask_BxTxT.shape[-1]
  slots_S = jnp.arange(capacity)
  rel_BxS = slots_S[None, :] - start_B[:, None]
  if t <= SELECT_BLOCK:
    block_BxTxS = (rel_BxS == 0)[:, None, :] & block_mask_BxTxT[:, :, :1]
    for r in range(1, t):
      block_BxTxS = block_BxTxS | ((rel_BxS == r)[:, None, :] & block_mask_BxTxT[:, :, r:r + 1])
    return (rel_BxS < 0)[:, None, :] | block_BxTxS
  in_block_BxS = (rel_BxS >= 0) & (rel_BxS < t)
  rel_idx = jnp.clip(rel_BxS, 0, t - 1)
  block_BxTxS = jnp.take_along_axis(block_mask_BxTxT, jnp.broadcast_to(
      rel_idx[:, None, :], (rel_idx.shape[0], block_mask_BxTxT.shape[1], capacity)), axis=2)
  return (rel_BxS < 0)[:, None, :] | (in_block_BxS[:, None, :] & block_BxTxS)


class MLP(nnx.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))   (Shazeer, 2020)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    pd = cfg.jnp_param_dtype
    self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), pd, rngs=rngs)
    self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), pd, rngs=rngs)
    self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), pd, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
  """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)). `input_norm=False` drops the first
  norm (EAGLE's drafter layer, whose input is already a projected feature)."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, input_norm: bool = True):
    pd = cfg.jnp_param_dtype
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs) if input_norm else None
    self.self_attn = Attention(cfg, rngs=rngs)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs)
    self.mlp = MLP(cfg, rngs=rngs)

  def __call__(self, x, positions, inv_freq, mask, kv_cache=None, start_B=None, kv_mask=None,
               segment_ids=None, attn_spec=None, kv_window=None):
    h = self.input_layernorm(x) if self.input_layernorm is not None else x
    attn, new_kv = self.self_attn(h, positions, inv_freq, mask, kv_cache, start_B, kv_mask,
                                  segment_ids, attn_spec, kv_window)
    x = x + attn
    x = x + self.mlp(self.post_attention_layernorm(x))
    return x, new_kv


def causal_mask(batch: int, t: int) -> Array:
  return jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (batch, t, t))


class Transformer(nnx.Module):
  """Llama / Qwen2 causal LM. See the module docstring for cache semantics."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    pd = cfg.jnp_param_dtype
    self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
    self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd, rngs=rngs)
    self.lm_head = None if cfg.tie_word_embeddings else _param(
        rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

  def embed(self, tokens_BxT: Array) -> Array:
    return jnp.take(self.embed_tokens[...], tokens_BxT, axis=0).astype(self.cfg.jnp_dtype)

  def logits(self, hidden_BxTxD: Array) -> Array:
    """float32 logits = f W_head, with W_head = embed^T when tied."""
    dt = self.cfg.jnp_dtype
    w = self.embed_tokens[...].T if self.lm_head is None else self.lm_head[...]
    return jnp.einsum("...d,dv->...v", hidden_BxTxD.astype(dt), w.astype(dt),
                      preferred_element_type=jnp.float32)

  def __call__(self, tokens_BxT: Array, positions_BxT: Array | None = None,
               cache: KVCache | None = None, attn_mask_BxTxT: Array | None = None,
               return_logits: bool = True, segment_ids_BxT: Array | None = None,
               attn_spec=None, kv_window: int | None = None,
               input_embeds_BxTxD: Array | None = None):
    """(logits_BxTxV | None, hidden_BxTxD, new cache | None).

    `input_embeds_BxTxD` replaces the token embeddings `embed(tokens_BxT)` (SCONE's contextual
    f-gram embeddings, models/scone.py); None keeps the plain model's program unchanged.

    Attention: causal by default, `attn_mask_BxTxT` when given, or (uncached) causal within the
    segments of `segment_ids_BxT` without a dense mask (models/attention.py; `attn_spec` chooses
    the kernel and its mesh). `kv_window`: see `Attention`. Without a cache and with
    `cfg.scan_layers`, the layers run as one `lax.scan` over their stacked params, each
    rematerialised by `cfg.remat` in the backward pass.
    """
    b, t = tokens_BxT.shape
    if positions_BxT is None:
      start = cache.lengths if cache is not None else jnp.zeros((b,), jnp.int32)
      positions_BxT = start[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    mask = None
    if segment_ids_BxT is None or cache is not None:
      mask = causal_mask(b, t) if attn_mask_BxTxT is None else attn_mask_BxTxT
    else:
      segment_ids_BxT = jnp.asarray(segment_ids_BxT, jnp.int32)
    if attn_spec is None:
      attn_spec = AttentionSpec(self.cfg.attention, self.cfg.attention_chunk)
    inv_freq = rope_inv_freq(self.cfg) if self.cfg.position_embedding == "rope" else None
    x = self.embed(tokens_BxT) if input_embeds_BxTxD is None else input_embeds_BxTxD.astype(self.cfg.jnp_dtype)
    if cache is None:
      x = self._layers_uncached(x, positions_BxT, inv_freq, mask, segment_ids_BxT, attn_spec)
      hidden = self.norm(x)
      return (self.logits(hidden) if return_logits else None), hidden, None
    new_k, new_v = [], []
    for i, layer in enumerate(self.layers):
      x, kv = layer(x, positions_BxT, inv_freq, mask, (cache.k[i], cache.v[i]), cache.lengths,
                    attn_spec=attn_spec, kv_window=kv_window)
      new_k.append(kv[0])
      new_v.append(kv[1])
    hidden = self.norm(x)
    logits = self.logits(hidden) if return_logits else None
    return logits, hidden, KVCache(tuple(new_k), tuple(new_v), cache.lengths + t)

  def _layers_uncached(self, x, positions_BxT, inv_freq, mask, segment_ids_BxT, attn_spec):
    """The decoder layers without a cache: a Python loop, or one `lax.scan` (cfg.scan_layers);
    each layer wrapped in `jax.checkpoint` with the cfg.remat policy unless it is "none".

    The scan stacks the per-layer params inside the step ([num_layers, ...] per weight, in their
    sharding): one transient copy of the layer weights, against a layer body compiled once."""

    graphdef = nnx.graphdef(self.layers[0])
    states = [nnx.state(layer) for layer in self.layers]

    def apply(layer_state, x_in):
      y, _ = nnx.merge(graphdef, layer_state)(x_in, positions_BxT, inv_freq, mask,
                                              segment_ids=segment_ids_BxT, attn_spec=attn_spec)
      return y

    if self.cfg.remat != "none":
      apply = jax.checkpoint(apply, policy=remat_policy(self.cfg.remat),
                             prevent_cse=not self.cfg.scan_layers)
    if not self.cfg.scan_layers:
      for layer_state in states:
        x = apply(layer_state, x)
      return x
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)

    def body(x_carry, layer_state):
      return apply(layer_state, x_carry), None

    x, _ = jax.lax.scan(body, x, stacked)
    return x


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(seed))
