"""A real instruct checkpoint end to end, small: a Qwen2-architecture checkpoint in HF layout
(config.json, model.safetensors, a byte-level BPE tokenizer.json, tokenizer_config.json carrying
the Qwen2.5-Instruct chat template; tests/fixtures/hf/qwen2_chat_tiny, made with transformers by
scripts/make_chat_fixtures.py), a GSM8K-style parquet (question/answer) and a verl-style parquet
(prompt messages, reward_model.ground_truth, data_source), through `python -m tlt_jax.main`:

  * SFT on the chat format, drafter warm-up, GRPO (stages sft,drafter,rl) on the GSM8K-style file;
  * drafter warm-up, GRPO (stages drafter,rl) on the verl-style file, gsm8k and MATH rows mixed;

each to an RL checkpoint. The RL policy is exported back to HF layout (scripts/export_hf.py) and
checked: the same tensor names, shapes and dtypes as transformers' own files, parameters equal
to the orbax checkpoint's, logits equal to the restored policy's; the starting checkpoint's
logits match transformers' golden logits. (Loaded in transformers itself, the exported policy's
logits agreed to 1e-5 when this test was written; torch is not a dependency, so the suite checks
the chain above.)
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors.numpy

from scripts import export_hf
from tests.numerics import assert_close
from tlt_jax.data import get_task, load_tokenizer, prepare
from tlt_jax.data.chat import configure_prompts
from tlt_jax.models import hf
from tlt_jax.rl.rewards import get_reward

ROOT = pathlib.Path(__file__).resolve().parents[1]
CKPT = ROOT / "tests" / "fixtures" / "hf" / "qwen2_chat_tiny"
INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."

CONFIG = '''
import importlib.util, os
def get_config(arg=""):
  spec = importlib.util.spec_from_file_location("tlt_default", {default!r})
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("tiny")
  c.init_from = c.tokenizer = {ckpt!r}
  if arg == "verl":
    c.task = type(c.task)(dict(name="verl", path={verl!r}))
    c.stages = "drafter,rl"
  else:
    c.task = type(c.task)(dict(name="gsm8k", path={gsm8k!r}, instruction={instruction!r}))
    c.stages = "sft,drafter,rl"
  c.sft.update(steps=3, batch_size=4, max_len=256, warmup_steps=1, eval_every=0, eval_size=4)
  c.drafter.update(warmup_steps=2)
  c.rollout.max_new_tokens = 16
  c.eval.max_new_tokens = 16
  c.rl.update(steps=2, sample_eval_every=0)
  return c
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("real_model")
  gsm8k = [{"question": f"Tom has {a} apples and buys {b} more. How many apples does he have?",
            "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a, b in ((3, 4), (5, 2), (7, 1), (2, 2), (6, 3), (1, 8))]
  pq.write_table(pa.Table.from_pylist(gsm8k), d / "gsm8k.parquet")
  math = [{"problem": f"What is ${a} \\times {b}$?", "solution": f"${a} \\times {b} = \\boxed{{{a * b}}}$",
           "level": "Level 1", "type": "Prealgebra"} for a, b in ((2, 3), (4, 2), (3, 3))]
  rows = prepare.convert("gsm8k", gsm8k[:3], "train") + prepare.convert("math", math, "train")
  prepare.write_parquet(rows, str(d / "verl.parquet"))
  shutil.copytree(CKPT, d / "ckpt")
  (d / "config.py").write_text(CONFIG.format(default=str(ROOT / "configs" / "default.py"), ckpt=str(d / "ckpt"),
                                             verl=str(d / "verl.parquet"), gsm8k=str(d / "gsm8k.parquet"),
                                             instruction=INSTRUCTION))
  return d


def _run(data, workdir, arg=""):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # the main job picks its device count, as on the command line
  cmd = [sys.executable, "-m", "tlt_jax.main", f"--workdir={workdir}", f"--config={data / 'config.py'}:{arg}"]
  proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
  with open(workdir / "metrics.jsonl") as f:
    return [json.loads(line) for line in f if line.strip()]


def _check_export(workdir, out):
  """The RL policy exported to HF layout: transformers' file layout, the checkpoint's parameters,
  the restored policy's logits; the tokenizer files carry the chat template."""
  export_hf.export(str(workdir), str(out))
  reference = safetensors.numpy.load_file(CKPT / "model.safetensors")
  exported = safetensors.numpy.load_file(out / "model.safetensors")
  assert {k: (v.shape, v.dtype) for k, v in exported.items()} == {k: (v.shape, v.dtype) for k, v in reference.items()}
  with open(CKPT / "config.json") as f, open(out / "config.json") as g:
    theirs, ours = json.load(f), json.load(g)
  for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings", "rms_norm_eps"):
    assert ours[key] == theirs[key], key
  step, params = export_hf.restore_policy_params(str(workdir))
  assert step == 2
  embed = exported["model.embed_tokens.weight"]
  np.testing.assert_array_equal(embed, np.asarray(params["embed_tokens"]))
  assert np.abs(embed - reference["model.embed_tokens.weight"]).max() > 0  # it trained
  tokens = np.load(CKPT / "golden.npz")["tokens"]
  _, policy, _ = export_hf.load_policy(str(workdir))
  reloaded = hf.from_pretrained(out)
  np.testing.assert_array_equal(np.asarray(reloaded(jnp.asarray(tokens))[0]),
                                np.asarray(policy(jnp.asarray(tokens))[0]))
  tok = load_tokenizer(str(out))
  assert tok.chat_template is not None and tok.eos_id == tok.encode("<|im_end|>")[0]


