"""Token batches for SFT and for rollout prompts (numpy, right-padded).

SFT alignment. Row b holds  tokens = [BOS] + prompt + trace + [EOS] + [PAD]*,  and
`loss_mask[b, t] = 1` exactly where tokens[b, t] is a trace token or the EOS: the mask marks
*target tokens*, aligned with `tokens`. For a causal LM whose logits at position t predict
token t+1, the loss is

  loss = sum_{b, t < L-1} loss_mask[b, t+1] * CE(logits[b, t], tokens[b, t+1]) / sum(loss_mask[:, 1:])

i.e. use `logits[:, :-1]`, `tokens[:, 1:]`, `loss_mask[:, 1:]` (see `next_token_targets`).
The first target (the first trace token) is predicted from position prompt_lens[b] - 1, the
last prompt token; `prompt_lens` counts BOS + prompt.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from tlt_jax.data.tasks import Example
from tlt_jax.data.tokenizer import Tokenizer


def _bos(tokenizer: Tokenizer) -> list[int]:
  return [] if tokenizer.bos_id is None else [tokenizer.bos_id]


def _encode_sft_example(ex: Example, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
  """(BOS + prompt, trace + EOS) token ids of one SFT example."""
  return _bos(tokenizer) + tokenizer.encode(ex.prompt), tokenizer.encode(ex.trace) + [tokenizer.eos_id]


def make_sft_batch(examples: Sequence[Example], tokenizer: Tokenizer, max_len: int) -> dict[str, np.ndarray]:
  """Right-padded SFT batch; see the module docstring for the alignment.

  Returns tokens [B, L] int32, loss_mask [B, L] float32 (1 on trace + EOS tokens),
  prompt_lens [B] int32 (BOS + prompt) and lengths [B] int32 (all non-pad tokens), L = max_len.
  Raises ValueError naming the prompt id, the length and the limit when a row does not fit.
  """
  b = len(examples)
  tokens = np.full((b, max_len), tokenizer.pad_id, np.int32)
  loss_mask = np.zeros((b, max_len), np.float32)
  prompt_lens = np.zeros((b,), np.int32)
  lengths = np.zeros((b,), np.int32)
  for row, ex in enumerate(examples):
    prompt, target = _encode_sft_example(ex, tokenizer)
    n = len(prompt) + len(target)
    if n > max_len:
      raise ValueError(f"make_sft_batch: example with prompt id {ex.prompt_id} has {n} tokens "
                       f"(prompt {len(prompt)} + trace/EOS {len(target)}), over max_len={max_len}")
    tokens[row, :n] = prompt + target
    loss_mask[row, len(prompt):n] = 1.0
    prompt_lens[row], lengths[row] = len(prompt), n
  return {"tokens": tokens, "loss_mask": loss_mask, "prompt_lens": prompt_lens, "lengths": lengths}


def next_token_targets(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs [B, L-1], targets [B, L-1], weights [B, L-1]) with targets[:, t] = tokens[:, t+1]."""
  tokens, mask = batch["tokens"], batch["loss_mask"]
  return tokens[:, :-1], tokens[:, 1:], mask[:, 1:]


def encode_prompts(examples: Sequence[Example], tokenizer: Tokenizer, max_prompt_len: int
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Rollout prompts: tokens [B, P] int32 = [BOS] + prompt, right-padded with pad_id, and
  lengths [B] int32 (BOS included). Raises ValueError naming the prompt id, its length and the
  limit when a prompt does not fit in P = max_prompt_len."""
  b = len(examples)
  tokens = np.full((b, max_prompt_len), tokenizer.pad_id, np.int32)
  lengths = np.zeros((b,), np.int32)
  for row, ex in enumerate(examples):
    ids = _bos(tokenizer) + tokenizer.encode(ex.prompt)
    if len(ids) > max_prompt_len:
      raise ValueError(f"encode_prompts: prompt id {ex.prompt_id} has {len(ids)} tokens (BOS included), "
                       f"over max_prompt_len={max_prompt_len}")
    tokens[row, :len(ids)] = ids
    lengths[row] = len(ids)
  return tokens, lengths


def prompt_check(tokenizer: Tokenizer, context: int, max_new_tokens: int):
  """`unusable(example) -> str | None` for data sources: why a prompt cannot be rolled out —
  the tokenizer cannot encode it, or BOS + prompt + `max_new_tokens` exceed the model's
  `context` — or None when it can."""
  limit = int(context) - int(max_new_tokens)

  def unusable(example: Example) -> str | None:
    try:
      n = len(_bos(tokenizer)) + len(tokenizer.encode(example.prompt))
    except ValueError as e:
      return f"prompt cannot be tokenized: {e}"
    if n > limit:
      return (f"prompt of {n} tokens (BOS included) is over the {limit} that fit: "
              f"model.max_position_embeddings={context} - rollout.max_new_tokens={max_new_tokens}")
    return None

  return unusable


def sft_check(tokenizer: Tokenizer, row_len: int, limit: str):
  """A check for `sources.usable_draws`: the problem string of an SFT example (BOS + prompt +
  trace + EOS) longer than `row_len` tokens (`limit` names the config key), else None."""

  def unusable(ex: Example) -> str | None:
    prompt, target = _encode_sft_example(ex, tokenizer)
    n = len(prompt) + len(target)
    if n > row_len:
      return f"{n} tokens (prompt {len(prompt)} + response {len(target)}), over {limit}={row_len}"
    return None

  return unusable


def pack_sft_batch(sample_fn, tokenizer: Tokenizer, rows: int, row_len: int) -> dict[str, np.ndarray]:
  """Packs examples drawn from `sample_fn()` into `rows` rows of `row_len` tokens.

  Each example (BOS + prompt + trace + EOS) is placed whole in the current row, or starts the
  next one when it does not fit; drawing stops when an example fits nowhere (it is dropped, so
  the batch is a pure function of the draws). Returns tokens, loss_mask (aligned as in
  `make_sft_batch`), positions (restarting at 0 per example) and segment_ids (1, 2, ... per
  example within a row; 0 on padding) — feed the model `segment_mask(segment_ids)` as its
  attention mask so examples never attend to each other.
  """
  tokens = np.full((rows, row_len), tokenizer.pad_id, np.int32)
  loss_mask = np.zeros((rows, row_len), np.float32)
  positions = np.zeros((rows, row_len), np.int32)
  segments = np.zeros((rows, row_len), np.int32)
  row, col, seg = 0, 0, 0
  while row < rows:
    ex = sample_fn()
    prompt, target = _encode_sft_example(ex, tokenizer)
    n = len(prompt) + len(target)
    if n > row_len:
      raise ValueError(f"pack_sft_batch: example with prompt id {ex.prompt_id} has {n} tokens, "
                       f"over the row length {row_len}")
    if col + n > row_len:
      row, col, seg = row + 1, 0, 0
      if row == rows:
        break
    seg += 1
    tokens[row, col:col + n] = prompt + target
    loss_mask[row, col + len(prompt):col + n] = 1.0
    positions[row, col:col + n] = np.arange(n)
    segments[row, col:col + n] = seg
    col += n
  return {"tokens": tokens, "loss_mask": loss_mask, "positions": positions, "segment_ids": segments}


def segment_mask(segment_ids_BxT):
  """Causal attention mask [B, T, T] restricted to tokens of the same (non-zero) segment."""
  import jax.numpy as jnp
  seg = jnp.asarray(segment_ids_BxT)
  t = seg.shape[1]
  same = (seg[:, :, None] == seg[:, None, :]) & (seg[:, :, None] > 0)
  return same & jnp.tril(jnp.ones((t, t), bool))[None]
