"""Compute-optimal synthetic data (Bansal et al. 2024): a weak-cheap (WC), a strong-expensive (SE)
and a student policy on the default chain-of-thought addition, and the experiment's settings.

The three policies are SFT'd on problems that are mostly short (P(n digits) ∝ n^-1.5 on 1..6:
about 22 % of 3-5 digits), then sample solutions to the longer problems (3-5 digits, disjoint
draws for sampling and for the held-out evaluation) where they are imperfect, so coverage is not
saturated. SE has about 3x the parameters of WC (3.1x), like Gemma2-27B vs 9B; the student is
smaller than both (knowledge distillation).

  configs/synth.py[:<role>]        role: se (default), wc or student; `model` is that policy
  configs/synth.py:tiny[,<role>]   a minute-scale version on 1-3 digit sums (the notebook)

  python -m tlt_jax.main --config=configs/synth.py:wc --workdir=runs/synth_wc   # one policy alone
  python experiments/compute_optimal.py --config=configs/synth.py               # the experiment
"""

import os

import ml_collections

from tlt_jax.cli import config_of

ROLES = ("se", "wc", "student")


def _default_config() -> ml_collections.ConfigDict:
  return config_of(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


def _model(layers: int, hidden: int, ffn: int, heads: int = 4, kv_heads: int = 2) -> dict:
  return dict(num_layers=layers, hidden_size=hidden, intermediate_size=ffn, num_heads=heads,
              num_kv_heads=kv_heads)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  bad = [p for p in parts if p not in ROLES + ("tiny",)]
  roles = [p for p in parts if p in ROLES]
  if bad or len(roles) > 1 or parts.count("tiny") > 1:
    raise ValueError(f"configs/synth.py: argument {arg!r} is not allowed; allowed: one role of {ROLES} "
                     "and/or 'tiny', comma-separated (e.g. 'wc', 'tiny,se')")
  tiny = "tiny" in parts
  role = roles[0] if roles else "se"
  c = _default_config()
  c.stages = "sft"
  c.task = ml_collections.ConfigDict(dict(name="arith", max_digits=6, alpha=1.5, p_recheck=0.5))
  c.model.update(max_position_embeddings=160)
  c.tlt.update(rollout_groups=1, speculative=False, train_drafter=False)
  # eval_every=0: the experiment evaluates the policies itself (one compiled sampler per model).
  c.sft.update(steps=300, batch_size=16, max_len=160, lr=3e-3, warmup_steps=20, eval_every=0,
               eval_size=64, log_every=50)
  c.eval.update(max_new_tokens=128, batch_size=256)
  c.rollout.update(max_new_tokens=128, temperature=1.0, spec_threshold=0)
  c.synth = ml_collections.ConfigDict(dict(
      # Policies (layers, width, MLP width; 4 heads over 2 KV heads): SE and WC of the same depth,
      # SE wider. Parameters with the 21-token char vocabulary: se 470k, wc 149k (SE/WC: 3.15 in
      # parameters and in dense FLOPs per token), student 57k.
      models=ml_collections.ConfigDict(dict(se=_model(3, 112, 352), wc=_model(3, 64, 192),
                                            student=_model(2, 48, 144))),
      # SFT steps and peak learning rate of each policy (`sft.lr` is set from base_lr[role]). The
      # LR is per role, the best of a sweep by held-out greedy accuracy (3-5 digits) after 300 steps:
      # SE 1e-3: 0.59, 1.5e-3: 0.75, 2e-3: 0.71, 3e-3: 0.02 (at WC's LR the wider SE ends in a
      # solution that fits the short sums but not the carries of longer ones); WC 2e-3: 0.06,
      # 3e-3: 0.28, 4e-3: 0.01, 5e-3: 0.02; student 3e-3: 0.00, 6e-3: 0.01.
      base_steps=ml_collections.ConfigDict(dict(se=300, wc=300, student=300)),
      base_lr=ml_collections.ConfigDict(dict(se=1.5e-3, wc=3e-3, student=3e-3)),
      # Problems to sample solutions for, and the fixed held-out evaluation set (disjoint seeds).
      min_digits=3, max_digits=5, problems=128, problem_seed=101,
      eval_problems=128, eval_seed=202, eval_samples=2,  # greedy accuracy and pass@eval_samples
      # Budgets: SE samples per problem; WC gets the same FLOPs (flops.matched_sample_counts).
      budgets=(1, 4), temperature=1.0, include_attention=True,
      # SFT on each filtered dataset: the same steps x packed tokens in every comparison.
      finetune=ml_collections.ConfigDict(dict(steps=30, batch_size=16, max_len=160, lr=1e-3,
                                              warmup_steps=3)),
      seeds=(0, 1),
      compact_rollouts=True,  # rollout batches compact into smaller buckets (off: one shape, fewer compiles)
  ))
  if tiny:
    c.synth.models = ml_collections.ConfigDict(dict(se=_model(2, 48, 128), wc=_model(1, 32, 96),
                                                    student=_model(1, 16, 48, heads=2, kv_heads=1)))
    c.synth.base_steps = ml_collections.ConfigDict(dict(se=150, wc=150, student=100))
    c.synth.base_lr = ml_collections.ConfigDict(dict(se=1e-2, wc=1e-2, student=1e-2))
    c.task.update(max_digits=3, alpha=1.0)
    c.synth.update(min_digits=2, max_digits=3, problems=8, eval_problems=8, eval_samples=2, budgets=(1, 2),
                   seeds=(0,), compact_rollouts=False)
    c.eval.batch_size = 32  # with compact_rollouts off, every rollout batch has this many rows
    c.synth.finetune.update(steps=4, batch_size=4, max_len=96, warmup_steps=1)
    c.sft.update(batch_size=8, max_len=96, warmup_steps=10, eval_size=8, log_every=50)
    c.model.max_position_embeddings = 96
    c.eval.max_new_tokens = 64
    c.rollout.max_new_tokens = 64
  c.model.update(c.synth.models[role])
  c.sft.steps = c.synth.base_steps[role]
  c.sft.lr = c.synth.base_lr[role]
  return c
