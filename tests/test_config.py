"""Config validation: every bad key or value is refused early, naming the key, the value and what
is allowed; unknown override keys and bad meshes get clear errors too."""

import importlib.util
import os
import subprocess
import sys

import ml_collections
import pytest

from tlt_jax import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def default_config() -> ml_collections.ConfigDict:
  spec = importlib.util.spec_from_file_location("default_config", os.path.join(ROOT, "configs", "default.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_default_config_is_valid_and_runs_every_stage():
  c = default_config()
  config_lib.validate(c)
  assert config_lib.stages(c) == ["sft", "drafter", "rl"]
  assert set(config_lib.STAGES) == {"sft", "drafter", "rl"}
  frozen = config_lib.finalize(default_config())
  assert isinstance(frozen, ml_collections.FrozenConfigDict)


def _set(c, path, value):
  node = c
  *parents, last = path.split(".")
  for p in parents:
    node = node[p]
  node[last] = value


@pytest.mark.parametrize("path,value,pattern", [
    ("rl.lr", -1.0, r"config\.rl\.lr=-1\.0 is not allowed; allowed: a float > 0"),
    ("rl.steps", -1, r"config\.rl\.steps=-1 is not allowed; allowed: an int >= 0"),
    ("rl.group_size", 1, r"config\.rl\.group_size=1 is not allowed; allowed: an int >= 2"),
    ("rl.aggregation", "batch", r"config\.rl\.aggregation='batch' is not allowed; allowed: one of \('token', 'sequence'\)"),
    ("rl.advantage", "ppo", r"config\.rl\.advantage='ppo' is not allowed; allowed: one of \('dr_grpo', 'grpo', 'grpo_returns', 'reinforce_returns', 'rloo', 'rloo_returns'\)"),
    ("rl.schedule", "step", r"config\.rl\.schedule='step' is not allowed; allowed: one of \('constant', 'cosine', 'wsd'"),
    ("rl.clip_eps", 1.5, r"config\.rl\.clip_eps=1\.5 is not allowed; allowed: a float in \(0, 1\)"),
    ("rl.micro_batches", 3, r"config\.rl\.micro_batches=3 is not allowed; allowed: a divisor of rl\.prompts_per_step \* rl\.group_size = 128"),
    ("rl.rewards.verifier", float("nan"), r"config\.rl\.rewards\.verifier=nan is not allowed; allowed: a finite float"),
    ("rl.rewards.checker", 1.0, r"config\.rl\.rewards\.checker is not allowed: 'checker' is no registered reward; allowed names: \("),
    ("rl.reward_kwargs.length_penalty.beta", 1.0, r"config\.rl\.reward_kwargs\.length_penalty=\{'alpha': 0\.1, 'beta': 1\.0\} is not allowed: reward 'length_penalty': bad arguments"),
    ("rollout.top_p", 0.0, r"config\.rollout\.top_p=0\.0 is not allowed; allowed: a float in \(0, 1\]"),
    ("rollout.top_k", -1, r"config\.rollout\.top_k=-1 is not allowed; allowed: an int >= 0"),
    ("rollout.buckets", (8, 4), r"config\.rollout\.buckets=\(8, 4\) is not allowed; allowed: a non-empty, strictly increasing"),
    ("rollout.temperature", 0.0, r"config\.rollout\.temperature=0\.0 is not allowed with the 'rl' stage; allowed: a float > 0"),
    ("drafter.warmup_steps", 0, r"config\.drafter\.warmup_steps=0 is not allowed; allowed: a positive int"),
    ("stages", "sft,ppo", r"config\.stages='sft,ppo' is not allowed; allowed: a comma-separated subset of \('sft', 'drafter', 'rl'\)"),
    ("rollout.spec_threshold", -1, r"config\.rollout\.spec_threshold=-1 is not allowed; allowed: an int >= 0"),
    ("tlt.between_steps", -1, r"config\.tlt\.between_steps=-1 is not allowed; allowed: an int >= 0"),
    ("tlt.single_group", "never", r"config\.tlt\.single_group='never' is not allowed; allowed: one of \('between_steps', 'off'\)"),
    ("tlt.strategies", ("d4k1n9",), r"config\.tlt\.strategies: 'd4k1n9' is not allowed; allowed: num_verify <= depth \* topk"),
    ("tlt.strategies", ("plain",), r"config\.tlt\.strategies=\('plain',\) is not allowed; allowed: .*at least one not 'plain'"),
    ("tlt.strategies", ("d4",), r"config\.tlt\.strategies=\('d4',\) is not allowed; allowed: distinct names"),
    ("tlt.buffer_decay", 0.0, r"config\.tlt\.buffer_decay=0\.0 is not allowed; allowed: a float in \(0, 1\]"),
    ("tlt.buffer_capacity", 4, r"config\.tlt\.buffer_capacity=4 is not allowed; allowed: an int >= config\.tlt\.drafter_batch_size=8"),
    ("tlt.rollout_groups", 32, r"config\.tlt\.rollout_groups=32 is not allowed; allowed: at most config\.rl\.prompts_per_step=16"),
])
def test_bad_values_name_key_value_and_allowed(path, value, pattern):
  c = default_config()
  _set(c, path, value)
  with pytest.raises(config_lib.ConfigError, match=pattern):
    config_lib.validate(c)


def test_all_zero_reward_weights_are_refused():
  c = default_config()
  for name in c.rl.rewards:
    c.rl.rewards[name] = 0.0
  with pytest.raises(config_lib.ConfigError, match="at least one non-zero weight"):
    config_lib.validate(c)


def test_unknown_key_message():
  c = default_config()
  assert config_lib.unknown_key_message(c, "rl.lr") is None
  msg = config_lib.unknown_key_message(c, "nonexistent")
  assert "config key 'nonexistent' does not exist" in msg and "'rl'" in msg
  msg = config_lib.unknown_key_message(c, "rl.lrate")
  assert "config.rl has no key 'lrate'" in msg and "'lr'" in msg
  assert "is a value, not a section" in config_lib.unknown_key_message(c, "rl.lr.x")


def _main(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "tlt_jax.main", "--config=configs/default.py",
                         "--workdir=/nonexistent/never_written", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cli_unknown_override_key_is_a_clear_error():
  out = _main("--config.nonexistent=1")
  assert out.returncode == 2, out.stderr[-2000:]
  assert "config error: --config.nonexistent=1: config key 'nonexistent' does not exist" in out.stderr
  assert "Traceback" not in out.stderr
  out = _main("--config.rl.nope=1")
  assert out.returncode == 2 and "config.rl has no key 'nope'" in out.stderr


def test_cli_bad_value_is_a_clear_error():
  out = _main("--config.rl.lr=-1")
  assert out.returncode == 2, out.stderr[-2000:]
  assert "config error: config.rl.lr=-1.0 is not allowed; allowed: a float > 0" in out.stderr
  assert "Traceback" not in out.stderr


def test_mesh_that_does_not_divide_the_devices():
  from tlt_jax import run as run_lib
  from tlt_jax.parallel import mesh as mesh_lib
  with pytest.raises(ValueError, match=r"mesh shape \(3, 1, 1\) \(product 3\) does not match the 8 "
                                       r"available devices"):
    mesh_lib.make_mesh((3, 1, 1))
  c = default_config()
  c.mesh.shape = (-1, 3, 1)
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.mesh\.shape=\(-1, 3, 1\) is not allowed: mesh shape \(-1, 3, 1\) "
                           r"does not divide the 8 available devices"):
    run_lib.build_setup(config_lib.finalize(c), "/nonexistent/never_written")
  c = default_config()
  c.mesh.shape = (1, -1, 1)  # data axis 1: no room for 2 rollout groups
  with pytest.raises(config_lib.ConfigError,
                     match=r"config\.tlt\.rollout_groups=2 rollout groups do not divide the mesh's data "
                           r"axis \(data=1, .*allowed: a divisor of 1: \[1\]"):
    run_lib.build_setup(config_lib.finalize(c), "/nonexistent/never_written")


def test_main_gives_the_cpu_one_device_per_rollout_group():
  """tlt_jax.main sets the CPU device count (before jax is imported) unless XLA_FLAGS has one."""
  code = ("import os, sys; sys.argv = ['main', *sys.argv[1:]]; import tlt_jax.main; import jax; "
          "print(os.environ.get('XLA_FLAGS'), jax.device_count())")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  run = lambda *args, env=env: subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env,  # noqa: E731
                                              capture_output=True, text=True, timeout=600)
  assert run("--config.tlt.rollout_groups=4").stdout.split() == ["--xla_force_host_platform_device_count=4", "4"]
  assert run().stdout.split()[-1] == "2"  # the default: 2 rollout groups
  mine = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=3")
  assert run("--config.tlt.rollout_groups=4", env=mine).stdout.split()[-1] == "3"
