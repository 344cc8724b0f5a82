"""The stages of one RL step and the typed batches that flow between them, one way.

  Rollout      rollout(+ refill rounds)   the sampled groups: prompts, responses, sampler log-probs,
                                          which rows the drafter buffer already holds
  Scores       host scorers               sequence rewards [P, G], correctness [B]
  UpdateBatch  layout + log-prob forwards rows [B, L] (one sequence each) and the update's layout
                                          (packed rows, rl/packing.py) with old/ref log-probs
  TokenRewards device scorers             per-token rewards [B, L] (PRIME's implicit PRM, a KL
                                          penalty) and their metrics
  advantages   registered estimator       per-token advantages [B, L] (rl/advantages.py)
  policy update                           rl/update.py, then the update's hidden states to the
                                          drafter buffer

Each stage is a function of the previous stages' batches (rl/trainer.py calls them in order);
none hands state to another through attributes. The pure pieces live here; the jitted device
steps in rl/update.py and rl/prime.py.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time
from typing import Any, Callable, Sequence

import jax
import numpy as np

from tlt_jax.rl.packing import PackIndex, pack_sequences, repack, unpack
from tlt_jax.rollout.records import RolloutResult, StepAccount, merge_accounts, merge_stats

# Arrays of an update batch that travel to the device (rl/update.py BATCH_KEYS + the rest).
ROW_KEYS = ("tokens", "positions", "segment_ids", "response_mask", "sampler_logprobs")


def round_up(n: int, multiple: int) -> int:
  return -(-int(n) // multiple) * multiple


# ----------------------------------------------------------------------------- rollout


@dataclasses.dataclass(frozen=True)
class Rollout:
  """B = P * G sampled rows, group g = rows gG .. gG + G - 1 (host arrays).

  examples: the B task examples (each prompt repeated G times); prompt_BxW / prompt_len_B the
  encoded, right-padded prompts; result the rollout engine's output; responses the decoded
  texts; buffered_B which rows' features the drafter buffer already holds (from the rollout);
  account the TLT account (time per phase, drafter steps); rollouts the samples generated for
  this batch, dropped groups included; dropped_groups the groups a filter dropped; rounds the
  rollout rounds run.
  """

  examples: list
  prompt_BxW: np.ndarray
  prompt_len_B: np.ndarray
  result: RolloutResult
  responses: list
  buffered_B: np.ndarray
  account: StepAccount
  rollouts: int
  dropped_groups: int = 0
  rounds: int = 1


@dataclasses.dataclass(frozen=True)
class Scores:
  """Host scorers' output: rewards_PxG (the weighted reward sum), correct_B (the verifier),
  reward_failures (groups a failing reward scored 0)."""

  rewards_PxG: np.ndarray
  correct_B: np.ndarray
  reward_failures: int = 0


def score_groups(reward_fn: Callable, correct_fn: Callable, task, examples: Sequence,
                 result: RolloutResult, responses: Sequence[str], group_size: int) -> Scores:
  """Rewards [P, G] and correctness [B], group by group (rewards see a whole group)."""
  rewards, correct = [], []
  failures_before = getattr(reward_fn, "failures", 0)
  for start in range(0, len(examples), group_size):
    rows = slice(start, start + group_size)
    args = (list(responses[rows]), result.finished[rows].tolist(), result.lengths[rows].tolist(),
            examples[start], task)
    rewards.append(reward_fn(*args))
    correct.append(correct_fn(*args))
  return Scores(np.stack(rewards), np.concatenate(correct),
                getattr(reward_fn, "failures", 0) - failures_before)


def keep_groups(scores: Scores, *, distinct_rewards: bool, accuracy_band: tuple[float, float]) -> np.ndarray:
  """bool [P]: the groups an online filter keeps.

  distinct_rewards: drop groups whose rewards are all equal (their group-relative advantages
  are 0): DAPO's dynamic sampling (Yu et al., 2025, "DAPO", Sec. 3.2).
  accuracy_band (lo, hi): keep groups whose verifier accuracy lies in [lo, hi]: PRIME's online
  prompt filter (Cui et al., 2025, Sec. 3.4; [0.2, 0.8]); (0, 1) keeps all.
  """
  r = scores.rewards_PxG
  keep = np.ones(r.shape[0], bool)
  if distinct_rewards:
    keep &= np.any(r != r[:, :1], axis=1)
  lo, hi = accuracy_band
  if lo > 0.0 or hi < 1.0:
    acc = scores.correct_B.reshape(r.shape).mean(axis=1)
    keep &= (acc >= lo - 1e-9) & (acc <= hi + 1e-9)
  return keep


def select_rows(rollout: Rollout, rows: np.ndarray) -> dict[str, Any]:
  """The per-row fields of `rollout` at `rows` (for merging rounds)."""
  r = rollout.result
  return dict(examples=[rollout.examples[i] for i in rows], prompt=rollout.prompt_BxW[rows],
              prompt_len=rollout.prompt_len_B[rows], tokens=r.tokens[rows], lengths=r.lengths[rows],
              logprobs=r.logprobs[rows], finished=r.finished[rows],
              responses=[rollout.responses[i] for i in rows], buffered=rollout.buffered_B[rows])


def _pad_cat(arrays: Sequence[np.ndarray], fill) -> np.ndarray:
  width = max(a.shape[1] for a in arrays)
  return np.concatenate([np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)
                         for a in arrays])


def assemble(parts: Sequence[tuple[Rollout, Scores, np.ndarray]], num_groups: int,
             group_size: int, pad_id: int = 0) -> tuple[Rollout, Scores]:
  """One batch of `num_groups` groups from rollout rounds (rollout, scores, keep [P_round]):
  kept groups in round order first; when fewer were kept, the dropped ones fill the batch
  (a static shape for the update; `dropped_groups` counts the groups left out or filled in)."""
  if len(parts) == 1 and parts[0][2].all():
    rollout, scores, _ = parts[0]
    return rollout, scores
  order = [(i, g) for i, (_, _, k) in enumerate(parts) for g in np.flatnonzero(k)]
  order += [(i, g) for i, (_, _, k) in enumerate(parts) for g in np.flatnonzero(~k)]
  chosen = order[:num_groups]
  kept = sum(int(k.sum()) for _, _, k in parts)
  sel = []
  for i, g in chosen:
    rows = np.arange(g * group_size, (g + 1) * group_size)
    sel.append(select_rows(parts[i][0], rows))
  cat = lambda k: np.concatenate([s[k] for s in sel])  # noqa: E731
  result = RolloutResult(_pad_cat([s["tokens"] for s in sel], pad_id), cat("lengths"),
                         _pad_cat([s["logprobs"] for s in sel], 0.0), cat("finished"),
                         merge_stats([p[0].result.stats for p in parts]))
  rollout = Rollout(examples=[e for s in sel for e in s["examples"]],
                    prompt_BxW=_pad_cat([s["prompt"] for s in sel], pad_id), prompt_len_B=cat("prompt_len"),
                    result=result, responses=[y for s in sel for y in s["responses"]],
                    buffered_B=cat("buffered"), account=merge_accounts([p[0].account for p in parts]),
                    rollouts=sum(p[0].rollouts for p in parts),
                    dropped_groups=sum(len(k) for _, _, k in parts) - min(kept, num_groups), rounds=len(parts))
  scores = Scores(np.stack([parts[i][1].rewards_PxG[g] for i, g in chosen]),
                  np.concatenate([parts[i][1].correct_B[g * group_size:(g + 1) * group_size] for i, g in chosen]),
                  sum(p[1].reward_failures for p in parts))
  return rollout, scores


# ----------------------------------------------------------------------------- update rows


def build_rows(prompt_BxP: np.ndarray, prompt_len_B: np.ndarray, result: RolloutResult,
               length_bucket: int, pad_id: int) -> dict[str, np.ndarray]:
  """One sequence per row: row b = prompt + response, right padded to L = round_up(max_b
  (prompt_len_b + len_b), length_bucket): tokens, positions, segment_ids (1 on the sequence, 0
  on padding), response_mask, and the sampler's log-probs at the response positions."""
  b = prompt_BxP.shape[0]
  total_B = prompt_len_B + result.lengths
  length = max(round_up(int(total_B.max()), length_bucket), 2)
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
  return {"tokens": tokens.astype(np.int32),
          "positions": np.ascontiguousarray(t_BxL, np.int32),
          "segment_ids": in_seq.astype(np.int32),
          "response_mask": in_resp.astype(np.float32),
          "sampler_logprobs": sampler_lp.astype(np.float32)}


