"""Sequence packing for the policy update: several (prompt + response) sequences per row.

A GRPO batch is long-tailed: a few responses are several times the mean, so one sequence per
row, padded to the longest, spends most of the update's FLOPs on padding. Packing places the
sequences whole into rows of a fixed length (first-fit decreasing), each with its own positions
(restarting at 0) and segment id, and the update attends within segments only
(rl/update.py), so the loss and gradient are those of the unpacked batch.

  packed, index = pack_sequences(rows, lengths, row_len, rows_multiple)
  ... packed[k]: [R, row_len]; R = bins rounded up to `rows_multiple` (few distinct shapes,
      divisible by the mesh's batch shards x micro-batches; extra rows are all padding)
  unpack(packed_RxLx..., index) -> [B, L_row, ...]: back to one sequence per row (for the
      drafter buffer, which stores the update's hidden states per response).
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class PackIndex:
  """Where sequence b went: packed row `row[b]`, columns start[b] .. start[b] + length[b] - 1;
  `width` is the unpacked rows' length."""

  row: np.ndarray
  start: np.ndarray
  length: np.ndarray
  width: int


def first_fit_decreasing(lengths, capacity: int) -> list[list[int]]:
  """Bins (lists of indices) of total length <= capacity: longest first, each into the first
  bin with room. Deterministic (ties keep index order)."""
  lengths = np.asarray(lengths, np.int64)
  if lengths.size and int(lengths.max()) > capacity:
    b = int(np.argmax(lengths))
    raise ValueError(f"sequence {b} has {int(lengths[b])} tokens, over the packed row length {capacity}")
  bins: list[list[int]] = []
  room: list[int] = []
  for b in np.argsort(-lengths, kind="stable"):
    n = int(lengths[b])
    for i, r in enumerate(room):
      if n <= r:
        bins[i].append(int(b))
        room[i] -= n
        break
    else:
      bins.append([int(b)])
      room.append(capacity - n)
  return bins


def pack_sequences(rows: dict[str, np.ndarray], lengths, row_len: int,
                   rows_multiple: int = 1) -> tuple[dict[str, np.ndarray], PackIndex]:
  """Packs row-format arrays (sequence b in columns [0, lengths[b]) of row b) into rows of
  `row_len`. "positions" and "segment_ids" are rebuilt (restart at 0 / 1, 2, ... per row);
  every other array is copied; padding is 0. Returns (packed arrays, index for `unpack`)."""
  lengths = np.asarray(lengths, np.int64)
  bins = first_fit_decreasing(lengths, row_len)
  num_rows = max(-(-max(len(bins), 1) // rows_multiple) * rows_multiple, rows_multiple)
  width = next(iter(rows.values())).shape[1]
  out = {k: np.zeros((num_rows, row_len) + v.shape[2:], v.dtype) for k, v in rows.items()}
  out["positions"] = np.zeros((num_rows, row_len), np.int32)
  out["segment_ids"] = np.zeros((num_rows, row_len), np.int32)
  row_of = np.zeros(len(lengths), np.int32)
  start_of = np.zeros(len(lengths), np.int32)
  for r, members in enumerate(bins):
    col = 0
    for seg, b in enumerate(sorted(members), start=1):  # row order: by sequence index
      n = int(lengths[b])
      for k, v in rows.items():
        if k not in ("positions", "segment_ids"):
          out[k][r, col:col + n] = v[b, :n]
      out["positions"][r, col:col + n] = np.arange(n)
      out["segment_ids"][r, col:col + n] = seg
      row_of[b], start_of[b] = r, col
      col += n
  return out, PackIndex(row_of, start_of, lengths.astype(np.int32), int(width))


def unpack(packed: np.ndarray, index: PackIndex) -> np.ndarray:
  """[R, row_len, ...] -> [B, width, ...]: sequence b back in columns [0, length[b]) of row b,
  zeros after."""
  t = np.arange(index.width)
  cols = np.clip(index.start[:, None] + t[None], 0, packed.shape[1] - 1)
  out = np.asarray(packed)[index.row[:, None], cols]
  valid = t[None] < index.length[:, None]
  return np.where(valid.reshape(valid.shape + (1,) * (out.ndim - 2)), out, 0).astype(packed.dtype)


def repack(x_BxW: np.ndarray, index: PackIndex, shape: tuple[int, int]) -> np.ndarray:
  """[B, W, ...] one sequence per row -> the packed layout `shape` = (rows, row_len) of `index`
  (sequence b's columns [0, length[b]) to row[b], columns start[b] ...; 0 elsewhere): the
  inverse of `unpack` for arrays made after packing (advantages, per-token rewards)."""
  x_BxW = np.asarray(x_BxW)
  out = np.zeros(tuple(shape) + x_BxW.shape[2:], x_BxW.dtype)
  for b in range(len(index.length)):
    n = int(index.length[b])
    out[index.row[b], index.start[b]:index.start[b] + n] = x_BxW[b, :n]
  return out
