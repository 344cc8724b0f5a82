"""Forward-pass FLOPs of the decoder from its config (multiply-adds count 2 FLOPs).

Per token, the matmuls with weights ("dense", Kaplan et al. 2020's 2N rule with N the weights a
token multiplies by):

  dense = 2 * [ L * (d*h*hd + 2*d*k*hd + h*hd*d + 3*d*f) + d*V ]
          (per layer: q, k, v, o projections with GQA, the SwiGLU MLP's gate, up and down;
           then the LM head, a matmul whether or not it is tied to the embedding)

Left out: the embedding lookup (a gather), norms, biases, RoPE, softmax and the sampler, all
O(d) per token. With attention ("attention"), a token at position t (1-based) that attends to the
t positions up to itself adds QK^T and AV:

  attention(t) = 2 * 2 * L * h * hd * t

A sampled sequence of p prompt tokens (BOS included) and r response tokens passes every one of
its n = p + r tokens through the model once (the KV cache: prefill, then one token per step), so

  sequence = n * dense + [include_attention] * 4 * L * h * hd * n (n + 1) / 2

All integers: budgets and sample counts are exact.
"""

from __future__ import annotations

from typing import Mapping

from tlt_jax.models.config import ModelConfig


def dense_flops_per_token(cfg: ModelConfig) -> int:
  """2 x the weights one token multiplies by (projections, MLP, LM head); module docstring."""
  d, f, v, h, k, hd, layers = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_heads,
                               cfg.num_kv_heads, cfg.head_dim, cfg.num_layers)
  per_layer = d * h * hd + 2 * d * k * hd + h * hd * d + 3 * d * f
  return 2 * (layers * per_layer + d * v)


def attention_flops_per_token(cfg: ModelConfig, context: int) -> int:
  """QK^T and AV of one token attending to `context` positions: 4 * L * h * hd * context."""
  return 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * int(context)


def sequence_flops(cfg: ModelConfig, prompt_len: int, response_len: int, include_attention: bool = True) -> int:
  """FLOPs of sampling one response of `response_len` tokens after `prompt_len` prompt tokens
  (BOS included): every token once through the model, attention over its causal prefix when
  `include_attention` (module docstring)."""
  n = int(prompt_len) + int(response_len)
  total = n * dense_flops_per_token(cfg)
  if include_attention:
    total += 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (n * (n + 1) // 2)
  return total


def matched_sample_counts(sample_flops: Mapping[str, int], budget_flops: int) -> dict[str, int]:
  """Samples per problem each model affords at `budget_flops` per problem: floor(budget / cost)
  with cost its FLOPs per sample (`sequence_flops` at the problems' typical lengths).

  With budget = S_SE * cost_SE this is Bansal et al.'s S_WC = S_SE * P_SE / P_WC (rounded down)
  when attention is excluded and both models write the same number of tokens."""
  out = {}
  for name, cost in sample_flops.items():
    if cost <= 0:
      raise ValueError(f"model {name!r}: FLOPs per sample must be > 0, got {cost}")
    out[name] = int(budget_flops) // int(cost)
  return out
