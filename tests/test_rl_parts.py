"""Rewards, advantages, losses and optimizer schedules, against hand-computed numbers."""

import logging
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tlt_jax.rl import advantages, losses, rewards
from tlt_jax.train import optim


class FakeTask:
  """Answer = the stripped response; verify is a string compare; "" has no answer."""

  def extract_answer(self, response):
    return response.strip() or None

  def verify(self, response, example):
    return self.extract_answer(response) == example.answer


TASK = FakeTask()
EXAMPLE = types.SimpleNamespace(answer="42", meta={"id": "p7"})


def sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


# --- rewards -------------------------------------------------------------------------------


def test_verifier_scores_only_finished_correct():
  fn = rewards.get_reward("verifier")
  r = fn(["42", "41", "42", ""], [True, True, False, True], [3, 3, 9, 1], EXAMPLE, TASK)
  assert r.dtype == np.float32
  np.testing.assert_array_equal(r, [1.0, 0.0, 0.0, 0.0])


def test_length_penalty_hand_computed():
  fn = rewards.get_reward("length_penalty", alpha=0.5)
  responses = ["42", "42", "41", "42", "42"]
  finished = [True, True, True, False, True]
  lengths = [10, 20, 5, 30, 30]
  r = fn(responses, finished, lengths, EXAMPLE, TASK)
  # Correct: indices 0, 1, 4 (2 is wrong, 3 truncated): lengths 10, 20, 30.
  mean, std = 20.0, math.sqrt(200.0 / 3.0)  # population std
  expected = [1 - 0.5 * sigmoid((10 - mean) / (std + 1e-7)), 1 - 0.5 * sigmoid(0.0), 0.0, 0.0,
              1 - 0.5 * sigmoid((30 - mean) / (std + 1e-7))]
  np.testing.assert_allclose(r, expected, rtol=1e-6)
  np.testing.assert_allclose(r[[0, 1, 4]], [0.88645, 0.75, 0.61355], atol=1e-5)  # pinned
  assert r[0] > r[1] > r[4]  # shorter correct answers score more


def test_length_penalty_degenerate_groups():
  fn = rewards.get_reward("length_penalty", alpha=0.4)
  # One correct response: z = 0 -> 1 - alpha / 2; equal lengths: std = 0, still finite.
  np.testing.assert_allclose(fn(["42", "1"], [True, True], [7, 3], EXAMPLE, TASK), [0.8, 0.0])
  np.testing.assert_allclose(fn(["42", "42"], [True, True], [5, 5], EXAMPLE, TASK), [0.8, 0.8])
  np.testing.assert_array_equal(fn(["1", "2"], [True, True], [5, 6], EXAMPLE, TASK), [0.0, 0.0])
  # alpha = 0 is the verifier.
  no_penalty = rewards.get_reward("length_penalty", alpha=0.0)
  np.testing.assert_array_equal(no_penalty(["42", "42", "x"], [True] * 3, [1, 9, 4], EXAMPLE, TASK),
                                [1.0, 1.0, 0.0])


def test_format_and_combine():
  responses, finished, lengths = ["42", "17", "", "42"], [True, True, True, False], [2, 2, 1, 2]
  fmt = rewards.get_reward("format")
  np.testing.assert_array_equal(fmt(responses, finished, lengths, EXAMPLE, TASK), [1, 1, 0, 0])
  combined = rewards.combine_rewards({"verifier": 1.0, "format": 0.1, "length_penalty": 0.0})
  np.testing.assert_allclose(combined(responses, finished, lengths, EXAMPLE, TASK),
                             [1.1, 0.1, 0.0, 0.0], rtol=1e-6)
  with_kwargs = rewards.combine_rewards({"length_penalty": 2.0}, {"length_penalty": {"alpha": 1.0}})
  np.testing.assert_allclose(with_kwargs(["42"], [True], [4], EXAMPLE, TASK), [1.0])  # 2*(1-1/2)
  with pytest.raises(ValueError, match="not in specs"):
    rewards.combine_rewards({"verifier": 1.0}, {"format": {}})


def test_registry_errors():
  with pytest.raises(ValueError, match=r"unknown reward 'nope'.*length_penalty.*verifier"):
    rewards.get_reward("nope")
  with pytest.raises(ValueError, match="bad arguments"):
    rewards.get_reward("length_penalty", beta=1.0)
  with pytest.raises(ValueError, match=r"unknown advantage 'ppo'.*grpo.*rloo"):
    advantages.get_advantage("ppo")


