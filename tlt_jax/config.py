"""Config validation: every key is checked before any work starts.

Configs are ml_collections ConfigDicts from `configs/*.py:get_config()`, overridden with
`--config.a.b=v`. `validate(config)` raises ConfigError naming the key, the value and what is
allowed; `finalize(config)` validates and returns a locked, frozen copy.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import ml_collections

from tlt_jax.errors import ConfigError  # noqa: F401  (re-exported: config_lib.ConfigError)


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


def nonneg_float(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def is_bool(v):
  return isinstance(v, bool)


def open_unit(v):
  return isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 < v <= 1.0


def increasing_ints(v):
  return (len(v) > 0 and all(pos_int(b) for b in v)
          and all(a < b for a, b in zip(tuple(v)[:-1], tuple(v)[1:])))


def one_of(options: Iterable[str]):
  options = tuple(options)
  return (lambda v: v in options), f"one of {options}"


BAD_RECORD_POLICIES = ("skip", "error")

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
    ("?model.scan_layers", lambda v: isinstance(v, bool), "True or False"),
    ("?model.remat", *one_of(("none", "full", "dots", "dots_no_batch"))),
    ("?model.attention", *one_of(("auto", "reference", "xla", "splash"))),
    ("?model.attention_chunk", pos_int, "a positive int"),
    ("?model.cache_attention", *one_of(("auto", "xla", "pallas", "interpret"))),
    ("?model.position_embedding", *one_of(("rope", "none"))),
    ("?rollout.max_prompt_len", nonneg_int, "an int >= 0 (0 = the task's bound or each batch's longest)"),
    ("?rollout.window_block", nonneg_int, "an int >= 0 (0 = attend to the whole cache)"),
    ("rl.pack_len", nonneg_int, "an int >= 0 (0 = prompt width + rollout.max_new_tokens)"),
    ("?rl.dynamic_sampling", is_bool, "True or False"),
    ("?rl.dynamic_sampling_rounds", nonneg_int, "an int >= 0 (extra rollout rounds per step that refill dropped groups)"),
    ("?prime.beta", pos_float, "a float > 0"),
    ("?prime.lr", pos_float, "a float > 0"),
    ("?prime.update_order", *one_of(("after", "before"))),
    ("?prime.process_norm", *one_of(("batch_norm", "none"))),
    ("?tlt.buffer_seq_len", nonneg_int, "an int >= 0 (0 = the packed row length)"),
    ("?tlt.buffer_bytes", nonneg_int, "an int >= 0 (0 = tlt.buffer_capacity rows, no byte budget)"),
    ("?tlt.buffer_dtype", *one_of(("float32", "bfloat16"))),
    ("?tlt.checkpoint_buffer", lambda v: isinstance(v, bool), "True or False"),
    ("mesh.shape", lambda v: len(v) == 3 and all(isinstance(s, int) and (s > 0 or s == -1) for s in v)
     and list(v).count(-1) <= 1, "3 ints (data, fsdp, tensor), each > 0 or one of them -1"),
    ("?sft.steps", nonneg_int, "an int >= 0"),
    ("?sft.batch_size", pos_int, "a positive int"),
    ("?sft.max_len", pos_int, "a positive int"),
    ("?sft.lr", pos_float, "a float > 0"),
    ("?sft.micro_batches", pos_int, "a positive int dividing sft.batch_size"),
    ("?sft.decay_frac", frac, "a float in [0, 1]"),
    ("?sft.warmup_steps", nonneg_int, "an int >= 0"),
    ("?sft.stage2_frac", frac,
     "a float in [0, 1]: where wsd_two_stage's second stage starts, as a fraction of sft.steps"),
    ("?sft.stage2_lr_factor", open_unit,
     "a float in (0, 1]: wsd_two_stage's second-stage LR as a fraction of the peak LR"),
    ("?sft.lr_from_bound", lambda v: isinstance(v, str),
     "a string: '' (off) or a reference schedule '<name>[:<option>=<number>,...]' whose tuned LR "
     "sft.lr is"),
    ("?rl.lr_from_bound", lambda v: isinstance(v, str),
     "a string: '' (off) or a reference schedule '<name>[:<option>=<number>,...]' whose tuned LR "
     "rl.lr is"),
    ("?checkpoint.every", pos_int, "a positive int"),
    ("?rollout.max_new_tokens", pos_int, "a positive int"),
    ("?rollout.chunk_size", pos_int, "a positive int"),
    ("?rollout.temperature", nonneg_float, "a float >= 0 (0 = greedy; RL needs > 0)"),
    ("?rollout.top_p", open_unit, "a float in (0, 1] (1 = off)"),
    ("?rollout.top_k", nonneg_int, "an int >= 0 (0 = off)"),
    ("?rollout.buckets", increasing_ints, "a non-empty, strictly increasing tuple of positive ints"),
    ("?rollout.spec_threshold", nonneg_int,
     "an int >= 0: a rollout group decodes speculatively once its active batch is <= it (0 = never)"),
    ("?rollout.rounds_per_chunk", pos_int, "a positive int (speculative rounds per jitted chunk)"),
    ("?tlt.speculative", is_bool, "True or False"),
    ("?tlt.train_drafter", is_bool, "True or False"),
    ("?tlt.rollout_groups", pos_int, "a positive int dividing the mesh's data axis"),
    ("?tlt.single_group", *one_of(("between_steps", "off"))),
    ("?tlt.train_where", *one_of(("auto", "bubbles", "between_steps"))),
    ("?tlt.between_steps", nonneg_int, "an int >= 0"),
    ("?tlt.bandit_epsilon", frac, "a float in [0, 1]"),
    ("?tlt.bandit_window", pos_int, "a positive int"),
    ("?tlt.drafter_lr", pos_float, "a float > 0"),
    ("?tlt.drafter_batch_size", pos_int, "a positive int"),
    ("?tlt.buffer_capacity", pos_int, "a positive int >= tlt.drafter_batch_size"),
    ("?tlt.buffer_decay", open_unit, "a float in (0, 1] (1 = no recency preference)"),
    ("?tlt.max_in_flight", pos_int, "a positive int"),
    ("?tlt.max_drafter_steps", nonneg_int, "an int >= 0 (0 = no cap)"),
    ("?tlt.draft_vocab_size", nonneg_int, "an int >= 0 (0 = the full vocabulary)"),
    ("?tlt.draft_vocab_refresh", pos_int, "a positive int (RL steps between draft vocabulary refreshes)"),
    ("?tlt.draft_vocab_decay", frac, "a float in [0, 1] (weight of earlier token counts per RL step)"),
    ("?drafter.warmup_steps", pos_int, "a positive int"),
    ("?drafter.lr", pos_float, "a float > 0"),
    ("?drafter.batch_size", pos_int, "a positive int"),
    ("?drafter.num_batches", pos_int, "a positive int"),
    ("?drafter.log_every", pos_int, "a positive int"),
    ("?rl.steps", nonneg_int, "an int >= 0"),
    ("?rl.prompts_per_step", pos_int, "a positive int"),
    ("?rl.group_size", lambda v: pos_int(v) and v >= 2, "an int >= 2 (group baselines need 2 samples)"),
    ("?rl.num_prompts", pos_int, "a positive int"),
    ("?rl.min_difficulty", nonneg_int, "an int >= 0 (0 = every prompt)"),
    ("?rl.clip_eps", lambda v: pos_float(v) and v < 1, "a float in (0, 1)"),
    ("?rl.clip_eps_high", nonneg_float, "a float >= 0 (0 = clip_eps)"),
    ("?rl.aggregation", *one_of(("token", "sequence"))),
    ("?rl.kl_coef", nonneg_float, "a float >= 0"),
    ("?rl.lr", pos_float, "a float > 0"),
    ("?rl.warmup_steps", nonneg_int, "an int >= 0"),
    ("?rl.weight_decay", nonneg_float, "a float >= 0"),
    ("?rl.max_grad_norm", nonneg_float, "a float >= 0 (0 = no clipping)"),
    ("?rl.micro_batches", pos_int, "a positive int dividing rl.prompts_per_step * rl.group_size"),
    ("?rl.max_consecutive_skips", pos_int, "a positive int"),
    ("?rl.length_bucket", pos_int, "a positive int"),
    ("?rl.pack", is_bool, "True or False"),
    ("?rl.pack_rows_multiple", pos_int, "a positive int"),
    ("?rl.track_kl", is_bool, "True or False"),
    ("?rl.checkpoint_every", pos_int, "a positive int"),
    ("?rl.eval_size", nonneg_int, "an int >= 0 (0 = no final evaluation)"),
    ("?rl.sample_eval_every", nonneg_int, "an int >= 0 (0 = off)"),
    ("?rl.sample_eval_size", nonneg_int, "an int >= 0 (0 = off)"),
    ("?checkpoint.max_to_keep", pos_int, "a positive int"),
    ("?checkpoint.async_save", lambda v: v in ("auto", True, False), "'auto', True or False"),
    ("?distributed.lost_host_timeout_s", pos_int, "a positive int (seconds)"),
    ("?distributed.shutdown_timeout_s", pos_int, "a positive int (seconds)"),
    ("?data.on_bad_record", *one_of(BAD_RECORD_POLICIES)),
    # experiments/compute_optimal.py (configs/synth.py)
    ("?synth.budgets", increasing_ints, "a non-empty, strictly increasing tuple of SE samples per problem"),
    ("?synth.problems", pos_int, "a positive int"),
    ("?synth.eval_problems", pos_int, "a positive int"),
    ("?synth.eval_samples", pos_int, "a positive int (pass@k of the held-out evaluation)"),
    ("?synth.min_digits", pos_int, "a positive int <= synth.max_digits"),
    ("?synth.max_digits", pos_int, "a positive int (no length in min_digits..max_digits is a gold length)"),
    ("?synth.val_problems", pos_int, "a positive int"),
    ("?synth.temperature", pos_float, "a float > 0 (sampling from softmax(logits / T))"),
    ("?synth.include_attention", is_bool, "True or False"),
    ("?synth.compact_rollouts", is_bool, "True or False"),
    ("?synth.seeds", lambda v: len(v) > 0 and all(nonneg_int(x) for x in v), "a non-empty tuple of ints >= 0"),
    *[(f"?synth.finetune.{key}.{role}", check, what) for role in ("se", "wc", "student")
      for key, check, what in (("steps", pos_int, "a positive int"), ("lr", pos_float, "a float > 0"))],
    ("?synth.finetune.batch_size", pos_int, "a positive int"),
    ("?synth.finetune.max_len", pos_int, "a positive int"),
    ("?synth.finetune.warmup_steps", nonneg_int, "an int >= 0"),
    ("?synth.select.lrs", lambda v: len(v) > 0 and all(pos_float(x) for x in v), "a non-empty tuple of floats > 0"),
    ("?synth.select.steps", lambda v: len(v) > 0 and all(pos_int(x) for x in v), "a non-empty tuple of ints > 0"),
]

STAGES = ("sft", "drafter", "rl")


def divisors(n: int) -> list[int]:
  return [d for d in range(1, int(n) + 1) if n % d == 0]
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
    raise ConfigError(f"config.model.num_kv_heads={m.num_kv_heads} is not allowed; allowed: a divisor of "
                      f"config.model.num_heads={m.num_heads}: {divisors(m.num_heads)}")
  if "sft" in config and config.sft.batch_size % config.sft.micro_batches:
    raise ConfigError(f"config.sft.micro_batches={config.sft.micro_batches} is not allowed; allowed: a "
                      f"divisor of config.sft.batch_size={config.sft.batch_size}: "
                      f"{divisors(config.sft.batch_size)}")
  stages = [s.strip() for s in str(config.stages).split(",") if s.strip()]
  bad = [s for s in stages if s not in STAGES]
  if bad or not stages:
    raise ConfigError(f"config.stages={config.stages!r} is not allowed; allowed: a comma-separated "
                      f"subset of {STAGES}")
  for fn in _extra_validators:
    fn(config)


def _check_schedule(config, section: str) -> None:
  """The section's learning-rate schedule (name, warmup vs steps, options) builds."""
  from tlt_jax.train import optim  # imported late (it imports jax)
  c = config[section]
  if c.schedule not in optim.registered_schedules():
    raise ConfigError(f"config.{section}.schedule={c.schedule!r} is not allowed; allowed: one of "
                      f"{tuple(optim.registered_schedules())}")
  if c.steps > 0 and not 0 <= c.warmup_steps <= c.steps:
    raise ConfigError(f"config.{section}.warmup_steps={c.warmup_steps} is not allowed with "
                      f"config.{section}.steps={c.steps}; allowed: an int in [0, {c.steps}]")
  if c.lr_from_bound:
    try:
      optim.parse_lr_reference(c.lr_from_bound)
    except ValueError as e:
      raise ConfigError(f"config.{section}.lr_from_bound={c.lr_from_bound!r} is not allowed: {e}; "
                        "allowed: '' (off) or '<schedule>[:<option>=<number>,...]', e.g. 'cosine', "
                        "'wsd:decay_frac=0.1', 'wsd:steps=200'") from None
  if c.steps > 0:
    try:
      optim.schedule_from_config(c)
    except ValueError as e:
      raise ConfigError(f"config.{section} (schedule {c.schedule!r}) is not allowed: {e}") from None


