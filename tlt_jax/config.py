"""Config validation: every key is checked before any work starts.

Configs are ml_collections ConfigDicts from `configs/*.py:get_config()`, overridden with
`--config.a.b=v`. `validate(config)` raises ConfigError naming the key, the value and what is
allowed; `finalize(config)` validates and returns a locked, frozen copy.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import ml_collections


class ConfigError(ValueError):
  """A bad config key or value. The message names the key, the value and what is allowed."""


def _get(config, path: str):
  node = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise ConfigError(f"config key {path!r} is missing")
    node = node[part]
  return node


def _check(config, path: str, ok: Callable[[Any], bool], allowed: str):
  value = _get(config, path)
  try:
    good = ok(value)
  except Exception:  # noqa: BLE001 - a type error in the predicate means a bad value
    good = False
  if not good:
    raise ConfigError(f"config.{path}={value!r} is not allowed; allowed: {allowed}")


def pos_int(v):
  return isinstance(v, int) and not isinstance(v, bool) and v > 0


def nonneg_int(v):
  return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def pos_float(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def frac(v):
  return isinstance(v, (int, float)) and 0.0 <= v <= 1.0


def one_of(options: Iterable[str]):
  options = tuple(options)
  return (lambda v: v in options), f"one of {options}"


# (path, predicate, description of what is allowed); a path absent from a config is skipped
# only when marked optional by a leading '?'.
RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", nonneg_int, "an int >= 0"),
    ("model.vocab_size", nonneg_int, "an int >= 0 (0 = from the tokenizer)"),
    ("model.hidden_size", pos_int, "a positive int"),
    ("model.intermediate_size", pos_int, "a positive int"),
    ("model.num_layers", pos_int, "a positive int"),
    ("model.num_heads", pos_int, "a positive int"),
    ("model.num_kv_heads", pos_int, "a positive int dividing model.num_heads"),
    ("model.max_position_embeddings", pos_int, "a positive int"),
    ("model.param_dtype", *one_of(("float32", "bfloat16", "float16"))),
    ("model.dtype", *one_of(("float32", "bfloat16", "float16"))),
    ("mesh.shape", lambda v: len(v) == 3 and all(isinstance(s, int) and (s > 0 or s == -1) for s in v)
     and list(v).count(-1) <= 1, "3 ints (data, fsdp, tensor), each > 0 or one of them -1"),
    ("?sft.steps", nonneg_int, "an int >= 0"),
    ("?sft.batch_size", pos_int, "a positive int"),
    ("?sft.max_len", pos_int, "a positive int"),
    ("?sft.lr", pos_float, "a float > 0"),
    ("?sft.micro_batches", pos_int, "a positive int dividing sft.batch_size"),
    ("?sft.decay_frac", frac, "a float in [0, 1]"),
    ("?sft.warmup_steps", nonneg_int, "an int >= 0"),
    ("?checkpoint.every", pos_int, "a positive int"),
    ("?checkpoint.max_to_keep", pos_int, "a positive int"),
]

STAGES = ("sft", "drafter", "rl")
_extra_validators: list[Callable[[ml_collections.ConfigDict], None]] = []


def register_validator(fn: Callable[[ml_collections.ConfigDict], None]):
  """Adds a validator (e.g. for a subsystem's section); it raises ConfigError."""
  _extra_validators.append(fn)
  return fn


def validate(config: ml_collections.ConfigDict) -> None:
  for path, ok, allowed in RULES:
    optional = path.startswith("?")
    path = path.lstrip("?")
    try:
      _get(config, path)
    except ConfigError:
      if optional:
        continue
      raise
    _check(config, path, ok, allowed)
  m = config.model
  if m.num_heads % m.num_kv_heads:
    raise ConfigError(f"config.model.num_kv_heads={m.num_kv_heads} must divide "
                      f"config.model.num_heads={m.num_heads}")
  if "sft" in config and config.sft.batch_size % config.sft.micro_batches:
    raise ConfigError(f"config.sft.micro_batches={config.sft.micro_batches} must divide "
                      f"config.sft.batch_size={config.sft.batch_size}")
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  bad = [s for s in stages if s not in STAGES]
  if bad or not stages:
    raise ConfigError(f"config.stages={config.stages!r} is not allowed; allowed: a comma-separated "
                      f"subset of {STAGES}")
  for fn in _extra_validators:
    fn(config)


def stages(config) -> list[str]:
  return [s.strip() for s in str(config.stages).split(",") if s.strip()]


def finalize(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """Validates, locks (no new keys) and freezes the config."""
  validate(config)
  config.lock()
  return ml_collections.FrozenConfigDict(config)
