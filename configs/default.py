"""The embedded default: a tiny deep-and-narrow policy on chain-of-thought reversed addition.

Runs end to end on 2 CPU cores in minutes:
  python -m tlt_jax.main --config=configs/default.py --workdir=runs/default
Override any key: --config.sft.steps=100 --config.model.num_layers=4
"""

import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "sft"  # comma-separated subset, in order, of: sft, drafter, rl

  # Policy: 8 layers at d=128 so that one drafter layer costs about 1/8 of a target step.
  c.model = ml_collections.ConfigDict(dict(
      vocab_size=0,  # 0: take it from the tokenizer
      hidden_size=128, intermediate_size=384, num_layers=8, num_heads=4, num_kv_heads=2,
      head_dim=0, rope_theta=10000.0, rms_norm_eps=1e-6, qkv_bias=False,
      tie_word_embeddings=True, max_position_embeddings=256,
      param_dtype="float32", dtype="float32",
  ))
  c.init_from = ""  # an HF checkpoint dir (config.json + *.safetensors) to start from

  c.tokenizer = "char"  # "char" (the task's charset) or a tokenizer.json path / dir
  c.task = ml_collections.ConfigDict(dict(name="arith", max_digits=8, alpha=1.5, p_recheck=0.5))

  # Mesh ('data', 'fsdp', 'tensor'); -1 fills the remaining devices.
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))

  c.sft = ml_collections.ConfigDict(dict(
      # 32 packed rows of 160 tokens (~110 examples) per step; ~1 s/step on 2 CPU cores.
      steps=300, batch_size=32, max_len=160, lr=3e-3, schedule="wsd", warmup_steps=30,
      decay_frac=0.2, weight_decay=0.01, max_grad_norm=1.0, micro_batches=1,
      eval_every=300, eval_size=256, log_every=25,
  ))
  c.eval = ml_collections.ConfigDict(dict(max_new_tokens=112, batch_size=256, chunk_size=16))

  c.checkpoint = ml_collections.ConfigDict(dict(every=100, max_to_keep=3))

  if arg:
    raise ValueError(f"configs/default.py takes no argument, got {arg!r}")
  return c
