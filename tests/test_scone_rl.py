"""SCONE in RL: the trainer takes a SCONE policy built from configs/scone.py (main transformer +
the frozen f-gram table as `input_embedder`), runs a whole RL step with speculative rollouts,
recomputes the sampler's log-probs with the same SCONE embeddings (and not with plain ones), and
greedy speculative decoding of the updated SCONE policy equals plain greedy decoding."""

import importlib.util
import os

import jax
import numpy as np
import pytest
from flax import nnx

from experiments.common import load_config
from tests.spec_fixtures import random_drafter
from tlt_jax import config as config_lib
from tlt_jax.data.fgram import build_vocab
from tlt_jax.data.tokenizer import CharTokenizer
from tlt_jax.errors import ConfigError
from tlt_jax.models import scone
from tlt_jax.models.config import ModelConfig
from tlt_jax.rl import rewards as rewards_lib
from tlt_jax.rl import stages
from tlt_jax.rl.trainer import RLTrainer
from tlt_jax.rl.update import make_logprob_fn
from tlt_jax.rollout.engine import RolloutEngine
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.speculative import SpeculativeDecoder, Strategy
from tlt_jax.run import drafter_bundle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = {"tlt.speculative": True, "tlt.train_drafter": False, "tlt.rollout_groups": 1,
             "tlt.strategies": ("d3k1n3",), "rl.track_kl": False, "rl.sample_eval_every": 0,
             "rl.steps": 1, "mesh.shape": (1, 1, 1), "rollout.spec_threshold": 8,
             "rollout.max_new_tokens": 24, "rollout.buckets": (8,)}


def scone_config():
  spec = importlib.util.spec_from_file_location("scone_config", os.path.join(ROOT, "configs", "scone.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config("tiny")


@pytest.fixture(scope="module")
def scone_rl(tmp_path_factory):
  config = config_lib.finalize(load_config("configs/default.py:tiny", OVERRIDES))
  task = config_lib.build_task(config)
  tokenizer = CharTokenizer(task.charset)
  sc = scone_config()
  cfg = ModelConfig.from_dict(dict(sc.model, vocab_size=tokenizer.vocab_size))
  scfg = scone.SconeConfig.from_mapping(dict(sc.scone, fgram_vocab_size=256))
  rng = np.random.default_rng(0)
  docs = []
  for _ in range(200):  # the task's own text: its f-grams recur in the prompts and answers
    ex = task.sample(rng)
    docs.append(np.asarray(tokenizer.encode(ex.prompt + ex.trace), np.int32))
  vocab, _ = build_vocab(docs, scfg.fgram_vocab_size, scfg.max_n)
  policy, table = scone.rl_policy(scone.build_model(cfg, scfg, seed=0), vocab)
  bundle = drafter_bundle(config, random_drafter(policy.cfg))
  trainer = RLTrainer(config, task, tokenizer, policy, str(tmp_path_factory.mktemp("scone_rl")),
                      drafter=bundle, input_embedder=table)
  # A reward that varies within every group (response length), so that the step's advantages
  # and gradient are not zero for an untrained policy.
  trainer.reward_fn = rewards_lib.safe_reward(
      lambda responses, finished, lengths, example, task: np.asarray(lengths, np.float32) / 24.0,
      name="length")
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.state.params))
  record = trainer.step(1)
  return dict(config=config, task=task, tokenizer=tokenizer, table=table, trainer=trainer,
              record=record, before=before, bundle=bundle)


def test_scone_rl_step_uses_the_table_in_rollouts_and_the_update(scone_rl):
  trainer, record, table = scone_rl["trainer"], scone_rl["record"], scone_rl["table"]
  assert record["spec_frac"] > 0  # speculative chunks verified against the SCONE target
  assert table.lookups > 0
  # The trainer's forward reads the same SCONE embeddings the sampler did: the old log-probs
  # reproduce the sampler's.
  assert record["logprob_gap_max"] < 1e-3, record["logprob_gap_max"]
  assert np.isfinite(record["loss"]) and not record["skipped"]
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(trainer.state.params))
  changed = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), scone_rl["before"], after))
  assert any(changed)  # the update trained the main model
  # Without the table the trainer's forward would not be the sampler's policy.
  rollout, _ = trainer.sample(2, stages.StageClock())
  with_table = trainer.prepare_update_batch(rollout).logprob_gap["logprob_gap_max"]
  trainer.logprob_fn = make_logprob_fn(trainer.graphdef, trainer.sampling.temperature, trainer.state.params)
  plain = trainer.prepare_update_batch(rollout).logprob_gap["logprob_gap_max"]
  assert with_table < 1e-3 and plain > 100 * max(with_table, 1e-5), (with_table, plain)


