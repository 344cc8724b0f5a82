"""The fused cache-attention kernel (models/cache_attention.py) computes what XLA ops compute
(`attention` over `cache_mask`), alone, under a mesh and inside the rollout (Pallas's interpreter
on CPU); compiled for a v5p chip it reads the keys and values once where the XLA form counts the
float32 scores several times."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.spec_fixtures import EOS, copying_drafter, nearly_context_free_target, random_prompts, target_config
from tlt_jax.models.attention import AttentionSpec, attention
from tlt_jax.models.cache_attention import cache_attention
from tlt_jax.models.transformer import cache_mask
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.engine import FixedSelector, RolloutEngine
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.speculative import SpeculativeDecoder, Strategy


def _case(rng, b, t, h, kv, d, capacity, width):
  q = jnp.asarray(rng.normal(size=(b, t, h, d)), jnp.float32)
  ck = jnp.asarray(rng.normal(size=(b, kv, capacity, d)), jnp.float32)
  cv = jnp.asarray(rng.normal(size=(b, kv, capacity, d)), jnp.float32)
  start = rng.integers(0, width - t + 1, size=b)
  start[0] = 0  # a row whose block is all it sees
  block = np.tril(rng.random((b, t, t)) < 0.5) | np.eye(t, dtype=bool)[None]  # a tree: itself, some ancestors
  return q, ck, cv, jnp.asarray(block), jnp.asarray(start, jnp.int32)


def _reference(q, ck, cv, block, start, width):
  return attention(q, ck[:, :, :width], cv[:, :, :width], cache_mask(block, start, width), heads_first=True)


@pytest.mark.parametrize("t,capacity,width,chunk", [
    (1, 64, 64, 16),   # a decode step, chunks dividing the window
    (5, 70, 61, 16),   # a verify block, a window below the capacity and a partial last chunk
    (9, 40, 40, 64),   # one chunk wider than the window
])
def test_kernel_equals_xla_attention_over_the_cache_mask(t, capacity, width, chunk):
  q, ck, cv, block, start = _case(np.random.default_rng(t), 3, t, 6, 2, 8, capacity, width)
  got = cache_attention(q, ck, cv, block, start, width, chunk=chunk, interpret=True)
  np.testing.assert_allclose(got, _reference(q, ck, cv, block, start, width), atol=2e-6)


def test_kernel_reads_no_slot_past_the_live_context():
  """Slots at or past start + T (garbage, even NaN) change nothing: they are neither seen nor
  multiplied into the output."""
  q, ck, cv, block, start = _case(np.random.default_rng(1), 2, 3, 4, 2, 8, 48, 48)
  start = jnp.asarray([5, 20], jnp.int32)
  want = cache_attention(q, ck, cv, block, start, 48, chunk=16, interpret=True)
  live = (jnp.arange(48)[None, :] < (start + 3)[:, None])[:, None, :, None]
  poisoned = [jnp.where(live, c, jnp.nan) for c in (ck, cv)]
  got = cache_attention(q, *poisoned, block, start, 48, chunk=16, interpret=True)
  np.testing.assert_array_equal(got, want)


def test_kernel_under_a_mesh_equals_one_device():
  """Rows over ('data', 'fsdp'), KV heads over 'tensor' under shard_map (8 CPU devices)."""
  mesh = mesh_lib.make_mesh((2, 2, 2), jax.devices()[:8])
  q, ck, cv, block, start = _case(np.random.default_rng(2), 4, 4, 8, 2, 8, 32, 32)
  want = cache_attention(q, ck, cv, block, start, 32, chunk=8, interpret=True)
  got = jax.jit(lambda *a: cache_attention(*a, 32, mesh=mesh, chunk=8, interpret=True))(q, ck, cv, block, start)
  np.testing.assert_allclose(got, want, atol=1e-6)


def test_cache_spec_resolves_auto_by_the_platform():
  cfg = target_config()
  assert AttentionSpec.for_cache(cfg).cache == "xla"  # CPU
  assert AttentionSpec.for_cache(cfg.replace(cache_attention="interpret")).cache == "interpret"
  assert AttentionSpec().cache == "xla"  # a forward given no spec partitions as XLA ops do
  with pytest.raises(ValueError, match="cache_attention"):
    cfg.replace(cache_attention="flash")


def test_rollout_with_the_kernel_equals_the_xla_rollout():
  """Plain greedy decoding with the kernel gives the XLA path's tokens, and speculative greedy
  decoding with it (a chain and a tree verify block) gives them too: lossless."""
  cfg = target_config()
  toks, plen = random_prompts(4, 6)
  sp = SamplingParams(temperature=0.0)
  xla_g, params = nnx.split(nearly_context_free_target(cfg))
  ker_g, _ = nnx.split(nearly_context_free_target(cfg.replace(cache_attention="interpret")))
  ref = RolloutEngine(xla_g, sp, eos_ids=EOS, chunk_size=8).generate(params, toks, plen, 24, jax.random.key(0))
  out = RolloutEngine(ker_g, sp, eos_ids=EOS, chunk_size=8).generate(params, toks, plen, 24, jax.random.key(0))
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
  dg, dparams = nnx.split(copying_drafter(cfg))
  strategies = (Strategy(3, 1, 3), Strategy(2, 2, 4))
  dec = SpeculativeDecoder(ker_g, dg, sp, EOS, strategies=strategies, rounds_per_chunk=3)
  spec = RolloutEngine(ker_g, sp, eos_ids=EOS, chunk_size=8, speculative=dec, spec_threshold=4096)
  for strategy in strategies:
    got = spec.generate(params, toks, plen, 24, jax.random.key(0), drafter_params=dparams,
                        selector=FixedSelector(strategy))
    np.testing.assert_array_equal(got.tokens, ref.tokens, err_msg=str(strategy))
    assert got.stats["spec_accept_len"] > 1.5, got.stats  # accepted keys and values were moved


def test_kernel_counts_the_cache_once_on_a_tpu():
  """Compiled for one v5p chip at 8 rows x 33,808 slots, a 5-token verify block: the XLA form
  counts over 2x the keys and values it must read (the float32 scores written and read back), the
  kernel within 2 % of them (its declared block copies)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from tlt_jax.analysis import aot
  rep = NamedSharding(Mesh(np.array(aot.topology_devices(aot.topology("v5p-8"))[:1]), ("x",)), P())
  b, t, h, kv, d, s = 8, 5, 7, 1, 128, 33808
  args = [jax.ShapeDtypeStruct(shape, dt, sharding=rep) for shape, dt in (
      ((b, t, h, d), jnp.bfloat16), ((b, kv, s, d), jnp.bfloat16), ((b, kv, s, d), jnp.bfloat16),
      ((b, t, t), jnp.bool_), ((b,), jnp.int32))]
  kv_bytes = 2 * b * kv * s * d * 2
  xla = jax.jit(lambda *a: _reference(*a, s)).lower(*args).compile()
  ker = jax.jit(lambda *a: cache_attention(*a, s)).lower(*args).compile()
  assert aot._cost(xla)["bytes accessed"] > 2 * kv_bytes
  assert kv_bytes <= aot._cost(ker)["bytes accessed"] < 1.02 * kv_bytes
