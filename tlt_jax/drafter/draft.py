"""Drafting for speculative decoding (rollout/speculative.py): the draft head (the target's full
LM head, or its columns of a reduced draft vocabulary), the drafter's live attention window, and
the two draft shapes, a chain (k = 1) and an EAGLE-2 dynamic tree."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp


def head_DxV(tgt):
  """The target's LM head as [D, V] (the token embeddings' transpose when they are tied)."""
  return tgt.embed_tokens[...].T if tgt.lm_head is None else tgt.lm_head[...]


def draft_subhead(head, ids, *, tied: bool, dtype):
  """The head's columns `ids` as [D, V_d] in `dtype`: `head` is the target's `lm_head` [D, V], or
  its token embeddings [V, D] when `tied`."""
  w = jnp.take(head, ids, axis=0).T if tied else jnp.take(head, ids, axis=1)
  return w.astype(dtype)


@dataclasses.dataclass(frozen=True)
class DraftHead:
  """The head a draft level reads: the target's full head (`ids` None) or its columns `ids`
  (int32[V_d]) as `w_DxV` [D, V_d]. The speculative decoder builds `w_DxV` once per (policy
  parameters, draft vocabulary) in a program of its own (`SpeculativeDecoder.subhead`) and hands
  it to the chunks; without it, `of` gathers the columns in the calling program."""

  tgt: Any
  w_DxV: Any = None
  ids: Any = None

  @classmethod
  def of(cls, tgt, ids=None, w_DxV=None) -> "DraftHead":
    if ids is None:
      return cls(tgt)
    if w_DxV is None:
      w_DxV = draft_subhead(head_DxV(tgt), ids, tied=False, dtype=tgt.cfg.jnp_dtype)
    if w_DxV.shape != (tgt.cfg.hidden_size, ids.shape[0]):
      raise ValueError(f"draft sub-head of shape {w_DxV.shape}; needs ({tgt.cfg.hidden_size}, {ids.shape[0]})")
    return cls(tgt, w_DxV, ids)

  def logits(self, feat):
    """float32 draft logits over the draft vocabulary (full: the target's `logits`)."""
    if self.ids is None:
      return self.tgt.logits(feat)
    return jnp.einsum("...d,dv->...v", feat.astype(self.w_DxV.dtype), self.w_DxV,
                      preferred_element_type=jnp.float32)

  def token(self, idx):
    """Full-vocabulary token ids of draft-vocabulary indices."""
    return idx.astype(jnp.int32) if self.ids is None else jnp.take(self.ids, idx, axis=0).astype(jnp.int32)


def draft_window(window: int | None, target_capacity: int, draft_capacity: int) -> int | None:
  """The drafter's static attention window for a target window `window` (None: all slots): the
  drafter writes at most `draft_capacity - target_capacity` slots past the target's (catch-up, tree
  levels, sync blocks), so every slot it reads or writes lies below `window` + that slack."""
  if window is None:
    return None
  w = int(window) + int(draft_capacity) - int(target_capacity)
  return None if w >= draft_capacity else w


def draft_chain(tgt, drf, head: DraftHead, dcache, root_feat_BxD, L, d: int, n: int, dwin=None, attn_spec=None):
  """k = 1: d greedy draft tokens in a line. The tree is static: node j has depth j+1 and parent
  j-1, and each level is one causal drafter step (attending as `attn_spec` says). Returns the
  verification block (see draft_tree)."""
  b = root_feat_BxD.shape[0]
  tok_B = head.token(jnp.argmax(head.logits(root_feat_BxD), axis=-1))
  feat_BxD, tokens = root_feat_BxD, [tok_B]
  for level in range(1, d):
    out, dcache = drf(tgt.embed(tok_B[:, None]), feat_BxD[:, None], (L + level - 1)[:, None], cache=dcache,
                      kv_window=dwin, attn_spec=attn_spec)
    feat_BxD = out[:, 0]
    tok_B = head.token(jnp.argmax(head.logits(feat_BxD), axis=-1))
    tokens.append(tok_B)
  tokens = jnp.stack(tokens[:n], axis=1)  # [B, n]
  depth = jnp.broadcast_to(jnp.arange(1, n + 1, dtype=jnp.int32), (b, n))
  blk_mask = jnp.broadcast_to(jnp.tril(jnp.ones((n + 1, n + 1), bool)), (b, n + 1, n + 1))
  par_blk = jnp.broadcast_to(jnp.arange(-1, n, dtype=jnp.int32), (b, n + 1))
  return tokens, depth, blk_mask, par_blk, dcache


def draft_tree(tgt, drf, head: DraftHead, dcache, root_feat_BxD, L, d: int, k: int, n: int, dwin=None):
  """EAGLE-2 dynamic tree: N = d*k nodes, level l (1-based) at [(l-1)k, lk); each level expands
  every node into its top-k children and keeps the k best by cumulative draft log-probability;
  the n best nodes overall (an ancestor-closed set) are verified.

  Returns the verification block without its root: node tokens [B, n], depths [B, n], the tree
  attention mask over (root + nodes) [B, n+1, n+1], and each block entry's parent index [B, n+1]
  (-1 for the root); and the drafter cache (its tree entries past L are garbage).
  """
  b = root_feat_BxD.shape[0]
  num_nodes = d * k
  logq_BxV = jax.nn.log_softmax(head.logits(root_feat_BxD), axis=-1)
  lq_Bxk, tok_Bxk = jax.lax.top_k(logq_BxV, k)
  tok_Bxk = head.token(tok_Bxk)
  tokens = jnp.zeros((b, num_nodes), jnp.int32).at[:, :k].set(tok_Bxk)
  scores = jnp.full((b, num_nodes), -jnp.inf, jnp.float32).at[:, :k].set(lq_Bxk)
  parent = jnp.full((b, num_nodes), -1, jnp.int32)
  depth = jnp.arange(num_nodes, dtype=jnp.int32) // k + 1
  anc = jnp.zeros((b, num_nodes, num_nodes), bool).at[:, jnp.arange(k), jnp.arange(k)].set(True)
  parent_feat_BxkxD = jnp.broadcast_to(root_feat_BxD[:, None], (b, k, root_feat_BxD.shape[-1]))
  slots_S = jnp.arange(dcache.capacity if dwin is None else min(int(dwin), dcache.capacity))
  rel = slots_S[None, :] - L[:, None]  # tree node index of each drafter slot
  in_tree = (rel >= 0) & (rel < num_nodes)
  for level in range(1, d):
    ids = (level - 1) * k + jnp.arange(k)
    seen = jnp.take_along_axis(anc[:, ids], jnp.broadcast_to(jnp.clip(rel, 0, num_nodes - 1)[:, None],
                                                             (b, k, rel.shape[1])), axis=2)
    kv_mask = (rel < 0)[:, None] | (in_tree[:, None] & seen)  # committed slots + ancestors
    pos = jnp.broadcast_to((L + level - 1)[:, None], (b, k))
    out_BxkxD, dcache = drf(tgt.embed(tokens[:, ids]), parent_feat_BxkxD, pos,
                            cache=dcache.replace(lengths=L + (level - 1) * k), kv_mask_BxTxS=kv_mask,
                            kv_window=dwin)
    clq, ctok = jax.lax.top_k(jax.nn.log_softmax(head.logits(out_BxkxD), axis=-1), k)  # [B,k,k]
    ctok = head.token(ctok)
    cand = (scores[:, ids][:, :, None] + clq).reshape(b, k * k)
    best_s, best = jax.lax.top_k(cand, k)
    par_local = best // k
    new = level * k + jnp.arange(k)
    tokens = tokens.at[:, new].set(jnp.take_along_axis(ctok.reshape(b, k * k), best, axis=1))
    scores = scores.at[:, new].set(best_s)
    par_global = ids[par_local]
    parent = parent.at[:, new].set(par_global)
    anc = anc.at[:, new].set(jnp.take_along_axis(anc, par_global[:, :, None], axis=1))
    anc = anc.at[:, new, new].set(True)
    parent_feat_BxkxD = jnp.take_along_axis(out_BxkxD, par_local[..., None], axis=1)
  # Parents sort before children: scores fall along a path, and the depth term breaks ties.
  _, sel = jax.lax.top_k(scores - 1e-4 * depth[None].astype(jnp.float32), n)  # [B, n]
  anc_sel = jnp.take_along_axis(jnp.take_along_axis(anc, sel[:, :, None], axis=1), sel[:, None, :], axis=2)
  blk_mask = jnp.zeros((b, n + 1, n + 1), bool).at[:, :, 0].set(True).at[:, 1:, 1:].set(anc_sel)
  par_sel = jnp.take_along_axis(parent, sel, axis=1)  # global id or -1
  par_blk = jnp.where(par_sel < 0, 0, 1 + jnp.argmax(sel[:, None, :] == par_sel[:, :, None], axis=2))
  par_blk = jnp.concatenate([jnp.full((b, 1), -1, jnp.int32), par_blk.astype(jnp.int32)], axis=1)
  return jnp.take_along_axis(tokens, sel, axis=1), depth[sel], blk_mask, par_blk, dcache
