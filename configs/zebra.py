"""ZebraLogic logic-grid puzzles for the tiny policy: SFT on answer grids (or solver traces), then GRPO.

The default config (configs/default.py) with the `zebra` task in its compact rendering and the
answer grid as the SFT target, no speculative decoding, and a `zebra` section for
experiments/zebra_scaling.py (training seeds, evaluation puzzles held out of training, evaluation
across sizes with best-of-N and majority-of-N).

  python -m tlt_jax.main --config=configs/zebra.py --workdir=runs/zebra
  python experiments/zebra_scaling.py --config=configs/zebra.py --config.zebra.seeds=0
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
  # trace="facts": the SFT target is each value's house in the clues' own form
  # ("A:a1@2,a2@1,b1@1,b2@2"). Solver traces ("deduction") teach this policy too slowly for a
  # CPU budget (no valid 2..3 x 2..3 grid after 300 steps); see experiments/results/zebra_scaling.
  c.task = ml_collections.ConfigDict(dict(name="zebra", min_houses=2, max_houses=3, min_attributes=2,
                                          max_attributes=3, style="compact", z3=False,
                                          recipe="zebralogic",  # or "halving": zebra/puzzle.py RECIPES
                                          trace="facts"))  # or "answer", "deduction": tasks/zebra.py
  # 4 layers at d=64 (a step costs about half of d=128's, so twice the steps fit); 128 positions
  # hold a 3x3 prompt (<= ~45 characters) and its 47-character answer.
  c.model.update(dict(num_layers=4, hidden_size=64, intermediate_size=192, max_position_embeddings=128))
  c.sft.update(dict(steps=1200, batch_size=16, max_len=128, lr=3e-3, schedule="cosine", warmup_steps=30,
                    eval_every=1200, eval_size=128, log_every=100))
  c.eval.update(dict(max_new_tokens=64, batch_size=256))
  c.rollout.update(dict(max_new_tokens=64, temperature=1.0, spec_threshold=0))
  c.tlt.update(dict(speculative=False, train_drafter=False, rollout_groups=1, single_group="off"))
  c.rl.update(dict(steps=40, prompts_per_step=16, group_size=8, lr=3e-4, min_difficulty=1,
                   eval_size=0, sample_eval_every=0, checkpoint_every=100, length_bucket=32))
  c.rl.rewards = ml_collections.ConfigDict(dict(verifier=1.0, format=0.1, length_penalty=0.0,
                                                partial_credit=0.0))
  # experiments/zebra_scaling.py: training seeds, RL variants, and the evaluation across sizes.
  c.zebra = ml_collections.ConfigDict(dict(
      seeds="0,1,2",  # training seeds (model init, SFT data, RL prompts), one workdir each
      holdout=True,  # training never draws an evaluation puzzle (same size and clue set)
      variants="grpo",  # RL variants after SFT: "grpo" verifier reward; "grpo_cells" + cell-accuracy reward
      cell_reward_weight=0.5,  # grpo_cells: r = verifier + this * cell accuracy (+ format)
      # Evaluation sizes "NxM": the training range 2..3 x 2..3 (the small bucket, 4 .. 216).
      eval_sizes="2x2,2x3,3x2,3x3",
      eval_per_size=50, eval_seed=1234,
      samples=8,  # samples per puzzle at rollout temperature: best-of-N / majority-of-N, N | samples
      best_of=(1, 4, 8),
  ))
  if arg == "quick":  # the notebook's: solver traces as the target, as it shows them
    c.task.trace = "deduction"
    c.model.update(dict(num_layers=2, max_position_embeddings=256))
    c.sft.update(dict(steps=60, batch_size=8, max_len=192, warmup_steps=10, eval_every=60, eval_size=16,
                      log_every=20))
    c.eval.update(dict(max_new_tokens=160))
    c.rollout.update(dict(max_new_tokens=160))
    c.rl.update(dict(steps=2, prompts_per_step=4, group_size=4))
    c.zebra.update(dict(seeds="0", variants="grpo", eval_sizes="2x2,2x3,3x3", eval_per_size=4, samples=4,
                        best_of=(1, 4)))
  return c
