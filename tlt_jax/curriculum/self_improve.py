"""Self-improvement for length generalisation: an ensemble labels problems one step harder than
it was trained on, the labels are filtered, and each model trains on them in a new WSD phase.

Lee et al. (2025), "Self-Improving Transformers Overcome Easy-to-Hard and Length Generalization
Challenges". The loop (`run_self_improve`):

  round 0   SFT of k models (seeds seed .. seed+k-1) on problems of 1..N digits, one WSD phase
            (warmup, stable, cooldown);
  round r   1. sample `problems_per_round` problems at the next difficulties F+1 .. F+w
               (F: the frontier, the largest digit count trained so far; w = digits_per_round,
               or with `fast` the number of consecutive lengths past F whose held-out accuracy
               is already >= fast_accuracy, at most fast_max_width);
            2. label them with every model, greedily, batched through the rollout engine;
            3. filter: "length" keeps an answer only if it ended with EOS and has exactly the
               task's answer length (`Task.well_formed`); "vote" (majority vote) keeps a problem
               only if at least `vote_threshold` of the k models give the same (well-formed)
               answer, which becomes every model's label. Without vote each model keeps its own
               answers (self-labelling); "none" keeps every answer as it is;
            4. add the kept labels to each model's pool (earlier rounds' labels stay);
            5. continue training each model from its state for one WSD phase of `round_steps`
               (stable at `round_lr`, then the cooldown). Batches (`mixture`):
               "newest" (the official code's, JackCai1206/arithmetic-self-improve): each row is
               one of the newest round's labels with probability `newest_frac` (0.5), else
               drawn from the older data: the earlier rounds' labels together with an initial
               set counted as `initial_size` fresh 1..N problems (an earlier label with
               probability |earlier| / (|earlier| + initial_size)).
               "pool" (the rule this module used first): each row a label drawn uniformly over
               all rounds with probability min(pool_frac, |pool| / (|pool| + initial_size)),
               else a fresh 1..N problem, so the newest length's share shrinks round by round.

After every round each model is evaluated on fixed held-out sets of 1..eval_max_digits digits,
far past the frontier. Exact match there is computed teacher-forced: a greedy response is right
iff the argmax at every answer position (and the EOS after it) is the reference token, so one
forward pass gives exactly the greedy verdict.

Resume. After each round, every model's train state (params, optimizer, step) and the round
state (pools, frontier, history) go to one orbax checkpoint (`<workdir>/ckpt`, step = round). A
run killed at any point restarts from the last finished round, and since every draw is keyed by
(seed, round, model, step), the rounds after it are the same as an uninterrupted run's.

Per round the record reports the held-out accuracy by digits (mean over models and per model),
the reach (the largest n with mean accuracy >= reach_accuracy at every length up to n), and
for the labels: answers generated, failed length/EOS, dropped by each filter, kept, and the error
rate of the kept labels against the true answers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import Counter
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tlt_jax import config as config_lib
from tlt_jax.data.batching import encode_prompts, make_sft_batch
from tlt_jax.data.tasks import Example, get_task
from tlt_jax.data.tokenizer import CharTokenizer
from tlt_jax.errors import CheckpointError, ConfigError
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import init_model
from tlt_jax.rollout.engine import RolloutEngine
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.train import optim
from tlt_jax.train.checkpoint import Checkpointer
from tlt_jax.train.sft import make_sft_step, run_sft
from tlt_jax.train.state import TrainState, create_train_state

log = logging.getLogger(__name__)

FILTERS = ("none", "length", "length+vote")
MIXTURES = ("newest", "pool")
# Config sections whose values round 0 depends on: a resumed run must match them.
ROUND0_KEYS = ("seed", "task", "model", "sft")
_SEQ_BUCKET = 16  # batch widths are rounded up to a multiple of this (few compiled shapes)


# ------------------------------------------------------------------------------------ config


def validate(config) -> None:
  """ConfigError (key, value, what is allowed) for a bad self-improvement config."""
  c, pos, nonneg = config_lib._check, config_lib.pos_int, config_lib.nonneg_int
  c(config, "seed", nonneg, "an int >= 0")
  c(config, "task.name", lambda v: v in ("reverse_add", "reverse_copy"), "'reverse_add' or 'reverse_copy'")
  c(config, "model.position_embedding", lambda v: v in ("rope", "none"), "'rope' or 'none' (NoPE)")
  si = "self_improve."
  for key in ("num_models", "initial_digits", "digits_per_round", "fast_max_width", "problems_per_round",
              "eval_max_digits", "eval_per_digit"):
    c(config, si + key, pos, "a positive int")
  for key in ("rounds", "label_slack"):
    c(config, si + key, nonneg, "an int >= 0")
  c(config, si + "filter", lambda v: v in FILTERS, f"one of {FILTERS}")
  c(config, si + "vote_threshold", lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
  c(config, si + "fast", config_lib.is_bool, "True or False")
  c(config, si + "fast_accuracy", lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
  c(config, si + "reach_accuracy", lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]")
  c(config, si + "pool_frac", lambda v: 0.0 <= v < 1.0, "a fraction in [0, 1)")
  c(config, si + "mixture", lambda v: v in MIXTURES, f"one of {MIXTURES}")
  c(config, si + "newest_frac", lambda v: 0.0 < v < 1.0, "a fraction in (0, 1)")
  c(config, si + "initial_size", pos, "a positive int")
  if config.self_improve.eval_max_digits < config.self_improve.initial_digits:
    raise ConfigError(f"config.self_improve.eval_max_digits={config.self_improve.eval_max_digits} is not "
                      f"allowed; allowed: >= self_improve.initial_digits={config.self_improve.initial_digits}")
  for key in ("batch_size", "round0_steps", "round_steps"):
    c(config, "sft." + key, pos, "a positive int")
  c(config, "sft.warmup_steps", lambda v: nonneg(v) and v <= config.sft.round0_steps,
    f"an int in [0, sft.round0_steps={config.sft.round0_steps}]")
  c(config, "sft.lr", config_lib.pos_float, "a float > 0")
  c(config, "sft.weight_decay", config_lib.nonneg_float, "a float >= 0")
  c(config, "sft.grad_clip", config_lib.nonneg_float, "a float >= 0 (0: no clipping)")
  c(config, "sft.schedule", lambda v: v in ("wsd", "wsd_sqrt"), "'wsd' or 'wsd_sqrt'")
  c(config, "sft.decay_frac", lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]")
  c(config, "sft.round_lr", config_lib.nonneg_float, "a float >= 0 (0: sft.lr)")
  c(config, "sft.round_decay_frac", lambda v: 0.0 <= v <= 1.0, "a fraction in [0, 1]")


def _round0_digest(config) -> str:
  return json.dumps({k: config[k].to_dict() if hasattr(config[k], "to_dict") else config[k]
                     for k in ROUND0_KEYS}, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------ filters


@dataclasses.dataclass(frozen=True)
class Labels:
  """The outcome of filtering one round's answers.

  labels[m][i]: model m's training label for problem i, or None when it is not kept.
  stats: answers, failed_length (answers that are not well formed, counted even when the length
  filter is off), dropped_length, dropped_vote (well-formed answers of problems whose vote
  failed), kept (labels added, summed over models), kept_wrong, problems_kept.
  """

  labels: list[list[str | None]]
  stats: dict[str, int]


def majority_answer(answers: Sequence[str | None], threshold: float) -> tuple[str | None, float]:
  """(the most common non-None answer, its share of ALL k answers), and None as the answer when
  that share is below `threshold`. Ties go to the answer seen first. k = len(answers)."""
  counts = Counter(a for a in answers if a is not None)
  if not counts:
    return None, 0.0
  best = max(counts.values())
  winner = next(a for a in answers if a is not None and counts[a] == best)
  share = best / len(answers)
  return (winner if share >= threshold - 1e-9 else None), share


def filter_labels(task, examples: Sequence[Example], responses: Sequence[Sequence[str]],
                  finished: Sequence[Sequence[bool]], mode: str, vote_threshold: float) -> Labels:
  """Applies the round's filter (`mode`, one of FILTERS) to `responses[m][i]`, model m's answer
  to `examples[i]` (`finished[m][i]`: it ended with EOS). See the module docstring."""
  if mode not in FILTERS:
    raise ConfigError(f"self_improve.filter={mode!r} is not allowed; allowed: one of {FILTERS}")
  k, n = len(responses), len(examples)
  ok = [[bool(finished[m][i]) and task.well_formed(responses[m][i], examples[i].meta["num_digits"])
         for i in range(n)] for m in range(k)]
  stats = dict(answers=k * n, failed_length=sum(not x for row in ok for x in row), dropped_length=0,
               dropped_vote=0, kept=0, kept_wrong=0, problems_kept=0)
  labels: list[list[str | None]] = [[None] * n for _ in range(k)]
  use_length = mode != "none"
  if use_length:
    stats["dropped_length"] = stats["failed_length"]
  for i, ex in enumerate(examples):
    if mode == "length+vote":
      votes = [responses[m][i].strip() if ok[m][i] else None for m in range(k)]
      winner, _ = majority_answer(votes, vote_threshold)
      if winner is None:
        stats["dropped_vote"] += sum(v is not None for v in votes)
        continue
      for m in range(k):
        labels[m][i] = winner
    else:
      for m in range(k):
        if ok[m][i] or not use_length:
          labels[m][i] = responses[m][i].strip()
  for i, ex in enumerate(examples):
    kept_here = [labels[m][i] for m in range(k) if labels[m][i] is not None]
    stats["problems_kept"] += bool(kept_here)
    stats["kept"] += len(kept_here)
    stats["kept_wrong"] += sum(lab != ex.answer for lab in kept_here)
  return Labels(labels, stats)


# ------------------------------------------------------------------------------------ pieces


def _round_up(n: int, block: int = _SEQ_BUCKET) -> int:
  return -(-int(n) // block) * block


@dataclasses.dataclass
class Parts:
  """What every round uses: task, tokenizer, model config, optimizer, compiled functions."""

  task: Any
  tokenizer: CharTokenizer
  model_cfg: ModelConfig
  graphdef: Any
  tx: optax.GradientTransformation
  step_fn: Callable
  engine: RolloutEngine
  phase_ends: list[int]


_COMPILED: dict[tuple, tuple] = {}  # (model cfg, optimizer spec) -> (graphdef, tx, step_fn, engine)


def phase_ends(sft, rounds: int) -> list[int]:
  """The global step at which each WSD phase ends: round 0, then one per round."""
  return [int(sft.round0_steps) + r * int(sft.round_steps) for r in range(rounds + 1)]


def lr_schedule(sft, rounds: int) -> optax.Schedule:
  """One schedule over every phase: round 0 is warmup-stable-cooldown over round0_steps at sft.lr,
  each later round stable-cooldown (no warmup) over round_steps at round_lr (0: sft.lr) with
  round_decay_frac of it cooling down."""
  pieces = [optim.make_schedule(sft.schedule, sft.lr, sft.round0_steps, sft.warmup_steps,
                                decay_frac=sft.decay_frac)]
  round_lr = float(sft.round_lr) or float(sft.lr)
  pieces += [optim.make_schedule(sft.schedule, round_lr, sft.round_steps, 0, decay_frac=sft.round_decay_frac)
             for _ in range(rounds)]
  return optax.join_schedules(pieces, phase_ends(sft, rounds)[:-1])


def build_parts(config) -> Parts:
  """Task, tokenizer, model config, optimizer and the compiled train step and rollout engine
  (cached per model config and optimizer, so that variants of one experiment compile once)."""
  task_kwargs = {k: v for k, v in config.task.items() if k != "name"}
  task = get_task(config.task.name, **task_kwargs)
  tokenizer = CharTokenizer(task.charset)
  mdict = dict(config.model)
  if mdict.get("vocab_size", 0) == 0:
    mdict["vocab_size"] = tokenizer.vocab_size
  try:
    model_cfg = ModelConfig.from_dict(mdict)
  except ValueError as e:
    raise ConfigError(f"config.model is not allowed: {e}") from None
  sft, rounds = config.sft, int(config.self_improve.rounds)
  key = (model_cfg, json.dumps(sft.to_dict(), sort_keys=True), rounds)
  if key not in _COMPILED:
    chain = [optax.clip_by_global_norm(sft.grad_clip)] if sft.grad_clip > 0 else []
    tx = optax.chain(*chain, optax.adamw(lr_schedule(sft, rounds), b1=0.9, b2=0.98,
                                         weight_decay=sft.weight_decay))
    graphdef, params = nnx.split(init_model(model_cfg, 0))
    step_fn = make_sft_step(graphdef, tx, create_train_state(params, tx, None), None)
    engine = RolloutEngine(graphdef, SamplingParams(temperature=0.0), eos_ids=tokenizer.eos_ids,
                           pad_id=tokenizer.pad_id, chunk_size=16, compact=False,
                           max_context=model_cfg.max_position_embeddings)
    _COMPILED[key] = (graphdef, tx, step_fn, engine)
  graphdef, tx, step_fn, engine = _COMPILED[key]
  return Parts(task, tokenizer, model_cfg, graphdef, tx, step_fn, engine, phase_ends(sft, rounds))


def init_states(parts: Parts, seed: int, k: int) -> list[TrainState]:
  """k fresh train states, model m initialised with seed + m."""
  states = []
  for m in range(k):
    _, params = nnx.split(init_model(parts.model_cfg, seed + m))
    states.append(create_train_state(params, parts.tx, None))
  return states


def _example_of(entry: dict) -> Example:
  return Example(prompt=entry["prompt"], trace=entry["label"], answer=entry["label"],
                 meta={"num_digits": entry["digits"], "difficulty": entry["digits"]})


def _seq_len(entry_or_example, tokenizer) -> int:
  if isinstance(entry_or_example, dict):
    prompt, trace = entry_or_example["prompt"], entry_or_example["label"]
  else:
    prompt, trace = entry_or_example.prompt, entry_or_example.trace
  return 1 + len(tokenizer.encode(prompt)) + len(tokenizer.encode(trace)) + 1


def mixture_shares(config, pool: list[dict]) -> tuple[float, float, int]:
  """(p_newest, p_earlier, newest round): the probability that a batch row is one of the newest
  round's labels, and that it is an earlier pool label (the rest are fresh 1..initial_digits
  problems), under `self_improve.mixture` (module docstring). Under "pool" every label counts as
  "earlier"."""
  si = config.self_improve
  initial = int(si.initial_size)
  if not pool:
    return 0.0, 0.0, -1
  if si.get("mixture", "newest") == "pool":
    return 0.0, min(float(si.pool_frac), len(pool) / (len(pool) + initial)), -1
  newest = max(int(e.get("round", 0)) for e in pool)
  earlier = sum(int(e.get("round", 0)) != newest for e in pool)
  p_new = float(si.get("newest_frac", 0.5))
  return p_new, (1.0 - p_new) * earlier / (earlier + initial), newest


def batch_fn(parts: Parts, config, model_index: int, pool: list[dict]) -> Callable[[int], dict]:
  """`batches(step)`: `sft.batch_size` rows, each (independently) one of the newest round's
  labels, an earlier pool label, or a fresh problem of 1..initial_digits digits, with the
  probabilities of `mixture_shares`; a label is drawn uniformly within its group, every draw
  keyed by (seed, model, step). Rows are padded to one width per call (the longest the pool or
  the initial range can need, rounded up to 16)."""
  si, b = config.self_improve, int(config.sft.batch_size)
  p_new, p_old, newest = mixture_shares(config, pool)
  newest_rows = [e for e in pool if int(e.get("round", 0)) == newest]
  older_rows = [e for e in pool if int(e.get("round", 0)) != newest]
  probe = parts.task.sample(np.random.default_rng(0), num_digits=si.initial_digits)
  width = max([_seq_len(probe, parts.tokenizer)] + [_seq_len(e, parts.tokenizer) for e in pool])
  width = _round_up(width)
  base = dataclasses.replace(parts.task, min_digits=1, max_digits=int(si.initial_digits))

  def batches(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([int(config.seed), 2, model_index, int(step)])
    n_new, n_old, n_fresh = (int(x) for x in rng.multinomial(b, [p_new, p_old, 1.0 - p_new - p_old]))
    examples = [base.sample(rng) for _ in range(n_fresh)]
    for group, n in ((older_rows, n_old), (newest_rows, n_new)):
      if n:
        examples += [_example_of(group[int(j)]) for j in rng.integers(0, len(group), size=n)]
    full = make_sft_batch(examples, parts.tokenizer, width)
    return {"tokens": full["tokens"], "loss_mask": full["loss_mask"]}

  return batches


def train_phase(parts: Parts, config, state: TrainState, model_index: int, pool: list[dict],
                end_step: int) -> TrainState:
  """Continues `state` up to global step `end_step` (the end of this round's WSD phase)."""
  model = nnx.merge(parts.graphdef, state.params)
  _, state, _ = run_sft(model, parts.tx, batch_fn(parts, config, model_index, pool), end_step, state=state,
                        step_fn=parts.step_fn, show_progress=False, log_every=10 ** 9)
  return state


def _argmax_forward(graphdef, params, tokens_BxT):
  logits, _, _ = nnx.merge(graphdef, params)(tokens_BxT)
  return jnp.argmax(logits, axis=-1).astype(jnp.int32)


argmax_forward = jax.jit(_argmax_forward, static_argnums=0)


def exact_match(parts: Parts, params, examples: Sequence[Example]) -> np.ndarray:
  """Greedy exact match of each example, teacher-forced: True iff the argmax after every prompt
  and answer token up to the EOS is the next reference token (module docstring). Rows are
  grouped by padded width, one forward per width."""
  widths = [_round_up(_seq_len(ex, parts.tokenizer)) for ex in examples]
  out = np.zeros(len(examples), bool)
  for w in sorted(set(widths)):
    idx = [i for i, x in enumerate(widths) if x == w]
    batch = make_sft_batch([examples[i] for i in idx], parts.tokenizer, w)
    pred = np.asarray(argmax_forward(parts.graphdef, params, jnp.asarray(batch["tokens"])))
    hit = (pred[:, :-1] == batch["tokens"][:, 1:]) | (batch["loss_mask"][:, 1:] == 0)
    out[idx] = hit.all(axis=1)
  return out


def greedy_answers(parts: Parts, params, examples: Sequence[Example], slack: int
                   ) -> tuple[list[str], list[bool]]:
  """Greedy responses (batched through the rollout engine) and whether each ended with EOS; each
  row may generate its answer length + EOS + `slack` tokens, so over-long answers show."""
  width = _round_up(max(1 + len(parts.tokenizer.encode(ex.prompt)) for ex in examples))
  prompts, plens = encode_prompts(examples, parts.tokenizer, width)
  max_new = np.array([parts.task.answer_length(ex.meta["num_digits"]) + 1 + slack for ex in examples],
                     np.int32)
  res = parts.engine.generate(params, prompts, plens, max_new, jax.random.key(0))
  texts = [parts.tokenizer.decode(res.tokens[i, :res.lengths[i]]) for i in range(len(examples))]
  return texts, [bool(f) for f in res.finished]


def eval_sets(parts: Parts, config) -> dict[int, list[Example]]:
  """The fixed held-out problems: eval_per_digit of each length 1..eval_max_digits, keyed by seed."""
  si = config.self_improve
  return {n: _draw(parts.task, [int(config.seed), 3, n], n, int(si.eval_per_digit))
          for n in range(1, int(si.eval_max_digits) + 1)}


def _draw(task, key, num_digits: int, count: int) -> list[Example]:
  rng = np.random.default_rng(key)
  return [task.sample(rng, num_digits=num_digits) for _ in range(count)]


def evaluate(parts: Parts, states: Sequence[TrainState], sets: dict[int, list[Example]]
             ) -> list[dict[int, float]]:
  """Per model: {digits: held-out greedy exact match}."""
  flat = [ex for n in sorted(sets) for ex in sets[n]]
  out = []
  for st in states:
    hit = exact_match(parts, st.params, flat)
    acc, pos = {}, 0
    for n in sorted(sets):
      acc[n] = float(hit[pos:pos + len(sets[n])].mean())
      pos += len(sets[n])
    out.append(acc)
  return out


def reach(mean_acc: dict[int, float], threshold: float) -> int:
  """The largest n such that every length 1..n has accuracy >= threshold (0 if none)."""
  n = 0
  for d in sorted(mean_acc):
    if mean_acc[d] < threshold:
      break
    n = d
  return n


def label_width(config, frontier: int, last_mean_acc: dict[int, float] | None) -> int:
  """How many new lengths this round labels: digits_per_round, or with `fast` the number of
  consecutive lengths past the frontier whose held-out accuracy is >= fast_accuracy (at least
  digits_per_round, at most fast_max_width)."""
  si = config.self_improve
  width = int(si.digits_per_round)
  if si.fast and last_mean_acc:
    w = 0
    while w < si.fast_max_width and last_mean_acc.get(frontier + w + 1, 0.0) >= si.fast_accuracy:
      w += 1
    width = max(width, w)
  return width


# ------------------------------------------------------------------------------------ the loop


def _abstract_states(parts: Parts, k: int):
  states = init_states(parts, 0, k)
  return {f"m{m}": st for m, st in enumerate(states)}


def run_self_improve(config, workdir: str, *, on_record: Callable[[dict], None] | None = None,
                     stop_after_round: int | None = None) -> list[dict]:
  """Runs (or resumes) rounds 0..self_improve.rounds in `workdir`; returns the per-round records.

  `on_record(record)` receives each new round's record. `stop_after_round` returns right after
  that round's checkpoint (an injected stop, as a kill between rounds would leave the workdir),
  or at once when the workdir is already past it.
  """
  validate(config)
  si = config.self_improve
  k, rounds = int(si.num_models), int(si.rounds)
  parts = build_parts(config)
  os.makedirs(workdir, exist_ok=True)
  ckpt = Checkpointer(os.path.join(workdir, "ckpt"), max_to_keep=2)
  digest = _round0_digest(config)
  restored = ckpt.restore_latest(_abstract_states(parts, k))
  if restored is None:
    start, meta = 0, {"pools": [[] for _ in range(k)], "history": [], "frontier": int(si.initial_digits)}
    states = None
  else:
    done, tree, meta = restored
    if meta.get("round0_digest") != digest:
      raise CheckpointError(f"{ckpt.directory} holds a run of another config (seed/task/model/sft "
                            "differ); allowed: the same config to resume, or a new workdir")
    if len(meta["pools"]) != k:
      raise CheckpointError(f"{ckpt.directory} holds {len(meta['pools'])} models, the config asks "
                            f"for self_improve.num_models={k}; allowed: the same number to resume")
    states = [tree[f"m{m}"] for m in range(k)]
    start = done + 1
  history: list[dict] = meta["history"]
  pools: list[list[dict]] = meta["pools"]
  frontier = int(meta["frontier"])
  if stop_after_round is not None and start > stop_after_round:
    ckpt.close()
    return history
  sets = eval_sets(parts, config)
  try:
    for r in range(start, rounds + 1):
      t0 = time.perf_counter()
      record: dict[str, Any] = {"round": r, "filter": si.filter}
      if r == 0:
        states = init_states(parts, int(config.seed), k)
        states = [train_phase(parts, config, st, m, [], parts.phase_ends[0]) for m, st in enumerate(states)]
        record.update(label_digits=None, labels=None)
      else:
        last = history[-1]["acc"] if history else None
        width = label_width(config, frontier, {int(d): a for d, a in last.items()} if last else None)
        digits = list(range(frontier + 1, frontier + width + 1))
        rng = np.random.default_rng([int(config.seed), 1, r])
        problems = [parts.task.sample(rng, num_digits=digits[i % len(digits)])
                    for i in range(int(si.problems_per_round))]
        answers = [greedy_answers(parts, st.params, problems, int(si.label_slack)) for st in states]
        out = filter_labels(parts.task, problems, [a[0] for a in answers], [a[1] for a in answers],
                            si.filter, float(si.vote_threshold))
        for m in range(k):
          for i, lab in enumerate(out.labels[m]):
            if lab is not None:
              pools[m].append({"prompt": problems[i].prompt, "label": lab, "round": r,
                               "digits": problems[i].meta["num_digits"], "true": problems[i].answer})
        raw_wrong = sum(a[0][i].strip() != problems[i].answer or not a[1][i]
                        for a in answers for i in range(len(problems)))
        stats = dict(out.stats)
        stats["answer_error_rate"] = raw_wrong / max(stats["answers"], 1)
        stats["kept_error_rate"] = stats["kept_wrong"] / stats["kept"] if stats["kept"] else None
        record.update(label_digits=[digits[0], digits[-1]], labels=stats)
        frontier = digits[-1]
        states = [train_phase(parts, config, st, m, pools[m], parts.phase_ends[r]) for m, st in enumerate(states)]
      accs = evaluate(parts, states, sets)
      mean = {d: float(np.mean([a[d] for a in accs])) for d in sorted(sets)}
      record.update(frontier=frontier, acc={str(d): v for d, v in mean.items()},
                    acc_models=[[a[d] for d in sorted(sets)] for a in accs],
                    reach=reach(mean, float(si.reach_accuracy)),
                    pool_sizes=[len(p) for p in pools], step=int(states[0].step),
                    time_s=round(time.perf_counter() - t0, 2))
      history.append(record)
      meta = {"round": r, "frontier": frontier, "pools": pools, "history": history, "round0_digest": digest}
      ckpt.save(r, {f"m{m}": st for m, st in enumerate(states)}, meta)
      if on_record is not None:
        on_record(record)
      if stop_after_round is not None and r >= stop_after_round:
        break
  finally:
    ckpt.close()
  return history


def load_states(config, workdir: str) -> tuple[int, list[TrainState]]:
  """(round, the k train states) of the newest checkpoint in `workdir`."""
  parts = build_parts(config)
  k = int(config.self_improve.num_models)
  ckpt = Checkpointer(os.path.join(workdir, "ckpt"))
  try:
    restored = ckpt.restore_latest(_abstract_states(parts, k))
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f"no self-improvement checkpoint in {workdir}/ckpt; allowed: a workdir of "
                          "run_self_improve")
  r, tree, _ = restored
  return r, [tree[f"m{m}"] for m in range(k)]
