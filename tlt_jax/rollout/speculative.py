"""Lossless tree speculative decoding with an EAGLE drafter (the TLT rollout tail).

One *round* for every active row of the batch:
  1. Catch-up: the drafter consumes the pairs (x_{t+1}, f_t) committed since its last round
     (true target features; at most depth + 1 of them) in one call; its last output is
     f̂_L, the draft feature of the pending token's successor.
  2. Draft a tree (EAGLE-2 style): level 1 holds the top-k tokens of q(·|f̂_L); each further
     level expands every node of the previous level into its top-k children and keeps the k
     best by cumulative draft log-probability. A depth-d tree has d·k nodes.
  3. Verify: the n best nodes (an ancestor-closed set) and the pending token run through the
     target in ONE forward under a tree attention mask at positions L + depth.
  4. Accept with exact target-only sampling (DESIGN.md): at node r draw x ~ p_r, the target
     distribution after temperature / top-k / top-p; if x is one of r's verified children, move
     there and repeat, else stop with x as the bonus token. This is sampling from p with an
     early exit, so the output has exactly the target's distribution whatever the drafter
     proposes (greedy: x = argmax p_r, exact argmax matching).
  5. Commit: the accepted path's keys/values are moved to consecutive cache slots; tokens,
     policy logprobs and target features are appended; the drafter's tree entries are dropped.

Sequences in one batch accept different lengths; EOS and max-new-tokens cut the accepted run.
A chain is k = 1.

Reduced draft vocabulary (EAGLE-3's): with `draft_vocab_size` V_d > 0 the drafter proposes only
among V_d token ids (the policy's most frequent recent tokens, tlt/draft_vocab.py). The decoder
gathers those V_d columns of the shared head into a sub-head w [D, V_d] in a small program of its
own, once per (policy parameters, draft vocabulary) (`SpeculativeDecoder.subhead`), and gives the
chunk programs the ids and the sub-head as ARGUMENTS (a refresh or a policy update never
recompiles a chunk, and no chunk reads the full head to draft): a draft level reads V_d x D head
weights and its log-softmax runs over V_d. Acceptance never reads the draft distribution (step 4 samples from p
alone), so sampling stays exact whatever the draft vocabulary misses: a token outside it is never
proposed and, when the target samples it, it is the bonus token.

Live window: a chunk whose target attends to slots [0, W) runs its drafter over slots
[0, W + slack) (slack = the drafter cache's extra slots, `draft_capacity`), not its capacity.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from tlt_jax.drafter.draft import DraftHead, draft_chain, draft_tree, draft_window
from tlt_jax.models.attention import AttentionSpec
from tlt_jax.models.transformer import KVCache, write_slots
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.decode import DecodeState, is_eos, state_shardings
from tlt_jax.rollout.programs import ProgramCache, ProgramKey
from tlt_jax.rollout.sampling import SamplingParams, policy_logprobs, sample_from, target_logprobs
from tlt_jax.rollout.strategy import Strategy
from tlt_jax.rollout.subhead import DraftVocabPrograms


def _rows(x, idx_B):
  return x[jnp.arange(x.shape[0]), idx_B]


def _write_block(buf_BxS, block_BxW, start_B):
  """buf[b, start_b : start_b + W] = block[b] (per-row offsets)."""
  zeros = (0,) * (buf_BxS.ndim - 2)
  return jax.vmap(lambda buf, blk, s: jax.lax.dynamic_update_slice(buf, blk.astype(buf.dtype), (s,) + zeros)
                  )(buf_BxS, block_BxW, start_B)


def drafter_prefill(tgt_graphdef, drf_graphdef, tparams, dparams, state: DecodeState, *,
                    capacity: int) -> KVCache:
  """Fills the drafter cache with the pairs (x_{t+1}, f_t), t < L - 1, of every row (L = the
  pending position), leaving the pair of the pending token to the first round's catch-up: one
  drafter pass over the whole capacity. The engine fills its cache with `drafter_sync` instead
  (cost by length); this is the reference it is tested against, and the cache's shape (AOT)."""
  tgt, drf = nnx.merge(tgt_graphdef, tparams), nnx.merge(drf_graphdef, dparams)
  b = state.seq_BxS.shape[0]
  cache = KVCache.init(drf.cfg, b, capacity)
  _, cache = drf(tgt.embed(state.seq_BxS[:, 1:]), state.feat_BxSxD[:, :-1], cache=cache)
  return cache.replace(lengths=state.cache.lengths - 1)


