"""The transformer: a numpy reference forward, KV-cache prefill/decode, tree-masked decode, GQA,
RoPE scaling, the dtype policy, parameter layout and config validation.

Weights are unit-scale random (tests/tiny.py), so logits are O(1) and a wrong mask, position or
head grouping moves them far beyond the float32 tolerance.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tlt_jax.models.config import ModelConfig, RopeScaling
from tlt_jax.models.transformer import KVCache, init_model, rope_inv_freq
from tlt_jax.parallel.mesh import TRAIN_RULES
from tests.tiny import VOCAB, cast_params, random_state, tiny_config
from tests.numerics import assert_close



# ----------------------------------------------------------------------------- numpy reference


def np_rope_inv_freq(head_dim, theta, scaling=None):
  """theta^(-2i/D); with Llama-3.1 scaling as Meta's reference `apply_scaling` states it, one
  frequency at a time: keep wavelengths below original_len / high_freq_factor, divide those above
  original_len / low_freq_factor by factor, and interpolate linearly in original_len / wavelen
  between the two."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is None or scaling.rope_type == "default":
    return freqs
  if scaling.rope_type == "linear":
    return freqs / scaling.factor
  low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
  high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
  out = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_wavelen:
      out.append(freq)
    elif wavelen > low_wavelen:
      out.append(freq / scaling.factor)
    else:
      smooth = ((scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor)
                / (scaling.high_freq_factor - scaling.low_freq_factor))
      out.append((1 - smooth) * freq / scaling.factor + smooth * freq)
  return np.asarray(out)


