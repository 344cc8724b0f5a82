"""Bad input, one case at a time: each gets ONE line naming what was wrong (the config key and its
value, or the file) and what is allowed, before any work starts and with nothing written; what can
only fail later names the file and loses nothing.

Most cases run in-process through `run.run` (the main job's own path) on the tiny config, with
every stage replaced by a tripwire: a case that got past the checks would fail loudly instead of
training. A few go through the real command line to check the exit status and that no traceback
is printed. The SIGINT-and-resume cases are in test_resume.py (they share its warm start).
"""

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import ml_collections
import pytest

from experiments.common import load_config
from tlt_jax import config as config_lib
from tlt_jax import run as run_lib
from tlt_jax.data.sources import TaskSource, load_jsonl, load_parquet
from tlt_jax.errors import CheckpointError, ConfigError, DataError, InputError, one_line
from tlt_jax.models import hf

ROOT = pathlib.Path(__file__).resolve().parent.parent
QWEN = ROOT / "tests" / "fixtures" / "hf" / "qwen2_tiny"


@pytest.fixture(autouse=True)
def no_stage_runs(monkeypatch):
  """A case that passes every check would start a stage: make that a failure, not a training run."""

  def tripwire(*args, **kwargs):
    raise AssertionError("the checks let this input through: a stage started")

  for name in ("run_sft_stage", "run_drafter_stage", "run_rl_stage", "load_policy"):
    monkeypatch.setattr(run_lib, name, tripwire)


def tiny_config(**overrides):
  """The tiny default config with `overrides` ({"a.b": v}; new task options allowed)."""
  config = load_config("configs/default.py:tiny")
  with config.unlocked():
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def error_of(tmp_path, workdir=None, **overrides) -> InputError:
  """The InputError `run.run` raises for the tiny config with `overrides`; checks that nothing was
  written to a new workdir."""
  workdir = str(workdir or tmp_path / "run")
  existed = os.path.exists(workdir)
  with pytest.raises(InputError) as info:
    run_lib.run(tiny_config(**overrides), workdir)
  if not existed:
    assert not os.path.exists(workdir), "the workdir was created by a run that failed its checks"
  line = one_line(info.value)
  assert "\n" not in line and "Traceback" not in line
  return info.value


# ----------------------------------------------------------------------------------- config values

CONFIG_CASES = [
    ({"rl.lr": -1.0}, r"config\.rl\.lr=-1\.0 is not allowed; allowed: a float > 0"),
    ({"model.num_kv_heads": 3}, r"config\.model\.num_kv_heads=3 is not allowed; allowed: a divisor of config\.model\.num_heads=4: \[1, 2, 4\]"),
    ({"sft.steps": 2}, r"config\.sft\.warmup_steps=4 is not allowed with config\.sft\.steps=2; allowed: an int in \[0, 2\]"),
    ({"sft.schedule": "step"}, r"config\.sft\.schedule='step' is not allowed; allowed: one of \('constant', 'cosine', 'wsd', 'wsd_sqrt'"),
    ({"rl.schedule": "linear"}, r"config\.rl\.schedule='linear' is not allowed; allowed: one of"),
    ({"rl.warmup_steps": 9}, r"config\.rl\.warmup_steps=9 is not allowed with config\.rl\.steps=4; allowed: an int in \[0, 4\]"),
    ({"task.name": "sudoku"}, r"config\.task\.name='sudoku' is not allowed; allowed: one of \(.*'arith'"),
    ({"task.max_digits": 0}, r"config\.task=.*is not allowed: arith\.max_digits=0 must be an int >= 1"),
    ({"task.colour": "red"}, r"config\.task=.*is not allowed: task 'arith' has no option\(s\) \['colour'\]; allowed: \["),
    ({"data.on_bad_record": "maybe"}, r"config\.data\.on_bad_record='maybe' is not allowed; allowed: one of \('skip', 'error'\)"),
    ({"stages": "sft,ppo"}, r"config\.stages='sft,ppo' is not allowed; allowed: a comma-separated subset"),
    ({"rollout.temperature": 0.0}, r"config\.rollout\.temperature=0\.0 is not allowed with the 'rl' stage; allowed: a float > 0"),
    ({"tlt.strategies": ("d4k1n9",)}, r"'d4k1n9' is not allowed; allowed: num_verify <= depth \* topk"),
    ({"rl.micro_batches": 3}, r"config\.rl\.micro_batches=3 is not allowed; allowed: a divisor of rl\.prompts_per_step \* rl\.group_size = 8"),
    ({"sft.micro_batches": 3}, r"config\.sft\.micro_batches=3 is not allowed; allowed: a divisor of config\.sft\.batch_size=8: \[1, 2, 4, 8\]"),
    ({"mesh.shape": (3, 1, 1)}, r"config\.mesh\.shape=\(3, 1, 1\) is not allowed: mesh shape \(3, 1, 1\) \(product 3\) does not match the 8 available devices"),
    ({"tlt.rollout_groups": 3, "rl.prompts_per_step": 4}, r"config\.tlt\.rollout_groups=3 rollout groups do not divide the mesh's data axis.*allowed: a divisor of 8"),
    ({"rollout.max_new_tokens": 128}, r"config\.rollout\.max_new_tokens=128 is not allowed; allowed: an int < model\.max_position_embeddings=128"),
    ({"model.vocab_size": 5}, r"config\.model\.vocab_size=5 is not allowed with this tokenizer; allowed: 0 \(from the tokenizer\) or >= its vocabulary \(21\)"),
    ({"tlt.buffer_capacity": 4}, r"config\.tlt\.buffer_capacity=4 is not allowed; allowed: an int >= config\.tlt\.drafter_batch_size=8"),
    ({"rl.rewards.checker": 1.0}, r"config\.rl\.rewards\.checker is not allowed: 'checker' is no registered reward; allowed names"),
    ({"rl.pack": False, "rl.micro_batches": 2}, r"config\.rl\.micro_batches=2 is not allowed: a micro-batch of 4 rows .* data \* fsdp = 8 batch shards; allowed: rows a multiple of 8, or rl\.pack=True"),
]


