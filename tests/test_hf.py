"""HF checkpoint loading / saving, pinned to golden logits from transformers.

Fixtures (tests/fixtures/hf/, made by scripts/make_golden_fixtures.py):
  qwen2_tiny  Qwen2ForCausalLM, tied embeddings, q/k/v bias, single model.safetensors.
  llama_tiny  LlamaForCausalLM, untied, Llama-3 RoPE scaling, GQA, head_dim != hidden / heads,
              sharded with model.safetensors.index.json.
"""

import functools
import json
import logging
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from tlt_jax.errors import CheckpointError
from tlt_jax.models import hf
from tlt_jax.models.config import ModelConfig, RopeScaling
from tlt_jax.models.transformer import KVCache
from tlt_jax.parallel.mesh import SAMPLE_RULES, TRAIN_RULES, logical_to_spec, make_mesh
from tests.numerics import assert_close

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
NAMES = ("qwen2_tiny", "llama_tiny")


@functools.lru_cache(maxsize=None)
def _golden(name):
  g = np.load(FIXTURES / name / "golden.npz")
  return g["tokens"], g["logits"]


@functools.lru_cache(maxsize=None)
def _model(name):
  return hf.from_pretrained(FIXTURES / name)


@nnx.jit
def _forward(model, tokens_BxT, cache=None):
  logits, _, cache = model(tokens_BxT, cache=cache)
  return logits, cache


def _flat_params(model):
  return {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(model))}


# ---------------------------------------------------------------------------------------------
# (a) golden logits, (b) cached decode


def test_fixtures_cover_both_layouts():
  q, l = _model("qwen2_tiny").cfg, _model("llama_tiny").cfg
  assert q.architecture == "Qwen2ForCausalLM" and q.qkv_bias and q.tie_word_embeddings
  assert l.architecture == "LlamaForCausalLM" and not l.qkv_bias and not l.tie_word_embeddings
  assert l.rope_scaling.rope_type == "llama3" and l.num_kv_heads < l.num_heads
  assert l.head_dim * l.num_heads != l.hidden_size
  assert (FIXTURES / "llama_tiny" / hf.INDEX_NAME).exists()
  assert not (FIXTURES / "qwen2_tiny" / hf.INDEX_NAME).exists()
  assert sum(f.stat().st_size for f in FIXTURES.rglob("*") if f.is_file()) < 1_500_000  # three tiny checkpoints (Qwen2, Llama, Qwen2 chat)


@pytest.mark.parametrize("name", NAMES)
def test_forward_matches_golden(name):
  tokens, golden = _golden(name)
  logits, _ = _forward(_model(name), jnp.asarray(tokens))
  assert logits.dtype == jnp.float32 and logits.shape == golden.shape
  assert_close(logits, golden)


@pytest.mark.parametrize("name", NAMES)
def test_prefill_then_cached_decode_matches_golden(name):
  model = _model(name)
  tokens, golden = _golden(name)
  b, t = tokens.shape
  prefill = 7
  cache = KVCache.init(model.cfg, b, capacity=16)
  logits, cache = _forward(model, jnp.asarray(tokens[:, :prefill]), cache)
  assert_close(logits, golden[:, :prefill])
  for i in range(prefill, t):
    logits, cache = _forward(model, jnp.asarray(tokens[:, i:i + 1]), cache)
    assert_close(logits[:, 0], golden[:, i], err_msg=f"decode step at position {i}")
  np.testing.assert_array_equal(cache.lengths, [t] * b)


# ---------------------------------------------------------------------------------------------
# (c) save -> load round trip


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("max_shard_bytes", [None, 40_000])
def test_save_load_round_trip_is_exact(name, max_shard_bytes, tmp_path):
  model = _model(name)
  hf.save_pretrained(model, tmp_path, max_shard_bytes=max_shard_bytes)
  shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
  if max_shard_bytes is None:
    assert (tmp_path / hf.WEIGHTS_NAME).exists() and not shards
    assert not (tmp_path / hf.INDEX_NAME).exists()
  else:
    assert not (tmp_path / hf.WEIGHTS_NAME).exists() and len(shards) > 2
    index = json.loads((tmp_path / hf.INDEX_NAME).read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    for shard in shards:
      tensors = safetensors.numpy.load_file(tmp_path / shard)
      assert len(tensors) == 1 or sum(x.nbytes for x in tensors.values()) <= max_shard_bytes
  saved_names = set(json.loads((tmp_path / hf.INDEX_NAME).read_text())["weight_map"]) if shards else set(
      safetensors.numpy.load_file(tmp_path / hf.WEIGHTS_NAME))
  assert ("lm_head.weight" in saved_names) == (not model.cfg.tie_word_embeddings)

  loaded = hf.from_pretrained(tmp_path)
  assert loaded.cfg == model.cfg
  want, got = _flat_params(model), _flat_params(loaded)
  assert want.keys() == got.keys()
  for path in want:
    assert got[path].dtype == want[path].dtype, path
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=str(path))