@register_validator
def _validate_sft(config) -> None:
  if "sft" in config and "schedule" in config.sft:
    _check_schedule(config, "sft")


@register_validator
def _validate_synth(config) -> None:
  """compute_optimal's sampled and evaluated lengths: none is a length the policies' gold traces
  hold (`task` draws it with probability > 0); its three problem sets have distinct seeds."""
  if "synth" not in config or "task" not in config:
    return
  s = config.synth
  if s.min_digits > s.max_digits:
    raise ConfigError(f"config.synth.min_digits={s.min_digits} is not allowed; allowed: <= "
                      f"config.synth.max_digits={s.max_digits}")
  task = build_task(config)
  probs = getattr(task, "digit_probs", None)
  if probs is None:
    raise ConfigError(f"config.task.name={config.task.name!r} is not allowed with config.synth; allowed: a task "
                      "with digit lengths (arith)")
  gold = {n for n, p in zip(range(task.min_digits, task.max_digits + 1), probs) if p > 0}
  overlap = sorted(gold & set(range(s.min_digits, s.max_digits + 1)))
  if overlap:
    raise ConfigError(f"config.synth.min_digits..max_digits={s.min_digits}..{s.max_digits} is not allowed: the "
                      f"policies' gold traces hold {overlap}-digit problems; allowed: lengths outside the gold "
                      f"ones {sorted(gold)} (raise task's lengths past them or list them in task.skip_digits)")
  seeds = [s.problem_seed, s.val_seed, s.eval_seed]
  if len(set(seeds)) != 3:
    raise ConfigError(f"config.synth.problem_seed / val_seed / eval_seed = {seeds} is not allowed; allowed: three "
                      "distinct seeds (disjoint sampling, validation and held-out problem sets)")