def build_update_batch(prompt_BxP, prompt_len_B, result, advantages_B, length_bucket: int,
                       pad_id: int) -> dict[str, np.ndarray]:
  """`build_rows` plus each sequence's advantage on its tokens (0 on padding)."""
  rows = build_rows(prompt_BxP, prompt_len_B, result, length_bucket, pad_id)
  rows["advantages"] = sequence_advantages_to_rows(advantages_B, rows["segment_ids"])
  return rows


def sequence_advantages_to_rows(advantages_B, segment_ids_BxL) -> np.ndarray:
  """A_b on every token of sequence b, 0 on padding: [B, L] float32."""
  return np.where(segment_ids_BxL > 0, np.asarray(advantages_B, np.float32)[:, None], 0.0).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class UpdateBatch:
  """The update's batch. `rows`: one sequence per row [B, L] (host); `device`: the same arrays in
  the update's layout (packed rows when `pack` is set, else `rows`), on the mesh, with
  old_logprobs (and ref_logprobs) added by the log-prob forwards; `logprob_gap` the sampler vs
  recomputed log-prob gap metrics (host floats). A pytree (the arrays are its leaves)."""

  rows: dict
  device: dict
  pack: PackIndex | None
  packed_shape: tuple[int, int]
  logprob_gap: dict = dataclasses.field(default_factory=dict)
  fill: float = 1.0  # share of the update layout's positions that hold a sequence

  def to_update_layout(self, x_BxL: np.ndarray) -> np.ndarray:
    """A row-format array [B, L] in the update's layout (host)."""
    if self.pack is None:
      return x_BxL
    return repack(x_BxL, self.pack, self.packed_shape)

  def to_rows(self, x) -> np.ndarray:
    """An update-layout array (host or device) back to one sequence per row [B, L, ...]."""
    from tlt_jax.parallel import mesh as mesh_lib
    x = mesh_lib.gather_to_host(x) if isinstance(x, jax.Array) else np.asarray(x)
    return unpack(x, self.pack) if self.pack is not None else x


