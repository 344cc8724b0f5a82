"""Language-model training and evaluation of a SCONE model (models/scone.py) or its plain baseline.

`train_lm` runs next-token cross-entropy on random windows of a token stream with AdamW and a
warmup + cosine LR. For a `SconeLM` the host matches every position's longest f-gram and passes the
batch's distinct f-grams (`scone.fgram_batch`); the f-gram model and the main model are updated
together. `eval_lm` measures validation perplexity the way inference runs: a SCONE model reads the
exported host table (`HostTable`), a plain model its token embeddings.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tlt_jax.data.fgram import FgramVocab
from tlt_jax.models import scone


def windows(stream: np.ndarray, batch: int, length: int, rng: np.random.Generator) -> np.ndarray:
  """[batch, length] random windows of a 1-D token stream."""
  starts = rng.integers(0, len(stream) - length, size=batch)
  return np.stack([np.asarray(stream[s:s + length]) for s in starts]).astype(np.int32)


def eval_windows(stream: np.ndarray, num: int, length: int) -> np.ndarray:
  """The first `num` non-overlapping windows of the stream (the same for every model)."""
  num = min(num, len(stream) // length)
  return np.asarray(stream[:num * length], np.int32).reshape(num, length)


def _ce(logits_BxTxV, tokens_BxT):
  logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), -1)
  return -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], -1)[..., 0]


def train_lm(model, vocab: FgramVocab | None, stream: np.ndarray, *, steps: int, batch_size: int,
             seq_len: int, lr: float, warmup_steps: int, weight_decay: float = 0.01, seed: int = 0,
             log: Callable[[dict], None] | None = None, log_every: int = 100) -> dict:
  """Trains `model` (a `Transformer`, or a `SconeLM` with its `vocab`) in place; returns
  statistics (final train loss, seconds, f-gram match rate, distinct f-grams per batch, and the
  training FLOPs: XLA's cost analysis of the one compiled step -- forward, backward and update of
  the main model and, for SCONE, the f-gram model on the batch's f-gram rows -- times `steps`)."""
  is_scone = isinstance(model, scone.SconeLM)
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, max(warmup_steps, 1), max(steps, warmup_steps + 1), lr * 0.1)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay))
  graphdef, params = nnx.split(model)
  opt_state = tx.init(params)

  def loss_fn(p, tokens, ft, idx):
    m = nnx.merge(graphdef, p)
    logits = (m(tokens, ft, idx) if is_scone else m(tokens))[0]
    return jnp.mean(_ce(logits, tokens))

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(p, o, tokens, ft, idx):
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens, ft, idx)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  rng = np.random.default_rng(seed)
  t0, losses, hit, uniq, compiled, step_flops = time.perf_counter(), [], [], [], None, float("nan")
  dummy = (jnp.zeros((1, 2), jnp.int32), jnp.zeros((1,), jnp.int32))
  # One f-gram row count for the whole run (one compile): a batch holds at most this many distinct.
  rows = 1 << (min(batch_size * seq_len, vocab.size if is_scone else 1) - 1).bit_length()
  for i in range(steps):
    tokens = windows(stream, batch_size, seq_len, rng)
    if is_scone:
      ft, idx = scone.fgram_batch(vocab, tokens, min_rows=rows)
      hit.append(float((idx >= 0).mean()))
      uniq.append(int(idx.max()) + 1)
      args = (jnp.asarray(ft), jnp.asarray(idx))
    else:
      args = dummy
    args = (jnp.asarray(tokens), *args)
    if compiled is None:  # every step has the same shapes: compile once, read its cost
      compiled = step.lower(params, opt_state, *args).compile()
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      step_flops = float(cost.get("flops", float("nan")))
    params, opt_state, loss = compiled(params, opt_state, *args)
    if (i + 1) % log_every == 0 or i + 1 == steps:
      losses.append(float(loss))
      if log is not None:
        log({"step": i + 1, "loss": round(losses[-1], 4), "time_s": round(time.perf_counter() - t0, 1)})
  nnx.update(model, params)
  return {"train_loss": losses[-1] if losses else float("nan"), "train_s": time.perf_counter() - t0,
          "match_rate": float(np.mean(hit)) if hit else 0.0,
          "fgrams_per_batch": float(np.mean(uniq)) if uniq else 0.0,
          "train_flops_per_step": step_flops, "train_flops": step_flops * steps}


def eval_lm(main, table: "scone.HostTable | None", tokens_NxT: np.ndarray, batch_size: int = 8) -> dict:
  """Validation next-token loss and perplexity of the main model, its input embeddings from the
  host table when given (inference's path), else its token embeddings."""
  graphdef, params = nnx.split(main)

  @jax.jit
  def ce_sum(p, toks):
    m = nnx.merge(graphdef, p)
    if table is None:
      logits = m(toks)[0]
    else:
      pos = jnp.broadcast_to(jnp.arange(toks.shape[1], dtype=jnp.int32), toks.shape)
      logits = m(toks, input_embeds_BxTxD=table.embed_positions(m, toks, pos))[0]
    return jnp.sum(_ce(logits, toks))

  total, count = 0.0, 0
  for s in range(0, len(tokens_NxT) - batch_size + 1, batch_size):
    toks = tokens_NxT[s:s + batch_size]
    total += float(ce_sum(params, jnp.asarray(toks)))
    count += toks.shape[0] * (toks.shape[1] - 1)
  loss = total / max(count, 1)
  return {"val_loss": loss, "val_ppl": math.exp(loss), "val_bits_per_char": loss / math.log(2)}
