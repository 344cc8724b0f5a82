"""The PPO-clip policy update: sharded == single device, micro-batches == one batch, NaN guard."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import init_model
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rl.packing import first_fit_decreasing, pack_sequences, unpack
from tlt_jax.rl.update import UpdateConfig, make_logprob_fn, make_policy_update_step
from tlt_jax.train import optim
from tlt_jax.train.state import create_train_state
from tests.numerics import assert_close

CFG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, tie_word_embeddings=False)
B, L = 8, 16
# Equality tests use clipped SGD so that params compare the gradients themselves (Adam's first
# step is lr * sign(g) and amplifies float noise in tiny gradient entries); the NaN guard uses
# the real optimizer (AdamW with clipping) to check that its moments do not move.
SGD = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))
ADAMW = optim.make_optimizer(dict(lr=1e-2, steps=10, schedule="constant", max_grad_norm=1.0))


@functools.cache
def _model():
  graphdef, params = nnx.split(init_model(CFG, seed=0))
  return graphdef, params


def _fresh_params():
  return jax.tree.map(jnp.copy, _model()[1])


@functools.cache
def _batch(seed=0):
  """Random rows: prompt [0, P_b), response [P_b, E_b), padding after; old logprobs = the
  current policy's plus noise (so ratios spread over the clip range), a noisy reference."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(3, CFG.vocab_size, (B, L)).astype(np.int32)
  prompt_len, end = rng.integers(2, 6, B), rng.integers(8, L + 1, B)
  t = np.arange(L)[None]
  mask = ((t >= prompt_len[:, None]) & (t < end[:, None])).astype(np.float32)
  mask[-1] = 0.0  # one row with no response tokens
  tokens = np.where(t < end[:, None], tokens, 0).astype(np.int32)
  positions = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L)).copy()
  segments = (t < end[:, None]).astype(np.int32)
  graphdef, params = _model()
  logp, _ = make_logprob_fn(graphdef, 1.0)(params, tokens, positions, segments, mask,
                                           np.zeros((B, L), np.float32))
  logp = np.asarray(logp)
  old = np.where(mask > 0, logp + rng.normal(0, 0.3, (B, L)), np.nan).astype(np.float32)  # garbage off-mask
  ref = (logp + rng.normal(0, 0.2, (B, L))).astype(np.float32)
  adv = np.broadcast_to(rng.normal(0, 1, (B, 1)), (B, L)).astype(np.float32)
  return dict(tokens=tokens, positions=positions, segment_ids=segments, response_mask=mask,
              advantages=adv, old_logprobs=old, ref_logprobs=ref, lengths=end)


def _run(cfg, mesh=None, batch=None, tx=SGD):
  graphdef, _ = _model()
  state = create_train_state(_fresh_params(), tx, mesh)
  batch = dict(batch or _batch())
  batch.pop("lengths", None)
  if mesh is not None:
    batch = mesh_lib.shard_batch(batch, mesh)
  step = make_policy_update_step(graphdef, tx, cfg, state, mesh, with_ref=True)
  state, metrics, hidden = step(state, batch)
  return jax.device_get((state, metrics, hidden))


def _assert_close(a, b, rtol=2e-5, atol=2e-6):
  assert_close(b, a, rtol=rtol, atol=atol)


@functools.cache
def _reference_run(aggregation):
  return _run(UpdateConfig(aggregation=aggregation, kl_coef=0.1))


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_sharded_update_equals_single_device(aggregation):
  mesh = mesh_lib.make_mesh((2, 2, 2))
  single = _reference_run(aggregation)
  sharded = _run(UpdateConfig(aggregation=aggregation, kl_coef=0.1), mesh)
  assert float(single[1]["skipped"]) == 0.0
  assert float(single[1]["clip_frac"]) > 0.0 and float(single[1]["kl"]) > 0.0
  _assert_close(single[0].params, sharded[0].params)
  _assert_close(single[1], sharded[1], rtol=1e-4, atol=1e-6)
  _assert_close(single[2], sharded[2], rtol=1e-4, atol=1e-5)
  assert int(sharded[0].step) == 1
  # The update moved the params, and the hidden states are those of the forward.
  before = _model()[1]
  moved = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))),
                       before, single[0].params)
  assert max(jax.tree.leaves(moved)) > 1e-4
  assert single[2].shape == (B, L, CFG.hidden_size)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_equal_full_batch(aggregation):
  one = _reference_run(aggregation)
  two = _run(UpdateConfig(aggregation=aggregation, kl_coef=0.1, micro_batches=2))
  _assert_close(one[0].params, two[0].params)
  _assert_close(one[1], two[1], rtol=1e-4, atol=1e-6)
  _assert_close(one[2], two[2], rtol=1e-5, atol=1e-5)


