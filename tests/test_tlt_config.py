"""TLTConfig reads every key of the rollout and tlt sections and requires each."""

import dataclasses

import pytest

from tests.test_config import default_config
from tlt_jax.errors import ConfigError
from tlt_jax.rollout.strategy import PLAIN
from tlt_jax.tlt.bandit import arm_ladder
from tlt_jax.tlt.config import ROLLOUT_KEYS, TLT_KEYS, TLTConfig


def test_reads_the_default_config():
  config = default_config()
  c = TLTConfig.from_config(config)
  assert set(ROLLOUT_KEYS) <= set(config.rollout) and set(TLT_KEYS) <= set(config.tlt)
  for k in ROLLOUT_KEYS:
    assert getattr(c, k) == (tuple(config.rollout[k]) if k == "buckets" else config.rollout[k]), k
  assert c.strategies == ((3, 1, 3), (4, 1, 4), PLAIN) and c.speculative_arms == ((3, 1, 3), (4, 1, 4))
  assert c.buffer_dtype == config.tlt.buffer_dtype and c.seed == config.seed
  with pytest.raises(dataclasses.FrozenInstanceError):
    c.chunk_size = 1


@pytest.mark.parametrize("section,key", [("rollout", "window_block"), ("tlt", "checkpoint_buffer"),
                                         ("tlt", "strategies")])
def test_a_missing_key_is_a_config_error_naming_it(section, key):
  config = default_config()
  del config[section][key]
  with pytest.raises(ConfigError, match=f"config.{section} lacks {key}"):
    TLTConfig.from_config(config)


@pytest.mark.parametrize("key,value,match", [
    ("draft_vocab_size", -1, "tlt.draft_vocab_size"),
    ("draft_vocab_refresh", 0, "tlt.draft_vocab_refresh"),
    ("arm_ladder", (1, 2, 5), "tlt.arm_ladder"),  # the default arms have 2 verify groups
    ("arm_ladder", (2, 5), "tlt.arm_ladder"),
])
def test_new_tlt_keys_are_validated(key, value, match):
  from tlt_jax.config import validate
  config = default_config()
  config.tlt[key] = value
  with pytest.raises(ConfigError, match=match):
    validate(config)


def test_draft_vocab_below_topk_and_a_valid_ladder():
  from tlt_jax.config import validate
  config = default_config()
  config.tlt.strategies = ("d3k2n4", "d4k1n4", "plain")
  config.tlt.draft_vocab_size = 1
  with pytest.raises(ConfigError, match="at least the largest strategy topk"):
    validate(config)
  config.tlt.draft_vocab_size = 4096
  config.tlt.strategies = ("d3k1n3", "d4k1n4", "plain")
  config.tlt.arm_ladder = (1, 4)
  validate(config)
  c = TLTConfig.from_config(config)
  assert arm_ladder(c.strategies, (1, 2, 4, 8), c.arm_ladder) == {1: [(4, 1, 4), PLAIN], 2: [(4, 1, 4), PLAIN],
                                                                  4: [(3, 1, 3), PLAIN], 8: [(3, 1, 3), PLAIN]}