@register_validator
def _validate_task(config) -> None:
  """The task exists and takes the config's options (it is built here, before any work)."""
  if "task" not in config:
    return
  build_task(config)


def build_task(config):
  """The task of `config.task` (name + options); ConfigError naming the key for a bad name or
  option."""
  from tlt_jax.data import tasks  # the registry; imported late
  from tlt_jax.errors import DataError
  options = {k: v for k, v in config.task.items() if k != "name"}
  name = config.task.name
  if name not in tasks.registered_tasks():
    raise ConfigError(f"config.task.name={name!r} is not allowed; allowed: one of "
                      f"{tuple(tasks.registered_tasks())}")
  if "data" in config and "on_bad_record" in tasks.task_options(name) and "on_bad_record" not in options:
    options["on_bad_record"] = config.data.on_bad_record  # tasks that read record files
  try:
    return tasks.get_task(name, **options)
  except DataError as e:
    raise ConfigError(f"config.task ({name}): {e}") from None
  except (ValueError, TypeError, OSError) as e:
    raise ConfigError(f"config.task={dict(config.task)} is not allowed: {e}") from None


@register_validator
def _validate_rl(config) -> None:
  """Names the config chooses from registries (schedules, advantages, rewards) and cross-key rules."""
  if "rl" not in config:
    return
  from tlt_jax.rl import advantages, rewards  # registries; imported late (they import jax)
  rl = config.rl
  _check_schedule(config, "rl")
  if rl.advantage not in advantages.registered_advantages():
    raise ConfigError(f"config.rl.advantage={rl.advantage!r} is not allowed; allowed: one of "
                      f"{tuple(advantages.registered_advantages())}")
  weights = dict(rl.rewards)
  for name, weight in weights.items():
    if name not in rewards.registered_rewards():
      raise ConfigError(f"config.rl.rewards.{name} is not allowed: {name!r} is no registered reward; "
                        f"allowed names: {tuple(rewards.registered_rewards())}")
    if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)):
      raise ConfigError(f"config.rl.rewards.{name}={weight!r} is not allowed; allowed: a finite float weight")
  if not any(float(w) != 0.0 for w in weights.values()):
    raise ConfigError(f"config.rl.rewards={weights} is not allowed; allowed: at least one non-zero weight")
  for name, kwargs in dict(rl.reward_kwargs).items():
    if name not in weights:
      raise ConfigError(f"config.rl.reward_kwargs.{name} is not allowed: {name!r} is not in "
                        f"config.rl.rewards {tuple(weights)}")
    try:
      rewards.get_reward(name, **dict(kwargs))
    except ValueError as e:
      raise ConfigError(f"config.rl.reward_kwargs.{name}={dict(kwargs)} is not allowed: {e}") from None
  _validate_rl_stages(config)
  batch = rl.prompts_per_step * rl.group_size
  if batch % rl.micro_batches:
    raise ConfigError(f"config.rl.micro_batches={rl.micro_batches} is not allowed; allowed: a divisor of "
                      f"rl.prompts_per_step * rl.group_size = {batch}")
  if "rl" in stages(config) and "rollout" in config and not config.rollout.temperature > 0:
    raise ConfigError(f"config.rollout.temperature={config.rollout.temperature!r} is not allowed with the "
                      "'rl' stage; allowed: a float > 0 (RL samples from softmax(logits / T))")