def _drafter_block(tgt, drf, state: DecodeState, dcache: KVCache, width: int, dwin: int | None = None,
                   attn_spec=None):
  """The drafter over the pairs (x_{t+1}, f_t), t in [dl, dl + width) (dl = the cache's length),
  written to the cache from slot dl, attending to slots [0, dwin) as `attn_spec` says. Returns
  (the drafter's outputs [B, width, D], the cache); its length is the caller's to set."""
  t_BxW = dcache.lengths[:, None] + jnp.arange(width)[None]
  tok_BxW = jnp.take_along_axis(state.seq_BxS, jnp.clip(t_BxW + 1, 0, state.seq_BxS.shape[1] - 1), axis=1)
  feat_BxWxD = jnp.take_along_axis(
      state.feat_BxSxD, jnp.clip(t_BxW, 0, state.feat_BxSxD.shape[1] - 1)[..., None], axis=1)
  return drf(tgt.embed(tok_BxW), feat_BxWxD, t_BxW, cache=dcache, kv_window=dwin, attn_spec=attn_spec)


def drafter_sync(tgt, drf, state: DecodeState, block: int, dwin: int | None = None,
                 attn_spec=None) -> DecodeState:
  """Catches the drafter cache up: it consumes the pairs (x_{t+1}, f_t), t in [dl, L - 1), that it
  has not seen (dl = its length, L = the pending position) in blocks of `block` positions, in a
  `lax.while_loop` that runs no block when it is up to date. From an empty cache (dl = 0) this is a
  prefill whose cost follows the rows' lengths, not the capacity; after plain chunks (which do not
  touch the drafter) it writes exactly the gap, so the cache is what `drafter_prefill` of the same
  state gives (up to float rounding) and the next round drafts from the right root feature.
  `dwin`: the drafter's attention window (`draft_window`; None: its whole cache); `attn_spec`: how
  it attends (`AttentionSpec.for_cache`; None: XLA ops)."""
  dcache = state.draft_cache
  last = state.cache.lengths - 1  # the pending pair (t = L - 1) is left to the round's catch-up

  def body(dc):
    dl = dc.lengths
    _, dc = _drafter_block(tgt, drf, state, dc, block, dwin, attn_spec)
    # slots past `last` hold garbage beyond the length: masked, and rewritten by later catch-ups
    return dc.replace(lengths=jnp.where(dl < last, jnp.minimum(dl + block, last), dl))

  dcache = jax.lax.while_loop(lambda dc: jnp.any(dc.lengths < last), body, dcache)
  return state.replace(draft_cache=dcache)


