"""Efficient reasoning: RL with a length-penalised verifier reward, as its authors ran it.

Arora & Zanette (2025), "Training Language Models to Reason Efficiently". The default job
(configs/default.py: SFT, drafter warm-up, RL) with the RL stage changed to the official run's
optimiser around the reward:

  - rl.rewards.length_penalty = 1 (verifier and format off): r_i = 1[correct_i] (1 - alpha
    sigmoid((len_i - mean) / std)), mean / std over the group's correct responses
    (rl/rewards.py: length_penalty_reward); alpha = rl.reward_kwargs.length_penalty.alpha;
  - advantages: rloo, then whitened over the batch (rl.advantage_kwargs.whiten = True);
  - the loss averaged per sequence (rl.aggregation = "sequence": long answers do not weigh more);
  - k3 KL to the SFT policy with rl.kl_coef = 0.001;
  - RL prompts of every difficulty (1-8 digits, long-tailed: many easy, few hard).

  python -m tlt_jax.main --config=configs/efficient_reasoning.py --workdir=runs/er \
      --config.rl.reward_kwargs.length_penalty.alpha=0.2

`configs/efficient_reasoning.py:small` is the scale of experiments/efficient_reasoning.py on a
shared 2-core CPU (configs/prime.py:small's 4-layer d=64 policy on 1-4 digit sums, 8 prompts x 8
responses, 12 steps); `:tiny` the seconds-scale variant.

`configs/efficient_reasoning.py:r1_distill_qwen_1_5b` is the paper's setting on a real model
through the HF path: DeepSeek-R1-Distill-Qwen-1.5B (init_from a local HF checkpoint directory)
on MATH (or GSM8K with --config.task.name=gsm8k --config.task.path=...), sharded over one
host's chips (mesh (1, -1, 1)):

  huggingface-cli download deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B --local-dir /data/r1-distill-qwen-1.5b
  python -m tlt_jax.main --config=configs/efficient_reasoning.py:r1_distill_qwen_1_5b \
      --workdir=/data/runs/er_r1_1_5b --config.rl.reward_kwargs.length_penalty.alpha=0.2
  python experiments/pod_compile.py --config=configs/efficient_reasoning.py:r1_distill_qwen_1_5b --topology=v5e-8
"""

import os

import ml_collections

from tlt_jax.cli import config_of

SIZES = ("", "tiny", "small", "r1_distill_qwen_1_5b")

# DeepSeek-R1-Distill-Qwen-1.5B's architecture (its config.json, a Qwen2.5-Math-1.5B body): used
# when init_from is not on this machine (e.g. to compile the steps ahead of time).
R1_DISTILL_QWEN_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                            num_heads=12, num_kv_heads=2, head_dim=0, rope_theta=10000.0, rms_norm_eps=1e-6,
                            qkv_bias=True, tie_word_embeddings=False, max_position_embeddings=131072)


def _default_config(arg: str) -> ml_collections.ConfigDict:
  return config_of(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"), arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in SIZES:
    raise ValueError(f"configs/efficient_reasoning.py:{arg}: unknown argument {arg!r}; allowed: "
                     f"{SIZES[1:]} (or none, for the default)")
  c = _default_config(arg if arg == "tiny" else "")
  c.rl.update(advantage="rloo", min_difficulty=1, aggregation="sequence", kl_coef=0.001, track_kl=True)
  c.rl.advantage_kwargs = ml_collections.ConfigDict(dict(whiten=True))
  c.rl.rewards.update(verifier=0.0, format=0.0, length_penalty=1.0)
  c.rl.reward_kwargs.length_penalty.alpha = 0.1
  # 1.5e-4: the largest LR of experiments/efficient_reasoning.py's sweep (3e-5, 1.5e-4) at which
  # the alpha = 0 run keeps its SFT accuracy (experiments/results/efficient_reasoning/REPORT.md).
  c.rl.lr = 1.5e-4
  if arg == "small":  # experiments/efficient_reasoning.py's scale on a shared 2-core CPU
    # configs/prime.py:small's policy and task (a 4-layer d=64 policy, 1-4 digit sums with
    # redundant re-checks in the SFT traces; the same SFT stage), 8 prompts x 8 responses.
    c.model.update(num_layers=4, hidden_size=64, intermediate_size=192, max_position_embeddings=128)
    c.task.max_digits = 4
    c.sft.update(steps=200, batch_size=16, max_len=128, warmup_steps=20, eval_every=200, eval_size=128,
                 log_every=50)
    c.eval.max_new_tokens = 64
    c.rollout.update(max_new_tokens=64, buckets=(4, 8, 16, 32, 64, 128))
    c.rl.update(prompts_per_step=8, group_size=8, steps=12, eval_size=0, sample_eval_every=0)
  if arg == "r1_distill_qwen_1_5b":
    r1_variant(c)
  return c


def r1_variant(c: ml_collections.ConfigDict) -> None:
  """The paper's setting at a real model's scale (see the module docstring), in place."""
  c.stages = "rl"  # the distilled reasoner is the SFT policy and the reference
  c.init_from = "/data/r1-distill-qwen-1.5b"  # the architecture comes from its config.json
  c.tokenizer = "/data/r1-distill-qwen-1.5b"
  c.task = type(c.task)(dict(name="math", path="/data/math/train.jsonl"))
  c.model.update(R1_DISTILL_QWEN_1_5B)
  c.model.update(param_dtype="bfloat16", dtype="bfloat16", scan_layers=True, remat="full",
                 attention="auto", attention_chunk=1024)
  c.mesh.shape = (1, -1, 1)  # one host: every chip on the fsdp axis, one rollout group
  c.tlt.rollout_groups = 1
  c.tlt.speculative = False
  c.tlt.train_drafter = False
  c.sft.steps = 0
  c.rollout.update(max_prompt_len=511, max_new_tokens=4096, chunk_size=64, window_block=1024,
                   buckets=(1, 2, 4, 8, 16, 32, 64))
  c.eval.max_new_tokens = 4096
  # The paper: 8 responses per prompt, LR 1e-6 (7B: 5e-7), KL 0.001, 100-200 steps.
  c.rl.update(prompts_per_step=32, group_size=8, micro_batches=32, pack_len=4608, length_bucket=128,
              lr=1e-6, eval_size=0, sample_eval_every=0, steps=200, min_difficulty=0)
