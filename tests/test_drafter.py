"""EAGLE drafter: index alignment, frozen target, cache / tree-mask equivalence, config checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tlt_jax.drafter import (EagleDrafter, TargetHead, check_compatible, collect_target_features,
                             drafter_loss, drafter_state_shardings, init_drafter,
                             init_drafter_train_state, make_drafter_train_step,
                             target_head_shardings, warmup_drafter)
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import KVCache, init_model
from tlt_jax.parallel.mesh import batch_sharding, make_mesh
from tests.numerics import assert_close

CFG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, tie_word_embeddings=False)
B, L = 8, 16
OPT = optax.adam(3e-3)
_loss = nnx.jit(drafter_loss)


@functools.cache
def _plain_step():
  """One compiled unsharded train step shared by the tests (compiles are the slow part)."""
  return make_drafter_train_step(nnx.graphdef(init_drafter(CFG)), OPT, CFG)


@functools.cache
def _target():
  """A tiny random target whose head is sharp enough for top-1 / CE to mean something (shared:
  building it eagerly is slow, and no test may change it)."""
  target = init_model(CFG, seed=0)
  target.embed_tokens[...] = target.embed_tokens[...] * 25.0
  target.lm_head[...] = target.lm_head[...] * 25.0
  return target


def _loss_mask(prompt_len, end):
  """loss_mask[b, t] = 1 iff x_{t+1} is a response token: responses occupy [P_b, E_b]."""
  t = np.arange(L)[None]
  return ((t >= np.asarray(prompt_len)[:, None] - 1) & (t <= np.asarray(end)[:, None] - 1)).astype(np.float32)


@functools.cache
def _batch(target, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (B, L)).astype(np.int32)
  prompt_len, end = rng.integers(2, 6, B), rng.integers(9, L, B)
  hidden = collect_target_features(target, tokens)
  return dict(tokens=tokens, hidden=hidden, loss_mask=_loss_mask(prompt_len, end))


@functools.partial(jax.jit, static_argnums=0)
def _apply(graphdef, state, *args):
  """The drafter's __call__, jitted (eager op-by-op dispatch is slow on the shared CPU)."""
  return nnx.merge(graphdef, state)(*args)


def _np(tree):
  return jax.tree.map(lambda x: np.array(x), tree)


def test_train_step_fits_target_features():
  target, drafter = _target(), init_drafter(CFG, seed=1)
  batch, step = _batch(target), _plain_step()
  state, head = init_drafter_train_state(drafter, OPT), TargetHead.from_target(target)
  first = None
  for _ in range(200):
    state, metrics = step(state, head, batch)
    first = first or {k: float(v) for k, v in metrics.items()}
  last = {k: float(v) for k, v in metrics.items()}
  assert int(state.step) == 200
  assert last["smooth_l1"] < 0.02 * first["smooth_l1"]
  assert last["kl"] < 0.05 * first["kl"]
  assert last["loss"] < 0.6 * first["loss"]
  assert first["accuracy"] < 0.5 and last["accuracy"] == 1.0


def test_loss_matches_numpy_pairs_and_mask():
  """drafter_loss == a loop over t that feeds (x_{t+1}, f_t) -> f_{t+1}, counting loss_mask[t+1]."""
  target, drafter = _target(), init_drafter(CFG, seed=1)
  batch = _batch(target, seed=3)
  _, metrics = _loss(drafter, TargetHead.from_target(target), batch)

  tokens, hidden, mask = batch["tokens"], np.asarray(batch["hidden"], np.float64), batch["loss_mask"]
  emb_table, head = np.asarray(target.embed_tokens[...]), np.asarray(target.lm_head[...], np.float64)
  emb_in = np.stack([[emb_table[tokens[b, t + 1]] for t in range(L - 1)] for b in range(B)])
  feat_in = np.stack([[hidden[b, t] for t in range(L - 1)] for b in range(B)])
  pred = np.asarray(_apply(*nnx.split(drafter), jnp.asarray(emb_in), jnp.asarray(feat_in, jnp.float32))[0],
                    np.float64)
  log_softmax = lambda z: z - z.max() - np.log(np.exp(z - z.max()).sum())
  sl1, ce, agree, n = 0.0, 0.0, 0.0, 0
  for b in range(B):
    for t in range(L - 1):
      if not mask[b, t + 1]:
        continue
      d = np.abs(pred[b, t] - hidden[b, t + 1])
      sl1 += np.mean(np.where(d < 1, 0.5 * d * d, d - 0.5))
      zt, zp = hidden[b, t + 1] @ head, pred[b, t] @ head
      ce += -np.sum(np.exp(log_softmax(zt)) * log_softmax(zp))
      agree += float(np.argmax(zt) == np.argmax(zp))
      n += 1
  assert float(metrics["num_steps"]) == n
  np.testing.assert_allclose(float(metrics["smooth_l1"]), sl1 / n, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["ce"]), ce / n, rtol=1e-4)
  np.testing.assert_allclose(float(metrics["accuracy"]), agree / n)
  np.testing.assert_allclose(float(metrics["loss"]), 0.5 * (sl1 + ce) / n, rtol=1e-4)