def test_greedy_speculative_equals_plain_greedy_for_the_trained_scone_policy(scone_rl):
  trainer, table, tok, task = scone_rl["trainer"], scone_rl["table"], scone_rl["tokenizer"], scone_rl["task"]
  rng = np.random.default_rng(5)
  prompts = [tok.encode(task.sample(rng).prompt) for _ in range(4)]
  width = max(len(p) for p in prompts) + 1
  ids = np.full((4, width), tok.pad_id, np.int32)
  for i, p in enumerate(prompts):
    ids[i, :len(p)] = p
  lens = np.array([len(p) for p in prompts], np.int32)
  sp = SamplingParams(temperature=0.0)
  params, g = trainer.state.params, trainer.graphdef
  plain = RolloutEngine(g, sp, eos_ids=tok.eos_ids, pad_id=tok.pad_id, chunk_size=4, input_embedder=table,
                        compact=False).generate(params, ids, lens, 20, jax.random.key(0))
  dg, dstate, _ = scone_rl["bundle"]
  dec = SpeculativeDecoder(g, dg, sp, tuple(tok.eos_ids), strategies=(Strategy(3, 2, 4),), rounds_per_chunk=3,
                           input_embedder=table)
  spec = RolloutEngine(g, sp, eos_ids=tok.eos_ids, pad_id=tok.pad_id, chunk_size=4, speculative=dec,
                       spec_threshold=64, input_embedder=table, compact=False)
  out = spec.generate(params, ids, lens, 20, jax.random.key(0), drafter_params=dstate.params)
  assert out.stats["spec_chunks"]
  np.testing.assert_array_equal(out.lengths, plain.lengths)
  for i in range(4):
    np.testing.assert_array_equal(out.tokens[i, :out.lengths[i]], plain.tokens[i, :plain.lengths[i]])
  # and the table matters: the plain model's greedy output differs somewhere
  no_table = RolloutEngine(g, sp, eos_ids=tok.eos_ids, pad_id=tok.pad_id, chunk_size=4,
                           compact=False).generate(params, ids, lens, 20, jax.random.key(0))
  assert any(not np.array_equal(no_table.tokens[i, :no_table.lengths[i]], plain.tokens[i, :plain.lengths[i]])
             for i in range(4))


def test_rl_policy_needs_a_scone_model():
  cfg = ModelConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=64)
  with pytest.raises(ConfigError, match="a SconeLM is needed"):
    scone.rl_policy(scone.build_model(cfg, None), None)


def test_run_builds_the_scone_policy_from_a_checkpoint(scone_rl, tmp_path):
  """`run.scone_rl_policy`: config.scone.checkpoint (a SCONE checkpoint) -> the main model and a
  table equal to the one exported from the saved f-gram model; a bad directory is a ConfigError."""
  import types

  import ml_collections

  from tlt_jax import run as run_lib

  tok, table = scone_rl["tokenizer"], scone_rl["table"]
  sc = scone_config()
  cfg = ModelConfig.from_dict(dict(sc.model, vocab_size=tok.vocab_size))
  scfg = scone.SconeConfig.from_mapping(dict(sc.scone, fgram_vocab_size=256))
  model = scone.build_model(cfg, scfg, seed=0)
  scone.save_checkpoint(str(tmp_path / "scone"), 1, model, table.vocab)
  setup = types.SimpleNamespace(tokenizer=tok, config=ml_collections.ConfigDict(
      {"scone": {"checkpoint": str(tmp_path / "scone")}}))
  main, loaded = run_lib.scone_rl_policy(setup)
  np.testing.assert_allclose(loaded.table_FxD, table.table_FxD, rtol=1e-6, atol=1e-7)
  assert main.cfg == cfg
  setup.config.scone.checkpoint = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="config.scone.checkpoint=.*is not usable"):
    run_lib.scone_rl_policy(setup)
  assert run_lib.scone_rl_policy(types.SimpleNamespace(config=ml_collections.ConfigDict({}))) is None