def _validate_rl_stages(config) -> None:
  """The RL step's registered stages: rl.advantage_kwargs, rl.loss / rl.loss_kwargs,
  rl.token_rewards (device scorers, which need a token estimator), the online filters, prime."""
  from tlt_jax.rl import advantages, losses, scorers  # registries; imported late (they import jax)
  rl = config.rl
  kwargs = dict(rl.advantage_kwargs)
  try:
    advantages.get_advantage(rl.advantage, **kwargs)
  except ValueError as e:
    raise ConfigError(f"config.rl.advantage_kwargs={kwargs} is not allowed: {e}") from None
  loss = rl.loss
  if loss not in losses.registered_losses():
    raise ConfigError(f"config.rl.loss={loss!r} is not allowed; allowed: one of {tuple(losses.registered_losses())}")
  loss_kwargs = dict(rl.loss_kwargs)
  try:
    losses.get_loss(loss, **loss_kwargs)
  except ValueError as e:
    raise ConfigError(f"config.rl.loss_kwargs={loss_kwargs} is not allowed: {e}") from None
  if "aggregation" in loss_kwargs and loss_kwargs["aggregation"] not in losses.AGGREGATIONS:
    raise ConfigError(f"config.rl.loss_kwargs.aggregation={loss_kwargs['aggregation']!r} is not allowed; "
                      f"allowed: one of {losses.AGGREGATIONS}")
  from tlt_jax.rl import prime  # noqa: F401  (registers the "prime" scorer)
  token_rewards = dict(rl.token_rewards)
  for name, weight in token_rewards.items():
    if name not in scorers.registered_scorers():
      raise ConfigError(f"config.rl.token_rewards.{name} is not allowed: {name!r} is no registered device "
                        f"scorer; allowed names: {tuple(scorers.registered_scorers())}")
    if not (isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight)):
      raise ConfigError(f"config.rl.token_rewards.{name}={weight!r} is not allowed; allowed: a finite float weight")
  on = [k for k, w in token_rewards.items() if float(w)]
  if on and not advantages.is_token_estimator(rl.advantage):
    token_kind = tuple(n for n in advantages.registered_advantages() if advantages.is_token_estimator(n))
    hint = f" ({rl.advantage}_returns is its token form)" if f"{rl.advantage}_returns" in token_kind else ""
    raise ConfigError(f"config.rl.advantage={rl.advantage!r} is not allowed with rl.token_rewards {on}: it "
                      f"reads sequence rewards only; allowed: a token estimator, one of {token_kind}{hint}")
  if "kl" in on and not (rl.kl_coef > 0 or rl.track_kl):
    raise ConfigError("config.rl.token_rewards.kl is not allowed without the reference's log-probs; allowed: "
                      "with rl.track_kl=True or rl.kl_coef > 0")
  band = rl.accuracy_band
  if not (len(band) == 2 and all(frac(x) for x in band) and band[0] <= band[1]):
    raise ConfigError(f"config.rl.accuracy_band={band!r} is not allowed; allowed: (lo, hi) with 0 <= lo <= hi <= 1")
  if "prime" in on:
    prime.PrimeConfig.from_config(config)  # ConfigError naming the bad prime.* key