def speculative_round(tgt, drf, state: DecodeState, strategy: Strategy, sp: SamplingParams,
                      eos_ids, catchup_width: int, window: int | None = None, embedder=None,
                      head: DraftHead | None = None, attn_spec=None):
  """One draft-verify-accept round for the whole batch (see the module docstring). `embedder`
  (SCONE's `HostTable`, or None): the target's input embeddings of the verification block (the
  drafter keeps the target's token embeddings); `head`: the draft head (None: the full vocabulary).
  Returns (state, emitted_B) where emitted_B counts the tokens appended per active row."""
  d, k, n = strategy.depth, strategy.topk, strategy.num_verify
  b = state.done_B.shape[0]
  active = ~state.done_B
  L = state.cache.lengths  # pending position
  dcache, head = state.draft_cache, head or DraftHead.of(tgt)
  dwin = draft_window(window, state.seq_BxS.shape[1], dcache.capacity)

  # 1. Catch-up over t in [dl, L-1]; the output at t = L-1 is f̂_L.
  dl = dcache.lengths
  out_BxWxD, dcache = _drafter_block(tgt, drf, state, dcache, catchup_width, dwin, attn_spec)
  root_feat_BxD = _rows(out_BxWxD, L - 1 - dl)
  dcache = dcache.replace(lengths=L)

  # 2. Draft.
  # a tree's levels see exact slot sets (`kv_mask_BxTxS`), which only XLA ops take: no attn_spec
  draft = functools.partial(draft_chain, attn_spec=attn_spec) if k == 1 else functools.partial(draft_tree, k=k)
  node_tok, node_depth, blk_mask, par_blk, dcache = draft(tgt, drf, head, dcache, root_feat_BxD, L, d, n=n,
                                                          dwin=dwin)
  dcache = dcache.replace(lengths=L)  # the draft entries are dropped

  # 3. Verify the nodes with the pending token as the root, in one target forward.
  pending = _rows(state.seq_BxS, L)
  blk_tok = jnp.concatenate([pending[:, None], node_tok], axis=1)
  blk_pos = L[:, None] + jnp.concatenate([jnp.zeros((b, 1), jnp.int32), node_depth], axis=1)
  x = None if embedder is None else embedder.embed_tree(tgt, state.seq_BxS, blk_tok, blk_pos, par_blk)
  logits, hidden, tcache = tgt(blk_tok, blk_pos, cache=state.cache, attn_mask_BxTxT=blk_mask,
                               kv_window=window, input_embeds_BxTxD=x, attn_spec=attn_spec)

  # 4. Target-only acceptance walk. Every block node j draws its own x_j ~ p_j up front (the
  # nodes on a path are distinct, so the draws along it are independent, as a sequential walk's
  # would be); the walk then only follows child pointers: child[j] is the verified child of j
  # whose token is x_j, or -1, at which point x_j is the bonus token.
  rng, key = jax.random.split(state.rng)
  logp_all = target_logprobs(logits, sp)  # [B, n+1, V]
  x_all = sample_from(logp_all, key, sp)  # [B, n+1]
  lp_all = jnp.take_along_axis(policy_logprobs(logits, sp), x_all[..., None], axis=-1)[..., 0]
  match = (par_blk[:, None, :] == jnp.arange(n + 1)[None, :, None]) & (blk_tok[:, None, :] == x_all[:, :, None])
  child = jnp.where(jnp.any(match, axis=2), jnp.argmax(match, axis=2), -1).astype(jnp.int32)  # [B, n+1]
  cur = jnp.zeros((b,), jnp.int32)
  chain = [cur]
  for _ in range(d):
    nxt = _rows(child, cur)
    cur = jnp.where(nxt >= 0, nxt, cur)
    chain.append(cur)
  chain = jnp.stack(chain, 1)  # [B, d+1]: block node that emits token j (repeats once stopped)
  out_tok = jnp.take_along_axis(x_all, chain, axis=1)
  out_lp = jnp.take_along_axis(lp_all, chain, axis=1)
  accepted = jnp.sum(chain[:, 1:] != chain[:, :-1], axis=1)  # nodes accepted
  count = accepted + 1
  eos = is_eos(out_tok, eos_ids)
  first_eos = jnp.where(jnp.any(eos, axis=1), jnp.argmax(eos, axis=1), d + 1)
  budget = state.max_new_B - state.num_gen_B
  n_new = jnp.where(active, jnp.minimum(jnp.minimum(count, first_eos + 1), budget), 0)

  # 5. Commit. Writes land past each row's pending token (or past its last logprob), so rows that
  # are done, or accept fewer tokens, only overwrite slots that are not committed.
  seq = _write_block(state.seq_BxS, out_tok, L + 1)
  logprobs = _write_block(state.logprobs_BxM, out_lp, state.num_gen_B)
  chain_feat = jnp.take_along_axis(hidden, chain[..., None], axis=1)
  feat = _write_block(state.feat_BxSxD, chain_feat, L)
  moved_k, moved_v = tcache.k, tcache.v
  if k > 1:  # a chain's accepted nodes already sit in consecutive slots L+1..L+a
    src = L[:, None] + chain[:, 1:]  # slots of the accepted nodes (depth 1..d)
    move = lambda c: write_slots(c, jnp.take_along_axis(c, src[:, None, :, None], axis=2), L + 1)  # noqa: E731
    moved_k, moved_v = tuple(map(move, tcache.k)), tuple(map(move, tcache.v))
  num_gen = state.num_gen_B + n_new
  last_tok = _rows(out_tok, jnp.maximum(n_new - 1, 0))
  done = state.done_B | (active & ((is_eos(last_tok, eos_ids) & (n_new > 0)) | (num_gen >= state.max_new_B)))
  cache = KVCache(moved_k, moved_v, jnp.where(active, L + n_new, L))
  new_state = state.replace(cache=cache, seq_BxS=seq, feat_BxSxD=feat, logprobs_BxM=logprobs,
                            num_gen_B=num_gen, done_B=done, rng=rng, draft_cache=dcache)
  return new_state, n_new