def np_forward(cfg: ModelConfig, params, tokens_T, positions_T):
  """One sequence through the model in float64 numpy: (logits [T, V], hidden [T, D])."""
  p = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
  p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  h, kv, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

  def rms(x, w):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps) * w

  def linear(x, lin):
    return x @ lin["kernel"] + lin.get("bias", 0.0)

  def rotate_half(x):
    x1, x2 = x[..., : dh // 2], x[..., dh // 2:]
    return np.concatenate([-x2, x1], -1)

  angles = np.asarray(positions_T, np.float64)[:, None] * np_rope_inv_freq(dh, cfg.rope_theta, cfg.rope_scaling)
  cos = np.cos(np.concatenate([angles, angles], -1))[:, None]  # [T, 1, dh]
  sin = np.sin(np.concatenate([angles, angles], -1))[:, None]
  t = len(tokens_T)
  causal = np.tril(np.ones((t, t), bool))
  x = p["embed_tokens"][np.asarray(tokens_T)]
  for i in range(cfg.num_layers):
    lp = p["layers"][i]
    a = rms(x, lp["input_layernorm"]["weight"])
    q = linear(a, lp["self_attn"]["q_proj"]).reshape(t, h, dh)
    k = linear(a, lp["self_attn"]["k_proj"]).reshape(t, kv, dh)
    v = linear(a, lp["self_attn"]["v_proj"]).reshape(t, kv, dh)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    k, v = np.repeat(k, h // kv, axis=1), np.repeat(v, h // kv, axis=1)  # query head j uses kv head j // G
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(dh)
    scores = np.where(causal[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    x = x + linear(np.einsum("hts,shd->thd", probs, v).reshape(t, h * dh), lp["self_attn"]["o_proj"])
    m = rms(x, lp["post_attention_layernorm"]["weight"])
    gate = linear(m, lp["mlp"]["gate_proj"])
    x = x + linear(gate / (1 + np.exp(-gate)) * linear(m, lp["mlp"]["up_proj"]), lp["mlp"]["down_proj"])
  hidden = rms(x, p["norm"]["weight"])
  head = p["embed_tokens"].T if cfg.tie_word_embeddings else p["lm_head"]
  return hidden @ head, hidden


REFERENCE_CASES = {
    "mha_kv=heads_tied": dict(num_kv_heads=4),
    "gqa_kv=2_bias_untied": dict(num_kv_heads=2, qkv_bias=True, tie_word_embeddings=False),
    "mqa_kv=1_bias": dict(num_kv_heads=1, qkv_bias=True),
    "one_layer_llama3_rope": dict(num_layers=1, num_kv_heads=2, rope_scaling=RopeScaling(
        "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64)),
    "head_dim_16_not_hidden_over_heads": dict(num_kv_heads=2, head_dim=16),
}


@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_forward_matches_numpy_reference(case):
  cfg = tiny_config(**REFERENCE_CASES[case])
  graphdef, params = random_state(cfg, seed=1)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, VOCAB, (2, 9)).astype(np.int32)
  positions = np.stack([np.arange(9), 50 + np.arange(9)]).astype(np.int32)  # RoPE at non-zero offsets
  logits, hidden, cache = jax.jit(lambda p, t, pos: nnx.merge(graphdef, p)(t, pos))(params, tokens, positions)
  assert cache is None and logits.dtype == jnp.float32 and logits.shape == (2, 9, VOCAB)
  for b in range(2):
    ref_logits, ref_hidden = np_forward(cfg, params, tokens[b], positions[b])
    assert np.abs(ref_logits).max() > 1.0  # O(1) logits: the tolerance is meaningful
    assert_close(logits[b], ref_logits)
    assert_close(hidden[b], ref_hidden)

  # The head: embed^T when tied, lm_head when not (and then not embed^T).
  pure = nnx.to_pure_dict(params)
  embed = np.asarray(pure["embed_tokens"], np.float64)
  hidden64 = np.asarray(hidden, np.float64)
  if cfg.tie_word_embeddings:
    assert_close(logits, hidden64 @ embed.T)
  else:
    assert_close(logits, hidden64 @ np.asarray(pure["lm_head"], np.float64))
    assert np.abs(np.asarray(logits) - hidden64 @ embed.T).max() > 0.1

  # The reference's power: swapping the kv heads (a wrong query-to-kv grouping) moves the logits.
  if 1 < cfg.num_kv_heads < cfg.num_heads:
    swapped = jax.tree.map(np.asarray, pure)
    kd = cfg.num_kv_heads * cfg.head_dim
    for layer in swapped["layers"].values():
      for proj in ("k_proj", "v_proj"):
        kern = layer["self_attn"][proj]["kernel"]
        layer["self_attn"][proj]["kernel"] = kern.reshape(-1, cfg.num_kv_heads, cfg.head_dim)[:, ::-1].reshape(-1, kd)
    wrong = np_forward(cfg, swapped, tokens[0], positions[0])[0]
    assert np.abs(np.asarray(logits[0]) - wrong).max() > 1e-3


# ----------------------------------------------------------------------------- KV cache


@pytest.fixture(scope="module")
def tiny():
  """The tiny model with jitted cached and uncached forwards (each shape compiles once)."""
  cfg = tiny_config()
  graphdef, params = random_state(cfg, seed=0)

  @jax.jit
  def cached(p, tokens, positions, cache, mask):
    return nnx.merge(graphdef, p)(tokens, positions, cache=cache, attn_mask_BxTxT=mask)

  @jax.jit
  def uncached_jit(p, tokens_1xT):
    return nnx.merge(graphdef, p)(tokens_1xT)[:2]

  def uncached(tokens_T):
    """The plain forward of one unpadded sequence: (logits [T, V], hidden [T, D])."""
    logits, hidden = uncached_jit(params, jnp.asarray(tokens_T, jnp.int32)[None])
    return np.asarray(logits[0]), np.asarray(hidden[0])

  return cfg, params, cached, uncached


def _right_pad(seqs, width, filler=7):
  out = np.full((len(seqs), width), filler, np.int32)  # a non-pad filler: padding must not matter
  for b, s in enumerate(seqs):
    out[b, :len(s)] = s
  return out


def _prefill(cfg, params, cached, prompts, lens, capacity=16):
  """Right-padded prefill of every prompt slot, then the cache keeps only the true lengths."""
  cache = KVCache.init(cfg, len(lens), capacity)
  logits, hidden, cache = cached(params, _right_pad(prompts, 7), None, cache, None)
  assert cache.lengths.tolist() == [7] * len(lens)
  return logits, hidden, cache.replace(lengths=jnp.asarray(lens, jnp.int32))


def test_padded_prefill_then_cached_decode_matches_uncached_forward(tiny):
  cfg, params, cached, uncached = tiny
  rng = np.random.default_rng(1)
  lens = np.array([5, 2, 7], np.int32)
  seqs = [rng.integers(3, VOCAB, n + 2).astype(np.int32) for n in lens]  # prompt + 2 decoded tokens
  prefill_logits, prefill_hidden, cache = _prefill(cfg, params, cached, [s[:n] for s, n in zip(seqs, lens)], lens)

  # Decode step 1 with explicit per-sequence positions; step 2 with positions from cache.lengths.
  step1 = np.array([s[n] for s, n in zip(seqs, lens)])[:, None]
  d1_logits, d1_hidden, cache = cached(params, step1, lens[:, None], cache, None)
  assert cache.lengths.tolist() == (lens + 1).tolist()
  step2 = np.array([s[n + 1] for s, n in zip(seqs, lens)])[:, None]
  d2_logits, d2_hidden, cache = cached(params, step2, None, cache, None)
  assert cache.lengths.tolist() == (lens + 2).tolist()

  for b, n in enumerate(lens):
    ref_logits, ref_hidden = uncached(seqs[b])
    assert_close(ref_logits, np_forward(cfg, params, seqs[b], np.arange(n + 2))[0])
    assert_close(prefill_logits[b, :n], ref_logits[:n])
    assert_close(prefill_hidden[b, :n], ref_hidden[:n])
    assert_close(d1_logits[b, 0], ref_logits[n])
    assert_close(d1_hidden[b, 0], ref_hidden[n])
    assert_close(d2_logits[b, 0], ref_logits[n + 1])
    assert_close(d2_hidden[b, 0], ref_hidden[n + 1])


def test_tree_masked_decode_matches_each_branch_decoded_alone(tiny):
  """Two branches of depth 2 written in one call under a tree mask == each branch by plain causal
  cached decode from the same prefix (and == the uncached forward of prefix + branch)."""
  cfg, params, cached, uncached = tiny
  rng = np.random.default_rng(2)
  lens = np.array([7, 2, 5], np.int32)
  prompts = [rng.integers(3, VOCAB, n).astype(np.int32) for n in lens]
  _, _, prefix_cache = _prefill(cfg, params, cached, prompts, lens)

  branch_a = rng.integers(3, VOCAB, (3, 2)).astype(np.int32)
  branch_b = rng.integers(3, VOCAB, (3, 2)).astype(np.int32)
  tree_tokens = np.concatenate([branch_a, branch_b], axis=1)  # nodes a1 a2 b1 b2
  tree_mask = np.array([[1, 0, 0, 0],   # a1 sees itself (and the prefix)
                        [1, 1, 0, 0],   # a2 sees a1
                        [0, 0, 1, 0],   # b1 sees itself
                        [0, 0, 1, 1]],  # b2 sees b1
                       bool)
  tree_positions = lens[:, None] + np.array([0, 1, 0, 1], np.int32)
  tree_logits, tree_hidden, tree_cache = cached(
      params, tree_tokens, tree_positions, prefix_cache, np.broadcast_to(tree_mask, (3, 4, 4)))
  assert tree_cache.lengths.tolist() == (lens + 4).tolist()

  branch_pos = lens[:, None] + np.arange(2, dtype=np.int32)
  for cols, branch in ((slice(0, 2), branch_a), (slice(2, 4), branch_b)):
    ref_logits, ref_hidden, _ = cached(params, branch, branch_pos, prefix_cache, None)
    assert_close(tree_logits[:, cols], ref_logits)
    assert_close(tree_hidden[:, cols], ref_hidden)
    for b, n in enumerate(lens):
      full_logits, _ = uncached(np.concatenate([prompts[b], branch[b]]))
      assert_close(tree_logits[b, cols], full_logits[n:])
  # The mask matters: the same nodes under a plain causal mask give different b-branch logits.
  causal = np.broadcast_to(np.tril(np.ones((4, 4), bool)), (3, 4, 4))
  causal_logits, _, _ = cached(params, tree_tokens, tree_positions, prefix_cache, causal)
  assert_close(causal_logits[:, :2], tree_logits[:, :2])
  assert np.abs(causal_logits[:, 2:] - tree_logits[:, 2:]).max() > 1e-2


# ----------------------------------------------------------------------------- RoPE scaling


def test_llama3_rope_scaling_follows_the_published_rule():
  sc = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=256)
  cfg = tiny_config(hidden_size=64, num_heads=1, num_kv_heads=1, head_dim=64, rope_theta=10000.0,
                    rope_scaling=sc)
  got = np.asarray(rope_inv_freq(cfg), np.float64)
  ref = np_rope_inv_freq(64, 10000.0, sc)
  base = np_rope_inv_freq(64, 10000.0)
  np.testing.assert_allclose(got, ref, rtol=2e-6, atol=0)
  wavelen = 2 * np.pi / base
  high, low = wavelen < 256 / 4, wavelen > 256 / 1
  medium = ~high & ~low
  assert high.any() and medium.any() and low.any()  # all three regimes are exercised
  np.testing.assert_allclose(got[high], base[high], rtol=2e-6)
  np.testing.assert_allclose(got[low], base[low] / 8.0, rtol=2e-6)
  assert np.all((got[medium] < base[medium]) & (got[medium] > base[medium] / 8.0))

  linear = tiny_config(rope_scaling=RopeScaling("linear", factor=4.0))
  np.testing.assert_allclose(rope_inv_freq(linear), np_rope_inv_freq(8, 10000.0) / 4.0, rtol=2e-6)
  np.testing.assert_allclose(rope_inv_freq(tiny_config()), np_rope_inv_freq(8, 10000.0), rtol=2e-6)


def test_rope_scaling_config_validation():
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    RopeScaling("yarn")
  with pytest.raises(ValueError, match="high_freq_factor"):
    RopeScaling("llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0)
  cfg = tiny_config(rope_scaling={"rope_type": "linear", "factor": 2.0})  # dicts are converted
  assert cfg.rope_scaling == RopeScaling("linear", factor=2.0)


# ----------------------------------------------------------------------------- dtype policy


def _dtypes(params):
  return {x.dtype for x in jax.tree.leaves(params)}


def test_bf16_policy_params_compute_and_float32_logits():
  tokens = (np.arange(20, dtype=np.int32).reshape(2, 10) * 7) % VOCAB
  cfg32 = tiny_config()
  _, p32 = random_state(cfg32, seed=3)
  ref_logits = np.stack([np_forward(cfg32, p32, t, np.arange(10))[0] for t in tokens])
  scale = np.abs(ref_logits).max()
  abstract = nnx.split(nnx.eval_shape(lambda: init_model(tiny_config(param_dtype="bfloat16"))))[1]
  assert _dtypes(abstract) == {jnp.dtype(jnp.bfloat16)}

  for param_dtype in ("bfloat16", "float32"):
    cfg = tiny_config(param_dtype=param_dtype, dtype="bfloat16")
    graphdef, params = random_state(cfg, seed=3)
    assert _dtypes(params) == {jnp.dtype(param_dtype)}

    with_cache = param_dtype == "bfloat16"

    @jax.jit
    def run(p, t):
      model = nnx.merge(graphdef, p)
      logits, hidden, _ = model(t)
      if not with_cache:
        return logits, hidden, None, None
      cache = KVCache.init(cfg, 2, capacity=16)
      _, _, cache = model(t[:, :9], cache=cache)
      step_logits, _, cache = model(t[:, 9:], cache=cache)
      return logits, hidden, step_logits, cache.k[0]

    logits, hidden, step_logits, cache_k = run(params, tokens)
    assert logits.dtype == jnp.float32 and hidden.dtype == jnp.bfloat16
    err = np.abs(np.asarray(logits) - ref_logits).max()
    assert 0 < err < 0.05 * scale, (param_dtype, err, scale)  # bf16 compute: close, not identical
    if with_cache:  # the cache is kept in the compute dtype; cached decode matches the forward
      assert cache_k.dtype == jnp.bfloat16 and step_logits.dtype == jnp.float32
      np.testing.assert_allclose(step_logits[:, 0], logits[:, 9], atol=0.05 * scale)

  # The bf16 weights are the f32 ones rounded: casting the f32 params reproduces them exactly.
  _, pbf = random_state(tiny_config(param_dtype="bfloat16", dtype="bfloat16"), seed=3)
  for a, b in zip(jax.tree.leaves(pbf), jax.tree.leaves(cast_params(p32, jnp.bfloat16))):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# ----------------------------------------------------------------------------- parameter layout


def _param_paths(params):
  flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  return {jax.tree_util.keystr(p): v for p, v in flat}


@pytest.mark.parametrize("tie,bias", [(True, False), (False, True)])
def test_param_layout_tied_untied_bias_and_logical_axes(tie, bias):
  cfg = tiny_config(tie_word_embeddings=tie, qkv_bias=bias)
  graphdef, params = random_state(cfg, seed=4)
  model = nnx.merge(graphdef, params)
  paths = _param_paths(params)

  for name, var in paths.items():
    assert isinstance(var, nnx.Param), name
    axes = var.logical_axes
    assert isinstance(axes, tuple) and len(axes) == var[...].ndim, (name, axes)
    assert all(a in TRAIN_RULES for a in axes), (name, axes)
  assert sum(v[...].size for v in paths.values()) == cfg.num_params

  biases = {n for n in paths if n.endswith("['bias']")}
  if bias:  # Qwen2: q, k and v carry biases, o does not
    assert biases == {f"['layers'][{i}]['self_attn']['{p}_proj']['bias']"
                      for i in range(cfg.num_layers) for p in "qkv"}
  else:
    assert not biases

  assert paths["['embed_tokens']"].logical_axes == ("vocab", "embed")
  if tie:
    assert model.lm_head is None and "['lm_head']" not in paths
  else:
    head = paths["['lm_head']"]
    assert head[...].shape == (cfg.hidden_size, VOCAB) and head.logical_axes == ("embed", "vocab")
  # (That the head is used as embed^T / lm_head is checked against numpy above.)


# ----------------------------------------------------------------------------- config validation


@pytest.mark.parametrize("changes,pattern", [
    (dict(num_heads=4, num_kv_heads=3), r"model\.num_heads=4 .*model\.num_kv_heads=3"),
    (dict(head_dim=7), r"model\.head_dim=7 must be even"),
    (dict(hidden_size=30, num_heads=4, num_kv_heads=2), r"model\.hidden_size=30 .*model\.num_heads=4"),
    (dict(dtype="float64"), r"model\.dtype='float64'.*allowed.*bfloat16"),
    (dict(param_dtype="int8"), r"model\.param_dtype='int8'.*allowed.*float32"),
    (dict(vocab_size=0), r"model\.vocab_size=0 must be a positive int"),
    (dict(num_layers=2.0), r"model\.num_layers=2\.0 must be a positive int"),
])
def test_model_config_errors_name_key_and_value(changes, pattern):
  with pytest.raises(ValueError, match=pattern):
    tiny_config(**changes)


def test_model_config_round_trip_and_unknown_keys():
  cfg = tiny_config(rope_scaling=RopeScaling("llama3", factor=8.0))
  assert ModelConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match=r"unknown model config keys \['hidden'\]"):
    ModelConfig.from_dict({**cfg.to_dict(), "hidden": 3})
