"""PRIME: RLOO with implicit process rewards from an online PRM, on the default task, from the
default SFT policy (Cui et al., 2025, "Process Reinforcement through Implicit Rewards").

  python -m tlt_jax.main --config=configs/prime.py --workdir=runs/prime

The default job (configs/default.py: SFT, drafter warm-up, RL) with the RL stage changed to:
  - advantages: rloo_returns, RLOO on each source (outcome at the last token; the PRM's token
    rewards against the other responses' mean), returns with gamma = 1, summed, whitened;
  - rl.token_rewards.prime: the implicit PRM r_t = beta * log pi_psi / pi_ref, pi_psi started
    from the SFT policy and trained online on the verifier's labels (prime.*), pi_ref = SFT;
    prime.process_norm = "batch_norm" (the official default): the token rewards divided by the
    batch's largest |process return-to-go|, so the process and the 0/1 outcome returns have the
    same size; rl.advantage_kwargs.process_coef / outcome_coef weigh them (the official run's
    reward_dpo_coef = reward_gt_coef = 5: equal weights, and only the ratio survives whitening);
    rl.advantage = "grpo_returns" or "reinforce_returns" swap the group baseline;
  - the online prompt filter: groups with accuracy in rl.accuracy_band = [0.2, 0.8], refilled
    from fresh prompts for up to rl.dynamic_sampling_rounds extra rounds;
  - PPO-clip, the verifier as the outcome reward (no format bonus), no KL penalty.
`configs/prime.py:tiny` is the seconds-scale variant of configs/default.py:tiny;
`configs/prime.py:small` the scale of experiments/prime.py (a 4-layer d=64 policy, up to
4-digit sums, 8 prompts x 8 responses per step).

`configs/prime.py:qwen2_5_1_5b` is the paper-scale recipe on a real instruct model through the HF
path: Qwen2.5-1.5B-Instruct (init_from a local HF checkpoint directory), GSM8K (or MATH with
--config.task.name=math --config.task.path=...), the policy and the PRM sharded over one host's
chips (mesh (1, -1, 1): every chip on the fsdp axis):

  huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --local-dir /data/qwen2.5-1.5b-instruct
  python -m tlt_jax.main --config=configs/prime.py:qwen2_5_1_5b --workdir=/data/runs/prime_qwen1_5b \
      [--config.init_from=DIR --config.tokenizer=DIR --config.task.path=/data/gsm8k/train.jsonl]
  python experiments/pod_compile.py --config=configs/prime.py:qwen2_5_1_5b --topology=v5e-8
"""

import os

import ml_collections

from tlt_jax.cli import config_of

SIZES = ("", "tiny", "small", "qwen2_5_1_5b")

# Qwen2.5-1.5B-Instruct's architecture (its config.json): used when init_from is not on this
# machine (e.g. to compile the steps ahead of time); a run takes it from init_from.
QWEN2_5_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                    num_heads=12, num_kv_heads=2, head_dim=0, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    qkv_bias=True, tie_word_embeddings=True, max_position_embeddings=32768)


def _default_config(arg: str) -> ml_collections.ConfigDict:
  return config_of(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"), arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in SIZES:
    raise ValueError(f"configs/prime.py:{arg}: unknown argument {arg!r}; allowed: {SIZES[1:]} "
                     "(or none, for the default)")
  c = _default_config(arg if arg == "tiny" else "")
  c.rl.update(advantage="rloo_returns", accuracy_band=(0.2, 0.8), dynamic_sampling_rounds=3)
  c.rl.rewards.update(verifier=1.0, format=0.0, length_penalty=0.0)
  c.rl.advantage_kwargs = ml_collections.ConfigDict(dict(outcome_coef=1.0, process_coef=1.0, whiten=True))
  c.rl.token_rewards.prime = 1.0
  # The implicit PRM. beta as in the paper (0.05); its LR is far above the paper's 1e-6 for a
  # 7B model: this policy is ~1.6M parameters. "after": score, then update (the paper's order).
  c.prime = ml_collections.ConfigDict(dict(beta=0.05, lr=1e-4, update_order="after",
                                           max_grad_norm=1.0, weight_decay=0.0, process_norm="batch_norm"))
  if arg == "small":  # experiments/prime.py's scale on a shared 2-core CPU (a 4-layer d=64 policy)
    c.model.update(num_layers=4, hidden_size=64, intermediate_size=192, max_position_embeddings=128)
    c.task.max_digits = 4
    c.sft.update(steps=200, batch_size=16, max_len=128, warmup_steps=20, eval_every=200, eval_size=128,
                 log_every=50)
    c.eval.max_new_tokens = 64
    c.rollout.update(max_new_tokens=64, buckets=(4, 8, 16, 32, 64, 128))  # 128: a held-out half
    # RL prompts of every difficulty (1-4 digits): on >= 2 digits this policy's sampled accuracy
    # is ~0.03 (greedy 0.52 over all), and groups in the filter's band [0.2, 0.8] are rare.
    # rl.lr 1.5e-4: at the default 5e-5 this policy barely moves in 20 steps, at 5e-4 outcome-only
    # RLOO collapsed it (held-out 0.39 -> 0.25, shorter responses). The PRM's LR twice the
    # policy's, as in the paper (5e-7 / 1e-6).
    c.rl.update(prompts_per_step=8, group_size=8, sample_eval_size=128, dynamic_sampling_rounds=2, steps=20,
                min_difficulty=1, lr=1.5e-4)
    c.prime.lr = 3e-4
  if arg == "qwen2_5_1_5b":
    qwen_variant(c)
  return c


def qwen_variant(c: ml_collections.ConfigDict) -> None:
  """The paper's recipe at a real model's scale (see the module docstring), in place."""
  c.stages = "rl"  # the instruct model is the SFT policy, the PRM's start and the reference
  c.init_from = "/data/qwen2.5-1.5b-instruct"  # the architecture comes from its config.json
  c.tokenizer = "/data/qwen2.5-1.5b-instruct"
  c.task = type(c.task)(dict(name="gsm8k", path="/data/gsm8k/train.jsonl"))
  c.model.update(QWEN2_5_1_5B)
  c.model.update(param_dtype="bfloat16", dtype="bfloat16", scan_layers=True, remat="full",
                 attention="auto", attention_chunk=1024)
  c.mesh.shape = (1, -1, 1)  # one host: every chip on the fsdp axis, one rollout group
  c.tlt.rollout_groups = 1
  c.tlt.speculative = False
  c.tlt.train_drafter = False
  c.sft.steps = 0
  c.rollout.update(max_prompt_len=511, max_new_tokens=2048, chunk_size=64, window_block=512,
                   buckets=(1, 2, 4, 8, 16, 32, 64))
  c.eval.max_new_tokens = 1024
  # The paper: 256 prompts x 4 responses, policy LR 5e-7, PRM LR 1e-6, accuracy band [0.2, 0.8].
  c.rl.update(prompts_per_step=64, group_size=4, micro_batches=16, pack_len=2560, length_bucket=128,
              lr=5e-7, eval_size=0, sample_eval_every=0, steps=200)
  c.prime.update(lr=1e-6, beta=0.05)