@pytest.mark.parametrize("overrides,pattern", CONFIG_CASES, ids=[",".join(c[0]) for c in CONFIG_CASES])
def test_bad_config_value(tmp_path, overrides, pattern):
  error = error_of(tmp_path, **overrides)
  assert isinstance(error, ConfigError)
  assert re.search(pattern, str(error)), str(error)


# ----------------------------------------------------------------------------------- paths


def test_workdir_that_is_a_file(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("keep me")
  error = error_of(tmp_path, workdir=afile)
  assert f"--workdir='{afile}' is an existing file; allowed: a directory" in str(error)
  assert afile.read_text() == "keep me"


def test_workdir_under_a_file(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("")
  error = error_of(tmp_path, workdir=afile / "sub")
  assert "cannot be written" in str(error) and str(afile) in str(error) and "allowed:" in str(error)


def _checkpoint_copy(tmp_path, name="ckpt"):
  path = tmp_path / name
  shutil.copytree(QWEN, path)
  return path


def _init_from_error(tmp_path, path) -> str:
  error = error_of(tmp_path, init_from=str(path), tokenizer="char")
  assert isinstance(error, ConfigError) and f"config.init_from='{path}' is not usable" in str(error)
  return str(error)


def test_init_from_missing_directory(tmp_path):
  message = _init_from_error(tmp_path, tmp_path / "nope")
  assert "no such checkpoint directory; allowed: a HF checkpoint directory with config.json" in message


def test_init_from_without_config_json(tmp_path):
  path = _checkpoint_copy(tmp_path)
  (path / "config.json").unlink()
  assert "no config.json in" in _init_from_error(tmp_path, path)


def test_init_from_with_broken_config_json(tmp_path):
  path = _checkpoint_copy(tmp_path)
  (path / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"], "hidden_size": 3')
  message = _init_from_error(tmp_path, path)
  assert f"{path / 'config.json'}: config.json is not valid JSON" in message


def test_init_from_with_unsupported_architecture(tmp_path):
  path = _checkpoint_copy(tmp_path)
  cfg = json.loads((path / "config.json").read_text())
  cfg["architectures"] = ["GPT2LMHeadModel"]
  (path / "config.json").write_text(json.dumps(cfg))
  message = _init_from_error(tmp_path, path)
  assert "unsupported architecture ['GPT2LMHeadModel']; allowed: ('LlamaForCausalLM', 'Qwen2ForCausalLM')" in message


def test_init_from_with_garbage_safetensors(tmp_path):
  path = _checkpoint_copy(tmp_path)
  (path / "model.safetensors").write_bytes(b"\xff" * 64)
  message = _init_from_error(tmp_path, path)
  assert f"{path / 'model.safetensors'}: not a safetensors file, or truncated" in message


def test_init_from_with_corrupt_safetensors_header(tmp_path):
  path = _checkpoint_copy(tmp_path)
  data = bytearray((path / "model.safetensors").read_bytes())
  data[10:14] = b"\x01\x02\x03\x04"  # control characters inside the JSON header
  (path / "model.safetensors").write_bytes(bytes(data))
  message = _init_from_error(tmp_path, path)
  assert f"{path / 'model.safetensors'}: corrupt safetensors header (not valid JSON" in message


def test_init_from_with_truncated_safetensors(tmp_path):
  path = _checkpoint_copy(tmp_path)
  data = (path / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(data[:len(data) // 2])
  message = _init_from_error(tmp_path, path)
  assert f"{path / 'model.safetensors'}: truncated or corrupt: tensor" in message and "data bytes" in message


def test_init_from_without_weights(tmp_path):
  path = _checkpoint_copy(tmp_path)
  (path / "model.safetensors").unlink()
  assert "no weights in" in _init_from_error(tmp_path, path)


def test_init_from_index_naming_a_missing_shard(tmp_path):
  path = _checkpoint_copy(tmp_path)
  (path / "model.safetensors.index.json").write_text(json.dumps(
      {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}}))
  assert "lists shard files that do not exist: ['model-00001-of-00002.safetensors']" in _init_from_error(tmp_path, path)


def test_from_pretrained_names_the_file_of_a_corrupt_checkpoint(tmp_path):
  """The same checks guard the library's loader (e.g. a workdir's sft/ policy damaged on disk)."""
  path = _checkpoint_copy(tmp_path)
  data = (path / "model.safetensors").read_bytes()
  (path / "model.safetensors").write_bytes(data[:-100])
  with pytest.raises(CheckpointError, match=rf"{path / 'model.safetensors'}: truncated or corrupt"):
    hf.from_pretrained(path)


def test_tokenizer_path_missing(tmp_path):
  error = error_of(tmp_path, tokenizer=str(tmp_path / "tok.json"))
  assert f"config.tokenizer='{tmp_path / 'tok.json'}' is not usable" in str(error)
  assert "spec must be 'char', a path to tokenizer.json" in str(error)


def test_tokenizer_file_corrupt(tmp_path):
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  error = error_of(tmp_path, tokenizer=str(bad))
  assert f"config.tokenizer='{bad}' is not usable" in str(error)


def test_existing_workdir_config_json_is_not_overwritten(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"the": "first run"}')
  error_of(tmp_path, workdir=workdir, tokenizer=str(tmp_path / "missing.json"))
  assert (workdir / "config.json").read_text() == '{"the": "first run"}'
  assert sorted(os.listdir(workdir)) == ["config.json"]


def test_a_changed_config_keeps_the_earlier_record(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text('{"the": "first run"}')
  run_lib.write_config(tiny_config(), str(workdir))
  assert (workdir / "config.1.json").read_text() == '{"the": "first run"}'
  assert json.loads((workdir / "config.json").read_text())["task"]["name"] == "arith"


# ----------------------------------------------------------------------------------- datasets


def _jsonl(tmp_path, rows, name="data.jsonl") -> str:
  path = tmp_path / name
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _gsm8k(path, **extra):
  return {"task": ml_collections.ConfigDict(dict(name="gsm8k", path=path, **extra)),
          "rl.min_difficulty": 0}


GOOD = {"question": "1+1?", "answer": "one step\n#### 2"}


def test_dataset_file_missing(tmp_path):
  error = error_of(tmp_path, **_gsm8k(str(tmp_path / "none.jsonl")))
  assert f"gsm8k.path='{tmp_path / 'none.jsonl'}': no such file; allowed: a .jsonl/.json or .parquet" in str(error)


def test_dataset_file_empty(tmp_path):
  error = error_of(tmp_path, **_gsm8k(_jsonl(tmp_path, [])))
  assert "holds no usable records (0 lines with text, 0 unusable)" in str(error)
  assert "config.task (task gsm8k" in str(error)


def test_dataset_all_lines_unparsable(tmp_path):
  path = _jsonl(tmp_path, ["{oops", '{"question": 1'])
  error = error_of(tmp_path, **_gsm8k(path))
  assert f"JSONL file '{path}' holds no usable records (2 lines with text, 2 unusable)" in str(error)


def test_dataset_bad_line_with_on_bad_record_error(tmp_path):
  path = _jsonl(tmp_path, [GOOD, "{oops", GOOD])
  error = error_of(tmp_path, **_gsm8k(path), **{"data.on_bad_record": "error"})
  assert f"{path}, line 2: invalid JSON" in str(error)


def test_dataset_bad_lines_are_skipped_and_counted(tmp_path, caplog):
  path = _jsonl(tmp_path, [GOOD, "{oops", {"question": "no answer"}, GOOD])
  with caplog.at_level(logging.WARNING, logger="tlt_jax.data.sources"):
    records = load_jsonl(path, on_bad_record="skip")
  assert len(records) == 2
  assert f"skipped 2 of 4 records of {path}" in caplog.text and "line 2: invalid JSON" in caplog.text
  assert "line 3: no answer field" in caplog.text


def test_dataset_all_below_min_difficulty(tmp_path):
  path = _jsonl(tmp_path, [GOOD] * 3)  # difficulty = 2 solution lines
  error = error_of(tmp_path, **{**_gsm8k(path), "rl.min_difficulty": 5})
  message = str(error)
  assert f"task gsm8k ({path})" in message and "min_difficulty=5" in message
  assert "allowed: a min_difficulty <= 2 (config.rl.min_difficulty)" in message


def test_overlong_prompt_with_on_bad_record_error(tmp_path):
  long_q = {"question": "x" * 200, "answer": "#### 1"}
  path = _jsonl(tmp_path, [long_q] * 3)
  error = error_of(tmp_path, **_gsm8k(path), **{"data.on_bad_record": "error"})
  assert re.search(r"record \d: prompt of 2\d\d tokens \(BOS included\) is over the 80 that fit", str(error))
  assert "model.max_position_embeddings=128 - rollout.max_new_tokens=48" in str(error)


def test_all_prompts_overlong(tmp_path):
  path = _jsonl(tmp_path, [{"question": "y" * 300, "answer": "#### 1"}])
  error = error_of(tmp_path, **_gsm8k(path))
  assert "no usable example in 1000 draws" in str(error) and "1000 were unusable" in str(error)


def test_overlong_prompts_are_skipped_counted_and_skipped_again_on_resume(tmp_path, caplog):
  from tlt_jax.data.batching import prompt_check
  from tlt_jax.data.tasks import get_task
  from tlt_jax.data.tokenizer import CharTokenizer
  path = _jsonl(tmp_path, [GOOD, {"question": "z" * 200, "answer": "#### 1"}])
  task = get_task("gsm8k", path=path)
  check = prompt_check(CharTokenizer(task.charset), context=128, max_new_tokens=48)
  first = TaskSource(task, 50, unusable=check)
  with caplog.at_level(logging.WARNING, logger="tlt_jax.data.sources"):
    drawn = [first[i].prompt for i in range(50)]
  assert all("z" not in p for p in drawn) and first.skipped > 0
  assert re.search(r", record 1: prompt of 2\d\d tokens", caplog.text)
  again = TaskSource(task, 50, unusable=check)  # a resumed run: same draws, same skips
  assert [again[i].prompt for i in range(50)] == drawn and again.skipped == first.skipped


def test_parquet_file_corrupt(tmp_path):
  bad = tmp_path / "data.parquet"
  bad.write_bytes(b"PAR1 not really")
  with pytest.raises(DataError, match=rf"parquet file '{bad}' is unreadable"):
    load_parquet(str(bad))
  error = error_of(tmp_path, **_gsm8k(str(bad)))
  assert f"parquet file '{bad}' is unreadable" in str(error)


# ----------------------------------------------------------------------------------- workdir state


def _broken_workdir(tmp_path):
  """A workdir whose sft/ policy is fine and whose drafter/ checkpoint is garbage."""
  from flax import nnx

  from tlt_jax.models.transformer import Transformer
  from tlt_jax.run import build_setup
  workdir = tmp_path / "run"
  setup = build_setup(load_config("configs/default.py:tiny"), str(workdir))
  hf.save_pretrained(Transformer(setup.model_cfg, rngs=nnx.Rngs(0)), workdir / "sft")
  (workdir / "drafter" / "4" / "state").mkdir(parents=True)
  (workdir / "drafter" / "4" / "state" / "junk").write_bytes(b"\x00garbage")
  return workdir


def test_corrupt_drafter_checkpoint_names_its_directory(tmp_path, monkeypatch):
  workdir = _broken_workdir(tmp_path)
  monkeypatch.setattr(run_lib, "load_policy", lambda setup: hf.from_pretrained(workdir / "sft"))
  before = sorted(p.name for p in workdir.rglob("*"))
  with pytest.raises(CheckpointError) as info:
    run_lib.run(tiny_config(stages="rl"), str(workdir))
  assert f"no checkpoint in {workdir / 'drafter'} could be restored" in str(info.value)
  assert "Refusing to start from scratch" in str(info.value)
  after = sorted(p.name for p in workdir.rglob("*"))
  assert set(before) <= set(after)  # nothing removed


# ----------------------------------------------------------------------------------- the command line


def _main(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "tlt_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def _one_line_error(out, prefix):
  assert out.returncode == 2, out.stderr[-3000:]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  lines = [line for line in out.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(prefix), out.stderr[-3000:]
  return lines[0]


def test_cli_config_file_missing(tmp_path):
  line = _one_line_error(_main("--config=configs/nope.py", f"--workdir={tmp_path / 'w'}"), "config error:")
  assert "--config=configs/nope.py: no such config file 'configs/nope.py'; allowed: a Python file" in line


def test_cli_config_argument_refused(tmp_path):
  line = _one_line_error(_main("--config=configs/default.py:huge", f"--workdir={tmp_path / 'w'}"), "config error:")
  assert "unknown argument 'huge'; allowed: ('tiny',)" in line


def test_cli_workdir_is_a_file(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("")
  line = _one_line_error(_main("--config=configs/default.py:tiny", f"--workdir={afile}"), "config error:")
  assert "is an existing file; allowed: a directory" in line


def test_cli_value_of_the_wrong_type(tmp_path):
  line = _one_line_error(_main("--config.rl.lr=fast", f"--workdir={tmp_path / 'w'}"), "config error:")
  assert "--config.rl.lr=fast" in line and "could not convert string to float" in line


def test_cli_corrupt_checkpoint_in_workdir(tmp_path):
  workdir = _broken_workdir(tmp_path)
  line = _one_line_error(_main("--config=configs/default.py:tiny", "--config.stages=rl", f"--workdir={workdir}"),
                         "checkpoint error:")
  assert f"no checkpoint in {workdir / 'drafter'} could be restored" in line
  assert (workdir / "sft" / "config.json").exists()


def test_experiment_override_of_a_missing_key(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "experiments/e2e_speedup.py", "--config.rl.lrate=1e-4",
                        f"--workdir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
  line = _one_line_error(out, "config error:")
  assert "config.rl has no key 'lrate'; allowed keys of config.rl: [" in line and "'lr'" in line


# ------------------------------------------------------------ over-long SFT and drafter records


def _sft_setup(tmp_path, on_bad_record):
  path = _jsonl(tmp_path, [GOOD, {"question": "x" * 400, "answer": "#### 1"}, GOOD])
  config = tiny_config(**_gsm8k(path), **{"data.on_bad_record": on_bad_record, "stages": "sft,drafter"})
  return path, run_lib.build_setup(config_lib.finalize(config), str(tmp_path / "run"))


def test_overlong_sft_and_drafter_records_are_skipped_and_counted(tmp_path, caplog):
  """The SFT stage's packed rows and the drafter warm-up's rows skip a record longer than their
  row (sft.max_len; the model's context) with a counted warning, as the RL prompts do."""
  from tlt_jax.models.transformer import Transformer
  from flax import nnx
  path, setup = _sft_setup(tmp_path, "skip")
  long_ids = set(setup.tokenizer.encode("x"))
  with caplog.at_level(logging.WARNING, logger="tlt_jax.data.sources"):
    batch = run_lib.sft_batches(setup)(0)
  assert batch["tokens"].shape == (setup.config.sft.batch_size, setup.config.sft.max_len)
  assert batch["segment_ids"].max() > 0 and not long_ids & set(batch["tokens"].ravel().tolist())
  assert re.search(rf"skipped task gsm8k \({re.escape(path)}\), record 1: 4\d\d tokens \(prompt 4\d\d "
                   rf"\+ response \d+\), over sft.max_len={setup.config.sft.max_len} \(1 skipped so far", caplog.text)
  caplog.clear()
  target = Transformer(setup.model_cfg, rngs=nnx.Rngs(0))
  with caplog.at_level(logging.WARNING, logger="tlt_jax.data.sources"):
    pool = next(run_lib.drafter_batches(setup, target))
  assert not long_ids & set(pool["tokens"].ravel().tolist())
  assert "over model.max_position_embeddings=128" in caplog.text


def test_overlong_sft_record_with_on_bad_record_error(tmp_path):
  path, setup = _sft_setup(tmp_path, "error")
  with pytest.raises(DataError) as info:
    for step in range(20):  # some step draws record 1
      run_lib.sft_batches(setup)(step)
  line = one_line(info.value)
  assert "\n" not in line and line.startswith("data error: ")
  assert f"task gsm8k ({path}), record 1: 4" in line and "over sft.max_len=" in line
  assert "data.on_bad_record='error'" in line
