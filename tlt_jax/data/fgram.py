"""F-gram vocabularies for SCONE (Yu et al., 2025, "Scaling Embedding Layers in Language Models").

An *f-gram* is a frequent n-gram of token ids, 2 <= n <= max_n. SCONE keeps the token vocabulary
and gives each position the embedding of the longest f-gram that ends at its token (models/scone.py).
This module does the host-side parts:

  * `NgramCounter`: streaming, bounded-memory counting of every n-gram (2 <= n <= max_n) of a token
    stream fed in chunks of any size. It keeps a Misra-Gries summary of at most `capacity` n-grams
    (Misra & Gries, 1982; merged as mergeable summaries, Agarwal et al., 2012): exact while the
    distinct n-grams fit, and otherwise every estimate is an undercount by at most `error_bound`
    (<= total / (capacity + 1)), so every n-gram more frequent than that survives.
  * `FgramVocab`: the top-|V_f| n-grams, ids in frequency order, with a vectorised batched
    longest-suffix matcher: every suffix of every context is hashed (a 64-bit polynomial hash
    built backwards from the current token, so the length-n hash extends the length-(n-1) one),
    looked up with one `np.searchsorted` per length over the sorted f-gram hashes, and verified
    token by token (a hash collision can never match the wrong f-gram).

Contexts are `[..., max_n]` int arrays whose last column is the current token and whose earlier
columns are the tokens before it (-1 where the sequence has no token: before its start).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from tlt_jax.errors import ConfigError, DataError

_P = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit multiplier (golden-ratio constant)
NO_TOKEN = -1
SMALL_BATCH = 64  # contexts at or below this are matched by dict probes (decode steps)


def suffix_hashes(ctx_MxN: np.ndarray) -> np.ndarray:
  """[M, N] uint64 hashes h[:, n-1] of the length-n suffix of every context (n = 1..N):
  h_1 = t_last + 1, h_n = h_{n-1} * P + (t_{last-n+1} + 1) mod 2^64 (wrapping uint64 maths)."""
  ctx = np.asarray(ctx_MxN, np.int64)
  m, n = ctx.shape
  out = np.empty((m, n), np.uint64)
  h = np.zeros((m,), np.uint64)
  with np.errstate(over="ignore"):
    for j in range(n):
      h = h * _P + (ctx[:, n - 1 - j] + 1).astype(np.uint64)
      out[:, j] = h
  return out


def ngram_contexts(tokens_T: np.ndarray, max_n: int, history: np.ndarray | None = None) -> np.ndarray:
  """[T, max_n] contexts of each position of a 1-D token stream (`history`: the tokens just before
  it, e.g. the previous chunk's tail; NO_TOKEN before the stream's start)."""
  tokens_T = np.asarray(tokens_T, np.int64)
  hist = np.full((max_n - 1,), NO_TOKEN, np.int64)
  if history is not None and len(history):
    h = np.asarray(history, np.int64)[-(max_n - 1):] if max_n > 1 else np.zeros((0,), np.int64)
    hist[len(hist) - len(h):] = h
  full = np.concatenate([hist, tokens_T])
  t = len(tokens_T)
  idx = np.arange(t)[:, None] + np.arange(max_n)[None, :]
  return full[idx]


def sequence_contexts(tokens_BxT: np.ndarray, max_n: int) -> np.ndarray:
  """[B, T, max_n] contexts of every position of each row (rows are independent sequences)."""
  tokens_BxT = np.asarray(tokens_BxT, np.int64)
  b, t = tokens_BxT.shape
  padded = np.concatenate([np.full((b, max_n - 1), NO_TOKEN, np.int64), tokens_BxT], axis=1)
  idx = np.arange(t)[:, None] + np.arange(max_n)[None, :]
  return padded[:, idx]


class NgramCounter:
  """Streaming counts of all n-grams (2 <= n <= max_n) in a bounded-memory Misra-Gries summary.

  `update(chunk)` takes the next piece of one token stream (n-grams spanning chunk boundaries are
  counted once); `new_document()` starts a new stream (no n-gram spans documents). At most
  `capacity` n-grams are held (plus one chunk's worth while merging), whatever the corpus size.
  """

  def __init__(self, max_n: int, capacity: int = 1 << 20):
    if not isinstance(max_n, int) or max_n < 2:
      raise ConfigError(f"scone.max_n={max_n!r} must be an int >= 2 (f-grams have 2..max_n tokens)")
    if not isinstance(capacity, int) or capacity < 1:
      raise ConfigError(f"scone.count_capacity={capacity!r} must be a positive int")
    self.max_n, self.capacity = max_n, capacity
    self.keys = np.zeros((0,), np.uint64)  # sorted
    self.tokens = np.zeros((0, max_n), np.int32)  # left-padded with NO_TOKEN
    self.counts = np.zeros((0,), np.int64)
    self.total = 0  # n-gram occurrences seen
    self.error_bound = 0  # every count is an undercount by at most this
    self._tail = np.zeros((0,), np.int64)

  def new_document(self) -> None:
    self._tail = np.zeros((0,), np.int64)

  def update(self, chunk: Iterable[int]) -> None:
    chunk = np.asarray(chunk, np.int64).reshape(-1)
    if chunk.size == 0:
      return
    ctx = ngram_contexts(chunk, self.max_n, self._tail)
    self._tail = np.concatenate([self._tail, chunk])[-(self.max_n - 1):]
    h = suffix_hashes(ctx)
    keys, toks = [], []
    for n in range(2, self.max_n + 1):
      ok = ctx[:, self.max_n - n] != NO_TOKEN
      keys.append(h[ok, n - 1])
      t = ctx[ok].copy()
      t[:, :self.max_n - n] = NO_TOKEN
      toks.append(t)
    keys = np.concatenate(keys)
    toks = np.concatenate(toks).astype(np.int32)
    self.total += int(keys.size)
    uk, first, cnt = np.unique(keys, return_index=True, return_counts=True)
    self._merge(uk, toks[first], cnt.astype(np.int64))

  def _merge(self, keys, tokens, counts) -> None:
    all_k = np.concatenate([self.keys, keys])
    uk, first, inv = np.unique(all_k, return_index=True, return_inverse=True)
    cnt = np.bincount(inv.reshape(-1), weights=np.concatenate([self.counts, counts]),
                      minlength=uk.size).astype(np.int64)
    toks = np.concatenate([self.tokens, tokens])[first]
    if uk.size > self.capacity:  # Misra-Gries: subtract the (capacity+1)-th largest count
      cut = int(np.partition(cnt, uk.size - self.capacity - 1)[uk.size - self.capacity - 1])
      cnt = cnt - cut
      keep = cnt > 0
      uk, toks, cnt = uk[keep], toks[keep], cnt[keep]
      self.error_bound += cut
    self.keys, self.tokens, self.counts = uk, toks, cnt

  def top(self, k: int) -> "FgramVocab":
    """The `k` most frequent n-grams (ties broken by hash, so the choice is deterministic)."""
    if not isinstance(k, int) or k < 0:
      raise ConfigError(f"scone.fgram_vocab_size={k!r} must be an int >= 0")
    order = np.lexsort((self.keys, -self.counts))[:k]
    return FgramVocab(self.tokens[order], self.counts[order])


@dataclasses.dataclass
class FgramVocab:
  """F-grams as left-padded token rows `tokens_FxN` (NO_TOKEN before the f-gram), id = row, with
  their corpus counts; `match` finds the longest f-gram ending at each position."""

  tokens_FxN: np.ndarray
  counts_F: np.ndarray

  def __post_init__(self):
    self.tokens_FxN = np.asarray(self.tokens_FxN, np.int32)
    self.counts_F = np.asarray(self.counts_F, np.int64)
    if self.tokens_FxN.ndim != 2 or self.tokens_FxN.shape[1] < 2:
      raise DataError(f"f-gram vocabulary tokens must be [F, max_n>=2], got {self.tokens_FxN.shape}")
    self.lengths_F = (self.tokens_FxN != NO_TOKEN).sum(axis=1).astype(np.int32)
    if self.size and (self.lengths_F.min() < 2 or np.any(self.tokens_FxN[:, -1] == NO_TOKEN)):
      raise DataError("f-gram vocabulary rows must hold 2..max_n tokens, right-aligned")
    n = self.max_n
    keys = suffix_hashes(self.tokens_FxN)[np.arange(self.size), self.lengths_F - 1] if self.size else (
        np.zeros((0,), np.uint64))
    self._order = np.argsort(keys, kind="stable")
    self._sorted_keys = keys[self._order]
    if self.size and np.any(self._sorted_keys[1:] == self._sorted_keys[:-1]):
      raise DataError("f-gram vocabulary has duplicate f-grams")
    self._n = n
    self._dict = None  # tuple -> id, built on the first small-batch match

  @property
  def size(self) -> int:
    return int(self.tokens_FxN.shape[0])

  @property
  def max_n(self) -> int:
    return int(self.tokens_FxN.shape[1])

  @property
  def nbytes(self) -> int:
    return int(self.tokens_FxN.nbytes + self._sorted_keys.nbytes + self._order.nbytes)

  def match(self, ctx_xN: np.ndarray) -> np.ndarray:
    """Ids of the longest f-gram that is a suffix of each context (shape `ctx.shape[:-1]`),
    -1 where none (a length-1 context suffix is the token itself, never an f-gram)."""
    ctx = np.asarray(ctx_xN)
    lead = ctx.shape[:-1]
    if ctx.shape[-1] != self.max_n:
      raise DataError(f"f-gram contexts have {ctx.shape[-1]} tokens, the vocabulary max_n={self.max_n}")
    ctx = ctx.reshape(-1, self.max_n).astype(np.int64)
    ids = np.full((ctx.shape[0],), -1, np.int64)
    if self.size == 0 or ctx.shape[0] == 0:
      return ids.reshape(lead)
    if ctx.shape[0] <= SMALL_BATCH:  # a decode step: a few contexts, dict probes beat numpy's overheads
      return self._match_small(ctx).reshape(lead)
    h = suffix_hashes(ctx)
    f = self.size
    for n in range(2, self.max_n + 1):  # longer matches overwrite shorter ones
      pos = np.searchsorted(self._sorted_keys, h[:, n - 1])
      pos_c = np.minimum(pos, f - 1)
      hit = self._sorted_keys[pos_c] == h[:, n - 1]
      if not hit.any():
        continue
      rows = np.flatnonzero(hit)
      cand = self._order[pos_c[rows]]
      same = (self.lengths_F[cand] == n) & np.all(
          (self.tokens_FxN[cand, self.max_n - n:] == ctx[rows, self.max_n - n:]), axis=1)
      ids[rows[same]] = cand[same]
    return ids.reshape(lead)

  def _match_small(self, ctx_MxN: np.ndarray) -> np.ndarray:
    if self._dict is None:
      self._dict = {tuple(int(t) for t in row[self.max_n - n:]): i
                    for i, (row, n) in enumerate(zip(self.tokens_FxN.tolist(), self.lengths_F.tolist()))}
    d, n_max = self._dict, self.max_n
    out = []
    for row in ctx_MxN.tolist():
      found = -1
      for n in range(n_max, 1, -1):
        found = d.get(tuple(row[n_max - n:]), -1)
        if found >= 0:
          break
      out.append(found)
    return np.asarray(out, np.int64)

  def match_sequences(self, tokens_BxT: np.ndarray) -> np.ndarray:
    """[B, T] f-gram ids of every position of each row (-1: no f-gram ends there)."""
    return self.match(sequence_contexts(tokens_BxT, self.max_n))

  def to_arrays(self) -> dict[str, np.ndarray]:
    return {"fgram_tokens": self.tokens_FxN, "fgram_counts": self.counts_F}

  @classmethod
  def from_arrays(cls, arrays) -> "FgramVocab":
    return cls(np.asarray(arrays["fgram_tokens"]), np.asarray(arrays["fgram_counts"]))


def build_vocab(token_chunks: Iterable[np.ndarray], size: int, max_n: int,
                capacity: int = 1 << 20) -> tuple[FgramVocab, NgramCounter]:
  """Counts the n-grams of `token_chunks` (each a separate document, fed in any chunking) and keeps
  the top `size`."""
  counter = NgramCounter(max_n, capacity)
  for chunk in token_chunks:
    counter.new_document()
    counter.update(chunk)
  return counter.top(size), counter
