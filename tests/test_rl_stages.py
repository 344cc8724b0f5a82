"""The RL step as registered stages (rl/stages.py, rl/trainer.py): bitwise equal to the monolithic
step it replaced; new losses and advantages against numpy; dynamic sampling; config checks."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tlt_jax.data.tasks.base import Example
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import init_model
from tlt_jax.rl import advantages, losses, rewards, stages
from tlt_jax.rl.packing import pack_sequences
from tlt_jax.rl.trainer import RLTrainer
from tlt_jax.rl.update import UpdateConfig, make_logprob_fn, make_policy_update_step, policy_forward
from tlt_jax.rollout.engine import RolloutResult
from tlt_jax.rollout.records import GroupAccount, RolloutStats, StepAccount
from tlt_jax.train.state import TrainState, accumulate_gradients, create_train_state, jit_step

CFG = ModelConfig(vocab_size=24, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, tie_word_embeddings=False)
P, G, M = 3, 4, 10  # prompts, group size, max new tokens
SGD = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.5))


class _Task:
  """Correct when the response ends with the answer; the answer is parsable when it is a digit."""

  def verify(self, response, example):
    return response.endswith(example.answer)

  def extract_answer(self, response):
    return response[-1] if response and response[-1].isdigit() else None


TASK = _Task()


@functools.cache
def _model():
  return nnx.split(init_model(CFG, seed=0))


def _fresh_state(tx=SGD):
  return create_train_state(jax.tree.map(jnp.copy, _model()[1]), tx, None)


@functools.cache
def _jitted():
  """(logprob_fn, update_step): jitted once for every test (compiled once per shape)."""
  graphdef, _ = _model()
  return (make_logprob_fn(graphdef, 1.0),
          make_policy_update_step(graphdef, SGD, UpdateConfig(kl_coef=0.05), _fresh_state(), None, with_ref=True))


def _rollout(seed: int, num_prompts: int = P, responses=None) -> stages.Rollout:
  """A synthetic rollout: random prompts (lengths 3..6) and responses (lengths 1..M)."""
  rng = np.random.default_rng(seed)
  b = num_prompts * G
  examples = [Example(f"q{seed}-{i // G}", "", "7", {"difficulty": 1}, prompt_id=i // G) for i in range(b)]
  prompt_len = np.repeat(rng.integers(3, 7, num_prompts), G).astype(np.int32)
  prompt = np.where(np.arange(8)[None] < prompt_len[:, None], rng.integers(3, CFG.vocab_size, (b, 8)), 0)
  lengths = rng.integers(1, M + 1, b).astype(np.int32)
  tokens = np.where(np.arange(M)[None] < lengths[:, None], rng.integers(3, CFG.vocab_size, (b, M)), 0)
  logprobs = np.where(tokens > 0, -rng.uniform(0.5, 3.0, (b, M)), 0.0).astype(np.float32)
  finished = rng.uniform(size=b) < 0.9
  if responses is None:
    responses = [str(rng.choice(["7", "3", "x7", "", "12"])) for _ in range(b)]
  result = RolloutResult(tokens.astype(np.int32), lengths, logprobs, finished,
                         RolloutStats(time_s={"decode": 0.1}, num_tokens=int(lengths.sum())))
  return stages.Rollout(examples, prompt.astype(np.int32), prompt_len, result, list(responses),
                        rng.uniform(size=b) < 0.5, StepAccount.of_groups(
                            [GroupAccount(1.0, 0.0, 0.0, 0.0, 1.0)], wall_s=1.0, preempt_wait_s=0.0,
                            drafter_steps=0), rollouts=b)


def _trainer(rollouts, *, pack=True, advantage="grpo", filtering=False, band=(0.0, 1.0), rounds=0):
  """An RLTrainer without TLT or data: its stage methods over fixed rollouts (in order)."""
  graphdef, params = _model()
  t = RLTrainer.__new__(RLTrainer)
  t.rl = types.SimpleNamespace(group_size=G, prompts_per_step=P, length_bucket=8, micro_batches=1)
  t.tokenizer = types.SimpleNamespace(pad_id=0)
  t.task, t.mesh, t.pack, t.pack_len, t.pack_rows_multiple = TASK, None, pack, 32, 4
  t.state, t.with_ref = _fresh_state(), True
  t.ref_params = jax.tree.map(lambda x: x + 0.01, params)
  t.logprob_fn, t.update_step = _jitted()
  t.token_estimator = advantages.is_token_estimator(advantage)
  t.advantage_fn = jax.jit(advantages.token_advantages(advantage) if t.token_estimator
                           else advantages.get_advantage(advantage))
  t.reward_fn = rewards.safe_reward(rewards.combine_rewards({"verifier": 1.0, "format": 0.1}))
  t.correct_fn = rewards.safe_reward(rewards.get_reward("verifier"))
  t.filtering, t.dynamic_sampling, t.accuracy_band, t.filter_rounds = filtering, filtering, band, rounds
  t.scorers = {}
  t.rng = jax.random.PRNGKey(0)
  queue = list(rollouts)
  t.prompts = iter([[r.examples[i] for i in range(0, len(r.examples), G)] for r in rollouts])
  t._rollout = lambda examples, key, step: queue.pop(0)  # noqa: E731
  return t


# --- the monolithic step of commit 666e166 (rl/trainer.py, rl/update.py), kept as the reference ---


def _old_build_update_batch(prompt_BxP, prompt_len_B, result, advantages_B, length_bucket, pad_id):
  b = prompt_BxP.shape[0]
  total_B = prompt_len_B + result.lengths
  length = max(stages.round_up(int(total_B.max()), length_bucket), 2)
  t_BxL = np.broadcast_to(np.arange(length), (b, length))
  resp_idx_BxL = t_BxL - prompt_len_B[:, None]
  in_prompt = resp_idx_BxL < 0
  in_resp = (resp_idx_BxL >= 0) & (resp_idx_BxL < result.lengths[:, None])
  gather = np.clip(resp_idx_BxL, 0, result.tokens.shape[1] - 1)
  prompt_padded = np.full((b, length), pad_id, np.int32)
  width = min(prompt_BxP.shape[1], length)
  prompt_padded[:, :width] = prompt_BxP[:, :width]
  tokens = np.where(in_prompt, prompt_padded,
                    np.where(in_resp, np.take_along_axis(result.tokens, gather, 1), pad_id))
  sampler_lp = np.where(in_resp, np.take_along_axis(result.logprobs, gather, 1), 0.0)
  in_seq = t_BxL < total_B[:, None]
  return {"tokens": tokens.astype(np.int32), "positions": np.ascontiguousarray(t_BxL, np.int32),
          "segment_ids": in_seq.astype(np.int32), "response_mask": in_resp.astype(np.float32),
          "advantages": np.where(in_seq, np.asarray(advantages_B, np.float32)[:, None], 0.0).astype(np.float32),
          "sampler_logprobs": sampler_lp.astype(np.float32)}


def _old_policy_update_step(graphdef, optimizer, cfg, state, batch):
  _TOKEN_MEAN_METRICS = ("clip_frac", "clip_frac_low", "clip_frac_high", "approx_kl", "ratio_mean")
  mask_full = batch["response_mask"].astype(jnp.float32)
  tokens_full = jnp.maximum(jnp.sum(mask_full), 1.0)
  has_ref = "ref_logprobs" in batch
  batch = dict(batch, loss_weights=losses.aggregation_weights(mask_full, batch["segment_ids"], cfg.aggregation))

  def loss_fn(params, mb):
    mask = mb["response_mask"].astype(jnp.float32)
    logp, entropy, hidden = policy_forward(graphdef, params, mb["tokens"], mb["positions"],
                                           mb["segment_ids"], cfg.temperature, None)
    loss, m = losses.ppo_clip_loss(logp, mb["old_logprobs"], mb["advantages"], mask,
                                   clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                   logp_ref_BxT=mb["ref_logprobs"] if has_ref else None,
                                   kl_coef=cfg.kl_coef, weights_BxT=mb["loss_weights"])
    w_tokens = jnp.sum(mask) / tokens_full
    aux = {k: m[k] * w_tokens for k in _TOKEN_MEAN_METRICS}
    aux["pg_loss"] = m["pg_loss"]
    aux["kl"] = m["kl_ref"] if has_ref else jnp.zeros((), jnp.float32)
    aux["entropy"] = losses.masked_aggregate(entropy, mask, "token") * w_tokens
    return loss, (aux, hidden)

  (loss, (aux, hidden)), grads = accumulate_gradients(loss_fn, state.params, batch, cfg.micro_batches,
                                                      has_outputs=True)
  grad_norm = optax.tree.norm(grads)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
  new_state = TrainState(step=state.step + 1, params=jax.tree.map(keep, params, state.params),
                         opt_state=jax.tree.map(keep, opt_state, state.opt_state))
  metrics = dict(aux, loss=loss, grad_norm=grad_norm, skipped=(~ok).astype(jnp.float32),
                 num_tokens=jnp.sum(mask_full), num_sequences=losses.num_sequences(mask_full, batch["segment_ids"]))
  return new_state, metrics, hidden


def _old_step(t, rollout: stages.Rollout, pack: bool):
  """train_step of 666e166 from the rollout on: rewards, advantages, batch, log-probs, update."""
  rewards_PxG, correct = [], []
  for start in range(0, len(rollout.examples), G):
    rows = slice(start, start + G)
    args = (list(rollout.responses[rows]), rollout.result.finished[rows].tolist(),
            rollout.result.lengths[rows].tolist(), rollout.examples[start], TASK)
    rewards_PxG.append(t.reward_fn(*args))
    correct.append(t.correct_fn(*args))
  rewards_PxG = np.stack(rewards_PxG)
  advantages_B = np.asarray(t.advantage_fn(jnp.asarray(rewards_PxG))).reshape(-1)
  host = _old_build_update_batch(rollout.prompt_BxW, rollout.prompt_len_B, rollout.result, advantages_B, 8, 0)
  if pack:
    host, _ = pack_sequences(host, rollout.prompt_len_B + rollout.result.lengths, 32, 4)
  host = dict(host)
  sampler_lp = host.pop("sampler_logprobs")
  batch = dict(host)
  args = (batch["tokens"], batch["positions"], batch["segment_ids"], batch["response_mask"], sampler_lp)
  batch["old_logprobs"], gap = t.logprob_fn(t.state.params, *args)
  batch["ref_logprobs"], _ = t.logprob_fn(t.ref_params, *args)
  graphdef, _ = _model()
  step = jit_step(functools.partial(_old_policy_update_step, graphdef, SGD, UpdateConfig(kl_coef=0.05)),
                  t.state, None, None, num_outputs_extra=2)
  state, metrics, hidden = step(_fresh_state(), batch)
  return jax.device_get((state, metrics, hidden, gap)), rewards_PxG, advantages_B, host


@pytest.mark.parametrize("pack", [True, False])
def test_staged_grpo_step_is_bitwise_the_monolithic_step(pack):
  rollout = _rollout(seed=1)
  old_t = _trainer([rollout], pack=pack)
  (old_state, old_metrics, old_hidden, old_gap), old_rewards, old_adv_B, old_host = _old_step(old_t, rollout, pack)
  t = _trainer([rollout], pack=pack)
  clock = stages.StageClock()
  got, scores = t.sample(1, clock)
  batch = t.prepare_update_batch(got)
  token_rewards = t.score_tokens(batch, scores)
  adv = t.compute_advantages(scores, token_rewards, batch)
  metrics, hidden = t.update_policy(batch, adv)
  assert got is rollout and token_rewards.rewards_BxL is None
  np.testing.assert_array_equal(scores.rewards_PxG, old_rewards)
  assert np.abs(old_adv_B).max() > 0 and float(old_metrics["clip_frac"]) >= 0 and float(old_metrics["kl"]) > 0
  np.testing.assert_array_equal(batch.to_update_layout(adv)[batch.to_update_layout(batch.rows["response_mask"]) > 0],
                                old_host["advantages"][old_host["response_mask"] > 0])
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(t.state.params), old_state.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(t.state.opt_state), old_state.opt_state)
  assert metrics == {k: float(v) for k, v in old_metrics.items()}
  np.testing.assert_array_equal(np.asarray(hidden), old_hidden)
  assert batch.logprob_gap == {k: float(v) for k, v in old_gap.items()}
  # The record's advantage summary is the old per-sequence one.
  first = np.argmax(batch.rows["response_mask"] > 0, axis=1)
  np.testing.assert_array_equal(adv[np.arange(len(first)), first], old_adv_B)


# --- dynamic sampling ------------------------------------------------------------------------


def test_dynamic_sampling_refills_the_batch_and_reports_drops():
  # Round 1: prompt 0's group all correct, prompt 1 all wrong (equal rewards: dropped), prompt 2
  # mixed. Round 2: all mixed. The batch = round 1's group 2 + round 2's groups 0, 1.
  mixed = ["7", "3", "7", "x"]
  r1 = _rollout(11, responses=["7"] * 4 + ["3"] * 4 + mixed)
  r2 = _rollout(12, responses=mixed * 3)
  t = _trainer([r1, r2], filtering=True, rounds=2)
  rollout, scores = t.sample(1, stages.StageClock())
  assert rollout.rounds == 2 and rollout.rollouts == 2 * P * G and rollout.dropped_groups == 3
  assert [e.prompt for e in rollout.examples[::G]] == ["q11-2", "q12-0", "q12-1"]
  assert scores.rewards_PxG.shape == (P, G) and np.all(scores.rewards_PxG.std(axis=1) > 0)
  np.testing.assert_array_equal(rollout.result.tokens[:G], r1.result.tokens[2 * G:])
  np.testing.assert_array_equal(rollout.responses[G:], r2.responses[:2 * G])
  # The cap on extra rounds: no refill left -> the dropped groups fill the batch, reported.
  t = _trainer([r1], filtering=True, rounds=0)
  rollout, scores = t.sample(1, stages.StageClock())
  assert rollout.rounds == 1 and rollout.dropped_groups == 2 and len(rollout.examples) == P * G
  assert [e.prompt for e in rollout.examples[::G]] == ["q11-2", "q11-0", "q11-1"]
  # PRIME's accuracy band keeps groups with accuracy in [0.2, 0.8] only.
  keep = stages.keep_groups(stages.Scores(np.zeros((3, 4)), np.array([1] * 4 + [1, 0, 0, 0] + [0] * 4, bool)),
                            distinct_rewards=False, accuracy_band=(0.2, 0.8))
  np.testing.assert_array_equal(keep, [False, True, False])


# --- new advantages and losses against numpy ----------------------------------------------------


def test_dr_grpo_and_rloo_returns_match_numpy():
  rng = np.random.default_rng(0)
  r = rng.integers(0, 2, (2, 4)).astype(np.float32)
  r[0] = [1, 0, 0, 0]
  np.testing.assert_allclose(advantages.get_advantage("dr_grpo")(jnp.asarray(r)), r - r.mean(1, keepdims=True),
                             rtol=1e-6)
  lengths = np.array([[3, 5, 1, 4], [2, 6, 6, 3]])
  L = 8
  mask = (np.arange(L)[None, None] < lengths[..., None]).astype(np.float32)
  mask[1, 2, 0] = 0.0  # a response starting one token later
  q = (rng.normal(size=(2, 4, L)) * mask).astype(np.float32)
  inputs = advantages.AdvantageInputs(jnp.asarray(r), jnp.asarray(q), jnp.asarray(mask))
  got = np.asarray(advantages.get_advantage("rloo_returns", outcome_coef=2.0, process_coef=0.5)(inputs))
  # numpy, token by token
  ref = np.zeros_like(q, np.float64)
  for p in range(2):
    qbar = [q[p, j][mask[p, j] > 0].mean() for j in range(4)]
    for i in range(4):
      idx = np.flatnonzero(mask[p, i])
      per = np.zeros(L)
      per[idx] = 0.5 * (q[p, i, idx] * 4 / 3 - np.sum(qbar) / 3)  # PRIME's leave-one-out per token
      per[idx[-1]] += 2.0 * (r[p, i] - np.mean([r[p, j] for j in range(4) if j != i]))
      for t in idx:
        ref[p, i, t] = per[t:].sum()
  valid = mask > 0
  ref[valid] = (ref[valid] - ref[valid].mean()) / np.sqrt(ref[valid].var() + 1e-8)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
  assert np.all(got[~valid] == 0)
  # A sequence estimator lifted to tokens: constant over the response, 0 elsewhere.
  lifted = np.asarray(advantages.token_advantages("rloo")(inputs))
  np.testing.assert_array_equal(lifted, np.where(mask > 0, np.asarray(advantages.rloo_advantages(jnp.asarray(r)))[..., None], 0))


def _loss_inputs():
  rng = np.random.default_rng(3)
  B, T = 4, 6
  mask = np.ones((B, T), np.float32)
  mask[:, :2] = 0  # prompt
  mask[3, 4:] = 0
  old = -rng.uniform(0.5, 2.0, (B, T)).astype(np.float32)
  new = (old + rng.normal(0, 0.3, (B, T))).astype(np.float32)
  adv = rng.normal(size=(B, T)).astype(np.float32)
  seg = np.ones((B, T), np.int32)
  seg[1, 3:] = 2  # row 1 packs two sequences
  return new, old, adv, mask, seg


def test_gspo_and_cispo_match_numpy():
  new, old, adv, mask, seg = _loss_inputs()
  w = np.asarray(losses.aggregation_weights(jnp.asarray(mask), jnp.asarray(seg), "sequence"))
  # GSPO: s_i = exp(mean over sequence i of the log-ratio); -min(s A, clip(s) A) per token.
  lr = np.where(mask > 0, new - old, 0.0).astype(np.float64)
  s = np.zeros_like(lr)
  for b in range(4):
    for k in np.unique(seg[b]):
      idx = (seg[b] == k) & (mask[b] > 0)
      s[b, idx] = np.exp(lr[b, idx].mean())
  per = -np.minimum(s * adv, np.clip(s, 1 - 0.1, 1 + 0.15) * adv)
  fn = jax.jit(functools.partial(losses.get_loss("gspo"), clip_eps=0.1, clip_eps_high=0.15))
  loss, m = fn(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask),
               weights_BxT=jnp.asarray(w), segment_ids_BxT=jnp.asarray(seg))
  np.testing.assert_allclose(float(loss), np.sum(w * per), rtol=1e-5)
  np.testing.assert_allclose(float(m["ratio_mean"]), s[mask > 0].mean(), rtol=1e-5)
  # Its gradient: d l_t / d logp_t = -A s (unclipped side), times the token's weight.
  g = jax.grad(lambda x: fn(x, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), weights_BxT=jnp.asarray(w),
                            segment_ids_BxT=jnp.asarray(seg))[0])(jnp.asarray(new))
  active = np.where(adv > 0, s <= 1.15, s >= 0.9) & (mask > 0)
  np.testing.assert_allclose(np.asarray(g), np.where(active, -w * adv * s, 0.0), rtol=1e-4, atol=1e-7)
  # CISPO: -sg(clip(rho)) A log pi, every token keeps its gradient.
  rho = np.exp(lr)
  wt = np.clip(rho, 1 - 0.2, 1 + 0.28)
  fn = jax.jit(functools.partial(losses.get_loss("cispo"), clip_eps=0.2, clip_eps_high=0.28))
  tw = mask / mask.sum()
  loss, m = fn(jnp.asarray(new), jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), weights_BxT=jnp.asarray(tw))
  np.testing.assert_allclose(float(loss), np.sum(tw * -wt * adv * new), rtol=1e-5)
  g = jax.grad(lambda x: fn(x, jnp.asarray(old), jnp.asarray(adv), jnp.asarray(mask), weights_BxT=jnp.asarray(tw))[0])(
      jnp.asarray(new))
  np.testing.assert_allclose(np.asarray(g), np.where(mask > 0, -tw * wt * adv, 0.0), rtol=1e-5, atol=1e-7)
  clipped = ((rho < 0.8) | (rho > 1.28))[mask > 0].mean()
  np.testing.assert_allclose(float(m["clip_frac"]), clipped, rtol=1e-6)


def test_registered_loss_runs_in_the_update_step():
  """rl.loss / rl.loss_kwargs reach the jitted update: gspo's small clip range clips most tokens."""
  rollout = _rollout(seed=2)
  t = _trainer([rollout])
  rollout, scores = t.sample(1, stages.StageClock())
  batch = t.prepare_update_batch(rollout)
  adv = t.compute_advantages(scores, t.score_tokens(batch, scores), batch)
  device = dict(batch.device, advantages=batch.to_update_layout(adv))
  device["old_logprobs"] = device["old_logprobs"] + 0.01 * device["response_mask"]  # ratios != 1
  cfg = UpdateConfig.from_config(dict(clip_eps=0.2, clip_eps_high=0.0, aggregation="token", kl_coef=0.0,
                                      micro_batches=1, loss="gspo",
                                      loss_kwargs={"clip_eps": 3e-4, "clip_eps_high": 4e-4,
                                                   "aggregation": "sequence"}), 1.0)
  assert cfg.loss == "gspo" and cfg.aggregation == "sequence" and dict(cfg.loss_kwargs)["clip_eps"] == 3e-4
  step = make_policy_update_step(_model()[0], SGD, cfg, t.state, None, with_ref=True)
  _, metrics, _ = step(t.state, device)
  assert float(metrics["clip_frac"]) > 0.1 and np.isfinite(float(metrics["loss"]))
  with pytest.raises(ValueError, match="bad arguments"):
    UpdateConfig(loss="cispo", loss_kwargs=(("clip_ratio", 1.0),))


def test_config_checks_for_the_stage_keys():
  from tlt_jax import config as config_lib
  from experiments.common import load_config, with_overrides
  base = load_config("configs/default.py:tiny")
  for overrides, match in [({"rl.loss": "ppo"}, "config.rl.loss='ppo'"),
                           ({"rl.loss_kwargs": {"clip": 1.0}}, "config.rl.loss_kwargs"),
                           ({"rl.advantage_kwargs": {"gamma": 0.9}}, "config.rl.advantage_kwargs"),
                           ({"rl.token_rewards.kl": 0.1}, "config.rl.advantage='grpo' is not allowed"),
                           ({"rl.accuracy_band": (0.8, 0.2)}, "config.rl.accuracy_band"),
                           ({"rl.advantage": "rloo_returns", "rl.token_rewards.prime": 1.0}, "no 'prime' section")]:
    cfg = with_overrides(base, overrides)
    with pytest.raises(config_lib.ConfigError, match=match):
      config_lib.validate(cfg)