def speculative_chunk(tgt_graphdef, drf_graphdef, tparams, dparams, state: DecodeState,
                      vocab_ids=None, w_DxV=None, *, strategy: Strategy, num_rounds: int, sp: SamplingParams,
                      eos_ids, catchup_width: int, window: int | None = None, embedder=None,
                      sync_block: int = 32, mesh=None):
  """Brings the drafter cache up to date (`drafter_sync`, blocks of `sync_block`: a prefill from an
  empty cache, the gap after plain chunks, nothing otherwise), then runs up to `num_rounds`
  speculative rounds in one `lax.while_loop` (stops when all rows are done); the target's
  verification reads cache slots [0, window) (None: all), the drafter its `draft_window`.
  `vocab_ids`: int32[V_d], the draft vocabulary (None: the full vocabulary), and `w_DxV` [D, V_d]
  its columns of the target's head (`SpeculativeDecoder.subhead`; None: gathered here, before the
  rounds). `mesh`: the program's mesh (None: one device), on which the verification, the
  drafter's catch-up and a chain's draft levels attend by the target's `cache_attention`
  (`AttentionSpec.for_cache`).

  Returns (state, stats) with stats = (rounds, emitted tokens, active row-rounds).
  """
  tgt, drf = nnx.merge(tgt_graphdef, tparams), nnx.merge(drf_graphdef, dparams)
  spec = AttentionSpec.for_cache(tgt.cfg, mesh)
  dwin = draft_window(window, state.seq_BxS.shape[1], state.draft_cache.capacity)
  state = drafter_sync(tgt, drf, state, sync_block, dwin, spec)
  head = DraftHead.of(tgt, vocab_ids, w_DxV)

  def cond(carry):
    i, st, _, _ = carry
    return (i < num_rounds) & ~jnp.all(st.done_B)

  def body(carry):
    i, st, tokens, row_rounds = carry
    active = jnp.sum(~st.done_B)
    st, n_new = speculative_round(tgt, drf, st, strategy, sp, eos_ids, catchup_width, window, embedder, head,
                                  spec)
    return i + 1, st, tokens + jnp.sum(n_new), row_rounds + active

  zero = jnp.int32(0)
  i, state, tokens, row_rounds = jax.lax.while_loop(cond, body, (zero, state, zero, zero))
  return state, (i, tokens, row_rounds)


def check_sizes(tparams, dparams) -> None:
  """The drafter reads and predicts the target's features: its width must be the target's."""
  target_h = tparams["embed_tokens"][...].shape[1]
  drafter_h = dparams["fc"]["kernel"][...].shape[1]
  if target_h != drafter_h:
    raise ValueError(f"drafter hidden_size={drafter_h} does not match the target's hidden_size={target_h}; "
                     "build the drafter from the target's ModelConfig (EagleDrafter(target.cfg, ...))")


