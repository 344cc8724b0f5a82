"""Times greedy decoding by a peer implementation (HF transformers or Tunix) on a HF Llama checkpoint.

What it measures: for each batch size B, the wall time of one whole greedy generation (prefill of B
prompts of `prompt_len` random token ids plus exactly `new_tokens` new tokens, no EOS stopping),
best of `repeats` timed runs after one untimed warm-up run (which includes any compilation).
It prints one JSON line per batch to stdout (`tok_s` = B * new_tokens / best_s, and a SHA-1 of the
int32 [B, new_tokens] generated tokens, so two implementations can be checked for agreement) and
what it set up to stderr.

  /tmp/peer/bin/python scripts/peer_decode_bench.py --impl {hf,tunix} --ckpt DIR \
      --batches 1,8,64 --prompt_len 16 --new_tokens 128 --repeats 3 [--threads N]

DIR holds config.json + *.safetensors (as `tlt_jax.models.hf.save_pretrained` writes). The script
never imports tlt_jax: it runs in a side virtualenv (torch, transformers, google-tunix with its own
jax) and is kept out of the project's runtime dependencies on purpose.

Tunix notes (google-tunix 0.1.7): the model is `tunix.models.llama3.model.Llama3`, loaded with Tunix's
own `llama3.params.create_model_from_safe_tensors`, sampled by `tunix.generate.sampler.Sampler`,
which takes strings through a tokenizer, so a trivial tokenizer maps "12 7 3" <-> [12, 7, 3]. Pad and
EOS are -1, an id the model never emits (a generated token equal to the pad id would be masked out of
later attention). Tunix 0.1.7's Llama3 attention calls `apply_rope` without `rope_theta`, i.e. always
with theta 1e6 whatever the config says; unless --stock_rope, this script rebinds that module
function to use config.json's rope_theta so the tokens can be compared with HF's (speed is unchanged).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import pathlib
import sys
import time

import numpy as np


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def setup_hf(args, cfg):
  """Returns (generate(prompts [B,P] int32) -> tokens [B,N], version)."""
  import torch
  import transformers
  if args.threads:
    torch.set_num_threads(args.threads)
  model = transformers.LlamaForCausalLM.from_pretrained(args.ckpt, dtype=torch.float32).eval()
  gc = model.generation_config
  gc.eos_token_id = None  # never stop early (a random model may emit the config's EOS id)
  gc.bos_token_id = None
  log(f"hf: transformers {transformers.__version__}, torch {torch.__version__}, "
      f"threads {torch.get_num_threads()}, generation_config {gc.to_diff_dict()}")

  def generate(prompts):
    ids = torch.from_numpy(prompts.astype(np.int64))
    with torch.inference_mode():
      out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                           min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                           pad_token_id=0)
    return out[:, prompts.shape[1]:].numpy()

  return generate, transformers.__version__


class IdTokenizer:
  """The smallest tokenizer Tunix's Sampler accepts: whitespace-separated decimal token ids."""

  def encode(self, text, **_):
    return [int(t) for t in text.split()]

  def decode(self, ids, **_):
    return " ".join(map(str, ids))

  def bos_id(self):
    return None  # no BOS is prepended

  def eos_id(self):
    return -1

  def pad_id(self):
    return -1


