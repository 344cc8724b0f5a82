"""Compute-optimal synthetic data (Bansal et al. 2024): a weak-cheap (WC), a strong-expensive (SE)
and a student policy on the default chain-of-thought addition, and the experiment's settings.

The three base policies are SFT'd on gold traces of every first-operand length in 1..6 digits but
one, `task.skip_digits` = (5,): no policy ever sees a gold solution of a 5-digit problem. The
experiment samples solutions to 5-digit problems (`synth.min_digits..max_digits`), where the bases
are partly right by generalising their chain of thought from the lengths around it, fine-tunes the
bases on the answer-filtered samples, and evaluates on held-out 5-digit problems. Three disjoint
5-digit problem sets: sampling (`problem_seed`), validation (`val_seed`: every design choice
below) and the held-out evaluation (`eval_seed`: the reported numbers only).

  configs/synth.py[:<role>]        role: se (default), wc or student; `model` is that policy
  configs/synth.py:tiny[,<role>]   a minute-scale version (gold on 1 and 3 digits, sampled on 2)

  python -m tlt_jax.main --config=configs/synth.py:wc --workdir=runs/synth_wc   # one policy alone
  python experiments/compute_optimal.py --config=configs/synth.py               # the experiment
  python experiments/compute_optimal.py --select                                # the fine-tuning grid
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


def _per_role(se, wc, student) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(se=se, wc=wc, student=student))


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
  # Gold traces: P(n digits) ∝ n^-1 on 1..6, never 5 digits (the sampled and evaluated length).
  c.task = ml_collections.ConfigDict(dict(name="arith", max_digits=6, alpha=1.0, p_recheck=0.5,
                                          skip_digits=(5,)))
  c.model.update(max_position_embeddings=160)
  c.tlt.update(rollout_groups=1, speculative=False, train_drafter=False)
  # eval_every=0: the experiment evaluates the policies itself (one compiled sampler per model).
  c.sft.update(steps=300, batch_size=16, max_len=160, lr=3e-3, warmup_steps=20, eval_every=0,
               eval_size=64, log_every=50)
  c.eval.update(max_new_tokens=128, batch_size=256)
  c.rollout.update(max_new_tokens=128, temperature=1.0, spec_threshold=0)
  c.synth = ml_collections.ConfigDict(dict(
      # Base policies (layers, width, MLP width; 4 heads over 2 KV heads). SE and WC have the same
      # depth, SE wider: 471k vs 149k parameters with the 21-token char vocabulary, 3.05x WC's FLOPs
      # per sample with attention (flops.py), like Gemma2-27B vs 9B. Their SFT steps were calibrated
      # on the validation set (64 five-digit problems, val_seed; greedy accuracy, and accuracy per
      # sample over 8 samples at T = 1, the sampling temperature) towards the paper's regime, SE about
      # 1.3x as accurate per sample at 3x the cost:
      #   SE 300 steps: greedy 0.391, per sample 0.186; 800 steps: 0.328, 0.240
      #   WC 300 steps: 0.000, -; 400: 0.141, 0.047; 475: 0.328, 0.164; 550: 0.281, 0.291
      # SE 800 / WC 475 gives 1.46 per sample (1.00 greedy), the nearest to 1.3 with SE ahead per
      # sample. A gold range of 1..4 digits instead leaves SE at 0.000 on 5 digits (no length
      # extrapolation with RoPE), hence the held-out length inside the range. The student (100k,
      # 2 layers, 800 steps): greedy 0.219, per sample 0.062 (64 samples), weaker than WC as in the
      # paper's distillation setting.
      models=_per_role(_model(3, 112, 352), _model(3, 64, 192), _model(2, 64, 192)),
      base_steps=_per_role(800, 475, 800),
      base_lr=_per_role(1.5e-3, 3e-3, 3e-3),
      # The sampled and evaluated length (outside the gold lengths: a config error otherwise), and
      # the three disjoint problem sets.
      min_digits=5, max_digits=5, problems=128, problem_seed=101,
      val_problems=64, val_seed=303,
      eval_problems=128, eval_seed=202, eval_samples=2,  # greedy accuracy and pass@eval_samples
      # Budgets: SE samples per problem; WC gets the same FLOPs (flops.matched_sample_counts).
      budgets=(1, 4), temperature=1.0, include_attention=True,
      # SFT on each filtered dataset: per role, the same steps x packed tokens for both sources.
      # LR and steps per role: the best mean validation accuracy over the two sources in the grid
      # below (experiments/results/compute_optimal/compute_optimal_select.md): SE 1e-4 x 30 steps
      # (0.906, tied with 3e-4 x 30), WC 1e-4 x 30 (0.680), student 1e-4 x 90 (0.695). 1e-4 is the
      # grid's lowest LR and 30 its fewest steps for SE and WC.
      finetune=ml_collections.ConfigDict(dict(batch_size=16, max_len=160, warmup_steps=3,
                                              lr=_per_role(1e-4, 1e-4, 1e-4), steps=_per_role(30, 30, 90))),
      # The grid `--select` fine-tunes each role on (seed 0, the largest budget, both sources) and
      # scores on the validation set: the evidence for `finetune.lr` / `finetune.steps` above.
      select=ml_collections.ConfigDict(dict(lrs=(1e-4, 3e-4, 1e-3, 3e-3), steps=(30, 90))),
      seeds=(0, 1, 2),
      compact_rollouts=True,  # rollout batches compact into smaller buckets (off: one shape, fewer compiles)
  ))
  if tiny:
    c.synth.models = _per_role(_model(2, 48, 128), _model(1, 32, 96), _model(1, 16, 48, heads=2, kv_heads=1))
    c.synth.base_steps = _per_role(150, 150, 100)
    c.synth.base_lr = _per_role(1e-2, 1e-2, 1e-2)
    c.task.update(max_digits=3, alpha=1.0, skip_digits=(2,))
    c.synth.update(min_digits=2, max_digits=2, problems=8, val_problems=8, eval_problems=8, eval_samples=2,
                   budgets=(1, 2), seeds=(0,), compact_rollouts=False)
    c.eval.batch_size = 32  # with compact_rollouts off, every rollout batch has this many rows
    c.synth.finetune.update(batch_size=4, max_len=96, warmup_steps=1, steps=_per_role(4, 4, 4),
                            lr=_per_role(1e-3, 1e-3, 1e-3))
    c.synth.select.update(lrs=(1e-3, 3e-3), steps=(2,))
    c.sft.update(batch_size=8, max_len=96, warmup_steps=10, eval_size=8, log_every=50)
    c.model.max_position_embeddings = 96
    c.eval.max_new_tokens = 64
    c.rollout.max_new_tokens = 64
  c.model.update(c.synth.models[role])
  c.sft.steps = c.synth.base_steps[role]
  c.sft.lr = c.synth.base_lr[role]
  return c
