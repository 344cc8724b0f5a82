"""Qwen2.5-7B-Instruct on GSM8K with TLT, for a TPU pod (e.g. v5p-64: 32 chips, 8 hosts).

Prepare (once, on a machine with internet):
  huggingface-cli download Qwen/Qwen2.5-7B-Instruct --local-dir /data/qwen2.5-7b   # config.json,
      model-0000x-of-00004.safetensors, model.safetensors.index.json, tokenizer.json
  GSM8K train split as JSONL with {"question", "answer"} records -> /data/gsm8k/train.jsonl

Launch: the same command on every host of the pod slice (jax.distributed initialises itself
from the TPU environment; each host loads only its shards of every tensor):
  gcloud compute tpus tpu-vm ssh $TPU --worker=all --command="cd tlt_jax && \
    python -m tlt_jax.main --config=configs/qwen2_5_7b_gsm8k.py --workdir=/data/runs/qwen7b_gsm8k"

Paths are overridable: --config.init_from=... --config.task.path=... --config.tokenizer=...

Check before launching (no TPU needed; `pip install -e .[tpu]`): every step compiled for the
slice, per-chip memory against HBM and the compiler's estimated times:
  python experiments/pod_compile.py --config=configs/qwen2_5_7b_gsm8k.py --topology=v5p-64
  python experiments/pod_compile.py --config=configs/qwen2_5_7b_gsm8k.py:v6e-64 --topology=v6e-64

Lengths come from here, never from the model's 32k context: prompts of at most 1,023 tokens
(+ BOS: a 1,024-token prompt width), responses up to 8,192 tokens, packed update rows and drafter
buffer rows of 9,216 tokens.

`:long32k` (v5p-64) and `:long32k-v5p-128`: the TLT paper's released 7B workload
(github.com/mit-han-lab/fastrl examples/grpo_7B.sh): 64 prompts x 8 responses, prompts <= 1,024
tokens, responses <= 32,768, speculation at <= 32 active rows with a verify-token ladder (more
verified tokens at small batches: tlt.arm_ladder), a reduced draft vocabulary of 32,768 ids,
packed update rows and drafter buffer rows of 33,792 tokens (32K + 1K).
"""

import os

from tlt_jax.cli import config_of


def _default():
  return config_of(os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py"))


# Qwen2.5-7B-Instruct's architecture (its config.json): used when init_from is not on this
# machine (e.g. to compile the steps ahead of time); a run takes it from init_from.
QWEN2_5_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
                  num_heads=28, num_kv_heads=4, head_dim=0, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  qkv_bias=True, tie_word_embeddings=False, max_position_embeddings=32768)
# Topology variants: (mesh (data, fsdp, tensor), rollout groups). Rollout groups are the data
# axis; each group decodes tensor-parallel over its 'tensor' chips with the batch over 'fsdp'.
VARIANTS = {
    "": ((4, 2, 4), 4),  # v5p-64: 32 chips, 8 per group (two hosts per group)
    "v5p-64": ((4, 2, 4), 4),
    "v6e-64": ((8, 2, 4), 8),  # v6e-64: 64 chips, 8 per group
}


LONG = {"long32k": VARIANTS["v5p-64"], "long32k-v5p-128": ((8, 2, 4), 8)}  # v5p-128: 64 chips


def _long32k(c) -> None:
  """The 32K-response regime (module docstring)."""
  c.rollout.max_new_tokens = 32768
  c.rollout.buckets = (1, 2, 4, 8, 16, 32, 64, 128)
  c.rollout.spec_threshold = 32
  c.rl.prompts_per_step = 64
  c.rl.micro_batches = 64  # one 33,792-token row per batch shard per micro-batch
  c.rl.pack_len = 33792
  c.tlt.buffer_seq_len = 33792
  # verify 12 / 8 / 4 / 3 tokens from 1 / 3 / 9 / 17 active rows; plain in every bucket
  c.tlt.strategies = ("d6k2n12", "d4k2n8", "d4k1n4", "d3k1n3", "plain")
  c.tlt.arm_ladder = (1, 3, 9, 17)
  c.tlt.draft_vocab_size = 32768


def get_config(arg: str = ""):
  """Qwen2.5-7B GRPO on GSM8K; `arg` picks the slice: "" or "v5p-64" (default), "v6e-64", and the
  32K-response regime: "long32k" (v5p-64), "long32k-v5p-128"."""
  if arg not in VARIANTS and arg not in LONG:
    raise ValueError(f"configs/qwen2_5_7b_gsm8k.py:{arg}: unknown argument {arg!r}; allowed: "
                     f"{sorted(k for k in list(VARIANTS) + list(LONG) if k)} (or none, for v5p-64)")
  c = _default()
  c.stages = "drafter,rl"  # start from the instruct model; warm the drafter up, then RL
  c.init_from = "/data/qwen2.5-7b"  # the architecture comes from its config.json
  c.tokenizer = "/data/qwen2.5-7b"  # tokenizer.json beside it
  c.task = type(c.task)(dict(name="gsm8k", path="/data/gsm8k/train.jsonl"))
  c.model.update(QWEN2_5_7B)
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  # Execution: one scanned layer body, each layer rematerialised (only its input kept), packed
  # rows attended with splash on TPU (no [L, L] mask), query chunks of 1,024 elsewhere.
  c.model.scan_layers = True
  c.model.remat = "full"
  c.model.attention = "auto"
  c.model.attention_chunk = 1024
  mesh, groups = VARIANTS[arg] if arg in VARIANTS else LONG[arg]
  c.mesh.shape = mesh
  c.tlt.rollout_groups = groups
  c.sft.steps = 0
  # Lengths (see the module docstring).
  c.rollout.max_prompt_len = 1023
  c.rollout.max_new_tokens = 8192
  c.rollout.chunk_size = 64
  c.rollout.window_block = 1024  # decode attends to the live part of the cache, 1k-slot granules
  c.rollout.buckets = (1, 2, 4, 8, 16, 32, 64)
  c.rollout.spec_threshold = 8  # memory-bound chips: the tail below 8 rows is decoded speculatively
  c.eval.max_new_tokens = 1024
  c.rl.prompts_per_step = 32
  c.rl.group_size = 8
  c.rl.micro_batches = 32  # one 9,216-token row per batch shard per micro-batch
  c.rl.pack_len = 9216
  c.rl.length_bucket = 128
  c.rl.lr = 1e-6
  c.rl.eval_size = 0
  c.rl.sample_eval_every = 0
  c.tlt.buffer_seq_len = 9216
  c.tlt.buffer_dtype = "bfloat16"
  c.tlt.buffer_bytes = 16 * 1024 ** 3  # 16 GiB of host memory per process: 248 rows of 66 MB
  c.tlt.buffer_capacity = 4096
  c.tlt.checkpoint_buffer = False  # refilled by the next rollouts after a restart
  if arg in LONG:
    _long32k(c)
  return c