@register_validator
def _validate_tlt(config) -> None:
  """TLT's draft strategies and its cross-key rules (rollout groups vs prompts, buffer vs batch)."""
  if "tlt" not in config:
    return
  import re
  t = config.tlt
  names = tuple(t.strategies) if isinstance(t.strategies, (tuple, list)) else ()
  bad = [s for s in names if s != "plain" and not re.fullmatch(r"d[1-9]\d*k[1-9]\d*n[1-9]\d*", str(s))]
  spec = [s for s in names if s != "plain"]
  if not names or bad or len(set(names)) != len(names) or (t.speculative and not spec):
    raise ConfigError(f"config.tlt.strategies={t.strategies!r} is not allowed; allowed: distinct names, "
                      "'plain' or 'd<depth>k<topk>n<num_verify>' (e.g. 'd4k1n4'), at least one not 'plain' "
                      "when tlt.speculative is on")
  for s in spec:
    d, k, n = map(int, re.findall(r"\d+", s))
    if n > d * k:
      raise ConfigError(f"config.tlt.strategies: {s!r} is not allowed; allowed: num_verify <= depth * topk")
  vd = t.draft_vocab_size
  max_k = max([int(re.findall(r"\d+", s)[1]) for s in spec] or [1])
  vocab = config.model.get("vocab_size", 0) if "model" in config else 0
  if isinstance(vd, int) and vd and (vd < max_k or (vocab and vd > vocab)):
    raise ConfigError(f"config.tlt.draft_vocab_size={vd} is not allowed; allowed: 0 (the full vocabulary) or "
                      f"an int in [{max_k}, {vocab or 'model.vocab_size'}] (at least the largest strategy topk)")
  ladder = t.arm_ladder
  tiers = sorted({int(re.findall(r"\d+", s)[2]) for s in spec}, reverse=True)
  if ladder and (not isinstance(ladder, (tuple, list)) or not all(isinstance(x, int) for x in ladder)
                 or list(ladder)[:1] != [1] or any(b <= a for a, b in zip(ladder, ladder[1:]))
                 or len(ladder) != len(tiers)):
    raise ConfigError(f"config.tlt.arm_ladder={ladder!r} is not allowed; allowed: () or {len(tiers)} strictly "
                      f"increasing batch sizes from 1, one per num_verify group {tiers} of tlt.strategies")
  if t.buffer_capacity < t.drafter_batch_size:
    raise ConfigError(f"config.tlt.buffer_capacity={t.buffer_capacity} is not allowed; allowed: an int >= "
                      f"config.tlt.drafter_batch_size={t.drafter_batch_size}")
  if "rl" in config and t.rollout_groups > config.rl.prompts_per_step:
    raise ConfigError(f"config.tlt.rollout_groups={t.rollout_groups} is not allowed; allowed: at most "
                      f"config.rl.prompts_per_step={config.rl.prompts_per_step} (each group takes whole "
                      "prompt groups)")


def unknown_key_message(config, dotted: str) -> str | None:
  """None when `dotted` (e.g. "rl.lr") names a key of `config`; else a message naming the first
  missing part and the keys allowed there."""
  node, seen = config, []
  for part in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      where = "config" + "".join(f".{p}" for p in seen)
      allowed = sorted(node.keys()) if isinstance(node, (ml_collections.ConfigDict, dict)) else []
      return (f"config key {dotted!r} does not exist: {where} has no key {part!r}"
              + (f"; allowed keys of {where}: {allowed}" if allowed else f" ({where} is a value, not a section)"))
    node = node[part]
    seen.append(part)
  return None


def stages(config) -> list[str]:
  return [s.strip() for s in str(config.stages).split(",") if s.strip()]


def finalize(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """Validates, locks (no new keys) and freezes the config."""
  validate(config)
  config.lock()
  return ml_collections.FrozenConfigDict(config)