def test_start_checkpoint_matches_transformers():
  golden = np.load(CKPT / "golden.npz")
  model = hf.from_pretrained(CKPT)
  assert model.cfg.architecture == "Qwen2ForCausalLM" and model.cfg.qkv_bias
  assert_close(model(jnp.asarray(golden["tokens"]))[0], golden["logits"])
  tok = load_tokenizer(str(CKPT))
  assert tok.chat_template is not None and tok.bos_id is None


def test_rewards_from_markers(data):
  """The verifier reward reads `####` for the gsm8k rows and `\\boxed{}` for the MATH rows."""
  task = get_task("verl", path=str(data / "verl.parquet"))
  configure_prompts(task, load_tokenizer(str(CKPT)))
  reward = get_reward("verifier")
  gsm, math = task.example_from_record(task.records[0], 0), task.example_from_record(task.records[3], 3)
  assert (gsm.answer, math.answer) == ("7", "6")
  responses = ["3 + 4 = 7\n#### 7", "#### 8", "\\boxed{7}", "3 + 4 = 7"]
  np.testing.assert_array_equal(reward(responses, [True] * 4, [8] * 4, gsm, task), [1, 0, 1, 0])
  np.testing.assert_array_equal(reward(responses, [False, True, True, True], [8] * 4, gsm, task), [0, 0, 1, 0])
  responses = ["2 x 3 = \\boxed{6}", "#### 6", "\\boxed{5}\n#### 6", "\\boxed{6}"]
  np.testing.assert_array_equal(reward(responses, [True, True, True, False], [8] * 4, math, task), [1, 1, 0, 0])


@pytest.mark.slow
def test_chat_sft_drafter_rl_and_export(data, tmp_path):
  workdir = tmp_path / "run"
  records = _run(data, workdir)
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["loss"]) and 0 <= r["reward_mean"] <= 1 for r in records)
  assert os.path.isdir(workdir / "ckpt_rl" / "2")
  # The SFT stage trained on chat prompts and left its policy in HF layout with the template.
  sft_tok = load_tokenizer(str(workdir / "sft"))
  assert sft_tok.chat_template is not None and sft_tok.eos_id == sft_tok.encode("<|im_end|>")[0]
  # RL rolled out the chat-rendered prompts: the prompt width holds the longest of them.
  tok = load_tokenizer(str(CKPT))
  task = get_task("gsm8k", path=str(data / "gsm8k.parquet"), instruction=INSTRUCTION)
  configure_prompts(task, tok)
  longest = max(len(tok.encode(task.example_from_record(r, i).prompt)) for i, r in enumerate(task.records))
  with open(workdir / "traces.jsonl") as f:
    assert json.loads(f.readline())["prompt_width"] >= longest > 60
  _check_export(workdir, tmp_path / "hf")


@pytest.mark.slow
def test_verl_drafter_rl(data, tmp_path):
  workdir = tmp_path / "run"
  records = _run(data, workdir, "verl")
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["loss"]) and r["rollouts_total"] > 0 for r in records)
  assert not os.path.exists(workdir / "sft") and os.path.isdir(workdir / "ckpt_rl" / "2")
