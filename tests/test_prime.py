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
from tlt_jax.rl import advantages, prime, stages
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


def _scorer(order: str, lr: float = 1e-2, norm: str = "none"):
  graphdef, params, ref_params, logprob_fn, _, _ = _setup()
  config = ml_collections.ConfigDict(dict(
      rl=dict(token_rewards=dict(prime=1.0), group_size=0),
      prime=dict(beta=BETA, lr=lr, update_order=order, max_grad_norm=0.0, weight_decay=0.0,
                 process_norm=norm)))
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
  np.testing.assert_allclose(m["prm_sign_accuracy"], np.mean((logit > 0) == correct), atol=1e-6)
  assert m["prm_grad_norm"] > 0 and m["prm_skipped"] == 0
  # Online learning from the outcome labels alone: the PRM separates this batch's outcomes.
  for _ in range(12):
    rewards, m = scorer.score(batch, scores)
  sums = batch.to_rows(rewards).sum(1)
  assert m["prm_sign_accuracy"] == pytest.approx(1.0) and np.all((sums > 0) == correct)
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


# --- the official scaling, metric and estimators (numpy references) ------------------------------


def _official_pairwise(scores, acc, n):
  """PRIME's compute_dpo_accuracy, pair by pair: per group of n, the |acc_i - acc_j|-weighted
  agreement of sign(s_i - s_j) with sign(acc_i - acc_j) over i < j (0.5 for a one-outcome group)."""
  out = []
  for g0 in range(0, len(scores), n):
    s, a = scores[g0:g0 + n], acc[g0:g0 + n]
    num = den = 0.0
    for i in range(n):
      for j in range(i + 1, n):
        w = abs(a[i] - a[j])
        num += w * float((s[i] - s[j] > 0) == (a[i] - a[j] > 0))
        den += w
    out.append(num / den if den else 0.5)
  return out


def test_pairwise_accuracy_matches_the_official_metric():
  rng = np.random.default_rng(5)
  g = 6
  acc = rng.integers(0, 2, 8 * g).astype(float)
  acc[:g] = 1.0  # a group with one outcome: no pairs
  scores = rng.normal(size=8 * g)
  ref = _official_pairwise(scores, acc, g)
  got = prime.pairwise_accuracy(scores.reshape(-1, g), acc.reshape(-1, g))
  np.testing.assert_allclose(got, np.mean(ref[1:]), rtol=1e-12)  # groups with both outcomes only
  # An offset and a positive scale shared by a group do not change it; the sign metric does move.
  np.testing.assert_allclose(prime.pairwise_accuracy(3 * scores.reshape(-1, g) - 7, acc.reshape(-1, g)), got)
  # Perfect and reversed rankings, a tie at one half, and no informative group at all.
  y = np.array([[1, 0, 1, 0]], float)
  assert prime.pairwise_accuracy(y * 2 - 5, y) == 1.0 and prime.pairwise_accuracy(-y, y) == 0.0
  assert prime.pairwise_accuracy(np.zeros((1, 4)), y) == 0.5
  assert np.isnan(prime.pairwise_accuracy(np.ones((2, 3)), np.ones((2, 3))))


def test_batch_norm_divides_by_the_largest_process_return():
  q = np.array([[0.2, -0.5, 0.1, 9.0], [1.0, 1.0, 1.0, 0.0]], np.float32)
  mask = np.array([[1, 1, 1, 0], [0, 1, 1, 1]], np.float32)  # 9.0 is off the response
  got = prime.batch_norm_process_rewards(q, mask)
  qm = q * mask
  rtg = np.array([[qm[b, t:].sum() for t in range(4)] for b in range(2)])  # returns-to-go, by hand
  np.testing.assert_allclose(got, qm / (np.abs(rtg).max() + 1e-6), rtol=1e-6)
  assert np.abs(got[1, 1:].sum()) == pytest.approx(1.0, rel=1e-5)  # the largest |return| is now 1


