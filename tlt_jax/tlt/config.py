"""`TLTConfig`: the typed view of the config sections `rollout` and `tlt`, the one place that
reads them. Every key is required (their defaults live in configs/default.py only); a missing
key is a config error naming it."""

from __future__ import annotations

import dataclasses
from typing import Any

from tlt_jax.errors import ConfigError
from tlt_jax.rollout.strategy import PLAIN, parse_strategy

ROLLOUT_KEYS = ("max_new_tokens", "chunk_size", "temperature", "top_p", "top_k", "buckets", "spec_threshold",
                "rounds_per_chunk", "window_block", "max_prompt_len")
TLT_KEYS = ("speculative", "train_drafter", "rollout_groups", "train_where", "single_group", "between_steps",
            "strategies", "bandit_epsilon", "bandit_window", "drafter_lr", "drafter_batch_size",
            "buffer_capacity", "buffer_decay", "max_in_flight", "max_drafter_steps", "buffer_seq_len",
            "buffer_bytes", "buffer_dtype", "checkpoint_buffer", "draft_vocab_size", "draft_vocab_refresh",
            "draft_vocab_decay", "arm_ladder")


def _read(config, section: str, keys) -> dict[str, Any]:
  if section not in config:
    raise ConfigError(f"config.{section} is missing; allowed: the section of configs/default.py")
  values = config[section]
  missing = [k for k in keys if k not in values]
  if missing:
    raise ConfigError(f"config.{section} lacks {', '.join(missing)}; allowed: every key of "
                      f"configs/default.py's {section} section")
  return {k: values[k] for k in keys}


@dataclasses.dataclass(frozen=True)
class TLTConfig:
  """The rollout's and TLT's settings (configs/default.py documents each key)."""

  # rollout
  max_new_tokens: int
  chunk_size: int
  temperature: float
  top_p: float
  top_k: int
  buckets: tuple[int, ...]
  spec_threshold: int
  rounds_per_chunk: int
  window_block: int
  max_prompt_len: int
  # tlt
  speculative: bool
  train_drafter: bool
  rollout_groups: int
  train_where: str
  single_group: str
  between_steps: int
  strategies: tuple[tuple[int, int, int], ...]  # bandit arms: Strategy tuples or PLAIN
  bandit_epsilon: float
  bandit_window: int
  drafter_lr: float
  drafter_batch_size: int
  buffer_capacity: int
  buffer_decay: float
  max_in_flight: int
  max_drafter_steps: int
  buffer_seq_len: int
  buffer_bytes: int
  buffer_dtype: str
  checkpoint_buffer: bool
  draft_vocab_size: int  # 0: draft over the full vocabulary
  draft_vocab_refresh: int  # RL steps between draft vocabulary refreshes
  draft_vocab_decay: float  # weight of the earlier counts per RL step
  arm_ladder: tuple[int, ...]  # () : every arm in every bucket; else tlt/bandit.arm_ladder thresholds
  seed: int

  @classmethod
  def from_config(cls, config) -> "TLTConfig":
    r, t = _read(config, "rollout", ROLLOUT_KEYS), _read(config, "tlt", TLT_KEYS)
    return cls(
        max_new_tokens=int(r["max_new_tokens"]), chunk_size=int(r["chunk_size"]),
        temperature=float(r["temperature"]), top_p=float(r["top_p"]), top_k=int(r["top_k"]),
        buckets=tuple(int(b) for b in r["buckets"]), spec_threshold=int(r["spec_threshold"]),
        rounds_per_chunk=int(r["rounds_per_chunk"]), window_block=int(r["window_block"]),
        max_prompt_len=int(r["max_prompt_len"]),
        speculative=bool(t["speculative"]), train_drafter=bool(t["train_drafter"]),
        rollout_groups=int(t["rollout_groups"]), train_where=str(t["train_where"]),
        single_group=str(t["single_group"]), between_steps=int(t["between_steps"]),
        strategies=tuple(parse_strategy(s) for s in t["strategies"]),
        bandit_epsilon=float(t["bandit_epsilon"]), bandit_window=int(t["bandit_window"]),
        drafter_lr=float(t["drafter_lr"]), drafter_batch_size=int(t["drafter_batch_size"]),
        buffer_capacity=int(t["buffer_capacity"]), buffer_decay=float(t["buffer_decay"]),
        max_in_flight=int(t["max_in_flight"]), max_drafter_steps=int(t["max_drafter_steps"]),
        buffer_seq_len=int(t["buffer_seq_len"]), buffer_bytes=int(t["buffer_bytes"]),
        buffer_dtype=str(t["buffer_dtype"]), checkpoint_buffer=bool(t["checkpoint_buffer"]),
        draft_vocab_size=int(t["draft_vocab_size"]), draft_vocab_refresh=int(t["draft_vocab_refresh"]),
        draft_vocab_decay=float(t["draft_vocab_decay"]), arm_ladder=tuple(int(x) for x in t["arm_ladder"]),
        seed=int(config.seed))

  @property
  def speculative_arms(self) -> tuple[tuple[int, int, int], ...]:
    """The strategies a speculative decoder runs (the arms other than PLAIN)."""
    return tuple(a for a in self.strategies if a != PLAIN)
