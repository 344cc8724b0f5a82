"""Writes tiny HuggingFace checkpoints and their golden logits for tests/test_hf.py.

Not run in CI: the fixtures are committed. It needs torch + transformers, kept out of the main
venv. To regenerate (CPU only, a few seconds):

  python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy   # exactly 2.13.0:
                                                        # a local CPU wheel; plain `torch` pulls CUDA
  /tmp/hfvenv/bin/python scripts/make_golden_fixtures.py  # from the repository root

It writes, under tests/fixtures/hf/:
  qwen2_tiny/  Qwen2ForCausalLM: tied embeddings, q/k/v bias, GQA; one model.safetensors.
  llama_tiny/  LlamaForCausalLM: untied lm_head, Llama-3 RoPE scaling, GQA, head_dim != hidden /
               heads; sharded (model-0000i-of-0000n.safetensors + model.safetensors.index.json).
Each directory also holds golden.npz: `tokens` int32 [2, 12] and HF's float32 `logits` [2, 12, V].

All weights are float32 and redrawn from a fixed seed at a scale that gives O(1) logits (HF's own
init has zero biases and unit norms, which would not test their mapping). Total size < 1 MB.
"""

from __future__ import annotations

import math
import pathlib
import shutil

import numpy as np
import torch
import transformers

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "hf"
SEED = 0
BATCH, LENGTH = 2, 12


def _randomize(model: torch.nn.Module, seed: int) -> None:
  """Redraws every parameter: linear weights N(0, 1/in), embeddings N(0, 0.5^2),
  norm weights 1 + N(0, 0.1^2), biases N(0, 0.1^2)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif name.endswith(".bias"):
        p.copy_(0.1 * noise)
      elif "embed_tokens" in name:
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise / math.sqrt(p.shape[1]))


def _write(name: str, config: transformers.PretrainedConfig, model_cls, *, max_shard_size=None) -> None:
  out = ROOT / name
  shutil.rmtree(out, ignore_errors=True)
  torch.manual_seed(SEED)
  config._attn_implementation = "eager"
  model = model_cls(config).to(torch.float32).eval()
  _randomize(model, SEED)
  if config.tie_word_embeddings:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
  model.save_pretrained(out, **kwargs)
  rng = np.random.default_rng(SEED)
  tokens = rng.integers(0, config.vocab_size, size=(BATCH, LENGTH)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  np.savez(out / "golden.npz", tokens=tokens, logits=logits)
  files = sorted(out.iterdir())
  print(f"{name}: {sum(f.stat().st_size for f in files)} bytes, files {[f.name for f in files]}, "
        f"logits std {logits.std():.3f}")


def main():
  torch.set_default_dtype(torch.float32)
  _write("qwen2_tiny", transformers.Qwen2Config(
      vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
      rope_theta=10000.0, tie_word_embeddings=True, use_sliding_window=False),
      transformers.Qwen2ForCausalLM)
  # head_dim 16 with hidden 48 (q_proj is 48 -> 64); Llama-3 scaling with a short original context
  # so that the kept (wavelength < 8), interpolated and scaled (> 32) bands all occur.
  _write("llama_tiny", transformers.LlamaConfig(
      vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
      transformers.LlamaForCausalLM, max_shard_size="100KB")
  total = sum(f.stat().st_size for f in ROOT.rglob("*") if f.is_file())
  print(f"total {total} bytes")
  assert total < 1_000_000, total


if __name__ == "__main__":
  main()