def test_non_finite_update_is_skipped():
  batch = dict(_batch())
  batch["advantages"] = batch["advantages"].copy()
  batch["advantages"][0] = np.nan
  state, metrics, _ = _run(UpdateConfig(kl_coef=0.1), batch=batch, tx=ADAMW)
  assert float(metrics["skipped"]) == 1.0
  assert not np.isfinite(float(metrics["loss"]))
  jax.tree.map(np.testing.assert_array_equal, state.params, jax.device_get(_model()[1]))
  fresh = jax.device_get(create_train_state(_fresh_params(), ADAMW, None).opt_state)
  jax.tree.map(np.testing.assert_array_equal, state.opt_state, fresh)
  assert int(state.step) == 1  # the step counts attempts; the optimizer's count did not move


def test_logprob_fn_matches_update_forward_and_reports_gap():
  graphdef, params = _model()
  b = _batch()
  fn = make_logprob_fn(graphdef, 0.7)
  args = (b["tokens"], b["positions"], b["segment_ids"])
  logp, _ = fn(params, *args, b["response_mask"], np.zeros((B, L), np.float32))
  # log p(token t) from logits[t - 1] at temperature 0.7, checked against numpy.
  logits, _, _ = nnx.merge(graphdef, params)(jnp.asarray(b["tokens"]))
  z = np.asarray(logits, np.float64)[:, :-1] / 0.7
  z = z - z.max(-1, keepdims=True)
  ref = np.take_along_axis(z - np.log(np.exp(z).sum(-1, keepdims=True)), b["tokens"][:, 1:, None], -1)[..., 0]
  in_seq = b["segment_ids"][:, 1:] > 0  # padding (segment 0) attends to nothing; not compared
  np.testing.assert_allclose(np.asarray(logp)[:, 1:][in_seq], ref[in_seq], atol=1e-5)
  assert np.all(np.asarray(logp)[:, 0] == 0)
  shifted = np.asarray(logp) + 0.25 * b["response_mask"]
  _, gap = fn(params, *args, b["response_mask"], shifted)
  np.testing.assert_allclose([gap["logprob_gap"], gap["logprob_gap_max"]], [0.25, 0.25], rtol=1e-5)