def setup_tunix(args, cfg):
  """Returns (generate(prompts [B,P] int32) -> tokens [B,N], version)."""
  import functools

  import jax
  import jax.numpy as jnp
  from tunix.generate import sampler as sampler_lib
  from tunix.models.llama3 import model as llama3
  from tunix.models.llama3 import params as llama3_params

  if args.threads:
    log("tunix: --threads is ignored (XLA:CPU picks its own thread pool)")
  rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default" or cfg.get("attention_bias") or cfg.get("mlp_bias"):
    log(f"tunix: WARNING Tunix's Llama3 has no rope scaling/biases; config has {rope}, "
        f"attention_bias={cfg.get('attention_bias')}: tokens will not match HF")
  theta = float(cfg.get("rope_theta") or rope.get("rope_theta", 10000.0))
  heads = cfg["num_attention_heads"]
  mcfg = llama3.ModelConfig(
      num_layers=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"], embed_dim=cfg["hidden_size"],
      hidden_dim=cfg["intermediate_size"], num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads", heads),
      head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, rope_theta=theta,
      norm_eps=cfg["rms_norm_eps"], weight_tying=bool(cfg.get("tie_word_embeddings", False)))
  if not args.stock_rope:
    llama3.apply_rope = functools.partial(llama3.apply_rope, rope_theta=theta)
  model = llama3_params.create_model_from_safe_tensors(args.ckpt, mcfg, dtype=jnp.float32)
  cache_size = args.prompt_len + args.new_tokens  # Sampler requires prompt + steps <= cache_size
  sampler = sampler_lib.Sampler(model, IdTokenizer(), sampler_lib.CacheConfig(
      cache_size=cache_size, num_layers=mcfg.num_layers, num_kv_heads=mcfg.num_kv_heads,
      head_dim=mcfg.head_dim))
  version = importlib.metadata.version("google-tunix")
  arch = {k: v for k, v in vars(mcfg).items() if k not in ("shd_config", "remat_config")}
  log(f"tunix: google-tunix {version}, jax {jax.__version__} on {jax.devices()}, Llama3 {arch}, "
      f"rope_theta used {'1e6 (stock)' if args.stock_rope else theta}, cache_size {cache_size}")

  def generate(prompts):
    out = sampler([" ".join(map(str, row)) for row in prompts], max_generation_steps=args.new_tokens,
                  max_prompt_length=prompts.shape[1], eos_tokens=[-1], temperature=0.0, echo=False)
    return np.stack([np.asarray(t) for t in out.tokens])

  return generate, version


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--impl", choices=("hf", "tunix"), required=True)
  p.add_argument("--ckpt", required=True, help="HF checkpoint dir: config.json + model.safetensors")
  p.add_argument("--batches", default="1,8,64")
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=128)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (hf only)")
  p.add_argument("--stock_rope", action="store_true", help="tunix: keep its hard-coded rope theta 1e6")
  p.add_argument("--save_tokens", default="", help="write the tokens to PREFIX_b{B}.npy")
  args = p.parse_args()

  cfg = json.loads((pathlib.Path(args.ckpt) / "config.json").read_text())
  generate, version = (setup_hf if args.impl == "hf" else setup_tunix)(args, cfg)
  log(f"{args.impl}: ckpt {args.ckpt} ({cfg.get('architectures')}, vocab {cfg['vocab_size']}), "
      f"prompt_len {args.prompt_len}, new_tokens {args.new_tokens}, repeats {args.repeats}")
  for batch in (int(b) for b in args.batches.split(",")):
    prompts = np.random.RandomState(0).randint(1, cfg["vocab_size"], (batch, args.prompt_len))
    prompts = prompts.astype(np.int32)
    t0 = time.perf_counter()
    tokens = generate(prompts)  # warm-up, includes compilation
    log(f"{args.impl}: batch {batch} warm-up {time.perf_counter() - t0:.3f}s")
    times = []
    for _ in range(args.repeats):
      t0 = time.perf_counter()
      tokens = generate(prompts)
      times.append(time.perf_counter() - t0)
    tokens = np.ascontiguousarray(tokens, dtype=np.int32)
    assert tokens.shape == (batch, args.new_tokens), tokens.shape
    if args.save_tokens:
      np.save(f"{args.save_tokens}_b{batch}.npy", tokens)
    best = min(times)
    print(json.dumps({
        "impl": args.impl, "batch": batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "best_s": round(best, 6),
        "tok_s": round(batch * args.new_tokens / best, 2),
        "tokens_sha": hashlib.sha1(tokens.tobytes()).hexdigest(),
        "first_tokens": tokens[0, :8].tolist(), "tokens": tokens.tolist(), "version": version}), flush=True)


if __name__ == "__main__":
  main()
