"""configs/qwen2_5_1_5b_instruct_gsm8k.py: every host variant is a valid run config (chat prompts
over verl-style data, drafter warm-up then RL), and the one-GPU memory estimate of
experiments/pod_compile.py counts Qwen2.5-1.5B's parameters exactly and fits 80 GB."""

import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from tlt_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "qwen2_5_1_5b_instruct_gsm8k.py"


def _module():
  spec = importlib.util.spec_from_file_location("qwen15_config", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("arg", ["gpu-80gb", "v5e-8", "v4-8", "v6e-8"])
def test_variants_finalize(arg, tmp_path):
  from tests.test_chat import _verl_rows, _write_verl
  c = _module().get_config(arg)
  c.task.path = _write_verl(tmp_path / "train.parquet", _verl_rows()[:2])
  final = config_lib.finalize(c)
  assert final.stages == "drafter,rl" and final.task.prompt_format == "chat"
  assert final.rollout.max_prompt_len >= 1023 and final.rollout.max_new_tokens >= 4096
  data, fsdp, tensor = final.mesh.shape
  assert data % final.tlt.rollout_groups == 0 and final.model.num_kv_heads % tensor == 0
  rows = final.rl.prompts_per_step * final.rl.group_size // final.tlt.rollout_groups
  assert max(final.rollout.buckets) == rows  # the largest bucket is what one group decodes


def test_unknown_variant():
  with pytest.raises(ValueError, match=r"unknown argument 'v9-8'; allowed: \['gpu-80gb', 'v4-8', 'v5e-8', 'v6e-8'\]"):
    _module().get_config("v9-8")


def _estimate(tmp_path, gib):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "experiments/pod_compile.py", f"--config={CONFIG}:gpu-80gb",
                         f"--gpu_gib={gib}", f"--out={tmp_path}"], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def test_gpu_memory_estimate(tmp_path):
  proc = _estimate(tmp_path, 80)
  assert proc.returncode == 0, proc.stderr[-2000:]
  text = (tmp_path / "qwen2_5_1_5b_instruct_gsm8k_gpu-80gb.md").read_text()
  # Qwen2.5-1.5B: 1.54 B parameters, 1.31 B without the (tied) embedding.
  params = float(text.split("| persistent | policy params |")[1].split("|")[1].split(" B params")[0])
  assert 1.54 <= params <= 1.55 and 1.30 <= params - 151936 * 1536 / 1e9 <= 1.32
  # KV cache: 128 rows x 5,136 slots x 28 layers x K and V x 2 KV heads x 128 x 2 bytes.
  assert f"| rollout | KV cache | {128 * 5136 * 28 * 2 * 2 * 128 * 2 / 2 ** 30:.2f} |" in text
  peak = float(text.split("| **peak** | | **")[1].split(" /")[0])
  assert 20 < peak < 80 and "| fits |" in text
  assert _estimate(tmp_path, 24).returncode == 1  # below the peak: exit 1, one line naming it
