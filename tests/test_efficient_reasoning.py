"""Efficient reasoning as its authors ran it: the batch-whitened estimators against numpy, the
config's optimiser settings, and the experiment's selection rule and seed statistics."""

import jax.numpy as jnp
import numpy as np
import pytest

from tlt_jax.rl import advantages


@pytest.mark.parametrize("name", ["rloo", "grpo", "dr_grpo"])
def test_whitened_sequence_estimators_match_numpy(name):
  rng = np.random.default_rng(2)
  r = rng.uniform(0, 1, (5, 4)).astype(np.float32)
  r[1] = 0.5  # a group of equal rewards: zero before whitening
  raw = np.asarray(advantages.get_advantage(name)(jnp.asarray(r)), np.float64)
  if name == "rloo":  # the leave-one-out advantage by hand
    np.testing.assert_allclose(raw, [[r[p, i] - np.delete(r[p], i).mean() for i in range(4)] for p in range(5)],
                               rtol=1e-5, atol=1e-6)
  got = np.asarray(advantages.get_advantage(name, whiten=True)(jnp.asarray(r)))
  np.testing.assert_allclose(got, (raw - raw.mean()) / np.sqrt(raw.var() + 1e-8), rtol=1e-4, atol=1e-5)
  assert abs(got.mean()) < 1e-5 and got.std() == pytest.approx(1.0, rel=1e-4)


def test_config_holds_the_official_optimiser():
  from experiments.common import load_config
  from tlt_jax import config as config_lib
  for arg in ("small", "tiny"):
    c = load_config(f"configs/efficient_reasoning.py:{arg}")
    config_lib.validate(c)
    assert c.rl.advantage == "rloo" and c.rl.advantage_kwargs.whiten is True
    assert c.rl.aggregation == "sequence" and c.rl.kl_coef == 0.001
    assert c.rl.rewards.length_penalty == 1.0 and c.rl.rewards.verifier == 0.0
  c = load_config("configs/efficient_reasoning.py:r1_distill_qwen_1_5b")
  assert c.init_from and c.model.num_layers == 28 and tuple(c.mesh.shape) == (1, -1, 1)
  with pytest.raises(ValueError, match="unknown argument 'huge'"):
    load_config("configs/efficient_reasoning.py:huge")


def test_keeps_sft_and_paired_seed_statistics():
  from experiments import efficient_reasoning as er
  sft = {"all": {"sampled_acc": 0.5, "greedy_acc": 0.6, "n": 100, "samples": 1}}
  se = np.sqrt(0.25 / 100)
  assert er.keeps_sft({"all": {"sampled_acc": 0.5 - 0.9 * se, "greedy_acc": 0.7}}, sft)
  assert not er.keeps_sft({"all": {"sampled_acc": 0.5 - 1.1 * se, "greedy_acc": 0.7}}, sft)
  stats = lambda tok, acc: {"all": dict(sampled_tokens=tok, sampled_acc=acc, greedy_tokens=tok, greedy_acc=acc,  # noqa: E731
                                        rechecks=0.0, n=10)}
  family = {0.0: {0: stats(20, 0.5), 1: stats(30, 0.6), 2: stats(25, 0.4)},
            0.4: {0: stats(10, 0.5), 1: stats(16.5, 0.5), 2: stats(12.5, 0.5)}}
  rows = er.summarize(family, stats(40, 0.3), [0, 1, 2])
  row = [r for r in rows if r["alpha"] == 0.4 and r["band"] == "all"][0]
  d = np.array([10 / 20, 16.5 / 30, 12.5 / 25]) - 1  # paired relative token changes
  assert row["sampled_tokens_change"] == pytest.approx(d.mean())
  assert row["sampled_tokens_change_sd"] == pytest.approx(d.std(ddof=1))
  assert row["sampled_tokens_change_exceeds"]  # -48 % with a spread of ~2.5 %
  a = np.array([0.0, -0.1, 0.1])
  assert row["sampled_acc_change"] == pytest.approx(a.mean(), abs=1e-12) and not row["sampled_acc_change_exceeds"]
  assert row["sampled_tokens_mean"] == pytest.approx(13.0) and row["sampled_tokens_sd"] == pytest.approx(np.sqrt(21.5 / 2))
