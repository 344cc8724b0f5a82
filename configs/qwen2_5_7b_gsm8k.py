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
"""

import importlib.util
import os


def _default():
  spec = importlib.util.spec_from_file_location("tlt_default_config",
                                                os.path.join(os.path.dirname(__file__), "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(arg: str = ""):
  c = _default()
  c.stages = "drafter,rl"  # start from the instruct model; warm the drafter up, then RL
  c.init_from = "/data/qwen2.5-7b"  # the architecture comes from its config.json
  c.tokenizer = "/data/qwen2.5-7b"  # tokenizer.json beside it
  c.task = type(c.task)(dict(name="gsm8k", path="/data/gsm8k/train.jsonl"))
  c.model.param_dtype = "bfloat16"
  c.model.dtype = "bfloat16"
  # 32 chips: 4-way data (rollout groups come from it), 8-way FSDP for the update.
  c.mesh.shape = (4, 8, 1)
  c.sft.steps = 0
  if arg:
    raise ValueError(f"configs/qwen2_5_7b_gsm8k.py takes no argument, got {arg!r}")
  return c
