"""Qwen2.5-1.5B-Instruct on GSM8K with TLT, on one accelerator host: one 80 GB GPU, or one TPU
v5e-8 / v4-8 / v6e-8 VM.

Prepare (once, on a machine with internet; docs/real_models.md):
  huggingface-cli download Qwen/Qwen2.5-1.5B-Instruct --local-dir /data/qwen2.5-1.5b-instruct
  huggingface-cli download openai/gsm8k --repo-type dataset --local-dir /data/gsm8k_raw
  python scripts/prepare_data.py gsm8k --train /data/gsm8k_raw/main/train-00000-of-00001.parquet \
      --test /data/gsm8k_raw/main/test-00000-of-00001.parquet --out /data/gsm8k

Run (`:arg` picks the host):
  python -m tlt_jax.main --config=configs/qwen2_5_1_5b_instruct_gsm8k.py:gpu-80gb --workdir=/data/runs/q15
  python -m tlt_jax.main --config=configs/qwen2_5_1_5b_instruct_gsm8k.py:v5e-8 --workdir=/data/runs/q15

Paths are overridable: --config.init_from=... --config.tokenizer=... --config.task.path=...

Prompts are the checkpoint's own chat format (tokenizer_config.json's chat template) over the
verl-style rows prepare_data.py writes, whose user turn already ends with GSM8K's customary
instruction "Let's think step by step and output the final answer after "####"."; a response
ends at `<|im_end|>`, and the `####` answer is checked against reward_model.ground_truth.

Check a TPU variant before launching (no TPU needed; `pip install -e ".[tpu]"`): every step
compiled for the host, per-chip memory against HBM:
  python experiments/pod_compile.py --config=configs/qwen2_5_1_5b_instruct_gsm8k.py:v5e-8 --topology=v5e-8
and the GPU variant's memory estimate:
  python experiments/pod_compile.py --config=configs/qwen2_5_1_5b_instruct_gsm8k.py:gpu-80gb --gpu_gib=80

Lengths: prompts of at most 1,023 tokens (+ BOS slot: a 1,024-token prompt width), responses up
to 4,096 tokens, packed update rows and drafter buffer rows of 5,120 tokens. Stages: the
drafter's warm-up on the instruct policy's own features (no SFT), then GRPO with speculative
rollout tails and the drafter trained in the bubbles.
"""

import os

from tlt_jax.cli import config_of


def _default():
  return config_of(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


# Qwen2.5-1.5B-Instruct's architecture (its config.json): used when init_from is not on this
# machine (to compile the steps ahead of time, or to estimate memory); a run takes it from init_from.
QWEN2_5_1_5B = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_layers=28,
                    num_heads=12, num_kv_heads=2, head_dim=0, rope_theta=1000000.0, rms_norm_eps=1e-6,
                    qkv_bias=True, tie_word_embeddings=True, max_position_embeddings=32768)

# Per host: mesh (data, fsdp, tensor), rollout groups (slices of the data axis), prompts per RL
# step, decode buckets (the largest is the rows one group decodes: prompts * 8 / groups).
# Qwen2.5-1.5B has 2 KV heads, so a tensor axis of at most 2 keeps each chip one whole KV head.
VARIANTS = {
    # One 80 GB GPU (H100 / A100-80GB): one group decodes the whole batch; the drafter trains
    # between policy updates (one group leaves no idle bubble to train it in).
    "gpu-80gb": dict(mesh=(1, 1, 1), groups=1, prompts=16, buckets=(1, 2, 4, 8, 16, 32, 64, 128),
                     spec_threshold=8),
    # v5e-8: 8 chips x 16 GiB; 2 groups of 4 chips (fsdp 2 x tensor 2), 128 rows each.
    "v5e-8": dict(mesh=(2, 2, 2), groups=2, prompts=32, buckets=(1, 4, 16, 64, 128), spec_threshold=4),
    # v4-8: 4 chips (megacore) x 32 GiB; 2 groups of 2 chips (tensor 2), 128 rows each.
    "v4-8": dict(mesh=(2, 1, 2), groups=2, prompts=32, buckets=(1, 4, 16, 64, 128), spec_threshold=4),
    # v6e-8: 8 chips x 32 GiB; 4 groups of 2 chips (tensor 2), 64 rows each.
    "v6e-8": dict(mesh=(4, 1, 2), groups=4, prompts=32, buckets=(1, 4, 16, 64), spec_threshold=4),
}
GROUP_SIZE = 8


def get_config(arg: str = "gpu-80gb"):
  """Qwen2.5-1.5B-Instruct GRPO + TLT on GSM8K; `arg` picks the host: "gpu-80gb" (default),
  "v5e-8", "v4-8" or "v6e-8"."""
  arg = arg or "gpu-80gb"
  if arg not in VARIANTS:
    raise ValueError(f"configs/qwen2_5_1_5b_instruct_gsm8k.py:{arg}: unknown argument {arg!r}; allowed: "
                     f"{sorted(VARIANTS)}")
  v = VARIANTS[arg]
  c = _default()
  c.stages = "drafter,rl"  # start from the instruct model; warm the drafter up, then RL
  c.init_from = "/data/qwen2.5-1.5b-instruct"  # the architecture comes from its config.json
  c.tokenizer = "/data/qwen2.5-1.5b-instruct"  # tokenizer.json + tokenizer_config.json (chat template)
  c.task = type(c.task)(dict(name="verl", path="/data/gsm8k/train.parquet", prompt_format="chat"))
  c.model.update(QWEN2_5_1_5B)
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  # Execution: one scanned layer body, each layer rematerialised, packed rows attended with
  # splash on TPU / query chunks of 1,024 elsewhere.
  c.model.scan_layers = True
  c.model.remat = "full"
  c.model.attention = "auto"
  c.model.attention_chunk = 1024
  c.mesh.shape = v["mesh"]
  c.tlt.rollout_groups = v["groups"]
  c.sft.steps = 0
  c.rollout.max_prompt_len = 1023
  c.rollout.max_new_tokens = 4096
  c.rollout.chunk_size = 64
  c.rollout.window_block = 1024
  c.rollout.buckets = v["buckets"]
  c.rollout.spec_threshold = v["spec_threshold"]
  c.eval.max_new_tokens = 1024
  c.rl.prompts_per_step = v["prompts"]
  c.rl.group_size = GROUP_SIZE
  c.rl.pack_len = 5120
  c.rl.length_bucket = 128
  # One 5,120-token packed row per batch shard per micro-batch.
  batch_shards = v["mesh"][0] * v["mesh"][1]
  c.rl.micro_batches = max(1, v["prompts"] * GROUP_SIZE // batch_shards)
  c.rl.lr = 1e-6
  c.rl.eval_size = 0
  c.rl.sample_eval_every = 0
  c.tlt.buffer_seq_len = 5120
  c.tlt.buffer_dtype = "bfloat16"
  c.tlt.buffer_bytes = 8 * 1024 ** 3  # host memory for the drafter's buffer: 8 GiB
  c.tlt.buffer_capacity = 2048
  c.tlt.checkpoint_buffer = False
  if v["groups"] == 1:
    c.tlt.single_group = "between_steps"
  return c
