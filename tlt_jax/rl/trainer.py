"""The RL loop: GRPO / RLOO / PRIME on verifiable rewards, a registered policy loss (PPO-clip,
GSPO, CISPO).

One step is a list of stages (rl/stages.py); typed batches flow one way (see /DESIGN.md):

  sample               Rollout, Scores     P prompts x G responses over the rollout groups (the
                                           drafter trains in their bubbles), host scorers
                                           (verifier, format, length penalty) -> rewards [P, G];
                                           online filters refill dropped groups (DAPO, PRIME)
  prepare_update_batch UpdateBatch         rows [B, L], the update's layout (packed), old / ref
                                           log-probs: one forward each, no gradient
  score_tokens         TokenRewards        device scorers: per-token rewards (PRIME's implicit
                                           PRM, which also learns here; a KL penalty)
  compute_advantages   [B, L]              the registered estimator, per token
  update_policy        metrics, hidden     the jitted policy update (rl/update.py)
  drafter_features                         hidden of rows the rollout did not buffer -> the
                                           drafter buffer (tlt/buffer.py)
  checkpoint every `rl.checkpoint_every` steps and at the end (policy, drafter, scorers' state)

Everything time-dependent (the loop, timing, checkpoints, logging) lives here; the device work
is the pure jitted steps of rl/update.py and the rollout engine. The run is a pure function of
(config, SFT policy): the RNG key and the prompt stream position are checkpointed with the
params, so a resumed run reproduces an uninterrupted one bitwise, as long as tlt.speculative is
off: speculative sampling is exact in distribution, but which samples it draws depends on the
drafter's proposals and the bandit's picks, hence on wall-clock time (tlt/runtime.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.data.batching import encode_prompts, prompt_check
from tlt_jax.data.iterator import PromptIterator, repeat_groups
from tlt_jax.data.sources import TaskSource
from tlt_jax.drafter.train import DrafterTrainState
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.parallel.hosts import Preempted
from tlt_jax.rl import advantages as advantages_lib
from tlt_jax.rl import rewards as rewards_lib
from tlt_jax.rl import scorers as scorers_lib
from tlt_jax.rl import stages
from tlt_jax.rl.stages import (Rollout, Scores, TokenRewards, UpdateBatch, build_update_batch,  # noqa: F401
                               round_up)
from tlt_jax.rl.update import UpdateConfig, make_logprob_fn, make_policy_update_step
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.tlt.runtime import TIMING_FIELDS as TLT_TIMING_FIELDS, TLTRuntime
from tlt_jax.train import optim
from tlt_jax.train.checkpoint import Checkpointer, async_saves
from tlt_jax.train.state import TrainState, create_train_state
from tlt_jax.utils.console import progress
from tlt_jax.utils.metrics import MetricsWriter, plot_curves, plot_stacked_bars, read_jsonl

log = logging.getLogger(__name__)

# Fields of a metrics record that measure wall-clock time (they differ between identical runs).
TIMING_FIELDS = ("step_time_s", "rollout_time_s", "reward_time_s", "logprob_time_s", "update_time_s",
                 "checkpoint_time_s", "sample_eval_time_s", "prefill_time_s", "decode_time_s",
                 "spec_time_s", "compact_time_s", "tlt_after_update_s") + TLT_TIMING_FIELDS
# The time breakdown plotted per step: (record key, label).
TIME_BREAKDOWN = (("rollout_time_s", "rollout"), ("reward_time_s", "rewards"),
                  ("logprob_time_s", "old/ref logprobs"), ("update_time_s", "update"),
                  ("checkpoint_time_s", "checkpoint"), ("sample_eval_time_s", "held-out eval"),
                  ("tlt_after_update_s", "drafter buffer / between-step training"))
# TLT's per-step curves: speculation, the bubbles and the drafter trained in them.
TLT_CURVES = ("accept_len", "tail_frac", "tail_time_frac", "spec_frac", "bubble_s", "bubble_utilisation", "drafter_version",
              "drafter_loss", "drafter_accuracy", "preempt_wait_s")


def with_moving_averages(records: Sequence[dict], keys: Sequence[str], window: int) -> list[dict]:
  """Copies of `records` with `<key>_ma<window>`: the mean of the last `window` values (fewer at
  the start), to see a trend through the per-step noise of which prompts were drawn."""
  out = []
  for i, r in enumerate(records):
    extra = {}
    for k in keys:
      recent = records[max(0, i - window + 1):i + 1]
      vals = [x[k] for x in recent if isinstance(x.get(k), (int, float))]
      if vals:
        extra[f"{k}_ma{window}"] = float(np.mean(vals))
    out.append({**r, **extra})
  return out


class TrainingDiverged(RuntimeError):
  """Too many consecutive non-finite updates: the run stops instead of training on garbage."""


def _decode(tokenizer, ids) -> str:
  try:
    return tokenizer.decode(ids)
  except ValueError:  # an id outside the tokenizer's vocabulary (model vocab may be larger)
    return ""


@dataclasses.dataclass
class HostState:
  """The host-side part of the run state (checkpointed in the JSON meta)."""

  consecutive_skips: int = 0
  reward_failures_total: int = 0
  rollouts_total: int = 0  # sampled responses, dropped groups included
  groups_dropped_total: int = 0  # by the online filters (rl.dynamic_sampling, rl.accuracy_band)


def rl_prompt_sources(config, task, tokenizer, context: int) -> tuple[TaskSource, TaskSource | None]:
  """(training prompts, fixed held-out prompts or None) of the RL stage: task draws of difficulty
  >= rl.min_difficulty whose prompts fit the context beside rollout.max_new_tokens; unusable ones
  are skipped (counted, logged) or raise, as `data.on_bad_record` says."""
  rl = config.rl
  on_bad = config.data.on_bad_record if "data" in config else "skip"
  unusable = prompt_check(tokenizer, context, int(config.rollout.max_new_tokens))
  make = lambda n, stream: TaskSource(task, n, seed=config.seed, stream=stream,  # noqa: E731
                                      min_difficulty=rl.min_difficulty, unusable=unusable,
                                      on_bad_record=on_bad)
  held_out = make(rl.sample_eval_size, 3) if rl.sample_eval_every and rl.sample_eval_size else None
  return make(rl.num_prompts, 2), held_out


def prompt_width(config, task) -> int | None:
  """The rollout's static prompt width: `rollout.max_prompt_len` (+ BOS, rounded to 8) when set,
  else the task's own bound when it knows one, else None (each batch's longest prompt)."""
  fixed = int(config.rollout.max_prompt_len)
  bound = fixed if fixed > 0 else getattr(task, "max_prompt_len", None)
  return round_up(bound + 1, 8) if isinstance(bound, int) else None


def rl_context(config, model_cfg) -> int:
  """The longest prompt + response the RL stage admits: the model's context, or less when
  `rollout.max_prompt_len` caps the prompts (longer ones are skipped as unusable records)."""
  fixed = int(config.rollout.max_prompt_len)
  context = model_cfg.max_position_embeddings
  return min(context, fixed + 1 + int(config.rollout.max_new_tokens)) if fixed > 0 else context


def rl_lengths(config, model_cfg, width: int | None) -> tuple[int, int]:
  """(packed update row length, drafter buffer row length), from the config, never from the
  model's maximum context alone: `rl.pack_len` and `tlt.buffer_seq_len` when set (> 0), else the
  longest sequence, prompt width + rollout.max_new_tokens (the context when the prompt width is
  unknown), rounded up to rl.length_bucket / 16."""
  r, rl = config.rollout, config.rl
  longest = (width or model_cfg.max_position_embeddings) + int(r.max_new_tokens)
  seq_len = min(round_up(longest, 16), round_up(model_cfg.max_position_embeddings, 16))
  pack_len = int(rl.pack_len) or round_up(seq_len, rl.length_bucket)
  buffer_len = int(config.tlt.buffer_seq_len)
  return pack_len, buffer_len or seq_len


class RLTrainer:
  """GRPO/RLOO/PRIME trainer over one policy; `run()` trains `rl.steps` steps, resuming from
  `<workdir>/ckpt_rl` when it holds a checkpoint.

  Args:
    config: the validated, frozen run config (sections rl, rollout, checkpoint).
    task, tokenizer: the task (verifier, prompts) and its tokenizer.
    policy: the initial policy (the SFT model); the trainer takes its params.
    reference_params: the frozen reference policy's params (the SFT policy) for the KL, or None.
    reference_source: where the reference comes from (a directory), recorded in checkpoints.
    drafter: (graphdef, DrafterTrainState, optimizer) of the EAGLE drafter, or None.
    evaluate: optional `evaluate(model) -> dict` run on the final policy.
    input_embedder: SCONE's f-gram table (models/scone.py `HostTable`, from `scone.rl_policy`)
      for a SCONE policy, None for a plain one: rollouts (plain and speculative) and the
      trainer's forwards read their input embeddings from it; the update trains the main model.
  """

  def __init__(self, config, task, tokenizer, policy, workdir: str, *, mesh=None,
               reference_params=None, reference_source: str = "",
               drafter: tuple[Any, DrafterTrainState, Any] | None = None,
               evaluate: Callable[[Any], dict] | None = None, preemption=None, input_embedder=None):
    self.config, self.rl, self.task, self.tokenizer = config, config.rl, task, tokenizer
    self.preemption = preemption  # parallel.hosts.PreemptionWatch: asked at every step boundary
    self.workdir = workdir
    # The run's mesh (one device: 1x1x1) for the rollout; the update's own single-device path
    # (rl/update.py) takes None there.
    self.run_mesh = mesh if mesh is not None else mesh_lib.local_mesh()
    self.mesh = self.run_mesh if self.run_mesh.size > 1 else None
    self.evaluate = evaluate
    self.input_embedder = input_embedder
    rl = self.rl
    self.batch_size = rl.prompts_per_step * rl.group_size
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"] if self.mesh is not None else 1
    # Packed update batches have a multiple of this many rows (whole micro-batches per shard).
    self.pack_rows_multiple = int(np.lcm(int(rl.pack_rows_multiple), rl.micro_batches * shards))
    self.pack = bool(rl.pack)
    if self.mesh is not None and not self.pack:
      if (self.batch_size // rl.micro_batches) % shards:
        raise ValueError(
            f"rl.prompts_per_step * rl.group_size / rl.micro_batches = "
            f"{self.batch_size // rl.micro_batches} rows per micro-batch must be divisible by the "
            f"mesh's batch shards data * fsdp = {shards} (mesh {dict(self.mesh.shape)})")

    self.model_cfg = policy.cfg
    self.graphdef, params = nnx.split(policy)
    params = jax.tree.map(jnp.copy, params)  # the update donates its state; keep `policy` intact
    self.tx = optim.make_optimizer(rl)
    self.schedule = optim.schedule_from_config(rl)
    self.state: TrainState = create_train_state(params, self.tx, self.mesh)
    self.rng = jax.random.PRNGKey(config.seed)  # raw uint32[2]: checkpoints as a plain array

    self.with_ref = rl.kl_coef > 0 or bool(rl.track_kl)
    self.reference_source = reference_source
    self.ref_params = None
    if self.with_ref:
      if reference_params is None:
        raise ValueError("rl.kl_coef > 0 or rl.track_kl needs the reference policy's params")
      self.ref_params = (mesh_lib.shard_state(reference_params, self.mesh) if self.mesh is not None
                         else reference_params)

    self.drafter_graphdef, self.drafter_state, self.drafter_tx = drafter or (None, None, None)

    self.sampling = SamplingParams(temperature=float(config.rollout.temperature),
                                   top_k=int(config.rollout.top_k), top_p=float(config.rollout.top_p))
    self.update_cfg = UpdateConfig.from_config(rl, self.sampling.temperature)
    self.update_step = make_policy_update_step(self.graphdef, self.tx, self.update_cfg, self.state,
                                               self.mesh, with_ref=self.with_ref, embedder=input_embedder)
    self.logprob_fn = make_logprob_fn(self.graphdef, self.sampling.temperature, self.state.params,
                                      self.mesh, micro_batches=int(rl.micro_batches), embedder=input_embedder)
    advantage_kwargs = dict(rl.advantage_kwargs)
    self.token_estimator = advantages_lib.is_token_estimator(rl.advantage)
    self.advantage_fn = jax.jit(advantages_lib.token_advantages(rl.advantage, **advantage_kwargs)
                                if self.token_estimator else
                                advantages_lib.get_advantage(rl.advantage, **advantage_kwargs))
    # Online filters of sampled groups (stage `sample`): DAPO's dynamic sampling, PRIME's band.
    self.dynamic_sampling = bool(rl.dynamic_sampling)
    band = tuple(float(x) for x in rl.accuracy_band)
    self.accuracy_band = (band[0], band[1])
    self.filtering = self.dynamic_sampling or band[0] > 0.0 or band[1] < 1.0
    self.filter_rounds = int(rl.dynamic_sampling_rounds)
    weights = {k: float(v) for k, v in dict(rl.rewards).items()}
    kwargs = {k: dict(v) for k, v in dict(rl.reward_kwargs).items() if float(weights.get(k, 0.0))}
    self.reward_fn = rewards_lib.safe_reward(
        rewards_lib.combine_rewards(weights, kwargs),
        name="+".join(f"{w:g}*{k}" for k, w in weights.items() if w))
    self.correct_fn = rewards_lib.safe_reward(rewards_lib.get_reward("verifier"), name="accuracy")

    source, held_out = rl_prompt_sources(config, task, tokenizer, rl_context(config, self.model_cfg))
    self.prompt_source = source
    self.prompts = PromptIterator(source, rl.prompts_per_step, seed=config.seed)
    self.prompt_width = prompt_width(config, task)
    self.host = HostState()
    self.build_rollout()
    # Device scorers (per-token rewards, rl/scorers.py), with their own state (PRIME's PRM).
    self.scorers = scorers_lib.build_scorers(config, scorers_lib.ScorerContext(
        graphdef=self.graphdef, policy_params=self.state.params, ref_params=self.ref_params,
        mesh=self.mesh, temperature=self.sampling.temperature, logprob_fn=self.logprob_fn,
        micro_batches=int(rl.micro_batches)))

    self.checkpointer = Checkpointer(os.path.join(workdir, "ckpt_rl"), config.checkpoint.max_to_keep,
                                     async_saves(config.checkpoint.async_save))
    self.writer = MetricsWriter(workdir, "metrics")
    # one replayable line per step for the step simulator (TLTRuntime.trace, analysis/sim.py)
    self.trace_writer = MetricsWriter(workdir, "traces", tensorboard=False)
    self.sample_eval_set = []
    if held_out is not None:
      self.sample_eval_set = [held_out[i] for i in range(rl.sample_eval_size)]
      self.eval_writer = MetricsWriter(workdir, "rl_eval")

  # ---------------------------------------------------------------------------------------------
  # Rollout wiring: TLT (tlt/runtime.py) builds the rollout groups over the mesh's data axis, the
  # engine with its speculative decoder (config tlt.speculative), the BEG-MAB bandit, the drafter
  # buffer and the drafter trained in the groups' bubbles (tlt.train_drafter), and the host
  # scheduler that runs every rollout.
  # ---------------------------------------------------------------------------------------------

  def build_rollout(self) -> None:
    r = self.config.rollout
    drafter = None
    if self.drafter_state is not None:
      drafter = (self.drafter_graphdef, self.drafter_state, self.drafter_tx)
    self.pack_len, buffer_len = rl_lengths(self.config, self.model_cfg, self.prompt_width)
    self.tlt = TLTRuntime(self.config, self.graphdef, self.model_cfg, self.sampling,
                          self.tokenizer.eos_ids, self.tokenizer.pad_id, self.run_mesh, drafter, buffer_len,
                          input_embedder=self.input_embedder)
    self.engine = self.tlt.engine

  # ----------------------------------------------------------------------------- checkpointing

  def _ckpt_tree(self) -> dict:
    """Arrays: policy + optimizer, RNG, and TLT's drafter + its optimizer and buffer rows."""
    tree = {"policy": self.state, "rng": self.rng, **self.tlt.checkpoint_tree()}
    scorer_state = {name: scorer.state for name, (_, scorer) in self.scorers.items()
                    if getattr(scorer, "state", None) is not None}
    if scorer_state:
      tree["scorers"] = scorer_state
    return tree

  def _meta(self, step: int) -> dict:
    return {"stage": "rl", "step": int(step), "iterator": self.prompts.get_state(),
            "host": dataclasses.asdict(self.host),
            "reference": {"kind": "hf_dir", "path": self.reference_source},
            "has_drafter": self.drafter_state is not None,
            "tlt": self.tlt.checkpoint_meta(),  # drafter version, buffer position, bandit
            "config": json.loads(self.config.to_json_best_effort())}

  def save(self, step: int) -> float:
    t0 = time.perf_counter()
    self.checkpointer.save(step, self._ckpt_tree(), self._meta(step))
    return time.perf_counter() - t0

  def restore(self) -> int:
    """Restores the newest readable checkpoint (falling back past corrupt ones); returns its step
    (0 when there is none)."""
    restored = self.checkpointer.restore_latest(self._ckpt_tree())
    if restored is None:
      return 0
    step, tree, meta = restored
    self.state, self.rng = tree["policy"], tree["rng"]
    self.drafter_state = tree.get("drafter")
    self.tlt.restore(tree, meta.get("tlt"))
    for name, state in tree.get("scorers", {}).items():
      self.scorers[name][1].state = state
    self.prompts.set_state(meta["iterator"])
    self.host = HostState(**meta["host"])
    source = meta.get("reference", {}).get("path", "")
    if (source and self.reference_source
        and os.path.abspath(source) != os.path.abspath(self.reference_source)):
      log.warning("the checkpoint's reference policy came from %s, this run's from %s", source,
                  self.reference_source)
    log.info("resumed RL from step %d (%s)", step, self.checkpointer.directory)
    return step

  # ----------------------------------------------------------------------------- one step
  # The step is a list of stages (rl/stages.py), each a function of the batches before it.

  def step(self, step: int) -> dict:
    """RL step `step` (1-based) in full; returns the metrics record."""
    t_start = time.perf_counter()
    clock = stages.StageClock()
    with clock("rollout"):  # rollout (+ refill rounds) with the host scorers; the drafter
      rollout, scores = self.sample(step, clock)  # trains in the rollout's bubbles
    with clock("logprob"):
      batch = self.prepare_update_batch(rollout)  # rows, update layout, old/ref log-probs
    with clock("reward"):
      token_rewards = self.score_tokens(batch, scores)  # device scorers: PRIME, KL penalty
      advantages_BxL = self.compute_advantages(scores, token_rewards, batch)
    with clock("update"):
      metrics, hidden = self.update_policy(batch, advantages_BxL)
    record = self.record(step, rollout, scores, token_rewards, batch, advantages_BxL, metrics, clock)
    record["step_time_s"] = time.perf_counter() - t_start
    self.trace_writer.write(step, self.tlt.trace(step, rollout.result, rollout.account, self.rl.group_size,
                                                 rollout.prompt_BxW.shape[1]))
    with clock("tlt_after_update"):  # the update's own features to the drafter buffer
      record.update(self.drafter_features(step, rollout, batch, hidden))
    record["tlt_after_update_s"] = clock.seconds["tlt_after_update"]
    record["step_time_s"] += record["tlt_after_update_s"]
    return record

  def _rollout(self, examples: Sequence, key, step: int | None = None) -> Rollout:
    """Encodes `examples`' prompts and samples one response each over the rollout groups. With
    `step` (an RL step) the drafter trains in the bubbles and buffers the responses' features;
    without (an evaluation) it only decodes."""
    width = self.prompt_width or round_up(
        max(len(self.tokenizer.encode(ex.prompt)) for ex in examples) + 1, 16)
    prompts, prompt_lens = encode_prompts(examples, self.tokenizer, width)
    train = step is not None
    result, account = self.tlt.rollout(self.state.params, prompts, prompt_lens,
                                       int(self.config.rollout.max_new_tokens), key, step=step or 0,
                                       group_size=self.rl.group_size if train else 1, train=train)
    responses = [_decode(self.tokenizer, result.tokens[i, :result.lengths[i]])
                 for i in range(len(examples))]
    buffered = account.buffered_rows
    buffered = np.zeros(len(examples), bool) if buffered is None else np.asarray(buffered, bool)
    return Rollout(list(examples), prompts, prompt_lens, result, responses, buffered, account,
                   rollouts=len(examples))

  def sample(self, step: int, clock: "stages.StageClock") -> tuple[Rollout, Scores]:
    """Stage 1, rollout and host scorers: P prompts x G responses with their rewards. With an
    online filter (rl.dynamic_sampling: DAPO; rl.accuracy_band: PRIME) groups it drops are
    replaced by groups of fresh prompts, up to rl.dynamic_sampling_rounds extra rounds; dropped
    groups fill what is still missing (rl/stages.assemble)."""
    rl = self.rl
    parts = []
    for _ in range(1 + (self.filter_rounds if self.filtering else 0)):
      examples = repeat_groups(next(self.prompts), rl.group_size)
      self.rng, key = jax.random.split(self.rng)
      rollout = self._rollout(examples, key, step)
      with clock("reward"):
        scores = stages.score_groups(self.reward_fn, self.correct_fn, self.task, examples,
                                     rollout.result, rollout.responses, rl.group_size)
      keep = (stages.keep_groups(scores, distinct_rewards=self.dynamic_sampling,
                                 accuracy_band=self.accuracy_band)
              if self.filtering else np.ones(rl.prompts_per_step, bool))
      parts.append((rollout, scores, keep))
      if sum(int(k.sum()) for _, _, k in parts) >= rl.prompts_per_step:
        break
    return stages.assemble(parts, rl.prompts_per_step, rl.group_size, self.tokenizer.pad_id)

  def _device_batch(self, batch):
    return mesh_lib.shard_batch(batch, self.mesh) if self.mesh is not None else batch

  def prepare_update_batch(self, rollout: Rollout) -> UpdateBatch:
    """Stage 2: one sequence per row, the update's layout (packed rows), and the forwards
    without gradient: old log-probs (and the reference's) with the sampler vs trainer gap."""
    rows = stages.build_rows(rollout.prompt_BxW, rollout.prompt_len_B, rollout.result,
                             self.rl.length_bucket, self.tokenizer.pad_id)
    laid_out, index = stages.layout_rows(rows, rollout.prompt_len_B + rollout.result.lengths,
                                         pack=self.pack, pack_len=self.pack_len,
                                         rows_multiple=self.pack_rows_multiple)
    laid_out = dict(laid_out)
    sampler_lp = self._device_batch(laid_out.pop("sampler_logprobs"))
    device = self._device_batch(laid_out)
    args = (device["tokens"], device["positions"], device["segment_ids"], device["response_mask"], sampler_lp)
    device["old_logprobs"], gap = self.logprob_fn(self.state.params, *args)
    if self.with_ref:
      device["ref_logprobs"], _ = self.logprob_fn(self.ref_params, *args)
    return UpdateBatch(rows, device, index, tuple(laid_out["tokens"].shape),
                       {k: float(v) for k, v in mesh_lib.to_host(gap).items()},
                       fill=float(np.mean(laid_out["segment_ids"] > 0)))

  def score_tokens(self, batch: UpdateBatch, scores: Scores) -> TokenRewards:
    """Stage 3, device scorers: sum_k w_k r^k_t per response token (rl/scorers.py), rows [B, L];
    stateful scorers (PRIME's PRM) also learn here."""
    if not self.scorers:
      return TokenRewards(None)
    total, metrics = None, {}
    for name, (weight, scorer) in self.scorers.items():
      rewards, m = scorer.score(batch, scores)
      metrics.update(m)
      term = weight * np.asarray(batch.to_rows(rewards), np.float32)
      total = term if total is None else total + term
    mask = batch.rows["response_mask"]
    total = total.astype(np.float32) * mask
    metrics["token_reward_mean"] = float(total.sum() / max(mask.sum(), 1.0))
    return TokenRewards(total, metrics)

  def compute_advantages(self, scores: Scores, token_rewards: TokenRewards, batch: UpdateBatch) -> np.ndarray:
    """Stage 4: per-token advantages [B, L] (rows) of the registered estimator."""
    if not self.token_estimator:  # A_i, constant over response i (and its prompt: masked)
      adv_B = np.asarray(self.advantage_fn(jnp.asarray(scores.rewards_PxG))).reshape(-1)
      return stages.sequence_advantages_to_rows(adv_B, batch.rows["segment_ids"])
    g = self.rl.group_size
    mask = batch.rows["response_mask"]
    token_r = token_rewards.rewards_BxL if token_rewards.rewards_BxL is not None else np.zeros_like(mask)
    inputs = advantages_lib.AdvantageInputs(
        jnp.asarray(scores.rewards_PxG, jnp.float32), jnp.asarray(stages.group_rows(token_r, g)),
        jnp.asarray(stages.group_rows(mask, g)))
    return np.asarray(self.advantage_fn(inputs)).reshape(mask.shape).astype(np.float32)

  def update_policy(self, batch: UpdateBatch, advantages_BxL: np.ndarray) -> tuple[dict, Any]:
    """Stage 5, the policy update: (metrics, hidden states f_t of its forward)."""
    device = dict(batch.device, advantages=self._device_batch(batch.to_update_layout(advantages_BxL)))
    self.state, metrics, hidden = self.update_step(self.state, device)
    return {k: float(v) for k, v in mesh_lib.to_host(metrics).items()}, hidden

  def drafter_features(self, step: int, rollout: Rollout, batch: UpdateBatch, hidden) -> dict:
    """Stage 6: TLT's drafter buffer takes the update's own features f_t for the rows the rollout
    did not already buffer (tlt/buffer.py); with one rollout group the drafter then trains
    between steps. Packed batches are unpacked to rows first. Returns record fields."""
    if not self.tlt.trains_drafter:
      return {}
    rows, hidden_BxLxH = batch.device, hidden
    if batch.pack is not None:
      rows, hidden_BxLxH = batch.rows, batch.to_rows(hidden)
    return self.tlt.after_update(rows, hidden_BxLxH, rollout.buffered_B, step, self.state.params)

  def record(self, step, rollout: Rollout, scores: Scores, token_rewards: TokenRewards,
             batch: UpdateBatch, advantages_BxL: np.ndarray, metrics: dict, clock) -> dict:
    """The step's metrics record (host bookkeeping included)."""
    result, rewards_PxG = rollout.result, scores.rewards_PxG
    self.host.reward_failures_total += scores.reward_failures
    self.host.rollouts_total += rollout.rollouts
    self.host.groups_dropped_total += rollout.dropped_groups
    # A response's advantage at its first token: A_i for sequence estimators; the return of the
    # whole response for token ones.
    first_B = np.argmax(batch.rows["response_mask"] > 0, axis=1)
    adv_B = advantages_BxL[np.arange(len(first_B)), first_B]
    lengths, times = result.lengths, result.stats.time_s
    accept = result.stats.spec_accept_len
    up = batch.device["tokens"]
    record = {
        "step": step,
        "reward_mean": float(rewards_PxG.mean()), "reward_std": float(rewards_PxG.std()),
        "accuracy": float(scores.correct_B.mean()),
        "finished_frac": float(result.finished.mean()),
        "response_len_mean": float(lengths.mean()), "response_len_max": int(lengths.max()),
        "accept_len": None if accept is None else float(accept),
        "advantage_abs_mean": float(np.abs(adv_B).mean()),
        "zero_adv_groups": int(np.sum(np.all(
            np.abs(advantages_BxL.reshape(rewards_PxG.shape + advantages_BxL.shape[1:])) < 1e-8, axis=(1, 2)))),
        "logprob_gap": batch.logprob_gap["logprob_gap"], "logprob_gap_max": batch.logprob_gap["logprob_gap_max"],
        "kl": metrics["kl"] if self.with_ref else None,
        "entropy": metrics["entropy"], "clip_frac": metrics["clip_frac"],
        "approx_kl": metrics["approx_kl"], "ratio_mean": metrics["ratio_mean"],
        "loss": metrics["loss"], "pg_loss": metrics["pg_loss"], "grad_norm": metrics["grad_norm"],
        "skipped": int(metrics["skipped"]), "reward_failures": int(scores.reward_failures),
        "lr": float(self.schedule(step - 1)), "update_len": int(up.shape[1]),
        "update_rows": int(up.shape[0]),
        "update_fill": batch.fill,
        "num_tokens": int(metrics["num_tokens"]),
        "rollouts_total": self.host.rollouts_total,
        "rollout_time_s": clock.seconds["rollout"],
        "reward_time_s": clock.seconds["reward"], "logprob_time_s": clock.seconds["logprob"],
        "update_time_s": clock.seconds["update"],
        "prefill_time_s": times.get("prefill", 0.0), "decode_time_s": times.get("decode", 0.0),
        "spec_time_s": times.get("speculative", 0.0), "compact_time_s": times.get("compact", 0.0),
    }
    if self.filtering:
      record.update(rollout_rounds=rollout.rounds, groups_dropped=rollout.dropped_groups,
                    groups_dropped_total=self.host.groups_dropped_total)
    record.update(token_rewards.metrics)
    record.update(self.tlt.record(result, rollout.account))
    if rollout.rounds > 1:  # TLT's token shares over every round's tokens, not the kept rows'
      scale = float(lengths.sum()) / max(int(result.stats.num_tokens), 1)
      record.update(spec_frac=record["spec_frac"] * scale, tail_frac=record["tail_frac"] * scale)
    return record

  def sample_eval(self) -> dict[str, float]:
    """Accuracy of ONE sample per fixed held-out prompt at the rollout's temperature, always with
    the same RNG key (common random numbers: two policies are compared on coupled samples)."""
    key = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), 10_000_019)
    ev = self._rollout(self.sample_eval_set, key)
    correct = [self.correct_fn([y], [f], [n], ex, self.task)[0] for y, f, n, ex in
               zip(ev.responses, ev.result.finished.tolist(), ev.result.lengths.tolist(), self.sample_eval_set)]
    return {"eval_accuracy": float(np.mean(correct)),
            "eval_response_len_mean": float(ev.result.lengths.mean())}

  def _check_skips(self, step: int, record: dict) -> None:
    self.host.consecutive_skips = self.host.consecutive_skips + 1 if record["skipped"] else 0
    if record["skipped"]:
      log.warning("step %d: non-finite update skipped (loss %s, grad_norm %s); %d in a row", step,
                  record["loss"], record["grad_norm"], self.host.consecutive_skips)
    if self.host.consecutive_skips >= self.rl.max_consecutive_skips:
      raise TrainingDiverged(
          f"RL stopped at step {step}: {self.host.consecutive_skips} consecutive policy updates had "
          f"a non-finite loss or gradient norm (last: loss={record['loss']}, "
          f"grad_norm={record['grad_norm']}) and were skipped (rl.max_consecutive_skips="
          f"{self.rl.max_consecutive_skips}). The params are those before the first skip; lower "
          "rl.lr or check the rewards and advantages, then resume from the checkpoint in "
          f"{self.checkpointer.directory}.")

  # ----------------------------------------------------------------------------- the loop

  def run(self) -> dict[str, Any]:
    rl = self.rl
    start = self.restore()
    self.writer.truncate_after(start)
    self.trace_writer.truncate_after(start)
    do_eval = bool(self.sample_eval_set)
    if do_eval:
      self.eval_writer.truncate_after(start)
      if start == 0:
        self.eval_writer.write(0, self.sample_eval())
    last_saved = start
    bar = progress(rl.steps, "rl", initial=start)
    try:
      for step in range(start + 1, rl.steps + 1):
        record = self.step(step)
        self._check_skips(step, record)
        record["checkpoint_time_s"] = 0.0
        if step % rl.checkpoint_every == 0 or step == rl.steps:
          record["checkpoint_time_s"] = self.save(step)
          last_saved = step
        record["reward_failures_total"] = self.host.reward_failures_total
        record["prompts_skipped_total"] = self.prompt_source.skipped  # unusable prompts (this process)
        if do_eval and (step % rl.sample_eval_every == 0 or step == rl.steps):
          t0 = time.perf_counter()
          record.update(self.sample_eval())
          record["sample_eval_time_s"] = time.perf_counter() - t0
          self.eval_writer.write(step, {k: v for k, v in record.items() if k.startswith("eval_")})
        self.writer.write(step, record)
        bar.update(1)
        accept = record["accept_len"]
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}",
                        acc=f"{record['accuracy']:.3f}", len=f"{record['response_len_mean']:.1f}",
                        max=record["response_len_max"],
                        accept="-" if accept is None else f"{accept:.2f}",
                        t=f"{record['step_time_s']:.1f}s")
        if self.preemption is not None and self.preemption.reached():
          if last_saved < step:
            self.save(step)
          raise Preempted("rl", step, self.workdir)
    except TrainingDiverged:
      if last_saved < int(self.state.step):
        self.save(int(self.state.step))
      raise
    finally:
      bar.close()
      self.checkpointer.close()
      self.writer.close()
      if do_eval:
        self.eval_writer.close()
    return self.finish()

  def finish(self) -> dict[str, Any]:
    """Plots, the final evaluation and the run summary (idempotent)."""
    records = read_jsonl(self.writer.path) if os.path.exists(self.writer.path) else []
    smoothed = with_moving_averages(records, ("reward_mean", "accuracy"), window=5)
    plot_curves(smoothed, ["reward_mean", "reward_mean_ma5", "accuracy", "accuracy_ma5",
                           "response_len_mean", "response_len_max", "accept_len"],
                os.path.join(self.workdir, "rl_curves.png"), "RL", ncols=4)
    plot_curves(records, ["kl", "entropy", "clip_frac", "logprob_gap", "grad_norm"],
                os.path.join(self.workdir, "rl_diagnostics.png"), "RL diagnostics", ncols=3)
    plot_stacked_bars(records, TIME_BREAKDOWN, os.path.join(self.workdir, "rl_time.png"),
                      "RL step time (s)")
    plot_curves(records, TLT_CURVES, os.path.join(self.workdir, "rl_tlt.png"),
                "TLT: speculative tails, bubbles and the drafter trained in them", ncols=4)
    eval_path = os.path.join(self.workdir, "rl_eval.jsonl")
    evals = read_jsonl(eval_path) if os.path.exists(eval_path) else []
    plot_curves(evals, ["eval_accuracy", "eval_response_len_mean"],
                os.path.join(self.workdir, "rl_eval.png"), "RL: sampled accuracy on held-out prompts")
    summary: dict[str, Any] = {"rl_steps": len(records)}
    if evals:
      summary["sample_eval"] = {int(r["step"]): round(r["eval_accuracy"], 4) for r in evals}
    if records:
      head, tail = records[:5], records[-5:]
      mean = lambda rs, k: float(np.mean([r[k] for r in rs]))  # noqa: E731
      summary.update(
          reward_first5=mean(head, "reward_mean"), reward_last5=mean(tail, "reward_mean"),
          accuracy_first5=mean(head, "accuracy"), accuracy_last5=mean(tail, "accuracy"),
          response_len_first5=mean(head, "response_len_mean"),
          response_len_last5=mean(tail, "response_len_mean"),
          rl_step_time_mean_s=mean(records, "step_time_s"))
      tlt = {k: [r[k] for r in records if isinstance(r.get(k), (int, float))]
             for k in ("accept_len", "bubble_utilisation", "spec_frac")}
      summary["tlt"] = {f"{k}_mean": float(np.mean(v)) for k, v in tlt.items() if v}
      summary["tlt"]["drafter_version"] = self.tlt.drafter_version
    if self.evaluate is not None and self.rl.eval_size:
      summary["final_eval"] = self.evaluate(nnx.merge(self.graphdef, self.state.params))
    return summary