@dataclasses.dataclass
class SpeculativeDecoder(DraftVocabPrograms):
  """Plugs speculative rounds into RolloutEngine; one compiled chunk per (strategy, bucket)."""

  target_graphdef: Any
  drafter_graphdef: Any
  sampling: SamplingParams
  eos_ids: tuple[int, ...]
  strategies: Sequence[Strategy] = (Strategy(4, 1, 4),)
  rounds_per_chunk: int = 8
  input_embedder: Any = None  # the target's input embeddings (SCONE's HostTable); None: plain
  sync_block: int = 32  # positions per drafter catch-up block (drafter_sync)
  draft_vocab_size: int = 0  # V_d > 0: draft among V_d token ids (`set_draft_vocab`); 0: all

  def __post_init__(self):
    self.strategies = tuple(Strategy.parse(s) for s in self.strategies)
    if not self.strategies:
      raise ValueError("speculative decoding needs at least one strategy")
    self.eos_ids = tuple(int(e) for e in self.eos_ids)
    self.max_depth = max(s.depth for s in self.strategies)
    self.max_nodes = max(s.depth * s.topk for s in self.strategies)
    self.max_verify_tokens = max(s.num_verify for s in self.strategies) + 1
    if int(self.sync_block) < 1:
      raise ValueError(f"sync_block={self.sync_block!r}; must be >= 1")
    self.draft_vocab_size = int(self.draft_vocab_size)
    max_topk = max(s.topk for s in self.strategies)
    if self.draft_vocab_size and self.draft_vocab_size < max_topk:
      raise ValueError(f"draft_vocab_size={self.draft_vocab_size} is below the largest strategy topk "
                       f"{max_topk}; use 0 (the full vocabulary) or >= {max_topk}")
    self.programs = ProgramCache()  # its chunk, catch-up and sub-head programs
    self._init_draft_vocab()
    drafter_cfg = lambda dparams: nnx.merge(self.drafter_graphdef, dparams).cfg  # noqa: E731
    # Placed (and committed) like the state it joins: a jit's output lives where its committed
    # inputs do, and `keep_unused` keeps `done_B` an input although only its shape is read.
    self._empty_cache = jax.jit(
        lambda dparams, done_B, capacity: KVCache.init(drafter_cfg(dparams), done_B.shape[0], capacity),
        static_argnums=(2,), keep_unused=True)

  @property
  def default_strategy(self) -> Strategy:
    return self.strategies[0]

  def max_tokens_per_chunk(self, strategy) -> int:
    """The most tokens a row can gain in one chunk: (depth + 1) per round."""
    return self.rounds_per_chunk * (Strategy.parse(strategy).depth + 1)

  def chunk_partial(self, strategy: Strategy, window: int | None = None, mesh=None):
    """`speculative_chunk` for `strategy` on `mesh` as a function of (tparams, dparams, state[,
    vocab_ids, w_DxV])."""
    return functools.partial(
        speculative_chunk, self.target_graphdef, self.drafter_graphdef, strategy=strategy,
        num_rounds=self.rounds_per_chunk, sp=self.sampling, eos_ids=self.eos_ids,
        catchup_width=self.max_depth + 1, window=window, embedder=self.input_embedder,
        sync_block=self.sync_block, mesh=mesh)

  def _state_jit(self, key: tuple, fn, mesh, tparams, dparams, state: DecodeState, stats_out: bool):
    """`fn(tparams, dparams, state[, vocab_ids, w_DxV])` jitted once per `key` and group shape, the
    state donated; on `mesh` with explicit in/out shardings (the params as placed, the state by
    engine.state_shardings, the statistics, when `stats_out`, and the draft vocabulary and its
    sub-head, arguments of the chunks when `draft_vocab_size` > 0: the ids replicated, the sub-head
    as `subhead_sharding`)."""

    def build():
      st, rep = state_shardings(state, mesh), mesh_lib.replicated(mesh)
      of = lambda t: jax.tree.map(lambda x: x.sharding, t)  # noqa: E731
      ins = (of(tparams), of(dparams), st)
      if stats_out and self.draft_vocab_size:
        ins += (rep, self.subhead_sharding(*self._head_of(tparams), mesh))
      return jax.jit(fn, in_shardings=ins,
                     out_shardings=(st, (rep, rep, rep)) if stats_out else st, donate_argnums=(2,))
    return self.programs.get(ProgramKey.of(key, mesh, tuple(state.seq_BxS.shape)), build)

  def _chunk_fn(self, strategy: Strategy, window: int | None, mesh, tparams, dparams,
                state: DecodeState):
    """The jitted chunk (`_state_jit`)."""
    return self._state_jit((strategy, window), self.chunk_partial(strategy, window, mesh), mesh, tparams, dparams,
                           state, stats_out=True)

  def draft_capacity(self, target_capacity: int) -> int:
    """Slots of the drafter cache: the target's, plus room for a round's catch-up and tree or a
    sync block written past the last committed slot."""
    return target_capacity + max(self.max_nodes + self.max_depth + 1, self.sync_block)

  def _with_draft_cache(self, tparams, dparams, state: DecodeState, mesh) -> DecodeState:
    """`state` with an empty drafter cache if it has none (placed like the state)."""
    if state.draft_cache is not None:
      return state
    check_sizes(tparams, dparams)
    dcache = self._empty_cache(dparams, state.done_B, self.draft_capacity(state.seq_BxS.shape[1]))
    dcache = jax.device_put(dcache, state_shardings(state.replace(draft_cache=dcache), mesh).draft_cache)
    return state.replace(draft_cache=dcache)

  def dispatch_sync(self, tparams, dparams, state: DecodeState, *, mesh) -> DecodeState:
    """Dispatches `drafter_sync` on its own (asynchronously; the state is donated): the engine
    catches the drafter up before a speculative chunk that follows plain chunks or starts the
    session, so that the chunk's time, the selector's score, holds only its rounds. The work is
    the drafter's pass over positions it has not seen, which steady speculation pays inside its
    rounds anyway."""
    state = self._with_draft_cache(tparams, dparams, state, mesh)
    return self.sync_fn(mesh, tparams, dparams, state)(tparams, dparams, state)

  def sync_fn(self, mesh, tparams, dparams, state: DecodeState):
    """The jitted `drafter_sync` of `dispatch_sync` (`_state_jit`)."""

    def sync(tparams, dparams, state):
      tgt, drf = nnx.merge(self.target_graphdef, tparams), nnx.merge(self.drafter_graphdef, dparams)
      return drafter_sync(tgt, drf, state, self.sync_block, attn_spec=AttentionSpec.for_cache(tgt.cfg, mesh))

    return self._state_jit(("sync",), sync, mesh, tparams, dparams, state, stats_out=False)

  def dispatch_chunk(self, tparams, dparams, state: DecodeState, strategy: Strategy | None = None,
                     *, window: int | None = None, mesh):
    """Dispatches one chunk of rounds (asynchronously); gives the state an empty drafter cache on
    the first call (the chunk's `drafter_sync` fills it, unless `dispatch_sync` did). `window`:
    the target's live attention window (engine.live_window); `mesh`: the group's, for explicit
    shardings. Returns (state, (rounds, tokens, row_rounds) as device scalars)."""
    strategy = Strategy.parse(strategy) if strategy is not None else self.default_strategy
    state = self._with_draft_cache(tparams, dparams, state, mesh)
    args = (tparams, dparams, state)
    if self.draft_vocab_size:
      args += (self._vocab_on(mesh), self.subhead(tparams, mesh))
    return self._chunk_fn(strategy, window, mesh, tparams, dparams, state)(*args)
