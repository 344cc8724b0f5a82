"""The drafter buffer: a bounded, host-side store of the policy's own (tokens, features) rows.

TLT trains its drafter on the target's hidden states of recent rollouts, so that the drafter
follows the policy as RL moves it (Hu et al., 2025, "Taming the Long Tail"). Rows come from two
sources, both free of any extra forward pass:

  1. responses of the CURRENT step, as soon as the rollout engine copies them out (the ones that
     finish early, while other groups still decode): their features f_t are those the engine
     already kept for speculative decoding (`RolloutSession.finished_features`), computed by
     the very policy being rolled out. They can train the drafter in this step's bubble.
  2. the policy update's own forward (`hidden` of `policy_update_step`), for every row of the
     step that source 1 did not deliver (e.g. when speculation is off, so the engine keeps no
     features). Same policy, same features (up to float rounding), one step later: they serve
     the next step's bubble.

Recomputing features in the bubble would cost a target forward; waiting for the update alone
would leave the first bubble without data and every bubble one step behind. Source 1 costs a
device-to-host copy of rows that are copied out anyway; it is the cheapest correct option.

Row format (drafter/train.py): tokens [L] = x_0 .. x_{L-1} (prompt + response from position 0,
PAD after), hidden [L, H] = f_0 .. f_{L-1}, loss_mask[t] = 1 iff x_{t+1} is a response token.
Every row is cut or padded to the buffer's fixed `seq_len` (one compiled drafter step).

Bounded: a ring of `capacity` rows; the oldest are overwritten. `rows_for_budget` turns a byte
budget into that capacity (a 7B's rows of 9,216 tokens x 3,584 features are 66 MB each in
bfloat16, `hidden_dtype`, half of float32's), so host memory is set by the config, not by L x H. Sampling prefers recent steps:
row i, added at RL step s_i, is drawn (without replacement within a batch) with probability

  p_i ∝ decay^(s_now - s_i),     s_now = the newest step in the buffer,

so with decay = 0.5 a row one step old weighs half as much as a fresh one (decay = 1: uniform).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import ml_dtypes
import numpy as np

from tlt_jax.tlt.bandit import _rng_state_from_json, _rng_state_to_json

STATE_VERSION = 1
HIDDEN_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def row_bytes(seq_len: int, hidden_size: int, hidden_dtype: str = "float32") -> int:
  """Host bytes of one buffer row: tokens (int32) + loss mask (float32) + features."""
  return int(seq_len) * (8 + int(hidden_size) * np.dtype(HIDDEN_DTYPES[hidden_dtype]).itemsize)


def rows_for_budget(max_rows: int, budget_bytes: int, seq_len: int, hidden_size: int,
                    hidden_dtype: str = "float32") -> int:
  """Capacity = min(max_rows, budget_bytes // row_bytes) (budget 0: max_rows). ValueError naming
  the budget when it holds no row."""
  if budget_bytes <= 0:
    return int(max_rows)
  fit = int(budget_bytes) // row_bytes(seq_len, hidden_size, hidden_dtype)
  if fit < 1:
    raise ValueError(f"tlt.buffer_bytes={budget_bytes} holds no drafter buffer row of "
                     f"{row_bytes(seq_len, hidden_size, hidden_dtype)} bytes (seq_len {seq_len} x "
                     f"hidden {hidden_size} in {hidden_dtype}); allowed: >= one row, or 0 for no budget")
  return min(int(max_rows), fit)


class DrafterBuffer:
  """Ring buffer of drafter rows with recency-weighted sampling; see the module docstring.

  Args:
    capacity: the most rows kept.
    seq_len: every row's length L (longer rows are cut, shorter ones padded with `pad_id`).
    hidden_size: H, the target's feature width.
    decay: recency weight per RL step, in (0, 1].
    seed: seed of the sampling Generator (its state is part of `state_dict`).
    hidden_dtype: "float32" or "bfloat16", the stored features' dtype.
  """

  def __init__(self, capacity: int, seq_len: int, hidden_size: int, *, decay: float = 0.5,
               seed: int = 0, pad_id: int = 0, hidden_dtype: str = "float32"):
    if capacity < 1 or seq_len < 2 or hidden_size < 1:
      raise ValueError(f"DrafterBuffer(capacity={capacity}, seq_len={seq_len}, hidden_size={hidden_size}):"
                       " need capacity >= 1, seq_len >= 2, hidden_size >= 1")
    if not 0.0 < decay <= 1.0:
      raise ValueError(f"DrafterBuffer decay={decay!r}; allowed: a float in (0, 1]")
    self.capacity, self.seq_len, self.hidden_size = int(capacity), int(seq_len), int(hidden_size)
    self.decay, self.pad_id = float(decay), int(pad_id)
    self.tokens = np.full((capacity, seq_len), pad_id, np.int32)
    if hidden_dtype not in HIDDEN_DTYPES:
      raise ValueError(f"DrafterBuffer hidden_dtype={hidden_dtype!r}; allowed: {sorted(HIDDEN_DTYPES)}")
    self.hidden_dtype = HIDDEN_DTYPES[hidden_dtype]
    self.hidden = np.zeros((capacity, seq_len, hidden_size), self.hidden_dtype)
    self.loss_mask = np.zeros((capacity, seq_len), np.float32)
    self.steps = np.full((capacity,), -1, np.int64)  # RL step of each slot (-1: empty)
    self.position = 0  # next slot to write
    self.count = 0  # rows held
    self.added = 0  # rows ever added
    self._rng = np.random.default_rng(seed)

  def __len__(self) -> int:
    return self.count

  # --- adding ----------------------------------------------------------------------------

  def add(self, tokens_NxL: np.ndarray, hidden_NxLxH: np.ndarray, loss_mask_NxL: np.ndarray,
          step: int) -> int:
    """Adds rows in the drafter batch format; rows without a counted training step (fewer than
    two response tokens) are skipped. Returns the number of rows added."""
    tokens_NxL, loss_mask_NxL = np.asarray(tokens_NxL), np.asarray(loss_mask_NxL, np.float32)
    hidden_NxLxH = np.asarray(hidden_NxLxH)
    n, length = tokens_NxL.shape
    if hidden_NxLxH.shape != (n, length, self.hidden_size) or loss_mask_NxL.shape != (n, length):
      raise ValueError(f"DrafterBuffer.add: tokens {tokens_NxL.shape}, hidden {hidden_NxLxH.shape}, "
                       f"loss_mask {loss_mask_NxL.shape}; expected [N, L], [N, L, {self.hidden_size}], [N, L]")
    width = min(length, self.seq_len)
    added = 0
    for i in range(n):
      # drafter step t counts iff loss_mask[t + 1] = 1 (drafter/train.py); keep rows that have one
      if not loss_mask_NxL[i, 1:width].any():
        continue
      slot = self.position
      self.tokens[slot] = self.pad_id
      self.tokens[slot, :width] = tokens_NxL[i, :width]
      self.hidden[slot] = 0.0
      self.hidden[slot, :width] = hidden_NxLxH[i, :width]
      self.loss_mask[slot] = 0.0
      self.loss_mask[slot, :width] = loss_mask_NxL[i, :width]
      self.steps[slot] = int(step)
      self.position = (slot + 1) % self.capacity
      self.count = min(self.count + 1, self.capacity)
      added += 1
    self.added += added
    return added

  def add_update_batch(self, tokens_BxL: np.ndarray, hidden_BxLxH: np.ndarray,
                       response_mask_BxL: np.ndarray, step: int, rows: Sequence[int] | None = None) -> int:
    """Source 2: rows of a policy-update batch (rl/update.py) with the `hidden` its forward
    returned: loss_mask[t] = response_mask[t + 1]. `rows` selects rows (default: all)."""
    rows = np.arange(len(tokens_BxL)) if rows is None else np.asarray(rows, np.int64)
    if rows.size == 0:
      return 0
    response_mask_BxL = np.asarray(response_mask_BxL, np.float32)[rows]
    loss_mask = np.zeros_like(response_mask_BxL)
    loss_mask[:, :-1] = response_mask_BxL[:, 1:]
    return self.add(np.asarray(tokens_BxL)[rows], np.asarray(hidden_BxLxH)[rows], loss_mask, step)

  def add_sequences(self, sequences: Sequence[tuple[np.ndarray, np.ndarray, int]], step: int) -> int:
    """Source 1: (tokens_T, feat_TxH, prompt_len) of finished responses (prompt + response from
    position 0, as the rollout engine keeps them): loss_mask[t] = 1 for prompt_len - 1 <= t < T - 1."""
    if not sequences:
      return 0
    length = min(max(len(t) for t, _, _ in sequences), self.seq_len)
    n = len(sequences)
    tokens = np.full((n, length), self.pad_id, np.int32)
    hidden = np.zeros((n, length, self.hidden_size), self.hidden_dtype)
    loss_mask = np.zeros((n, length), np.float32)
    for i, (tok_T, feat_TxH, prompt_len) in enumerate(sequences):
      t = min(len(tok_T), length)
      tokens[i, :t] = tok_T[:t]
      hidden[i, :t] = feat_TxH[:t]
      loss_mask[i, max(int(prompt_len) - 1, 0):t - 1] = 1.0
    return self.add(tokens, hidden, loss_mask, step)

  # --- sampling --------------------------------------------------------------------------

  def weights(self) -> np.ndarray:
    """Sampling probability of every slot (0 for empty ones)."""
    full = self.steps >= 0
    w = np.zeros((self.capacity,), np.float64)
    if full.any():
      age = self.steps[full].max() - self.steps[full]
      w[full] = self.decay ** age.astype(np.float64)
      w /= w.sum()
    return w

  def sample(self, batch_size: int) -> dict[str, np.ndarray]:
    """A batch {tokens [B, L], hidden [B, L, H], loss_mask [B, L]} drawn with the recency weights
    (without replacement when the buffer holds at least `batch_size` rows)."""
    if self.count == 0:
      raise ValueError("DrafterBuffer.sample: the buffer is empty")
    w = self.weights()
    replace = self.count < batch_size
    idx = np.sort(self._rng.choice(self.capacity, size=batch_size, replace=replace, p=w))
    return {"tokens": self.tokens[idx], "hidden": self.hidden[idx], "loss_mask": self.loss_mask[idx]}

  def summary(self) -> dict[str, Any]:
    full = self.steps[self.steps >= 0]
    return {"buffer_rows": int(self.count), "buffer_added": int(self.added),
            "buffer_oldest_step": int(full.min()) if full.size else None,
            "buffer_newest_step": int(full.max()) if full.size else None}

  # --- checkpointing ---------------------------------------------------------------------

  def state_dict(self) -> dict[str, Any]:
    """{"arrays": fixed-shape numpy arrays (for the checkpoint's pytree), "meta": JSON-able
    position, counts and the sampling RNG state}."""
    return {"arrays": {"tokens": self.tokens.copy(), "hidden": self.hidden.copy(),
                       "loss_mask": self.loss_mask.copy(), "steps": self.steps.copy()},
            "meta": {"version": STATE_VERSION, "capacity": self.capacity, "seq_len": self.seq_len,
                     "hidden_size": self.hidden_size, "position": self.position, "count": self.count,
                     "added": self.added, "rng": _rng_state_to_json(self._rng.bit_generator.state)}}

  def load_state_dict(self, state: Mapping[str, Any]) -> None:
    meta, arrays = state["meta"], state["arrays"]
    if meta.get("version") != STATE_VERSION:
      raise ValueError(f"drafter buffer state version {meta.get('version')!r}; expected {STATE_VERSION}")
    shape = (meta["capacity"], meta["seq_len"], meta["hidden_size"])
    if shape != (self.capacity, self.seq_len, self.hidden_size):
      raise ValueError(f"saved drafter buffer (capacity, seq_len, hidden_size)={shape} != this buffer's "
                       f"{(self.capacity, self.seq_len, self.hidden_size)}")
    self.tokens = np.array(arrays["tokens"], np.int32)
    self.hidden = np.array(arrays["hidden"], self.hidden_dtype)
    self.loss_mask = np.array(arrays["loss_mask"], np.float32)
    self.steps = np.array(arrays["steps"], np.int64)
    self.position, self.count, self.added = int(meta["position"]), int(meta["count"]), int(meta["added"])
    rng_state = _rng_state_from_json(meta["rng"])
    rng = np.random.Generator(getattr(np.random, rng_state["bit_generator"])())
    rng.bit_generator.state = rng_state
    self._rng = rng