def test_build_update_batch_aligns_prompt_response_and_logprobs():
  from tlt_jax.rl.trainer import build_update_batch
  from tlt_jax.rollout.engine import RolloutResult
  prompts = np.array([[1, 5, 6, 0], [1, 7, 0, 0]], np.int32)  # right-padded, width 4
  plens = np.array([3, 2], np.int32)
  tokens = np.array([[9, 9, 2, 0, 0], [8, 2, 0, 0, 0]], np.int32)  # responses end with EOS = 2
  lps = np.array([[-.1, -.2, -.3, 0, 0], [-.4, -.5, 0, 0, 0]], np.float32)
  result = RolloutResult(tokens, np.array([3, 2]), lps, np.array([True, True]), {})
  b = build_update_batch(prompts, plens, result, np.array([1.0, -1.0]), length_bucket=4, pad_id=0)
  assert b["tokens"].shape == (2, 8)  # max(3 + 3, 2 + 2) = 6 -> 8
  np.testing.assert_array_equal(b["tokens"], [[1, 5, 6, 9, 9, 2, 0, 0], [1, 7, 8, 2, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["response_mask"], [[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_allclose(b["sampler_logprobs"], [[0, 0, 0, -.1, -.2, -.3, 0, 0],
                                                     [0, 0, -.4, -.5, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["positions"][1], np.arange(8))
  np.testing.assert_array_equal(b["segment_ids"], [[1, 1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0, 0]])
  np.testing.assert_array_equal(b["advantages"], [[1] * 6 + [0] * 2, [-1] * 4 + [0] * 4])


# --- sequence packing ------------------------------------------------------------------------


def test_first_fit_decreasing_and_pack_unpack_round_trip():
  bins = first_fit_decreasing([5, 9, 3, 7, 2], capacity=10)
  assert bins == [[1], [3, 2], [0, 4]]  # 9 | 7 + 3 | 5 + 2: longest first, first bin with room
  with pytest.raises(ValueError, match=r"sequence 1 has 9 tokens, over the packed row length 8"):
    first_fit_decreasing([5, 9], capacity=8)
  b = _batch()
  packed, index = pack_sequences({k: v for k, v in b.items() if k != "lengths"}, b["lengths"], 32, 4)
  assert packed["tokens"].shape[0] % 4 == 0 and packed["tokens"].shape[1] == 32
  assert packed["tokens"].shape[0] < B  # fewer rows than sequences
  np.testing.assert_array_equal(np.sort(packed["tokens"][packed["segment_ids"] > 0]),
                                np.sort(b["tokens"][b["segment_ids"] > 0]))
  for k in ("tokens", "response_mask", "advantages", "old_logprobs", "positions"):
    np.testing.assert_array_equal(unpack(packed[k], index), np.where(b["segment_ids"] > 0, b[k], 0))
  np.testing.assert_array_equal(unpack(packed["segment_ids"], index) > 0, b["segment_ids"] > 0)
  # Positions restart at 0 with every sequence of a row.
  seg, pos = packed["segment_ids"], packed["positions"]
  starts = (seg > 0) & (np.diff(seg, prepend=0, axis=1) != 0)
  assert np.all(pos[starts] == 0) and int(starts.sum()) == B


def _packed(batch, row_len=32, rows_multiple=4):
  rows = {k: v for k, v in batch.items() if k != "lengths"}
  return pack_sequences(rows, batch["lengths"], row_len, rows_multiple)


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_packed_update_equals_unpacked(aggregation):
  """Several sequences per row, attending within their segment only: the same loss, gradient
  and hidden states as one sequence per row."""
  unpacked = _reference_run(aggregation)
  packed_batch, index = _packed(_batch())
  packed = _run(UpdateConfig(aggregation=aggregation, kl_coef=0.1), batch=packed_batch)
  _assert_close(unpacked[0].params, packed[0].params, rtol=1e-4, atol=1e-6)
  _assert_close(unpacked[1], packed[1], rtol=1e-4, atol=1e-6)
  valid = (_batch()["segment_ids"] > 0)[..., None]
  np.testing.assert_allclose(unpack(packed[2], index) * valid, unpacked[2] * valid, rtol=1e-4, atol=1e-5)
  assert float(packed[1]["num_sequences"]) == float(unpacked[1]["num_sequences"]) == B - 1


def test_packed_update_sharded_with_micro_batches_equals_single_device():
  single = _run(UpdateConfig(aggregation="sequence", kl_coef=0.1), batch=_packed(_batch())[0])
  sharded = _run(UpdateConfig(aggregation="sequence", kl_coef=0.1, micro_batches=2),
                 mesh_lib.make_mesh((2, 2, 2)), batch=_packed(_batch(), rows_multiple=8)[0])
  _assert_close(single[0].params, sharded[0].params, rtol=1e-4, atol=1e-6)
  _assert_close(single[1], sharded[1], rtol=1e-4, atol=1e-6)


def test_trainer_stops_after_max_consecutive_skips():
  import types
  from tlt_jax.rl.trainer import HostState, RLTrainer, TrainingDiverged
  stub = types.SimpleNamespace(host=HostState(), rl=types.SimpleNamespace(max_consecutive_skips=2),
                               checkpointer=types.SimpleNamespace(directory="/ckpt"))
  ok = {"skipped": 0, "loss": 0.1, "grad_norm": 1.0}
  bad = {"skipped": 1, "loss": float("nan"), "grad_norm": float("nan")}
  RLTrainer._check_skips(stub, 1, bad)
  RLTrainer._check_skips(stub, 2, ok)  # a good step resets the count
  RLTrainer._check_skips(stub, 3, bad)
  with pytest.raises(TrainingDiverged, match=r"RL stopped at step 4: 2 consecutive policy updates"):
    RLTrainer._check_skips(stub, 4, bad)