def test_safe_reward_catches_and_counts(caplog):

  @rewards.register_reward("test_raises_on_41")
  def raises(responses, finished, lengths, example, task):
    if "41" in responses:
      raise RuntimeError("checker crashed")
    return np.ones(len(responses), np.float32)

  safe = rewards.safe_reward(rewards.get_reward("test_raises_on_41"), name="raises")
  with caplog.at_level(logging.WARNING, logger="tlt_jax.rl.rewards"):
    bad = safe(["41", "42", "43"], [True] * 3, [1, 1, 1], EXAMPLE, TASK)
  np.testing.assert_array_equal(bad, [0.0, 0.0, 0.0])
  assert safe.failures == 1
  assert "p7" in caplog.text and "checker crashed" in caplog.text
  assert safe.recent_errors[-1] == ("p7", "RuntimeError: checker crashed")
  # The run goes on: the next group is scored normally.
  np.testing.assert_array_equal(safe(["42", "42"], [True] * 2, [1, 1], EXAMPLE, TASK), [1.0, 1.0])
  assert (safe.failures, safe.calls) == (1, 2)
  # A wrong shape or a nan is a failure too; the id falls back to example.prompt_id.
  nan = rewards.safe_reward(lambda *a: np.array([np.nan, 1.0]))
  out = nan(["a", "b"], [True] * 2, [1, 1], types.SimpleNamespace(prompt_id=12, meta={}), TASK)
  np.testing.assert_array_equal(out, [0.0, 0.0])
  assert nan.failures == 1 and nan.recent_errors[-1][0] == "12"


# --- advantages ----------------------------------------------------------------------------


