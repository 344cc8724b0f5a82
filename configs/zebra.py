"""ZebraLogic logic-grid puzzles for the tiny policy: SFT on solver traces, then GRPO.

The default config (configs/default.py) with the `zebra` task in its compact rendering, a longer
context for the traces (a 4x3 puzzle with its deduction is ~200 characters), no speculative
decoding, and a `zebra` section for experiments/zebra_scaling.py (evaluation across sizes with
best-of-N and majority-of-N).

  python -m tlt_jax.main --config=configs/zebra.py --workdir=runs/zebra
  python experiments/zebra_scaling.py --config=configs/zebra.py --config.rl.steps=20
  configs/zebra.py:quick   a smaller, shorter run (the Colab notebook)
"""

import os

import ml_collections

from tlt_jax.cli import config_of


def _default_config() -> ml_collections.ConfigDict:
  return config_of(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


ARGS = ("", "quick")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in ARGS:
    raise ValueError(f"configs/zebra.py: argument {arg!r} is not allowed; allowed: {ARGS}")
  c = _default_config()
  c.stages = "sft,rl"
  # Small grids: 2..3 houses x 2..3 attributes (search space 4 .. 216: the small bucket).
  # Z3's conflict count is left out of training examples (evaluation sets compute it).
  c.task = ml_collections.ConfigDict(dict(name="zebra", min_houses=2, max_houses=3, min_attributes=2,
                                          max_attributes=3, style="compact", z3=False,
                                          recipe="zebralogic"))  # or "halving": zebra/puzzle.py RECIPES
  # 4 layers at d=128; 320 positions hold a 4x4 prompt (<= ~70 tokens) + 224 new tokens (a 3x3
  # deduction trace is <= ~110 characters, 4x4 <= ~190, for the sizes evaluated beyond training).
  c.model.num_layers = 4
  c.model.max_position_embeddings = 320
  c.sft.update(dict(steps=700, batch_size=16, max_len=192, lr=3e-3, warmup_steps=30, eval_every=700,
                    eval_size=128, log_every=50))
  c.eval.update(dict(max_new_tokens=224, batch_size=256))
  c.rollout.update(dict(max_new_tokens=224, temperature=1.0, spec_threshold=0))
  c.tlt.update(dict(speculative=False, train_drafter=False, rollout_groups=1, single_group="off"))
  c.rl.update(dict(steps=30, prompts_per_step=8, group_size=8, lr=1e-4, min_difficulty=2,
                   eval_size=0, sample_eval_every=0, checkpoint_every=100, length_bucket=64))
  c.rl.rewards = ml_collections.ConfigDict(dict(verifier=1.0, format=0.1, length_penalty=0.0,
                                                partial_credit=0.0))
  # experiments/zebra_scaling.py: which RL variants, and the evaluation across sizes.
  c.zebra = ml_collections.ConfigDict(dict(
      variants="grpo",  # RL variants after SFT: "grpo" verifier reward; "grpo_cells" + cell-accuracy reward
      cell_reward_weight=0.5,  # grpo_cells: r = verifier + this * cell accuracy (+ format)
      # Evaluation sizes "NxM": the training range 2..3 x 2..3, and beyond it 2x4, 3x4 (a 4th
      # attribute), 4x2, 4x3 (a 4th house): small, medium (1,296 and 13,824).
      eval_sizes="2x2,2x3,3x2,3x3,2x4,4x2,3x4,4x3",
      eval_per_size=10, eval_seed=1234,
      samples=8,  # samples per puzzle at rollout temperature: best-of-N / majority-of-N, N | samples
      best_of=(1, 4, 8),
  ))
  if arg == "quick":
    c.model.update(dict(num_layers=2, hidden_size=64, intermediate_size=192, max_position_embeddings=256))
    c.task.update(dict(max_houses=3, max_attributes=3))
    c.sft.update(dict(steps=60, batch_size=8, max_len=192, warmup_steps=10, eval_every=60, eval_size=16,
                      log_every=20))
    c.eval.update(dict(max_new_tokens=160))
    c.rollout.update(dict(max_new_tokens=160))
    c.rl.update(dict(steps=2, prompts_per_step=4, group_size=4))
    c.zebra.update(dict(variants="grpo", eval_sizes="2x2,2x3,3x3", eval_per_size=4, samples=4,
                        best_of=(1, 4)))
  return c
