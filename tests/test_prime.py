"""PRIME's implicit PRM (rl/prime.py): the BCE on outcome labels against numpy, the token rewards,
online learning, and the two update orders."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from tlt_jax.errors import ConfigError
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import init_model
from tlt_jax.rl import prime, stages
from tlt_jax.rl.packing import pack_sequences
from tlt_jax.rl.scorers import ScorerContext, build_scorers
from tlt_jax.rl.update import make_logprob_fn

CFG = ModelConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, tie_word_embeddings=False)
B, L, BETA = 6, 12, 0.5


@functools.cache
def _setup():
  graphdef, params = nnx.split(init_model(CFG, seed=0))
  rng = np.random.default_rng(0)
  lengths = rng.integers(6, L + 1, B)
  prompt = rng.integers(2, 4, B)
  t = np.arange(L)[None]
  rows = {"tokens": np.where(t < lengths[:, None], rng.integers(3, CFG.vocab_size, (B, L)), 0).astype(np.int32),
          "positions": np.broadcast_to(t, (B, L)).astype(np.int32).copy(),
          "segment_ids": (t < lengths[:, None]).astype(np.int32),
          "response_mask": ((t >= prompt[:, None]) & (t < lengths[:, None])).astype(np.float32),
          "sampler_logprobs": np.zeros((B, L), np.float32)}
  packed, index = pack_sequences(rows, lengths, 2 * L, 2)  # several sequences per row
  device = {k: v for k, v in packed.items() if k != "sampler_logprobs"}
  logprob_fn = make_logprob_fn(graphdef, 1.0)
  ref_params = jax.tree.map(lambda x: x + 0.02 * jnp.sign(x), params)  # a reference != the PRM's start
  device["ref_logprobs"], _ = logprob_fn(ref_params, device["tokens"], device["positions"], device["segment_ids"],
                                         device["response_mask"], packed["sampler_logprobs"])
  batch = stages.UpdateBatch(rows, device, index, packed["tokens"].shape)
  correct = np.array([1, 0, 1, 1, 0, 0], bool)
  return graphdef, params, ref_params, logprob_fn, batch, correct


def _scorer(order: str, lr: float = 1e-2):
  graphdef, params, ref_params, logprob_fn, _, _ = _setup()
  config = ml_collections.ConfigDict(dict(
      rl=dict(token_rewards=dict(prime=1.0)),
      prime=dict(beta=BETA, lr=lr, update_order=order, max_grad_norm=0.0)))
  ctx = ScorerContext(graphdef, params, ref_params, None, 1.0, logprob_fn)
  (weight, scorer), = build_scorers(config, ctx).values()
  assert weight == 1.0 and isinstance(scorer, prime.ImplicitPRM) and scorer.reuse_ref
  return scorer


def _forward_rows(params, batch):
  """log pi(y_t) per row [B, L] under `params` (one sequence per row)."""
  graphdef, _, _, logprob_fn, _, _ = _setup()
  r = batch.rows
  logp, _ = logprob_fn(params, r["tokens"], r["positions"], r["segment_ids"], r["response_mask"], r["sampler_logprobs"])
  return np.asarray(logp, np.float64)


def test_prm_scores_then_learns_outcome_labels_after_order():
  _, params, ref_params, _, batch, correct = _setup()
  scorer = _scorer("after")
  scores = stages.Scores(np.zeros((3, 2), np.float32), correct)
  rewards, m = scorer.score(batch, scores)
  # "after": r_t = beta (log pi_psi - log pi_ref) with psi BEFORE the update (= the policy's start).
  mask = batch.rows["response_mask"] > 0
  expected = np.where(mask, BETA * (_forward_rows(params, batch) - _forward_rows(ref_params, batch)), 0.0)
  np.testing.assert_allclose(batch.to_rows(rewards), expected, rtol=1e-4, atol=1e-6)
  # The BCE over sequences: logit_i = sum_t r_t, loss = mean_i softplus(s) - y s; accuracy of sign.
  logit = expected.sum(1)
  y = correct.astype(np.float64)
  np.testing.assert_allclose(m["prm_loss"], np.mean(np.logaddexp(0, logit) - y * logit), rtol=1e-4)
  np.testing.assert_allclose(m["prm_accuracy"], np.mean((logit > 0) == correct), atol=1e-6)
  assert m["prm_grad_norm"] > 0 and m["prm_skipped"] == 0
  # Online learning from the outcome labels alone: the PRM separates this batch's outcomes.
  for _ in range(12):
    rewards, m = scorer.score(batch, scores)
  sums = batch.to_rows(rewards).sum(1)
  assert m["prm_accuracy"] == pytest.approx(1.0) and np.all((sums > 0) == correct)
  assert int(scorer.state.step) == 13


def test_before_order_scores_with_the_updated_prm():
  _, _, ref_params, _, batch, correct = _setup()
  scorer = _scorer("before")
  rewards, _ = scorer.score(batch, stages.Scores(np.zeros((3, 2), np.float32), correct))
  updated = _forward_rows(scorer.state.params, batch)
  mask = batch.rows["response_mask"] > 0
  np.testing.assert_allclose(batch.to_rows(rewards), np.where(mask, BETA * (updated - _forward_rows(ref_params, batch)), 0),
                             rtol=1e-4, atol=1e-6)
  assert np.abs(batch.to_rows(rewards)).max() > 0  # the updated PRM differs from its start
  with pytest.raises(ConfigError, match="config.prime.update_order='sideways'"):
    prime.PrimeConfig(update_order="sideways")
