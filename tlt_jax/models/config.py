"""Model hyper-parameters for the decoder-only Llama / Qwen2 family."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ROPE_TYPES = ("default", "linear", "llama3")
# Rematerialisation of each decoder layer in the backward pass (jax.checkpoint policies):
# "none" keeps every activation, "full" keeps only the layer's input, "dots" keeps the matmul
# outputs, "dots_no_batch" the matmul outputs without batch dimensions (the weights' products).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# Attention of uncached forwards over packed rows (segment ids): "auto" picks splash on TPU,
# "xla" elsewhere on accelerators, "reference" on CPU (see models/attention.py).
ATTENTION_IMPLS = ("auto", "reference", "xla", "splash")
# Attention of a block of <= transformer.SELECT_BLOCK tokens over the KV cache (a decode step, a
# verify block) in the rollout's programs: "auto" picks the fused Pallas kernel on TPU
# (models/cache_attention.py) and XLA ops elsewhere; "interpret" runs the kernel in Pallas's
# interpreter (CPU tests).
CACHE_ATTENTION_IMPLS = ("auto", "xla", "pallas", "interpret")
# How token positions enter attention: "rope" rotates queries and keys (Su et al. 2021); "none"
# is NoPE, no positional signal at all beyond the causal mask (Kazemnejad et al. 2023), the
# length-generalising choice of Lee et al. 2025 (self-improving transformers).
POSITION_EMBEDDINGS = ("rope", "none")


def to_dtype(name: str):
  """Maps a dtype name from a config ('float32', 'bfloat16', 'float16') to a jnp dtype."""
  if name not in _DTYPES:
    raise ValueError(f"dtype {name!r} is not supported; allowed: {sorted(_DTYPES)}")
  return _DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling. 'llama3' follows Llama-3.1's piecewise rule, 'linear' divides by factor."""

  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.rope_type not in ROPE_TYPES:
      raise ValueError(f"rope_scaling.rope_type={self.rope_type!r} is not supported; allowed: {ROPE_TYPES}")
    if self.factor <= 0:
      raise ValueError(f"rope_scaling.factor={self.factor} must be > 0")
    if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
      raise ValueError("rope_scaling: llama3 needs high_freq_factor > low_freq_factor, got "
                       f"{self.high_freq_factor} <= {self.low_freq_factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only transformer: RMSNorm, RoPE, GQA attention, SwiGLU MLP.

  `dtype` is the compute dtype and `param_dtype` the storage dtype; logits and softmax are
  always computed in float32.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int = 0  # 0 means hidden_size // num_heads
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  rms_norm_eps: float = 1e-6
  qkv_bias: bool = False
  tie_word_embeddings: bool = True
  max_position_embeddings: int = 2048
  position_embedding: str = "rope"  # POSITION_EMBEDDINGS
  param_dtype: str = "float32"
  dtype: str = "float32"
  architecture: str = "LlamaForCausalLM"
  # Execution (not architecture; never written to config.json): lax.scan over the layers of an
  # uncached forward, its remat policy, and the packed-row attention and its query chunk.
  scan_layers: bool = False
  remat: str = "none"
  attention: str = "auto"
  attention_chunk: int = 1024
  cache_attention: str = "auto"

  def __post_init__(self):
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings"):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"model.{name}={value!r} must be a positive int")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"model.num_heads={self.num_heads} must be a multiple of "
                       f"model.num_kv_heads={self.num_kv_heads} (grouped-query attention)")
    if self.head_dim == 0:
      if self.hidden_size % self.num_heads:
        raise ValueError(f"model.hidden_size={self.hidden_size} is not divisible by "
                         f"model.num_heads={self.num_heads}; set model.head_dim explicitly")
      object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
    if self.head_dim % 2:
      raise ValueError(f"model.head_dim={self.head_dim} must be even for RoPE")
    for name in ("param_dtype", "dtype"):
      value = getattr(self, name)
      if value not in _DTYPES:
        raise ValueError(f"model.{name}={value!r} is not supported; allowed: {sorted(_DTYPES)}")
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"model.remat={self.remat!r} is not supported; allowed: {REMAT_POLICIES}")
    if self.attention not in ATTENTION_IMPLS:
      raise ValueError(f"model.attention={self.attention!r} is not supported; allowed: {ATTENTION_IMPLS}")
    if self.cache_attention not in CACHE_ATTENTION_IMPLS:
      raise ValueError(f"model.cache_attention={self.cache_attention!r} is not supported; "
                       f"allowed: {CACHE_ATTENTION_IMPLS}")
    if not isinstance(self.attention_chunk, int) or self.attention_chunk <= 0:
      raise ValueError(f"model.attention_chunk={self.attention_chunk!r} must be a positive int")
    if self.position_embedding not in POSITION_EMBEDDINGS:
      raise ValueError(f"model.position_embedding={self.position_embedding!r} is not supported; "
                       f"allowed: {POSITION_EMBEDDINGS}")
    if isinstance(self.rope_scaling, dict):
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))

  EXECUTION_FIELDS = ("scan_layers", "remat", "attention", "attention_chunk", "cache_attention")

  def with_execution(self, source: Any) -> "ModelConfig":
    """This architecture with the execution fields (`EXECUTION_FIELDS`) of `source` (a mapping,
    e.g. the run config's `model` section, or a ModelConfig); absent keys keep their values."""
    get = (lambda k: getattr(source, k)) if isinstance(source, ModelConfig) else source.get
    changes = {k: get(k) for k in self.EXECUTION_FIELDS if get(k) is not None}
    return self.replace(**changes)

  @property
  def jnp_dtype(self):
    return to_dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return to_dtype(self.param_dtype)

  def replace(self, **changes: Any) -> "ModelConfig":
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    d = dict(d)
    allowed = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - allowed
    if unknown:
      raise ValueError(f"unknown model config keys {sorted(unknown)}; allowed: {sorted(allowed)}")
    if isinstance(d.get("rope_scaling"), dict):
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return cls(**d)

  @property
  def num_params(self) -> int:
    d, f, v, h, k, hd = (self.hidden_size, self.intermediate_size, self.vocab_size, self.num_heads,
                         self.num_kv_heads, self.head_dim)
    attn = d * h * hd * 2 + d * k * hd * 2 + (h * hd + 2 * k * hd if self.qkv_bias else 0)
    layer = attn + 3 * d * f + 2 * d
    head = 0 if self.tie_word_embeddings else d * v
    return v * d + self.num_layers * layer + d + head