def test_scorer_batch_norm_and_pairwise_metrics():
  _, params, ref_params, _, batch, correct = _setup()
  scorer = _scorer("after", norm="batch_norm")
  scores = stages.Scores(np.zeros((3, 2), np.float32), correct)
  rewards, m = scorer.score(batch, scores)
  mask = batch.rows["response_mask"]
  raw = np.where(mask > 0, BETA * (_forward_rows(params, batch) - _forward_rows(ref_params, batch)), 0.0)
  np.testing.assert_allclose(batch.to_rows(rewards), prime.batch_norm_process_rewards(raw, mask), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(m["prm_pairwise_acc_before"],
                             prime.pairwise_accuracy(raw.sum(1).reshape(3, 2), correct.reshape(3, 2)))
  after = np.where(mask > 0, BETA * (_forward_rows(scorer.state.params, batch) - _forward_rows(ref_params, batch)), 0)
  np.testing.assert_allclose(m["prm_pairwise_acc_after"],
                             prime.pairwise_accuracy(after.sum(1).reshape(3, 2), correct.reshape(3, 2)))
  with pytest.raises(ConfigError, match="config.prime.process_norm='layer'"):
    prime.PrimeConfig(process_norm="layer")


def _returns_reference(r, q, mask, baseline, oc, pc, whiten=True):
  """process_outcome_returns token by token in numpy (float64)."""
  P, G, L = q.shape
  ref = np.zeros((P, G, L))
  for p in range(P):
    qbar = np.array([q[p, j][mask[p, j] > 0].mean() for j in range(G)])
    for i in range(G):
      idx = np.flatnonzero(mask[p, i])
      per = np.zeros(L)
      if baseline == "rloo":
        per[idx] = pc * (q[p, i, idx] * G / (G - 1) - qbar.sum() / (G - 1))
        per[idx[-1]] += oc * (r[p, i] - np.delete(r[p], i).mean())
      elif baseline == "grpo":
        per[idx] = pc * (q[p, i, idx] - qbar.mean()) / (qbar.std(ddof=1) + 1e-6)
        per[idx[-1]] += oc * (r[p, i] - r[p].mean()) / (r[p].std(ddof=1) + 1e-6)
      else:
        per[idx] = pc * q[p, i, idx]
        per[idx[-1]] += oc * r[p, i]
      for t in idx:
        ref[p, i, t] = per[t:].sum()
  if whiten:
    v = mask > 0
    ref[v] = (ref[v] - ref[v].mean()) / np.sqrt(ref[v].var() + 1e-8)
  return ref


@pytest.mark.parametrize("name,baseline", [("rloo_returns", "rloo"), ("grpo_returns", "grpo"),
                                           ("reinforce_returns", "none")])
@pytest.mark.parametrize("whiten", [True, False])
def test_process_outcome_returns_match_numpy(name, baseline, whiten):
  rng = np.random.default_rng(1)
  P, G, L = 3, 4, 7
  r = rng.integers(0, 2, (P, G)).astype(np.float32)
  r[0] = [1, 0, 0, 1]
  lengths = rng.integers(2, L + 1, (P, G))
  mask = (np.arange(L)[None, None] < lengths[..., None]).astype(np.float32)
  mask[1, 2, 0] = 0.0
  q = (rng.normal(size=(P, G, L)) * mask).astype(np.float32)
  q_norm = prime.batch_norm_process_rewards(q.reshape(P * G, L), mask.reshape(P * G, L)).reshape(P, G, L)
  inputs = advantages.AdvantageInputs(jnp.asarray(r), jnp.asarray(q_norm), jnp.asarray(mask))
  got = np.asarray(advantages.get_advantage(name, outcome_coef=5.0, process_coef=2.0, whiten=whiten)(inputs))
  np.testing.assert_allclose(got, _returns_reference(r, q_norm.astype(np.float64), mask, baseline, 5.0, 2.0, whiten),
                             rtol=2e-4, atol=2e-5)
  assert np.all(got[mask == 0] == 0)
  # The outcome part alone is the sequence estimator at each response's tokens (before whitening).
  out_only = np.asarray(advantages.get_advantage(name, process_coef=0.0, whiten=False)(inputs))
  seq = {"rloo": advantages.rloo_advantages, "grpo": advantages.grpo_advantages, "none": lambda x: x}[baseline]
  np.testing.assert_allclose(out_only, np.where(mask > 0, np.asarray(seq(jnp.asarray(r)))[..., None], 0),
                             rtol=1e-5, atol=1e-5)


def test_config_admits_prime_with_grpo_and_reinforce_returns():
  from experiments.common import load_config, with_overrides
  from tlt_jax import config as config_lib
  base = load_config("configs/prime.py:tiny")
  assert base.prime.process_norm == "batch_norm"
  for name in ("rloo_returns", "grpo_returns", "reinforce_returns"):
    config_lib.validate(with_overrides(base, {"rl.advantage": name}))
  with pytest.raises(ConfigError, match=r"config.rl.advantage='grpo' is not allowed .* \(grpo_returns is its token form\)"):
    config_lib.validate(with_overrides(base, {"rl.advantage": "grpo", "rl.advantage_kwargs": {}}))
  with pytest.raises(ConfigError, match="config.prime.process_norm='max'"):
    config_lib.validate(with_overrides(base, {"prime.process_norm": "max"}))


def test_experiment_target_and_sample_efficiency_per_seed():
  from experiments import prime as exp

  def run(accs, rollouts_per_step=100):
    evals = [{"step": 5 * k, "rollouts": 5 * k * rollouts_per_step, "eval_accuracy": a} for k, a in enumerate(accs)]
    records = [{"step": s, "rollouts_total": s * rollouts_per_step, "accuracy": 0.5, "step_time_s": 1.0,
                "prm_sign_accuracy": 0.4, "prm_pairwise_acc_before": 0.6, "prm_pairwise_acc_after": 0.7}
               for s in range(1, 5 * (len(accs) - 1) + 1)]
    return {"records": records, "evals": evals}

  runs = {"rloo": {0: run([0.40, 0.41, 0.43]), 1: run([0.30, 0.30, 0.31])},
          "prime": {0: run([0.40, 0.44, 0.45]), 1: run([0.30, 0.33, 0.35])}}
  s = exp.summarize(runs, margin=0.02)
  # seed 0: target 0.42; RLOO crosses it halfway between 500 and 1000 rollouts, PRIME at 5/4 * 500 / ...
  assert exp.rollouts_to_reach(runs["rloo"][0]["evals"], 0.42) == pytest.approx(750.0)
  assert exp.rollouts_to_reach(runs["prime"][0]["evals"], 0.42) == pytest.approx(500 * 0.02 / 0.04)
  per = {p["seed"]: p for p in s["per_seed"]}
  assert per[0]["sample_efficiency"] == pytest.approx(750.0 / 250.0)
  assert per[1]["rollouts_to_target"]["rloo"] is None and per[1]["sample_efficiency"] is None  # censored
  assert s["reached"] == {"rloo": 1, "prime": 2} and s["sample_efficiency"]["n"] == 1
  assert s["final_gain_prime_minus_rloo"]["mean"] == pytest.approx(np.mean([0.02, 0.04]))
  assert s["prm_batches"]["n"] == 20 and s["prm_batches"]["above_chance"] == 20
