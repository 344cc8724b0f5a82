"""The draft vocabulary: the V_d most frequent tokens of the policy's own recent rollouts.

EAGLE-3 (Li et al., 2025, "EAGLE-3: Scaling up Inference Acceleration of Large Language Models
via Training-Time Test", arXiv:2503.01840) drafts over a reduced vocabulary of the most frequent
tokens: a draft step then reads V_d rows of the head, not all of them. Here the counts come from
the responses the rollouts generate (host-side, `observe`), decayed per step so that they follow
the policy as it changes; `ids()` is the current top V_d (ties broken by the smaller id, unseen
tokens fill the tail in id order), refreshed into the decoder every `refresh` steps
(`SpeculativeDecoder.set_draft_vocab`: same shape, so no program recompiles).

Losslessness does not depend on the choice: the acceptance samples from the target alone
(rollout/speculative.py), so a token outside the draft vocabulary is simply never proposed.
"""

from __future__ import annotations

import numpy as np


class DraftVocabCounter:
  """Decayed token counts over the rollouts' responses; `ids()` = the top `size` token ids."""

  def __init__(self, vocab_size: int, size: int, decay: float = 0.5):
    if not 0 < int(size) <= int(vocab_size):
      raise ValueError(f"draft vocabulary size {size}; needs 1..vocab_size={vocab_size}")
    if not 0.0 <= float(decay) <= 1.0:
      raise ValueError(f"draft vocabulary decay {decay}; needs 0..1")
    self.vocab_size, self.size, self.decay = int(vocab_size), int(size), float(decay)
    self.counts = np.zeros(self.vocab_size, np.float64)
    self.steps = 0

  def observe(self, tokens_BxT, lengths_B=None) -> None:
    """Adds one step's response tokens (row b's first `lengths_B[b]`; all without lengths),
    after decaying the earlier counts by `decay`."""
    tokens = np.asarray(tokens_BxT)
    if lengths_B is not None:
      keep = np.arange(tokens.shape[-1])[None, :] < np.asarray(lengths_B)[:, None]
      tokens = tokens[keep]
    tokens = tokens.reshape(-1).astype(np.int64)
    tokens = tokens[(tokens >= 0) & (tokens < self.vocab_size)]
    self.counts *= self.decay
    self.counts += np.bincount(tokens, minlength=self.vocab_size)
    self.steps += 1

  def ids(self) -> np.ndarray:
    """int32[size]: the most frequent ids, most frequent first (stable: equal counts by id)."""
    order = np.argsort(-self.counts, kind="stable")
    return order[:self.size].astype(np.int32)

  def coverage(self, tokens_BxT, lengths_B=None) -> float:
    """The share of `tokens` inside the current top `size` (what a draft can propose at all)."""
    tokens = np.asarray(tokens_BxT)
    if lengths_B is not None:
      tokens = tokens[np.arange(tokens.shape[-1])[None, :] < np.asarray(lengths_B)[:, None]]
    tokens = tokens.reshape(-1)
    if tokens.size == 0:
      return 0.0
    return float(np.isin(tokens, self.ids()).mean())

  def state_dict(self) -> dict:
    """JSON-able counts (the seen tokens only: float64 values round-trip exactly through JSON)."""
    seen = np.flatnonzero(self.counts)
    return {"vocab_size": self.vocab_size, "index": seen.tolist(), "counts": self.counts[seen].tolist(),
            "steps": self.steps}

  def load_state_dict(self, d: dict) -> None:
    if int(d["vocab_size"]) != self.vocab_size:
      raise ValueError(f"draft vocabulary counts of {d['vocab_size']} tokens; this model has {self.vocab_size}")
    counts = np.zeros(self.vocab_size, np.float64)
    counts[np.asarray(d["index"], np.int64)] = np.asarray(d["counts"], np.float64)
    self.counts, self.steps = counts, int(d["steps"])
