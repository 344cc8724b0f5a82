"""Self-improvement for length generalisation (Lee et al. 2025), NoPE models.

  python experiments/self_improve.py --config=configs/self_improve.py          # 2 CPU cores, ~21 min
  python experiments/self_improve.py --config=configs/self_improve.py:paper    # reverse addition, paper size
  python experiments/self_improve.py --config=configs/self_improve.py:tiny     # seconds, for tests
  python experiments/pod_compile.py --config=configs/self_improve.py:pod --topology=v5e-8 \
      --windows= --only=prefill,decode,logprob,policy_update   # `:paper`'s steps for a one-host TPU

The paper: 6 layers, d=384, NoPE, reverse addition trained on 1..10 digits (1..16 in other runs),
one digit more per round, 3-5 models voting at 70 %. The official code's recipe is the default
here: unpadded operands (`task.padded=False`, `{a[::-1]}+{b[::-1]}=`), half of every batch from
the newest round's labels (`mixture="newest"`, `newest_frac=0.5`), 5 models voting at 0.7 (4 of
5 must agree). The earlier choices stay as options: `task.padded=True` (reverse addition only),
`self_improve.mixture="pool"` (labels of all rounds drawn uniformly, at most `pool_frac` of a
batch), `self_improve.num_models=3` (with 0.7, unanimity). Scale: the official runs label 20,000
problems and train 500 steps a round; the default here labels 192 and trains 100 (about 1/100
and 1/5).

Default here: the scaled-down run for 2 CPU cores: 5 NoPE models of d=64, 4 layers on the second
task, reverse copy, trained on 1..8 digits, then 6 rounds (held-out 32 problems per length
1..14). Reverse addition is not learnt in round 0 at this budget: the same model, 1,200 steps on
unpadded 1..8-digit sums, scores 9 % on 1-digit sums and 0 % on longer ones
(experiments/results/self_improve/round0_reverse_add.md). `:paper` is reverse addition at the paper's
model size (for an accelerator). See tlt_jax/curriculum/self_improve.py for every key.
"""

from __future__ import annotations

import os

import ml_collections


def pod_config() -> ml_collections.ConfigDict:
  """`:paper`'s steps as a run config for experiments/pod_compile.py (configs/default.py's keys):
  the paper's NoPE model, labelling = greedy decoding of reverse additions up to 60 digits
  (prompts <= 122 characters, answers <= 61 digits + EOS; the decode step costs the same at any
  temperature, and RL configs need one > 0), and a training step of 256 rows (the
  round's SFT batch; compiled as the policy update, the same forward and backward at that shape).
  No drafter and no speculative decoding (the self-improvement loop has none)."""
  from tlt_jax.cli import config_of
  paper = get_config("paper")
  c = config_of(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))
  c.stages = "sft,rl"
  c.model.update(dict(paper.model))
  c.task = ml_collections.ConfigDict(dict(name="reverse_add", min_digits=1,
                                          max_digits=int(paper.self_improve.eval_max_digits)))
  c.rollout.update(dict(max_new_tokens=64, max_prompt_len=127, temperature=1.0, buckets=(256,),
                        spec_threshold=0))
  c.eval.update(dict(max_new_tokens=64, batch_size=256))
  c.rl.update(dict(prompts_per_step=128, group_size=2, track_kl=False, pack=False, length_bucket=64,
                   lr=float(paper.sft.lr)))
  c.tlt.update(dict(speculative=False, train_drafter=False, rollout_groups=1, single_group="off"))
  return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg == "pod":
    return pod_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = ml_collections.ConfigDict(dict(name="reverse_copy"))  # or "reverse_add"
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0,  # 0: from the tokenizer
      hidden_size=64, intermediate_size=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=0,
      rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=False, tie_word_embeddings=True,
      max_position_embeddings=256, position_embedding="none",
      param_dtype="float32", dtype="float32",
  ))
  c.self_improve = ml_collections.ConfigDict(dict(
      num_models=5,            # k: the ensemble (seeds seed .. seed+k-1); the official vote uses 5
      initial_digits=8,        # round 0 trains on 1..initial_digits
      rounds=6,                # self-improvement rounds after round 0
      digits_per_round=1,      # new lengths per round (the paper: 1)
      fast=False,              # widen the next range while held-out accuracy >= fast_accuracy
      fast_accuracy=0.99,
      fast_max_width=4,
      problems_per_round=192,  # problems labelled per round
      label_slack=2,           # tokens a label may run past its expected length + EOS
      filter="length+vote",    # "none" | "length" | "length+vote"
      vote_threshold=0.7,      # share of the k models that must agree (the paper: 0.7)
      mixture="newest",        # "newest": newest_frac of each batch from the newest round's labels (official);
                               # "pool": all rounds' labels uniformly, at most pool_frac of a batch
      newest_frac=0.5,
      pool_frac=0.5,           # "pool" only: the cap on the pool's share
      initial_size=2000,       # older labels are mixed with the initial data as if that were this many problems
      eval_max_digits=14,      # held-out sets of 1..eval_max_digits digits
      eval_per_digit=32,
      reach_accuracy=0.9,      # "reach": every length up to n at >= this mean accuracy
  ))
  c.sft = ml_collections.ConfigDict(dict(
      batch_size=32, lr=1e-3, weight_decay=0.0, grad_clip=1.0, schedule="wsd", decay_frac=0.2,
      warmup_steps=100, round0_steps=1200, round_steps=100,
      round_lr=5e-4, round_decay_frac=0.5,  # each round's WSD phase: peak LR (0: lr) and cooldown share
  ))
  if arg == "paper":  # reverse addition at the paper's model size (an accelerator's run)
    c.task.name = "reverse_add"
    c.model.update(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=6, num_kv_heads=6,
                   max_position_embeddings=512)
    c.self_improve.update(num_models=5, initial_digits=10, rounds=30, problems_per_round=20000,
                          eval_max_digits=60, eval_per_digit=100)
    c.sft.update(batch_size=256, lr=5e-4, warmup_steps=500, round0_steps=10000, round_steps=500)
  elif arg == "tiny":  # a few seconds a round: tests and the notebook's test run
    c.task.name = "reverse_add"
    c.model.update(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=2,
                   max_position_embeddings=64)
    c.self_improve.update(num_models=3, initial_digits=3, rounds=2, problems_per_round=24,
                          eval_max_digits=6, eval_per_digit=8)
    c.sft.update(batch_size=16, warmup_steps=2, round0_steps=12, round_steps=4)
  elif arg:
    raise ValueError(f"configs/self_improve.py:{arg}: unknown argument; allowed: '', 'paper', 'pod' or 'tiny'")
  return c