def layout_rows(rows: dict[str, np.ndarray], lengths_B: np.ndarray, *, pack: bool, pack_len: int,
                rows_multiple: int) -> tuple[dict[str, np.ndarray], PackIndex | None]:
  """The update's layout of `rows`: packed (first-fit decreasing into rows of `pack_len`, a
  multiple of `rows_multiple` rows) or as is."""
  if not pack:
    return rows, None
  return pack_sequences(rows, lengths_B, pack_len, rows_multiple)


# ----------------------------------------------------------------------------- token rewards


@dataclasses.dataclass(frozen=True)
class TokenRewards:
  """Per-token rewards of the device scorers, one sequence per row [B, L] (host, 0 off the
  response; None when no device scorer is on), and their metrics."""

  rewards_BxL: np.ndarray | None
  metrics: dict = dataclasses.field(default_factory=dict)


def group_rows(x_BxL: np.ndarray, group_size: int) -> np.ndarray:
  """[B, L] -> [P, G, L]."""
  return x_BxL.reshape((-1, group_size) + x_BxL.shape[1:])


class StageClock:
  """Wall-clock seconds per stage: `with clock("rollout"): ...`. Times are exclusive: a stage
  entered inside another (host scoring inside the rollout rounds) is not counted twice."""

  def __init__(self):
    self.seconds: dict[str, float] = collections.defaultdict(float)
    self._stack: list[str] = []

  @contextlib.contextmanager
  def __call__(self, name: str):
    t0 = time.perf_counter()
    self._stack.append(name)
    try:
      yield
    finally:
      self._stack.pop()
      elapsed = time.perf_counter() - t0
      self.seconds[name] += elapsed
      if self._stack:
        self.seconds[self._stack[-1]] -= elapsed