def test_grpo_hand_computed():
  r = jnp.array([[1.0, 0.0, 1.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
  # mean 0.5; unbiased std sqrt(1/3) -> +-0.5 * sqrt(3); a constant group -> 0.
  a = advantages.get_advantage("grpo")(r)
  s3 = 0.5 * math.sqrt(3.0)
  np.testing.assert_allclose(a, [[s3, -s3, s3, -s3], [0, 0, 0, 0]], rtol=1e-5)
  a_pop = advantages.get_advantage("grpo", ddof=0)(r)  # population std 0.5 -> +-1
  np.testing.assert_allclose(a_pop[0], [1, -1, 1, -1], rtol=1e-5)
  a_mean = advantages.get_advantage("grpo", normalize_std=False)(r)
  np.testing.assert_allclose(a_mean, [[0.5, -0.5, 0.5, -0.5], [0, 0, 0, 0]])
  assert a.dtype == jnp.float32
  with pytest.raises(ValueError, match="G >= 2"):
    advantages.grpo_advantages(jnp.ones((3, 1)))


def test_rloo_hand_computed():
  r = jnp.array([[1.0, 0.0, 1.0, 0.0], [3.0, 1.0, 2.0, 0.0]])
  a = jax.jit(advantages.get_advantage("rloo"))(r)
  # Row 0: 1 - 1/3, 0 - 2/3. Row 1: 3 - 1, 1 - 5/3, 2 - 4/3, 0 - 2.
  np.testing.assert_allclose(a, [[2 / 3, -2 / 3, 2 / 3, -2 / 3], [2.0, -2 / 3, 2 / 3, -2.0]],
                             rtol=1e-6)


# --- losses --------------------------------------------------------------------------------


def _log_softmax_np(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_token_logprobs_and_entropy():
  logits = np.random.default_rng(0).normal(size=(2, 3, 5)).astype(np.float32) * 3
  targets = np.array([[0, 4, 2], [1, 1, 3]])
  pick = lambda lp: np.take_along_axis(lp, targets[..., None], -1)[..., 0]  # noqa: E731
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  lp = losses.token_logprobs(bf16, targets)
  assert lp.dtype == jnp.float32 and lp.shape == (2, 3)
  np.testing.assert_allclose(lp, pick(_log_softmax_np(np.asarray(bf16, np.float32))), atol=1e-5)
  hot = losses.token_logprobs(logits, targets, temperature=0.5)
  np.testing.assert_allclose(hot, pick(_log_softmax_np(logits / 0.5)), atol=1e-5)
  np.testing.assert_allclose(losses.entropy_from_logits(jnp.zeros((1, 2, 8))), math.log(8),
                             rtol=1e-6)
  logp = _log_softmax_np(logits)
  np.testing.assert_allclose(losses.entropy_from_logits(logits),
                             -np.sum(np.exp(logp) * logp, -1), atol=1e-5)


def test_kl_k3():
  np.testing.assert_allclose(losses.kl_k3(jnp.array([0.0, -1.0]), jnp.array([math.log(2.0), -1.0])),
                             [1.0 - math.log(2.0), 0.0], atol=1e-7)
  x = np.random.default_rng(1).normal(size=(2, 64)).astype(np.float32)
  assert bool(jnp.all(losses.kl_k3(x[0], x[1]) >= 0))


MASK = jnp.array([[1, 1, 1], [1, 0, 0]], jnp.float32)
# Jitted once per configuration: far faster on CPU than op-by-op dispatch.
ppo = jax.jit(losses.ppo_clip_loss, static_argnames=("clip_eps", "clip_eps_high", "aggregation"))


def test_ppo_on_policy_aggregations():
  logp = jnp.array([[-1.0, -2.0, -0.5], [-0.3, 7e3, jnp.nan]])  # garbage under the mask
  adv = jnp.array([1.0, -2.0])
  tok, m = ppo(logp, logp, adv, MASK, aggregation="token")
  seq, _ = ppo(logp, logp, adv, MASK, aggregation="sequence")
  # ratio 1 -> per-token loss -A: tokens (-1, -1, -1, +2): token mean -1/4, sequence mean 1/2.
  np.testing.assert_allclose(tok, -0.25, rtol=1e-6)
  np.testing.assert_allclose(seq, 0.5, rtol=1e-6)
  assert float(m["clip_frac"]) == 0.0 and abs(float(m["approx_kl"])) < 1e-7
  g = jax.grad(lambda x: ppo(x, logp, adv, MASK)[0])(logp)
  # d loss / d logp_t = -A rho / N on unclipped tokens, 0 on masked ones (no nan leaks).
  np.testing.assert_allclose(g, [[-0.25, -0.25, -0.25], [0.5, 0.0, 0.0]], rtol=1e-6)
  with pytest.raises(ValueError, match="aggregation"):
    ppo(logp, logp, adv, MASK, aggregation="batch")


def test_ppo_clipping_hand_computed():
  # Four one-token sequences: ratios 1.5, 1.5, 0.5, 0.5 with advantages +1, -1, +1, -1.
  old = jnp.zeros((4, 1))
  new = jnp.log(jnp.array([[1.5], [1.5], [0.5], [0.5]]))
  adv = jnp.array([1.0, -1.0, 1.0, -1.0])
  mask = jnp.ones((4, 1))
  loss, m = ppo(new, old, adv, mask, clip_eps=0.2)
  # Per token: -min(1.5, 1.2) = -1.2 (clipped); -min(-1.5, -1.2) = 1.5; -min(.5, .8) = -.5;
  # -min(-.5, -.8) = .8 (clipped).
  np.testing.assert_allclose(loss, (-1.2 + 1.5 - 0.5 + 0.8) / 4, rtol=1e-6)
  np.testing.assert_allclose([m["clip_frac"], m["clip_frac_high"], m["clip_frac_low"]],
                             [0.5, 0.25, 0.25])
  approx_kl = np.mean([1.5 - 1 - math.log(1.5)] * 2 + [0.5 - 1 - math.log(0.5)] * 2)
  np.testing.assert_allclose(m["approx_kl"], approx_kl, rtol=1e-5)
  np.testing.assert_allclose(m["ratio_max"], 1.5, rtol=1e-6)
  # Clip-higher: eps_high = 0.28 moves only the upper bound.
  high, _ = ppo(new, old, adv, mask, clip_eps=0.2, clip_eps_high=0.28)
  np.testing.assert_allclose(high, (-1.28 + 1.5 - 0.5 + 0.8) / 4, rtol=1e-6)
  g = jax.grad(lambda x: ppo(x, old, adv, mask)[0])(new)
  np.testing.assert_allclose(g[:, 0], [0.0, 1.5 / 4, -0.5 / 4, 0.0], rtol=1e-6)


def test_ppo_kl_penalty_to_reference():
  logp = jnp.array([[-1.0, -2.0, -0.5], [-0.3, 0.0, 0.0]])
  ref = logp + jnp.log(2.0)
  loss, m = ppo(logp, logp, jnp.zeros(2), MASK, logp_ref_BxT=ref, kl_coef=0.5)
  np.testing.assert_allclose(m["kl_ref"], 1 - math.log(2.0), rtol=1e-6)
  np.testing.assert_allclose(loss, 0.5 * (1 - math.log(2.0)), rtol=1e-6)


# --- schedules, bound, optimizer -------------------------------------------------------------


def test_schedules_hand_computed():
  constant = optim.make_schedule("constant", 1.0, 100, 10)
  np.testing.assert_allclose([constant(s) for s in (0, 5, 10, 99)], [0.0, 0.5, 1.0, 1.0])
  cosine = optim.make_schedule("cosine", 2.0, 110, 10, final_lr=0.2)
  np.testing.assert_allclose([cosine(s) for s in (5, 10, 60, 110)], [1.0, 2.0, 1.1, 0.2],
                             rtol=1e-5)
  wsd = optim.make_schedule("wsd", 1.0, 100, 10, decay_frac=0.2)
  np.testing.assert_allclose([wsd(s) for s in (5, 10, 79, 80, 90, 99, 100)],
                             [0.5, 1.0, 1.0, 1.0, 0.5, 0.05, 0.0], atol=1e-6)
  wsd_final = optim.make_schedule("wsd", 1.0, 100, 0, decay_frac=0.5, final_lr=0.1)
  np.testing.assert_allclose([wsd_final(s) for s in (0, 50, 75, 100)], [1.0, 1.0, 0.55, 0.1],
                             atol=1e-6)
  values = optim.schedule_values(wsd, 100)
  assert values.shape == (100,) and values[-1] > 0 and values.max() == 1.0


def test_schedule_errors():
  with pytest.raises(ValueError, match=r"unknown schedule 'step'.*constant.*cosine.*wsd"):
    optim.make_schedule("step", 1.0, 10, 0)
  with pytest.raises(ValueError, match="exceed total_steps"):
    optim.make_schedule("wsd", 1.0, 100, 90, decay_frac=0.2)
  with pytest.raises(ValueError, match=r"unknown option\(s\) \['decay_frac'\]"):
    optim.make_schedule("cosine", 1.0, 100, 10, decay_frac=0.2)
  with pytest.raises(ValueError, match="peak_lr"):
    optim.make_schedule("constant", 0.0, 100, 10)


def _bound_reference(eta, D, G):
  """O(T^2) transcription of the bound, 1-indexed as in the paper."""
  T = len(eta)
  S = lambda k: sum(eta[k - 1:])  # noqa: E731  sum_{t=k}^T eta_t
  Q = lambda k: sum(e * e for e in eta[k - 1:])  # noqa: E731
  first = (D**2 + G**2 * Q(1)) / (2 * S(1))
  last = G**2 / 2 * sum(eta[k - 1] / S(k + 1) * Q(k) / S(k) for k in range(1, T))
  return first + last


def test_wsd_convex_bound():
  # Constant eta: third term = (G^2/2) eta H_{T-1}; closed form.
  T, eta, D, G = 50, 0.1, 2.0, 3.0
  harmonic = sum(1.0 / j for j in range(1, T))
  closed = (D**2 + G**2 * T * eta**2) / (2 * T * eta) + G**2 / 2 * eta * harmonic
  np.testing.assert_allclose(optim.wsd_convex_bound(np.full(T, eta), D=D, G=G), closed, rtol=1e-12)
  # Any schedule: the O(T) suffix-sum version equals the direct transcription.
  eta_rand = np.random.default_rng(0).uniform(0.01, 1.0, 40)
  np.testing.assert_allclose(optim.wsd_convex_bound(eta_rand, D=1.5, G=0.7),
                             _bound_reference(list(eta_rand), 1.5, 0.7), rtol=1e-12)
  # Schaipp et al.: at the same peak lr, a WSD cooldown beats the constant schedule's bound.
  T, peak = 1000, 1.0 / math.sqrt(1000)
  wsd = optim.schedule_values(optim.make_schedule("wsd", peak, T, 0, decay_frac=0.2), T)
  const = optim.schedule_values(optim.make_schedule("constant", peak, T, 0), T)
  assert optim.wsd_convex_bound(wsd) < 0.8 * optim.wsd_convex_bound(const)
  with pytest.raises(ValueError, match="positive last value"):
    optim.wsd_convex_bound(np.array([1.0, 0.5, 0.0]))


def test_make_optimizer_from_config():
  cfg = types.SimpleNamespace(lr=0.1, steps=20, schedule="wsd", warmup_steps=2, decay_frac=0.5,
                              weight_decay=0.0, max_grad_norm=1.0)
  opt = optim.make_optimizer(cfg)
  params = {"w": jnp.array([3.0, -4.0])}
  state = opt.init(params)
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 2))
  updates, state = opt.update(grad_fn(params), state, params)
  np.testing.assert_array_equal(updates["w"], [0.0, 0.0])  # warmup starts at lr 0
  for _ in range(15):
    updates, state = opt.update(grad_fn(params), state, params)
    params = optax.apply_updates(params, updates)
  assert float(jnp.sum(params["w"] ** 2)) < 25.0 - 1.0
  # A dict config works too; decay_frac is ignored by a schedule that has no such option.
  cos = optim.schedule_from_config({"peak_lr": 1.0, "total_steps": 10, "schedule": "cosine",
                                    "decay_frac": 0.3})
  np.testing.assert_allclose([cos(0), cos(10)], [1.0, 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="needs one of"):
    optim.make_optimizer({"steps": 10})