def test_bfloat16_round_trip_and_resave_replaces_old_files(tmp_path):
  model = hf.from_pretrained(FIXTURES / "llama_tiny", param_dtype=jnp.bfloat16)
  assert model.cfg.param_dtype == model.cfg.dtype == "bfloat16"
  assert model.embed_tokens[...].dtype == jnp.bfloat16
  hf.save_pretrained(model, tmp_path, max_shard_bytes=20_000)  # sharded first ...
  hf.save_pretrained(model, tmp_path)                           # ... then one file over it
  assert sorted(p.name for p in tmp_path.iterdir()) == [hf.CONFIG_NAME, hf.WEIGHTS_NAME]
  header, _ = hf._read_header(tmp_path / hf.WEIGHTS_NAME)
  assert {info["dtype"] for info in header.values()} == {"BF16"}
  loaded = hf.from_pretrained(tmp_path)
  assert loaded.cfg == model.cfg
  want, got = _flat_params(model), _flat_params(loaded)
  for path in want:
    assert got[path].dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), err_msg=str(path))
  # float32 compute over bfloat16 storage, and upcasting a checkpoint on load.
  mixed = hf.from_pretrained(tmp_path, dtype="float32")
  assert (mixed.cfg.param_dtype, mixed.cfg.dtype) == ("bfloat16", "float32")
  up = hf.from_pretrained(tmp_path, param_dtype="float32")
  np.testing.assert_array_equal(np.asarray(up.lm_head[...]), np.asarray(model.lm_head[...], np.float32))


@pytest.mark.parametrize("name", NAMES)
def test_config_round_trip(name):
  cfg = _model(name).cfg
  assert hf.config_from_hf(hf.hf_config_from(cfg)) == cfg
  on_disk = json.loads((FIXTURES / name / hf.CONFIG_NAME).read_text())
  assert hf.config_from_hf(on_disk) == cfg


def test_config_reads_transformers4_rope_keys():
  v5 = json.loads((FIXTURES / "llama_tiny" / hf.CONFIG_NAME).read_text())
  v4 = {k: v for k, v in v5.items() if k not in ("rope_parameters", "dtype")}
  params = dict(v5["rope_parameters"])
  v4["rope_theta"] = params.pop("rope_theta")
  params["type"] = params.pop("rope_type")  # the oldest spelling
  v4.update(rope_scaling=params, torch_dtype="float32")
  assert hf.config_from_hf(v4) == hf.config_from_hf(v5)
  assert hf.config_from_hf(v4).rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 32)
  qwen = {"architectures": ["Qwen2ForCausalLM"], "vocab_size": 8, "hidden_size": 8,
          "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
          "rope_theta": 1e6, "rope_scaling": None, "torch_dtype": "bfloat16"}
  cfg = hf.config_from_hf(qwen)
  assert (cfg.rope_theta, cfg.rope_scaling, cfg.num_kv_heads, cfg.param_dtype) == (1e6, None, 2, "bfloat16")
  linear = hf.config_from_hf({**qwen, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                          "rope_theta": 500.0}})
  assert (linear.rope_theta, linear.rope_scaling) == (500.0, RopeScaling("linear", 2.0))


# ---------------------------------------------------------------------------------------------
# (d) loading onto an 8-device mesh


