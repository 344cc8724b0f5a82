"""TLT for one RL run, wired from the config: rollout groups, the engine with its speculative
decoder, the BEG-MAB bandit, the drafter buffer and trainer, the host scheduler, and the state of
all of them that a checkpoint carries.

Two switches (config `tlt`):
  speculative     decode each rollout group's tail (active batch <= rollout.spec_threshold)
                  speculatively, strategy per chunk from the BEG-MAB bandit (plain decoding is
                  one of its arms when `tlt.strategies` lists "plain");
  train_drafter   train the drafter on the policy's own features in the idle groups' bubbles
                  (tlt/scheduler.py), publishing versions that later chunks pick up.
Off/off is plain decoding over the rollout groups (the baseline); on/off is a static drafter.

Where the drafter trains (`tlt.train_where`): "bubbles" (idle rollout groups while others still
decode), "between_steps" (`tlt.between_steps` steps on all groups after each policy update), or
"auto": bubbles on accelerators, where an idle group's chips are free; between steps when the
rollout groups are fake devices over the same CPU cores (training in a "bubble" would only take
cores from the group still decoding). The choice is logged once.

Determinism: without speculation a run is a pure function of its config. With it, every rollout
is an exact sample of the policy, but WHICH sample depends on the drafter's proposals and the
bandit's picks, and those depend on wall-clock time (bubble lengths, measured throughput): runs
agree in distribution, not bitwise.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from tlt_jax.drafter.train import DrafterTrainState, make_drafter_train_step
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.engine import RolloutEngine
from tlt_jax.rollout.records import RolloutResult, StepAccount
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.speculative import SpeculativeDecoder
from tlt_jax.rollout.strategy import Strategy, parse_strategy, strategy_name
from tlt_jax.tlt.bandit import BegMab, arm_ladder
from tlt_jax.tlt.buffer import DrafterBuffer, rows_for_budget
from tlt_jax.tlt.config import TLTConfig
from tlt_jax.tlt.draft_vocab import DraftVocabCounter
from tlt_jax.tlt.groups import split_mesh
from tlt_jax.tlt.scheduler import DrafterTrainer, HostScheduler, target_head

log = logging.getLogger(__name__)

# Record fields whose values depend on wall-clock time (they differ between identical runs).
TIMING_FIELDS = ("bubble_s", "bubble_utilisation", "drafter_train_s", "idle_group_s", "decode_group_s",
                 "preempt_wait_s", "drafter_steps", "drafter_version", "drafter_version_min",
                 "drafter_loss", "drafter_accuracy", "spec_frac", "spec_chunks", "accept_len",
                 "between_steps_train_s", "between_steps_drafter_steps", "tail_time_frac")


def parse_arms(names: Sequence[str]) -> list[tuple[int, int, int]]:
  """Bandit arms from names: "plain" (PLAIN = (0, 0, 0)) or "d<depth>k<topk>n<num_verify>"."""
  return [parse_strategy(s) for s in names]


TRAIN_WHERE = ("auto", "bubbles", "between_steps")


def rollout_selector(strategies: Sequence[Strategy], buckets: Sequence[int], spec_threshold: int,
                     epsilon: float, window: int, seed: int, ladder: Sequence[int] = ()) -> BegMab:
  """The BEG-MAB selector of a run's speculative chunks: one bandit bucket per rollout bucket at or
  below `spec_threshold` (the rows a tail chunk computes); arms `strategies` in every bucket, or
  with `ladder` (tlt.arm_ladder) the verify-token ladder of tlt/bandit.arm_ladder."""
  tail = tuple(b for b in buckets if b <= spec_threshold) or (spec_threshold,)
  arms = arm_ladder(strategies, tail, ladder) if ladder else list(strategies)
  return BegMab(arms, buckets=tail, epsilon=epsilon, window=window, seed=seed)


def resolve_train_where(where: str, num_groups: int, backend: str | None = None) -> str:
  """The drafter-training mode (module docstring) with its reason, e.g. "between_steps (the 2
  rollout groups share the CPU's cores)"."""
  if where not in TRAIN_WHERE:
    raise ValueError(f"tlt.train_where={where!r} is not allowed; allowed: one of {TRAIN_WHERE}")
  backend = backend or jax.default_backend()
  if num_groups < 2:
    return "between_steps (one rollout group: no bubbles)"
  if where == "auto":
    if backend == "cpu":
      return f"between_steps (auto: the {num_groups} rollout groups are fake devices sharing the CPU's cores)"
    return f"bubbles (auto: the {num_groups} rollout groups are disjoint {backend} devices)"
  return f"{where} (tlt.train_where)"


