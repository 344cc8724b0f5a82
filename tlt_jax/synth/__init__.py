"""Compute-optimal synthetic data (Bansal et al. 2024, "Smaller, Weaker, Yet Better: Training LLM
Reasoners via Compute-Optimal Sampling").

At a fixed sampling budget in FLOPs, a weaker, cheaper (WC) model draws P_SE / P_WC times as many
solutions per problem as a stronger, more expensive (SE) one. This package:

  flops.py     FLOPs of a forward pass per token and per sampled sequence, from a ModelConfig
               (attention included or not), and the compute-matched sample counts;
  sampling.py  samples per problem through the rollout engine, each checked step by step
               (`Task.check_trace`) and costed in FLOPs; the answer-filtered SFT dataset (JSONL
               with provenance) and its loader;
  metrics.py   coverage@k, diversity@k and the false-positive rate (exact when the task checks
               every step), at one k and as curves over k.
"""

from tlt_jax.synth.flops import (attention_flops_per_token, dense_flops_per_token, matched_sample_counts,
                                 sequence_flops)
from tlt_jax.synth.metrics import (coverage_at_k, data_metrics, diversity_at_k, false_positive_rate,
                                   metric_curves, metric_curves_of)
from tlt_jax.synth.sampling import (Sample, filter_correct, read_sft_examples, read_samples, sample_solutions,
                                    write_jsonl)

__all__ = ["attention_flops_per_token", "dense_flops_per_token", "matched_sample_counts", "sequence_flops",
           "coverage_at_k", "data_metrics", "diversity_at_k", "false_positive_rate", "metric_curves",
           "metric_curves_of", "Sample",
           "filter_correct", "read_sft_examples", "read_samples", "sample_solutions", "write_jsonl"]