@pytest.mark.parametrize("name", NAMES)
def test_load_onto_mesh_shards_each_array(name):
  mesh = make_mesh((2, 2, 2))
  model = hf.from_pretrained(FIXTURES / name, mesh=mesh)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    x = var.get_value()
    want = NamedSharding(mesh, logical_to_spec(var.logical_axes, TRAIN_RULES, x.shape, mesh))
    assert x.sharding == want, path
  q_kernel = model.layers[0].self_attn.q_proj.kernel[...]
  assert q_kernel.sharding.spec == P("fsdp", "tensor")
  assert len(q_kernel.addressable_shards) == 8 and q_kernel.addressable_shards[0].data.shape == (
      q_kernel.shape[0] // 2, q_kernel.shape[1] // 2)
  tokens, golden = _golden(name)
  logits, _ = _forward(model, jnp.asarray(tokens))
  assert_close(logits, golden)
  assert_close(logits, _forward(_model(name), jnp.asarray(tokens))[0])  # sharded == single device


def test_load_with_sample_rules():
  mesh = make_mesh((2, 2, 2))
  model = hf.from_pretrained(FIXTURES / "llama_tiny", mesh=mesh, rules=SAMPLE_RULES)
  assert model.embed_tokens[...].sharding.spec == P("tensor", None)
  assert model.lm_head[...].sharding.spec == P(None, "tensor")


# ---------------------------------------------------------------------------------------------
# (e) clear errors


def _copy(name, tmp_path):
  return pathlib.Path(shutil.copytree(FIXTURES / name, tmp_path / name))


def test_unsupported_architecture_and_rope():
  base = json.loads((FIXTURES / "llama_tiny" / hf.CONFIG_NAME).read_text())
  with pytest.raises(ValueError, match=r"MistralForCausalLM.*allowed.*LlamaForCausalLM.*Qwen2ForCausalLM"):
    hf.config_from_hf({**base, "architectures": ["MistralForCausalLM"]})
  with pytest.raises(ValueError, match=r"model_type='gpt2'.*allowed"):
    hf.config_from_hf({**{k: v for k, v in base.items() if k != "architectures"}, "model_type": "gpt2"})
  with pytest.raises(ValueError, match=r"rope type 'yarn'.*allowed.*llama3"):
    hf.config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})
  with pytest.raises(ValueError, match="attention_bias"):
    hf.config_from_hf({**base, "attention_bias": True})
  with pytest.raises(ValueError, match=r"hidden_act='gelu'"):
    hf.config_from_hf({**base, "hidden_act": "gelu"})
  with pytest.raises(ValueError, match="missing required key 'vocab_size'"):
    hf.config_from_hf({k: v for k, v in base.items() if k != "vocab_size"})
  cfg = ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
                    num_kv_heads=2)
  with pytest.raises(ValueError, match="Qwen2ForCausalLM"):
    hf.hf_config_from(cfg.replace(qkv_bias=True))
  with pytest.raises(ValueError, match="qkv_bias=False"):
    hf.hf_config_from(cfg.replace(architecture="Qwen2ForCausalLM"))


def test_missing_tensor(tmp_path):
  qwen = _copy("qwen2_tiny", tmp_path)
  tensors = safetensors.numpy.load_file(qwen / hf.WEIGHTS_NAME)
  del tensors["model.layers.1.mlp.up_proj.weight"]
  safetensors.numpy.save_file(tensors, qwen / hf.WEIGHTS_NAME)
  with pytest.raises(ValueError, match=r"missing 1 tensor.*model\.layers\.1\.mlp\.up_proj\.weight"):
    hf.from_pretrained(qwen)

  llama = _copy("llama_tiny", tmp_path)  # untied: lm_head is required
  index = json.loads((llama / hf.INDEX_NAME).read_text())
  shard = index["weight_map"].pop("lm_head.weight")
  tensors = safetensors.numpy.load_file(llama / shard)
  del tensors["lm_head.weight"]
  safetensors.numpy.save_file(tensors, llama / shard)
  (llama / hf.INDEX_NAME).write_text(json.dumps(index))
  with pytest.raises(ValueError, match=r"missing 1 tensor.*lm_head\.weight"):
    hf.from_pretrained(llama)


def test_shape_mismatch(tmp_path):
  qwen = _copy("qwen2_tiny", tmp_path)
  config = json.loads((qwen / hf.CONFIG_NAME).read_text())
  (qwen / hf.CONFIG_NAME).write_text(json.dumps({**config, "intermediate_size": 80}))
  with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight'.*shape \(64, 96\); "
                                       r"expected \(64, 80\)"):
    hf.from_pretrained(qwen)


def test_missing_files(tmp_path):
  with pytest.raises(CheckpointError, match="config.json"):
    hf.from_pretrained(tmp_path)
  shutil.copy(FIXTURES / "qwen2_tiny" / hf.CONFIG_NAME, tmp_path / hf.CONFIG_NAME)
  with pytest.raises(CheckpointError, match=r"model\.safetensors or model\.safetensors\.index\.json"):
    hf.from_pretrained(tmp_path)
  llama = _copy("llama_tiny", tmp_path)
  (llama / "model-00002-of-00003.safetensors").unlink()
  with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors"):
    hf.from_pretrained(llama)


def test_extra_tensors_are_ignored_with_a_log(tmp_path, caplog):
  qwen = _copy("qwen2_tiny", tmp_path)
  tensors = safetensors.numpy.load_file(qwen / hf.WEIGHTS_NAME)
  tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8, np.float32)
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied: present but unused
  tensors["model.layers.0.mystery"] = np.ones(3, np.float32)
  safetensors.numpy.save_file(tensors, qwen / hf.WEIGHTS_NAME)
  with caplog.at_level(logging.INFO, logger="tlt_jax.models.hf"):
    model = hf.from_pretrained(qwen)
  assert "rotary_emb.inv_freq" in caplog.text and "lm_head.weight" in caplog.text
  assert any(r.levelno == logging.WARNING and "mystery" in r.getMessage() for r in caplog.records)
  tokens, golden = _golden("qwen2_tiny")
  assert_close(_forward(model, jnp.asarray(tokens))[0], golden)