def test_alignment_exact_zero_loss_only_when_paired_correctly():
  """Features obey f_{t+1} = E[x_{t+1}] M + f_t R, and the drafter is set to exactly that map.

  The loss is then 0 iff it pairs (x_{t+1}, f_t) -> f_{t+1} on the counted steps; hidden states
  shifted one position either way (an off-by-one pairing) give a large loss. Features outside
  the counted steps are garbage, so counting any extra step would show too.
  """
  target = _target()
  rng = np.random.default_rng(7)
  h = CFG.hidden_size
  m = rng.normal(size=(h, h)) / np.sqrt(h)
  r = 0.5 * np.linalg.qr(rng.normal(size=(h, h)))[0]
  drafter = init_drafter(CFG, seed=1)
  drafter.fc.kernel[...] = jnp.asarray(np.concatenate([m, r]), jnp.float32)
  drafter.fc.bias[...] = jnp.zeros((h,))
  drafter.layer.self_attn.o_proj.kernel[...] = jnp.zeros((h, h))  # residual branches off:
  drafter.layer.mlp.down_proj.kernel[...] = jnp.zeros((CFG.intermediate_size, h))  # out = fc(in)

  tokens = rng.integers(0, CFG.vocab_size, (B, L)).astype(np.int32)
  prompt_len, end = rng.integers(2, 6, B), rng.integers(9, L, B)
  emb = np.asarray(target.embed(jnp.asarray(tokens)), np.float64)
  hidden = rng.normal(size=(B, L, h))  # garbage except where the recurrence is needed
  for b in range(B):
    for t in range(prompt_len[b] - 1, end[b]):  # targets f_{P-1} .. f_{E-1}
      hidden[b, t] = emb[b, t] @ m + hidden[b, t - 1] @ r
  batch = dict(tokens=tokens, hidden=jnp.asarray(hidden, jnp.float32),
               loss_mask=_loss_mask(prompt_len, end))

  head = TargetHead.from_target(target)
  _, metrics = _loss(drafter, head, batch)
  assert float(metrics["num_steps"]) == np.sum(end - prompt_len + 1)
  assert float(metrics["smooth_l1"]) < 1e-10
  assert abs(float(metrics["kl"])) < 1e-4
  assert float(metrics["accuracy"]) == 1.0
  for shift in (1, -1):
    shifted = dict(batch, hidden=jnp.roll(batch["hidden"], shift, axis=1))
    _, bad = _loss(drafter, head, shifted)
    assert float(bad["smooth_l1"]) > 0.1 and float(bad["kl"]) > 0.1 and float(bad["accuracy"]) < 0.5


def test_target_frozen_and_drafter_owns_no_embedding_or_head():
  target, drafter = _target(), init_drafter(CFG, seed=1)
  before = _np(nnx.state(target))
  batch = _batch(target)
  state = init_drafter_train_state(drafter, OPT)
  paths = ["/".join(map(str, p)) for p, _ in jax.tree_util.tree_leaves_with_path(state.params)]
  assert not [p for p in paths if "embed" in p or "head" in p], paths
  h, f = CFG.hidden_size, CFG.intermediate_size
  layer = 2 * h * h + 2 * h * (CFG.num_kv_heads * CFG.head_dim) + 3 * h * f + h  # attn, mlp, post-norm
  assert sum(x.size for x in jax.tree.leaves(state.params)) == 2 * h * h + h + layer

  step, head = _plain_step(), TargetHead.from_target(target)
  fc_before = np.array(drafter.fc.kernel[...])
  for _ in range(3):
    state, _ = step(state, head, batch)
  token_batches = [dict(tokens=batch["tokens"], loss_mask=batch["loss_mask"])] * 4  # no hidden:
  _, history = warmup_drafter(target, drafter, token_batches, steps=4, optimizer=OPT, log_every=2)
  assert [r["step"] for r in history] == [2, 4]
  jax.tree.map(np.testing.assert_array_equal, before, _np(nnx.state(target)))
  assert not np.array_equal(np.asarray(drafter.fc.kernel[...]), fc_before)  # warm-up wrote back


