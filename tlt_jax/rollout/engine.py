"""Rollout engine: the configuration of batched generation over one model graph and sampling
parameters, its program cache (rollout/programs.py) and the entry points `start` (a session
that decodes chunk by chunk, rollout/session.py) and `generate` (a whole session).

Per call of `generate`:
  1. prefill the right-padded prompts into a KV cache and sample the first token;
  2. decode in jitted chunks (`lax.while_loop` of up to K steps, state donated);
  3. between chunks, on the host, copy out finished rows and compact the active ones into the
     next smaller batch bucket, so the long tail never pays for finished rows. Shapes are
     static per bucket, so each bucket compiles once;
  4. once the active batch is at or below `spec_threshold` and a speculative decoder is given,
     decode the tail with `speculative_chunk` instead (see rollout/speculative.py).

Every program runs on a mesh (the group's; one device is a 1x1x1 mesh) with explicit in/out
shardings (rollout/decode.py: placement). The names of rollout/decode.py, records.py and
session.py are re-exported here.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.decode import (DEFAULT_BUCKETS, DecodeState, advance, bucket_for,  # noqa: F401
                                    compacted_rows, decode_chunk, decode_step, feature_dtype,
                                    gather_rows, is_eos, live_window, mark_done_from, prefill,
                                    state_shardings)
from tlt_jax.rollout.programs import RolloutPrograms
from tlt_jax.rollout.records import RolloutResult
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.session import FixedSelector, RolloutSession  # noqa: F401
from tlt_jax.rollout.strategy import PLAIN  # noqa: F401


@dataclasses.dataclass
class RolloutEngine:
  """Host driver for batched generation. One engine per (model graph, sampling params)."""

  graphdef: Any
  sampling: SamplingParams
  eos_ids: tuple[int, ...]
  pad_id: int = 0
  chunk_size: int = 16
  buckets: tuple[int, ...] = DEFAULT_BUCKETS
  max_context: int = 2048  # cache capacity limit (model max positions)
  speculative: Any = None  # a SpeculativeDecoder (rollout/speculative.py) or None
  spec_threshold: int = 0  # switch to speculative decoding at or below this active batch size
  compact: bool = True
  window_block: int = 0  # live attention window granularity (0: attend to the whole cache)
  # Input embeddings from outside the params (SCONE's host-side f-gram table, models/scone.py:
  # HostTable); None: the model's own token embeddings (the plain programs, unchanged).
  input_embedder: Any = None

  def __post_init__(self):
    if self.chunk_size <= 0:
      raise ValueError(f"rollout.chunk_size={self.chunk_size} must be > 0")
    self.eos_ids = tuple(int(e) for e in self.eos_ids)
    if not self.eos_ids:
      raise ValueError("rollout needs at least one EOS id")
    keep = self.speculative is not None
    prefill_fn = functools.partial(prefill, self.graphdef, sp=self.sampling,
                                   eos_ids=self.eos_ids, keep_features=keep,
                                   live_window=self.window_block > 0, embedder=self.input_embedder)
    chunk_fn = functools.partial(decode_chunk, self.graphdef, num_steps=self.chunk_size,
                                 sp=self.sampling, eos_ids=self.eos_ids, embedder=self.input_embedder)
    self.jits = RolloutPrograms(prefill_fn, chunk_fn)  # the one cache of its programs

  def programs(self, kind: str) -> list:
    """The jitted programs of one kind built so far (RolloutPrograms.programs)."""
    return self.jits.programs(kind)

  def capacity_for(self, prompt_len: int, max_new_tokens: int) -> int:
    margin = 1
    if self.speculative is not None:
      margin = max(self.speculative.max_verify_tokens, self.speculative.max_depth + 1) + 1
    cap = prompt_len + max_new_tokens + margin
    return int(-(-cap // 16) * 16)

  def start(self, params, prompt_BxP: np.ndarray, prompt_len_B: np.ndarray, max_new_tokens,
            rng: jax.Array, drafter_params=None, selector=None, *,
            place_batch: Callable[[np.ndarray], jax.Array] | None = None,
            collect_features: bool = False, mesh=None) -> "RolloutSession":
    """Prefills and returns a session that decodes chunk by chunk (`session.advance()`); a host
    scheduler interleaves the sessions of several rollout groups this way.

    `place_batch(x)` puts the session's [B, ...] host inputs on devices (e.g. batch-sharded over a
    rollout group's sub-mesh; default: `jnp.asarray`, which follows the params). With
    `collect_features` (and a speculative decoder, which keeps the features), every row copied out
    is also appended to `session.finished_features` as (row, tokens_T, feat_TxD, prompt_len): the
    target's own features f_t of prompt + response, for the drafter buffer (tlt/buffer.py).
    Every jit has explicit in/out shardings on `mesh` (the group's; default: the mesh the params
    live on, `mesh_lib.mesh_of`, a 1x1x1 mesh for one device) and the host reads only replicated
    values (module docstring).
    """
    return RolloutSession(self, params, prompt_BxP, prompt_len_B, max_new_tokens, rng, drafter_params,
                          selector, place_batch=place_batch, collect_features=collect_features,
                          mesh=mesh or mesh_lib.mesh_of(params))

  def generate(self, params, prompt_BxP: np.ndarray, prompt_len_B: np.ndarray, max_new_tokens,
               rng: jax.Array, drafter_params=None, selector=None, *, mesh=None) -> RolloutResult:
    """Generates up to `max_new_tokens` (an int, or one per row) for each right-padded prompt.

    At or below `spec_threshold` active rows (and with `drafter_params`), each chunk's strategy
    comes from `selector.select(rows)` (e.g. the BEG-MAB bandit, tlt/bandit.py; the decoder's
    default strategy without one), `rows` the state's rows (the active batch's bucket with
    compaction); the selector may answer PLAIN = (0, 0, 0) for a plain chunk, and is told each
    chunk's outcome through `selector.update(rows, strategy, accept_len, time_per_round)`.
    """
    session = self.start(params, prompt_BxP, prompt_len_B, max_new_tokens, rng, drafter_params, selector,
                         mesh=mesh)
    while session.advance():
      pass
    return session.result()
