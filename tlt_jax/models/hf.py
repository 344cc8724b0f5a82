"""HuggingFace checkpoints <-> `Transformer`: `config.json` plus (sharded) safetensors.

Supported architectures are `LlamaForCausalLM` and `Qwen2ForCausalLM`. Tensor names follow HF:

  model.embed_tokens.weight                          [V, D]
  model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   [out, in]  (+ .bias for q, k, v in Qwen2)
  model.layers.{i}.mlp.{gate,up,down}_proj.weight    [out, in]
  model.layers.{i}.{input,post_attention}_layernorm.weight
  model.norm.weight
  lm_head.weight                                     [V, D]     (absent when embeddings are tied)

Torch `nn.Linear` stores its weight [out, in]; our kernels are [in, out], so every `*.weight` of a
linear layer (and `lm_head`) is transposed on the way in and out. The name mapping is derived
from the module tree (`_hf_name`), so nothing is listed twice.

Loading never holds two copies of the model on the host: the module is built abstractly with
`nnx.eval_shape`, then tensors are read one at a time and each is placed straight into its final
device sharding.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import re
import struct
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from tlt_jax.errors import CheckpointError
from tlt_jax.models.config import ROPE_TYPES, ModelConfig, RopeScaling, to_dtype
from tlt_jax.models.transformer import Transformer
from tlt_jax.parallel.mesh import TRAIN_RULES, logical_to_spec

logger = logging.getLogger(__name__)

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_SHARD_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Tensors a checkpoint may carry that the model does not need (buffers of older exports).
_BENIGN_EXTRA_RE = re.compile(r"(^|\.)rotary_emb\.inv_freq$")

# safetensors dtype codes we read. numpy has no bfloat16, so BF16 is decoded with ml_dtypes.
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


# ----------------------------------------------------------------------------------------------
# config.json


def _dtype_name(dtype) -> str:
  """'float32' / 'bfloat16' / 'float16' from a name or a numpy / jnp dtype; ValueError otherwise."""
  name = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
  to_dtype(name)
  return name


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """(rope_theta, rope_scaling) from either transformers >= 5 `rope_parameters` or the older
  top-level `rope_theta` + `rope_scaling` (whose type key may be `rope_type` or `type`)."""
  params = hf.get("rope_parameters")
  if params:
    if "rope_type" not in params and "type" not in params and "rope_theta" not in params:
      # Nested per layer type ({"full_attention": {...}, ...}); Llama / Qwen2 have only one.
      if set(params) != {"full_attention"}:
        raise ValueError(f"rope_parameters per layer type {sorted(params)} are not supported; "
                         "allowed: one global dict, or only 'full_attention'")
      params = params["full_attention"]
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = params
  else:
    theta = hf.get("rope_theta", 10000.0)
    scaling = hf.get("rope_scaling") or {}
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"unsupported rope type {rope_type!r}; allowed: {ROPE_TYPES}")
  if scaling.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise ValueError("partial_rotary_factor != 1 is not supported; allowed: 1.0")
  if rope_type == "default":
    return float(theta), None
  if rope_type == "linear":
    return float(theta), RopeScaling("linear", factor=float(scaling["factor"]))
  original = scaling.get("original_max_position_embeddings",
                         hf.get("original_max_position_embeddings", hf.get("max_position_embeddings")))
  return float(theta), RopeScaling(
      "llama3", factor=float(scaling["factor"]),
      low_freq_factor=float(scaling.get("low_freq_factor", 1.0)),
      high_freq_factor=float(scaling.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(original))


def config_from_hf(hf_config: Mapping[str, Any]) -> ModelConfig:
  """A `ModelConfig` from a HuggingFace `config.json` dict (Llama or Qwen2).

  The architecture comes from `architectures` (or, when absent, `model_type`). Qwen2 always has
  q/k/v biases; Llama has none. Rope settings are read from `rope_parameters` (transformers >= 5)
  or from top-level `rope_theta` / `rope_scaling` (older). The checkpoint's `dtype` (or
  `torch_dtype`) becomes `param_dtype` and `dtype` when it is one we support, else float32.
  Raises ValueError naming the offending key, its value and what is allowed.
  """
  hf = dict(hf_config)
  archs = hf.get("architectures")
  if not archs:
    by_type = {v: k for k, v in _MODEL_TYPES.items()}
    if hf.get("model_type") not in by_type:
      raise ValueError(f"config has no 'architectures' and model_type={hf.get('model_type')!r}; "
                       f"allowed architectures: {ARCHITECTURES} (model types {sorted(by_type)})")
    archs = [by_type[hf["model_type"]]]
  if len(archs) != 1 or archs[0] not in ARCHITECTURES:
    raise ValueError(f"unsupported architecture {archs!r}; allowed: {ARCHITECTURES}")
  arch = archs[0]

  for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads"):
    if key not in hf:
      raise ValueError(f"{arch} config is missing required key {key!r}")
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={hf['hidden_act']!r} is not supported; allowed: 'silu'")
  if hf.get("mlp_bias", False):
    raise ValueError("mlp_bias=True is not supported; allowed: False")
  if arch == "LlamaForCausalLM" and hf.get("attention_bias", False):
    # HF's attention_bias also biases o_proj, which this model has no parameter for.
    raise ValueError("LlamaForCausalLM with attention_bias=True (bias on q/k/v *and* o_proj) is not "
                     "supported; allowed: attention_bias=False (use Qwen2ForCausalLM for q/k/v bias)")
  if hf.get("use_sliding_window", False):
    raise ValueError("use_sliding_window=True is not supported; allowed: False")

  rope_theta, rope_scaling = _rope_from_hf(hf)
  ckpt_dtype = hf.get("dtype") or hf.get("torch_dtype") or "float32"
  param_dtype = ckpt_dtype if ckpt_dtype in ("float32", "bfloat16", "float16") else "float32"
  return ModelConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=hf.get("head_dim") or 0,
      rope_theta=rope_theta,
      rope_scaling=rope_scaling,
      rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qkv_bias=arch == "Qwen2ForCausalLM",
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      param_dtype=param_dtype,
      dtype=param_dtype,
      architecture=arch,
  )


def hf_config_from(cfg: ModelConfig) -> dict[str, Any]:
  """The HuggingFace `config.json` dict for `cfg` (inverse of `config_from_hf`).

  Rope settings are written both as transformers >= 5 `rope_parameters` and as the older
  top-level `rope_theta` / `rope_scaling`, so either major version reads them. Raises ValueError
  when `cfg.architecture` cannot express `cfg.qkv_bias` (Qwen2 always has q/k/v biases; Llama's
  `attention_bias` would also bias o_proj).
  """
  arch = cfg.architecture
  if arch not in ARCHITECTURES:
    raise ValueError(f"model.architecture={arch!r} has no HuggingFace export; allowed: {ARCHITECTURES}")
  if arch == "LlamaForCausalLM" and cfg.qkv_bias:
    raise ValueError("model.qkv_bias=True cannot be exported as LlamaForCausalLM (its attention_bias "
                     "also biases o_proj); allowed: architecture='Qwen2ForCausalLM' for q/k/v bias")
  if arch == "Qwen2ForCausalLM" and not cfg.qkv_bias:
    raise ValueError("model.qkv_bias=False cannot be exported as Qwen2ForCausalLM (it always has "
                     "q/k/v biases); allowed: qkv_bias=True, or architecture='LlamaForCausalLM'")
  if cfg.position_embedding != "rope":
    raise ValueError(f"model.position_embedding={cfg.position_embedding!r} (NoPE) has no HuggingFace "
                     "export: Llama and Qwen2 always apply RoPE, so the exported model would compute "
                     "something else; allowed: position_embedding='rope' (keep NoPE models as orbax "
                     "checkpoints)")
  sc = cfg.rope_scaling
  if sc is None or sc.rope_type == "default":
    rope_scaling = None
  elif sc.rope_type == "linear":
    rope_scaling = {"rope_type": "linear", "factor": sc.factor}
  else:
    rope_scaling = {"rope_type": "llama3", "factor": sc.factor, "low_freq_factor": sc.low_freq_factor,
                    "high_freq_factor": sc.high_freq_factor,
                    "original_max_position_embeddings": sc.original_max_position_embeddings}
  hf = {
      "architectures": [arch],
      "model_type": _MODEL_TYPES[arch],
      "vocab_size": cfg.vocab_size,
      "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size,
      "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads,
      "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": cfg.max_position_embeddings,
      "rms_norm_eps": cfg.rms_norm_eps,
      "tie_word_embeddings": cfg.tie_word_embeddings,
      "rope_theta": cfg.rope_theta,
      "rope_scaling": rope_scaling,
      "rope_parameters": {"rope_type": "default", **(rope_scaling or {}), "rope_theta": cfg.rope_theta},
      "dtype": cfg.param_dtype,
      "use_cache": True,
  }
  if arch == "LlamaForCausalLM":
    hf.update(attention_bias=False, mlp_bias=False)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
  return hf


# ----------------------------------------------------------------------------------------------
# Tensor names


def _hf_name(path: tuple) -> tuple[str, bool]:
  """Our variable path -> (HF tensor name, whether HF stores it transposed)."""
  if path == ("embed_tokens",):
    return "model.embed_tokens.weight", False
  if path == ("lm_head",):
    return "lm_head.weight", True
  *prefix, leaf = (str(p) for p in path)
  if prefix and leaf == "kernel":
    return f"model.{'.'.join(prefix)}.weight", True
  if prefix and leaf in ("weight", "bias"):
    return f"model.{'.'.join(prefix)}.{leaf}", False
  raise ValueError(f"model variable {'/'.join(map(str, path))} has no HuggingFace tensor name")


def _named_variables(model_or_abstract) -> tuple[Any, Any, dict[str, tuple[nnx.Variable, bool]]]:
  """(graphdef, flat state, {hf_name: (variable, transposed)}) for a (possibly abstract) model."""
  graphdef, state = nnx.split(model_or_abstract)
  flat = nnx.to_flat_state(state)
  named = {}
  for path, var in flat:
    name, transposed = _hf_name(path)
    named[name] = (var, transposed)
  return graphdef, flat, named


# ----------------------------------------------------------------------------------------------
# Reading


class _CheckpointReader:
  """Reads named tensors, one at a time, from `model.safetensors` or a sharded index."""

  def __init__(self, path: pathlib.Path):
    index_file, single_file = path / INDEX_NAME, path / WEIGHTS_NAME
    if index_file.exists():
      weight_map = _read_json(index_file, "safetensors index").get("weight_map")
      if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_file}: no 'weight_map' of tensor name -> shard file; allowed: a "
                              "safetensors index as transformers writes it")
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not (path / f).exists()]
      if missing:
        raise CheckpointError(f"{index_file} lists shard files that do not exist: {missing}")
      self.source = str(index_file)
    elif single_file.exists():
      files = [WEIGHTS_NAME]
      self.source = str(single_file)
    else:
      raise CheckpointError(f"no weights in {path}: expected {WEIGHTS_NAME} or {INDEX_NAME}")
    self.path = path
    # name -> (file, header entry, absolute data start). Headers are tiny; the data stays on disk.
    self.entries: dict[str, tuple[str, dict, int]] = {}
    for f in files:
      header, data_start = _read_header(path / f)
      for name, info in header.items():
        self.entries[name] = (f, info, data_start)
    self._handles: dict[str, Any] = {}

  def __contains__(self, name: str) -> bool:
    return name in self.entries

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self.entries[name][1]["shape"])

  def get(self, name: str) -> np.ndarray:
    """The tensor as a host numpy array (bfloat16 via ml_dtypes)."""
    file, info, data_start = self.entries[name]
    code = info["dtype"]
    if code not in _ST_DTYPES:
      raise ValueError(f"tensor {name!r} in {file} has dtype {code}; allowed: {sorted(_ST_DTYPES)}")
    if code == "BF16":  # safetensors' numpy backend cannot build a bfloat16 array: read raw bytes.
      begin, end = info["data_offsets"]
      with open(self.path / file, "rb") as fh:
        fh.seek(data_start + begin)
        buf = fh.read(end - begin)
      return np.frombuffer(buf, ml_dtypes.bfloat16).reshape(info["shape"])
    try:
      if file not in self._handles:
        self._handles[file] = safetensors.safe_open(str(self.path / file), framework="numpy")
      return self._handles[file].get_tensor(name)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError and others
      raise CheckpointError(f"{self.path / file}: tensor {name!r} is unreadable ({type(e).__name__}: "
                            f"{e}); the file is corrupt or truncated") from None

  def close(self):
    self._handles.clear()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def _read_json(file: pathlib.Path, what: str) -> dict:
  """A JSON object from `file`; CheckpointError naming the file and what is wrong otherwise."""
  try:
    value = json.loads(file.read_text(encoding="utf-8"))
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{file}: {what} is not UTF-8 text ({e.reason} at byte {e.start})") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{file}: {what} is not valid JSON ({e.msg} at line {e.lineno}, column "
                          f"{e.colno})") from None
  if not isinstance(value, dict):
    raise CheckpointError(f"{file}: {what} must be a JSON object, got {type(value).__name__}")
  return value


def _read_header(file: pathlib.Path) -> tuple[dict, int]:
  """The safetensors JSON header (without `__metadata__`) and the byte offset where data starts.

  A safetensors file is: 8 bytes little-endian header length n, n bytes of JSON header
  {name: {dtype, shape, data_offsets: [begin, end]}}, then the data. Raises CheckpointError naming
  the file when it is too short, its header is not JSON, or a tensor ends past the file (truncated).
  """
  size = file.stat().st_size
  with open(file, "rb") as fh:
    raw = fh.read(8)
    if len(raw) < 8:
      raise CheckpointError(f"{file}: not a safetensors file ({size} bytes, fewer than the 8-byte header "
                            "length); it is empty or truncated")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise CheckpointError(f"{file}: not a safetensors file, or truncated: its header claims {n} bytes "
                            f"but the file has {size - 8} after the length field")
    text = fh.read(n)
  try:
    header = json.loads(text)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{file}: corrupt safetensors header (not valid JSON: {e})") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{file}: corrupt safetensors header (a JSON {type(header).__name__}, "
                          "expected an object of tensors)")
  header.pop("__metadata__", None)
  data_bytes = size - 8 - n
  for name, info in header.items():
    try:
      begin, end = info["data_offsets"]
      shape, dtype = list(info["shape"]), str(info["dtype"])
    except (TypeError, KeyError, ValueError):
      raise CheckpointError(f"{file}: corrupt safetensors header: entry {name!r} lacks dtype, shape "
                            "or data_offsets") from None
    if not 0 <= begin <= end or end > data_bytes:
      raise CheckpointError(f"{file}: truncated or corrupt: tensor {name!r} ({dtype}{shape}) spans bytes "
                            f"{begin}..{end} of the data, but the file holds {data_bytes} data bytes")
  return header, 8 + n


def _place(x: np.ndarray, var: nnx.Variable, mesh: Mesh | None, rules: Mapping[str, Any]) -> jax.Array:
  """Puts host array `x` on device(s): default device, or its logical-axis sharding on `mesh`."""
  if mesh is None:
    return jnp.asarray(x)
  axes = getattr(var, "logical_axes", None) or (None,) * x.ndim
  sharding = NamedSharding(mesh, logical_to_spec(axes, rules, x.shape, mesh))
  # Shard by shard: each process (host) builds only its own devices' pieces, never a whole copy.
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
  """The `config.json` dict of the checkpoint directory `path` (CheckpointError naming the file
  when the directory, the file or its JSON is missing or broken)."""
  path = pathlib.Path(path)
  if not path.is_dir():
    raise CheckpointError(f"{path}: no such checkpoint directory; allowed: a HF checkpoint directory "
                          f"with {CONFIG_NAME} and {WEIGHTS_NAME} (or {INDEX_NAME} and its shards)")
  file = path / CONFIG_NAME
  if not file.exists():
    raise CheckpointError(f"no {CONFIG_NAME} in {path}; allowed: a HF checkpoint directory with "
                          f"{CONFIG_NAME} and {WEIGHTS_NAME} (or {INDEX_NAME} and its shards)")
  return _read_json(file, CONFIG_NAME)


def check_checkpoint(path: str | os.PathLike) -> ModelConfig:
  """Checks a HF checkpoint directory without loading its tensors: config.json parses into a
  supported config, and every safetensors file's header is intact and covered by the file.
  Returns the ModelConfig; raises CheckpointError naming the file and what is wrong."""
  path = pathlib.Path(path)
  try:
    cfg = config_from_hf(read_hf_config(path))
  except ValueError as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{path / CONFIG_NAME}: {e}") from None
  _CheckpointReader(path).close()
  return cfg


def from_pretrained(path: str | os.PathLike, *, mesh: Mesh | None = None,
                    rules: Mapping[str, Any] | None = None, dtype=None, param_dtype=None,
                    execution: Mapping[str, Any] | None = None) -> Transformer:
  """Loads a HF Llama / Qwen2 checkpoint directory into a `Transformer`.

  Reads `config.json` and `model.safetensors` (or the shards of `model.safetensors.index.json`).
  The module is built abstractly; each tensor is then read alone, converted ([out, in] ->
  [in, out] for linear weights, cast to `param_dtype`) and placed directly in its final sharding
  `NamedSharding(mesh, logical_to_spec(var.logical_axes, rules))` when `mesh` is given (rules
  default to TRAIN_RULES), else on the default device. So the host holds at most one tensor.

  `param_dtype` defaults to the checkpoint's dtype, `dtype` (compute) to `param_dtype`.
  Raises FileNotFoundError for missing files, ValueError for a missing tensor or a shape mismatch
  (naming the tensor, its expected and found shape). Tensors the model does not use (rotary
  `inv_freq` buffers, `lm_head.weight` of a tied model) are skipped with a log message.
  Multi-host: every process calls it with the same global `mesh` and keeps only its own shards.
  `execution` (e.g. the run config's `model` section) sets the non-architecture fields
  (ModelConfig.EXECUTION_FIELDS: scan over layers, remat, attention kernel).
  """
  path = pathlib.Path(path)
  cfg = check_checkpoint(path)
  if execution is not None:
    cfg = cfg.with_execution(execution)
  if param_dtype is not None:
    cfg = cfg.replace(param_dtype=_dtype_name(param_dtype))
  cfg = cfg.replace(dtype=cfg.param_dtype if dtype is None else _dtype_name(dtype))
  rules = TRAIN_RULES if rules is None else rules

  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
  graphdef, flat, named = _named_variables(abstract)
  with _CheckpointReader(path) as reader:
    missing = [n for n in named if n not in reader]
    if missing:
      raise CheckpointError(f"checkpoint {reader.source} is missing {len(missing)} tensor(s) the "
                       f"{cfg.architecture} config needs: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    for name, (var, transposed) in named.items():
      want = tuple(var.get_value().shape)
      want_hf = want[::-1] if transposed else want
      found = reader.shape(name)
      if found != want_hf:
        raise CheckpointError(f"tensor {name!r} in {reader.source} has shape {found}; expected {want_hf} "
                         f"(HF layout{', [out, in]' if transposed else ''}) from config.json")
    extra = sorted(n for n in reader.entries if n not in named)
    if extra:
      benign = [n for n in extra if _BENIGN_EXTRA_RE.search(n) or
                (n == "lm_head.weight" and cfg.tie_word_embeddings)]
      if benign:
        logger.info("ignoring %d checkpoint tensors the model does not use: %s", len(benign), benign[:8])
      unknown = [n for n in extra if n not in benign]
      if unknown:
        logger.warning("ignoring %d unexpected checkpoint tensors: %s", len(unknown), unknown[:8])

    for name, (var, transposed) in named.items():
      x = reader.get(name).astype(var.get_value().dtype, copy=False)
      var.set_value(_place(x.T if transposed else x, var, mesh, rules))
      del x
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


# ----------------------------------------------------------------------------------------------
# Writing


def _plan_shards(sizes: dict[str, int], max_shard_bytes: int | None) -> list[list[str]]:
  """Groups tensor names, in order, into shards of at most `max_shard_bytes` (a larger tensor
  gets a shard of its own). One shard when the limit is None or not exceeded."""
  names = list(sizes)
  if max_shard_bytes is None or sum(sizes.values()) <= max_shard_bytes:
    return [names]
  shards, current, current_bytes = [], [], 0
  for name in names:
    if current and current_bytes + sizes[name] > max_shard_bytes:
      shards.append(current)
      current, current_bytes = [], 0
    current.append(name)
    current_bytes += sizes[name]
  shards.append(current)
  return shards


def save_pretrained(model: Transformer, path: str | os.PathLike, max_shard_bytes: int | None = None) -> None:
  """Writes `model` as a HF checkpoint directory that `from_pretrained` and transformers read.

  Writes `config.json` and `model.safetensors`; when the weights exceed `max_shard_bytes`, writes
  `model-0000i-of-0000n.safetensors` shards plus `model.safetensors.index.json` instead. Tensors
  keep the parameters' dtype, so the round trip is exact. A tied model writes no `lm_head.weight`
  (HF convention). Stale weight files of an earlier save in `path` are removed. Gathers one
  shard's tensors to the host at a time. Multi-host: every process must call it (arrays that span
  processes are all-gathered); only process 0 writes.
  """
  path = pathlib.Path(path)
  writer = jax.process_index() == 0
  if writer:
    path.mkdir(parents=True, exist_ok=True)
  hf_cfg = hf_config_from(model.cfg)
  _, _, named = _named_variables(model)
  sizes = {n: math.prod(v.get_value().shape) * v.get_value().dtype.itemsize for n, (v, _) in named.items()}
  shards = _plan_shards(sizes, max_shard_bytes)
  if len(shards) == 1:
    files = [WEIGHTS_NAME]
  else:
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]

  if writer:
    for stale in path.iterdir():
      is_weights = stale.name in (WEIGHTS_NAME, INDEX_NAME) or _SHARD_RE.match(stale.name)
      if is_weights and stale.name not in files:
        stale.unlink()
  weight_map = {}
  for file, names in zip(files, shards):
    arrays = {}
    for name in names:
      var, transposed = named[name]
      x = var.get_value()
      x = np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))
      arrays[name] = np.ascontiguousarray(x.T if transposed else x)
      weight_map[name] = file
    if writer:
      safetensors.numpy.save_file(arrays, str(path / file), metadata={"format": "pt"})
    del arrays
  if not writer:
    return
  if len(files) > 1:
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (path / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
  (path / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