def test_cached_decode_equals_full_forward():
  drafter = init_drafter(CFG, seed=2)
  k1, k2 = jax.random.split(jax.random.key(0))
  t, prefill = 10, 4
  emb = jax.random.normal(k1, (2, t, CFG.hidden_size))
  feat = jax.random.normal(k2, (2, t, CFG.hidden_size))
  graphdef, state = nnx.split(drafter)
  full, none = _apply(graphdef, state, emb, feat)
  assert none is None
  cache = KVCache.init(drafter.cfg, 2, 16)
  assert len(cache.k) == 1
  out, cache = _apply(graphdef, state, emb[:, :prefill], feat[:, :prefill], None, cache)
  outs = [out]
  for i in range(prefill, t):
    out, cache = _apply(graphdef, state, emb[:, i:i + 1], feat[:, i:i + 1], None, cache)
    outs.append(out)
  np.testing.assert_array_equal(np.asarray(cache.lengths), [t, t])
  assert_close(np.concatenate(outs, axis=1), full)


def test_tree_mask_call_equals_separate_branches():
  """Tree [r, c1, c2] (c1, c2 both children of r) in one call == branches [r, c1] and [r, c2]."""
  drafter = init_drafter(CFG, seed=3)
  keys = jax.random.split(jax.random.key(1), 4)
  p = 5
  emb_pre, feat_pre = (jax.random.normal(k, (1, p, CFG.hidden_size)) for k in keys[:2])
  emb_tree, feat_tree = (jax.random.normal(k, (1, 3, CFG.hidden_size)) for k in keys[2:])
  graphdef, state = nnx.split(drafter)
  _, cache = _apply(graphdef, state, emb_pre, feat_pre, None, KVCache.init(drafter.cfg, 1, 16))
  mask = jnp.array([[[1, 0, 0], [1, 1, 0], [1, 0, 1]]], bool)
  positions = jnp.array([[p, p + 1, p + 1]], jnp.int32)
  tree_out, tree_cache = _apply(graphdef, state, emb_tree, feat_tree, positions, cache, mask)
  assert int(tree_cache.lengths[0]) == p + 3
  for branch in ([0, 1], [0, 2]):
    out, _ = _apply(graphdef, state, emb_tree[:, branch], feat_tree[:, branch], None, cache)
    assert_close(tree_out[:, branch], out)


def test_hidden_size_mismatch_raises():
  target = _target()
  wide = nnx.eval_shape(lambda: EagleDrafter(CFG.replace(hidden_size=48), rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"drafter hidden_size=48 .* hidden_size=32"):
    check_compatible(wide, CFG)
  with pytest.raises(ValueError, match="hidden_size=48"):
    drafter_loss(wide, target, _batch(target))
  with pytest.raises(ValueError, match="hidden_size=32"):
    make_drafter_train_step(nnx.graphdef(wide), optax.adam(1e-3), CFG)
  with pytest.raises(ValueError, match="hidden_size=32 does not match its inputs"):
    init_drafter(CFG)(jnp.zeros((1, 2, 32)), jnp.zeros((1, 2, 48)))


def test_sharded_step_matches_unsharded():
  mesh = make_mesh((2, 2, 2))
  target, drafter = _target(), init_drafter(CFG, seed=1)
  batch, head, plain = _batch(target), TargetHead.from_target(target), _plain_step()
  sharded = make_drafter_train_step(nnx.graphdef(drafter), OPT, CFG, mesh=mesh)
  s1 = init_drafter_train_state(drafter, OPT)
  s2 = init_drafter_train_state(drafter, OPT)
  s2 = jax.device_put(s2, drafter_state_shardings(s2, mesh))
  head2 = jax.device_put(head, target_head_shardings(CFG, mesh))
  batch2 = jax.device_put(batch, batch_sharding(mesh, 1))
  for _ in range(2):
    s1, m1 = plain(s1, head, batch)
    s2, m2 = sharded(s2, head2, batch2)
  assert s2.params["fc"]["kernel"][...].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
  assert_close(_np(s2.params), _np(s1.params), rtol=1e-4)