class TLTRuntime:
  """TLT's rollout side of one RL run (see the module docstring).

  Args:
    config: the run config (sections `rollout`, `tlt`, `seed`), read through TLTConfig (or a
      TLTConfig).
    graphdef: the policy's graphdef; model_cfg its ModelConfig.
    sampling: the rollout's SamplingParams; eos_ids / pad_id the tokenizer's.
    mesh: the run's mesh (one device is a 1x1x1 mesh); its `data` axis is split into the rollout
      groups.
    drafter: (graphdef, DrafterTrainState, optax optimizer) of the warmed-up drafter, or None.
    seq_len: the drafter buffer's row length (>= prompt width + max_new_tokens).
  """

  def __init__(self, config, graphdef, model_cfg, sampling: SamplingParams, eos_ids: Sequence[int],
               pad_id: int, mesh: Mesh, drafter: tuple[Any, DrafterTrainState, Any] | None,
               seq_len: int, input_embedder=None):
    c = self.config = config if isinstance(config, TLTConfig) else TLTConfig.from_config(config)
    self.graphdef = graphdef
    self.spec_threshold, self.rounds_per_chunk = c.spec_threshold, c.rounds_per_chunk
    self.groups = split_mesh(mesh, c.rollout_groups)
    self.speculative = c.speculative and drafter is not None
    self.train_drafter = c.train_drafter and drafter is not None
    if drafter is None and (c.speculative or c.train_drafter):
      log.warning("no drafter (run the 'drafter' stage first): speculative decoding and drafter "
                  "training are off")
    decoder = None
    if self.speculative:
      decoder = SpeculativeDecoder(graphdef, drafter[0], sampling, tuple(eos_ids),
                                   strategies=[Strategy(*a) for a in c.speculative_arms],
                                   rounds_per_chunk=c.rounds_per_chunk, input_embedder=input_embedder,
                                   draft_vocab_size=c.draft_vocab_size)
    self.draft_vocab = (DraftVocabCounter(model_cfg.vocab_size, c.draft_vocab_size, c.draft_vocab_decay)
                        if decoder is not None and c.draft_vocab_size else None)
    self.engine = RolloutEngine(
        graphdef, sampling, eos_ids=tuple(eos_ids), pad_id=pad_id, chunk_size=c.chunk_size,
        buckets=c.buckets, max_context=model_cfg.max_position_embeddings, speculative=decoder,
        spec_threshold=c.spec_threshold if decoder is not None else 0, window_block=c.window_block,
        input_embedder=input_embedder)
    self.bandit = None
    if self.speculative:
      self.bandit = rollout_selector(c.strategies, self.engine.buckets, c.spec_threshold, c.bandit_epsilon,
                                     c.bandit_window, c.seed, c.arm_ladder)
    self.checkpoint_buffer = c.checkpoint_buffer
    self.drafter_state = None if drafter is None else drafter[1]
    self.buffer, self.trainer = self._drafter_training(drafter, model_cfg, pad_id, seq_len)
    static = drafter[1].params if self.speculative and not self.train_drafter else None
    self.train_where = resolve_train_where(c.train_where, len(self.groups))
    if self.train_drafter:
      log.info("tlt: drafter training %s", self.train_where)
    self.scheduler = HostScheduler(
        self.engine, self.groups, trainer=self.trainer, drafter_params=static, selector=self.bandit,
        train_in_bubbles=self.train_where.startswith("bubbles"), single_group=c.single_group,
        between_steps=c.between_steps, max_in_flight=c.max_in_flight, max_train_steps=c.max_drafter_steps)

  def _drafter_training(self, drafter, model_cfg, pad_id: int, seq_len: int):
    """(buffer, trainer) of the drafter trained on the policy's features, or (None, None)."""
    if not self.train_drafter:
      return None, None
    c, (dgraph, state, tx) = self.config, drafter
    capacity = rows_for_budget(c.buffer_capacity, c.buffer_bytes, int(seq_len), model_cfg.hidden_size,
                               c.buffer_dtype)
    buffer = DrafterBuffer(capacity, int(seq_len), model_cfg.hidden_size, decay=c.buffer_decay, seed=c.seed,
                           pad_id=pad_id, hidden_dtype=c.buffer_dtype)
    trainer = DrafterTrainer(lambda mesh: make_drafter_train_step(dgraph, tx, model_cfg, mesh=mesh),
                             state, self.groups, buffer, c.drafter_batch_size)
    return buffer, trainer

  # ----------------------------------------------------------------------------- the facade

  @property
  def trains_drafter(self) -> bool:
    """Whether a drafter trains (in the bubbles or between steps) in this run."""
    return self.trainer is not None

  @property
  def trains_in_bubbles(self) -> bool:
    """Whether the drafter trains in the idle groups' bubbles (else between steps, or not at all)."""
    return self.scheduler.train_in_bubbles

  @property
  def drafter_version(self) -> int | None:
    """The published drafter version (None when no drafter trains)."""
    return None if self.trainer is None else self.trainer.version

  def drafter_params(self, group: int = 0):
    """(version, params placed on rollout group `group`) of the drafter the next speculative
    chunk uses: the trained drafter's newest published version, the static drafter (version 0),
    or (None, None) without speculation."""
    return self.scheduler.drafter_for(group)

  @property
  def buffer_rows(self) -> int:
    """Rows in the drafter buffer (0 without drafter training)."""
    return 0 if self.buffer is None else len(self.buffer)

  # ----------------------------------------------------------------------------- one step

  def rollout(self, params, prompt_BxP: np.ndarray, prompt_len_B: np.ndarray, max_new_tokens,
              rng: jax.Array, *, step: int = 0, group_size: int = 1,
              train: bool = True) -> tuple[RolloutResult, StepAccount]:
    """A rollout over the groups, the drafter trained in their bubbles (HostScheduler.rollout;
    `train=False` for evaluations: no buffering, no training)."""
    result, account = self.scheduler.rollout(params, prompt_BxP, prompt_len_B, max_new_tokens, rng, step=step,
                                             group_size=group_size, train=train)
    if train and self.draft_vocab is not None:  # the reduced draft vocabulary follows the policy
      self.draft_vocab.observe(result.tokens, result.lengths)
      if self.draft_vocab.steps % self.config.draft_vocab_refresh == 0:
        self.engine.speculative.set_draft_vocab(self.draft_vocab.ids())
    return result, account

  def after_update(self, batch: Mapping[str, Any], hidden_BxLxH, buffered_rows: np.ndarray, step: int,
                   next_params) -> dict[str, Any]:
    """After the policy update: the update's own features of the rows the rollout did not buffer
    (source 2 of tlt/buffer.py), then, with one rollout group, drafter training between steps
    against the updated policy's head. Returns record fields."""
    if self.trainer is None:
      return {}
    rows = np.flatnonzero(~np.asarray(buffered_rows, bool))
    if rows.size:
      tokens, mask, hidden = (mesh_lib.gather_to_host(x) for x in (batch["tokens"], batch["response_mask"],
                                                                   hidden_BxLxH))
      self.buffer.add_update_batch(tokens, hidden, mask, step, rows=rows)
    out = self.scheduler.train_between_steps(target_head(self.graphdef, next_params))
    record = {"buffer_rows": len(self.buffer)}
    if out.drafter_steps:
      record.update(between_steps_train_s=out.train_s, between_steps_drafter_steps=out.drafter_steps,
                    drafter_version=out.drafter_version)
    return record

  def record(self, result: RolloutResult, account: StepAccount) -> dict[str, Any]:
    """The step's TLT fields for the metrics record (group-seconds summed over the groups).
    tail_frac: share of the tokens decoded at an active batch <= rollout.spec_threshold (where
    speculation may run); tail_time_frac: the share of the groups' chunk time spent there;
    spec_frac: share of the tokens decoded speculatively."""
    stats = result.stats
    spec, tail = stats.spec_chunks, stats.tail(self.spec_threshold)
    spec_tokens, tail_tokens = sum(c.tokens for c in spec), sum(c.tokens for c in tail)
    chunk_time = sum(c.time_s for c in stats.chunks)
    used = account.drafter_versions_used
    return {
        "rollout_groups": account.num_groups, "decode_group_s": account.decode_s,
        "drafter_train_s": account.train_s, "idle_group_s": account.idle_s,
        "bubble_s": account.bubble_s, "bubble_utilisation": account.bubble_utilisation,
        "preempt_wait_s": account.preempt_wait_s, "drafter_steps": account.drafter_steps,
        "drafter_version": account.drafter_version,
        "drafter_version_min": min(used) if used else None,
        "drafter_loss": account.drafter_loss, "drafter_accuracy": account.drafter_accuracy,
        "spec_chunks": len(spec), "spec_frac": spec_tokens / max(int(result.lengths.sum()), 1),
        "tail_frac": tail_tokens / max(int(result.lengths.sum()), 1),
        "tail_time_frac": sum(c.time_s for c in tail) / chunk_time if chunk_time > 0 else 0.0,
    }

  def trace(self, step: int, result: RolloutResult, account: StepAccount, group_size: int,
            prompt_width: int) -> dict[str, Any]:
    """What a replay of this step's rollout needs (analysis/sim.py, experiments/pod_sim.py --validate):
    each row's response length by rollout group (in the group's row order), every chunk as
    [group, active batch, strategy name or None (the bandit's choice), tokens, rounds, row-rounds,
    seconds], each group's active-batch trace, finish time and host timings (session start, first
    dispatch, seconds inside `advance()` after it), the drafter steps and their
    group-seconds, and the scheduling parameters. Compact JSON, one line per step."""
    from tlt_jax.tlt.groups import split_rows
    lengths = np.asarray(result.lengths)
    rows = split_rows(len(lengths), int(group_size), len(self.groups))
    eng = self.engine
    chunks = [[c.group, c.batch, c.strategy, c.tokens, c.rounds, c.row_rounds, round(float(c.time_s), 6)]
              for c in result.stats.chunks]
    arms = self.config.strategies if self.speculative else ()
    return {
        "step": int(step), "lengths": [lengths[r].tolist() for r in rows], "prompt_width": int(prompt_width),
        "chunks": chunks, "active_trace": [list(t) for t in result.stats.active_trace],
        "group_done_s": [round(float(g.done_s), 6) for g in account.groups],
        # per group: session start, first chunk dispatched (prefill done), host time inside advance()
        "group_host_s": [[round(float(x), 6) for x in (g.start_s, g.first_dispatch_s, g.host_s)]
                         for g in account.groups],
        "rollout_s": round(float(account.wall_s), 6), "drafter_steps": int(account.drafter_steps),
        "drafter_train_s": round(float(account.train_s), 6), "bubble_s": round(float(account.bubble_s), 6),
        "preempt_wait_s": round(float(account.preempt_wait_s), 6),
        "speculative": self.speculative, "train_drafter": self.train_drafter,
        "train_in_bubbles": self.scheduler.train_in_bubbles, "between_steps": self.scheduler.between_steps,
        "spec": {"chunk_size": eng.chunk_size, "buckets": list(eng.buckets), "compact": eng.compact,
                 "spec_threshold": eng.spec_threshold, "rounds_per_chunk": self.rounds_per_chunk,
                 "arms": [strategy_name(a) for a in arms]},
    }

  # ----------------------------------------------------------------------------- checkpointing

  def checkpoint_tree(self) -> dict[str, Any]:
    """Arrays for the run's checkpoint: the drafter's train state (params + optimizer) and the
    buffer's rows."""
    tree = {}
    state = self.trainer.state if self.trainer is not None else self.drafter_state
    if state is not None:
      tree["drafter"] = state
    if self.buffer is not None and self.checkpoint_buffer:  # tlt.checkpoint_buffer=False: kept out
      tree["drafter_buffer"] = self.buffer.state_dict()["arrays"]
    return tree

  def checkpoint_meta(self) -> dict[str, Any]:
    """JSON for the run's checkpoint: drafter version, buffer position, bandit statistics and the
    draft vocabulary's counts and ids."""
    meta: dict[str, Any] = {"speculative": self.speculative, "train_drafter": self.train_drafter}
    if self.trainer is not None:
      meta["drafter_version"] = self.trainer.version
    if self.buffer is not None and self.checkpoint_buffer:
      meta["buffer"] = self.buffer.state_dict()["meta"]
    if self.bandit is not None:
      meta["bandit"] = self.bandit.state_dict()
    if self.draft_vocab is not None:  # the counts and the vocabulary the chunks draft among
      meta["draft_vocab"] = {"counter": self.draft_vocab.state_dict(),
                             "ids": self.engine.speculative.draft_vocab.tolist()}
    return meta

  def restore(self, tree: Mapping[str, Any], meta: Mapping[str, Any] | None) -> None:
    """Restores what `checkpoint_tree` / `checkpoint_meta` saved (parts the checkpoint lacks,
    e.g. from a run with TLT off, keep their fresh values)."""
    meta = meta or {}
    if "drafter" in tree:
      if self.trainer is not None:
        self.trainer.restore(tree["drafter"], int(meta.get("drafter_version", 0)))
      else:
        self.drafter_state = tree["drafter"]
        if self.speculative:
          self.scheduler.set_static_drafter(self.drafter_state.params)
    if self.buffer is not None and "drafter_buffer" in tree and "buffer" in meta:
      self.buffer.load_state_dict({"arrays": tree["drafter_buffer"], "meta": meta["buffer"]})
    if self.bandit is not None and "bandit" in meta:
      self.bandit.load_state_dict(meta["bandit"])
    if self.draft_vocab is not None and "draft_vocab" in meta:
      self.draft_vocab.load_state_dict(meta["draft_vocab"]["counter"])
      self.engine.speculative.set_draft_vocab(meta["draft_vocab"]["ids"])
