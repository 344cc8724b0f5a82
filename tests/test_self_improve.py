"""Self-improvement for length generalisation (issue 17): the NoPE model option, the reverse
tasks and their verifier, the label filters and the majority-vote threshold, and a resume after a
stop between rounds that reproduces the uninterrupted run exactly.
"""

import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs.self_improve import get_config
from tlt_jax.curriculum import self_improve as si
from tlt_jax.data.tasks import get_task
from tlt_jax.errors import CheckpointError, ConfigError
from tlt_jax.models import hf
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import KVCache
from tests.numerics import assert_close
from tests.test_model import np_forward
from tests.tiny import VOCAB, random_state, tiny_config


# ----------------------------------------------------------------------------- NoPE


@pytest.fixture(scope="module")
def nope():
  cfg = tiny_config(position_embedding="none")
  graphdef, params = random_state(cfg, seed=3)

  @jax.jit
  def fwd(p, tokens, positions, cache):
    return nnx.merge(graphdef, p)(tokens, positions, cache=cache)

  return cfg, params, fwd


def test_nope_forward_is_the_reference_without_rotation(nope):
  """NoPE = the float64 reference with every rotation angle 0 (positions all zero), whatever the
  positions given; and it differs from the RoPE model with the same weights."""
  cfg, params, fwd = nope
  tokens = np.random.default_rng(0).integers(3, VOCAB, (3, 9)).astype(np.int32)
  shifted = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32) + 17, (3, 9))
  logits, _, _ = fwd(params, tokens, shifted, None)
  for b in range(3):
    ref, _ = np_forward(cfg, params, tokens[b], np.zeros(9))
    assert_close(logits[b], ref)
  rope_ref, _ = np_forward(cfg.replace(position_embedding="rope"), params, tokens[0], np.arange(9))
  assert np.abs(np.asarray(logits[0]) - rope_ref).max() > 1e-2


def test_nope_cached_decode_equals_full_forward(nope):
  """Right-padded prefill, then two cached decode steps per row, against the plain forward."""
  cfg, params, fwd = nope
  rng = np.random.default_rng(1)
  lens = np.array([5, 2, 7], np.int32)
  seqs = [rng.integers(3, VOCAB, n + 2).astype(np.int32) for n in lens]
  padded = np.full((3, 7), 9, np.int32)
  for b, n in enumerate(lens):
    padded[b, :n] = seqs[b][:n]
  cache = KVCache.init(cfg, 3, 16)
  _, _, cache = fwd(params, padded, None, cache)
  cache = cache.replace(lengths=jnp.asarray(lens))
  steps = []
  for j in range(2):
    tok = np.array([s[n + j] for s, n in zip(seqs, lens)], np.int32)[:, None]
    logits, _, cache = fwd(params, tok, None, cache)
    steps.append(np.asarray(logits[:, 0]))
  assert cache.lengths.tolist() == (lens + 2).tolist()
  rows = np.full((3, 9), 9, np.int32)  # causal: the right padding does not reach earlier positions
  for b, n in enumerate(lens):
    rows[b, :n + 2] = seqs[b]
  full, _, _ = fwd(params, rows, None, None)
  for b, n in enumerate(lens):
    for j in range(2):
      assert_close(steps[j][b], full[b, n + j])


def test_nope_config_and_hf_export_refused():
  with pytest.raises(ValueError, match="position_embedding='alibi'.*allowed"):
    tiny_config(position_embedding="alibi")
  assert ModelConfig.from_dict(tiny_config().to_dict()).position_embedding == "rope"
  with pytest.raises(ValueError, match="position_embedding='none'.*no HuggingFace export"):
    hf.hf_config_from(tiny_config(position_embedding="none"))
  hf.hf_config_from(tiny_config())  # RoPE still exports


# ----------------------------------------------------------------------------- tasks


def test_reverse_add_unpadded_format_round_trips():
  """The official format, `{a[::-1]}+{b[::-1]}=` and the reversed sum, without padding."""
  task = get_task("reverse_add", max_digits=12)
  assert not task.padded
  ex = task.make_example(347, 85)
  assert (ex.prompt, ex.answer, ex.meta["num_digits"]) == ("743+58=", "234", 3)
  assert task.make_example(999, 1).answer == "0001" and task.make_example(0, 0).answer == "0"
  assert task.verify("234", ex) and not task.verify("2340", ex)
  assert task.well_formed("234", 3) and task.well_formed("0001", 3)
  for bad in ("2340", "23", "2305", "23a", "0002"):  # trailing zero, short, carry digit > 1, junk
    assert not task.well_formed(bad, 3), bad
  rng = np.random.default_rng(0)
  for n in (1, 4, 12):
    for _ in range(30):  # parse the prompt back: the answer is the reversed sum of the reversed operands
      e = task.sample(rng, num_digits=n)
      a, b = e.prompt[:-1].split("+")
      assert (a[::-1], b[::-1]) == (e.meta["a"], e.meta["b"]) and max(len(a), len(b)) == n
      assert not (len(a) > 1 and a.endswith("0")) and not (len(b) > 1 and b.endswith("0"))
      assert e.answer == str(int(a[::-1]) + int(b[::-1]))[::-1] and task.well_formed(e.answer, n)
      assert task.make_example(a[::-1], b[::-1]) == e
  with pytest.raises(ValueError, match="padded='yes'"):
    get_task("reverse_add", padded="yes")


def test_reverse_add_format_and_exact_verifier():
  task = get_task("reverse_add", max_digits=12, padded=True)
  ex = task.make_example(347, 85)
  assert (ex.prompt, ex.answer, ex.trace, ex.meta["difficulty"]) == ("743+580=", "2340", "2340", 3)
  assert task.verify("2340", ex) and task.verify(" 2340\n", ex)
  for wrong in ("234", "23400", "2350", "0432", ""):
    assert not task.verify(wrong, ex)
  assert task.well_formed("2340", 3) and not task.well_formed("234", 3) and not task.well_formed("23a0", 3)
  rng = np.random.default_rng(0)
  for n in (1, 4, 12):
    for _ in range(20):  # brute force: reversed answer is the sum; operands padded to n
      e = task.sample(rng, num_digits=n)
      a, b = e.prompt[:-1].split("+")
      assert len(a) == len(b) == n and len(e.answer) == n + 1 and e.meta["difficulty"] == n
      assert int(e.answer[::-1]) == int(a[::-1]) + int(b[::-1])
      assert max(len(e.meta["a"]), len(e.meta["b"])) == n
  assert {task.sample(rng).meta["num_digits"] for _ in range(200)} == set(range(1, 13))
  copy_task = get_task("reverse_copy")
  c = copy_task.make_example("12045")
  assert (c.prompt, c.answer) == ("12045=", "54021") and copy_task.verify("54021", c)
  assert not copy_task.verify("5402", c) and copy_task.well_formed("54021", 5)
  with pytest.raises(ValueError, match="min_digits"):
    get_task("reverse_add", min_digits=5, max_digits=3)


# ----------------------------------------------------------------------------- filters


def _planted():
  """Three problems of 3 digits with their true answers, and three models' answers."""
  task = get_task("reverse_add", padded=True)
  exs = [task.make_example(347, 85), task.make_example(999, 1), task.make_example(100, 200)]
  truth = [e.answer for e in exs]  # 2340, 0001, 0030
  answers = [["2340", "0001", "003"],     # model 0: last one too short
             ["2340", "0002", "0030"],    # model 1: wrong but well formed on problem 1
             ["2340", "0002", "00300"]]   # model 2: last one too long
  finished = [[True, True, True], [True, True, True], [True, False, True]]  # model 2 / problem 1: no EOS
  return task, exs, truth, answers, finished


def test_no_filter_and_length_filter_on_planted_labels():
  task, exs, truth, answers, finished = _planted()
  none = si.filter_labels(task, exs, answers, finished, "none", 0.7)
  assert none.labels == answers and none.stats["kept"] == 9 and none.stats["failed_length"] == 3
  assert none.stats["kept_wrong"] == 4  # 003, 0002 (model 1), 0002 (model 2, unfinished), 00300
  length = si.filter_labels(task, exs, answers, finished, "length", 0.7)
  assert length.labels == [["2340", "0001", None], ["2340", "0002", "0030"], ["2340", None, None]]
  assert length.stats["dropped_length"] == 3 and length.stats["kept"] == 6
  assert length.stats["kept_wrong"] == 1


def test_majority_vote_threshold():
  task, exs, truth, answers, finished = _planted()
  # Problem 0: 3/3 agree. Problem 1: well formed "0001", "0002" (2: no EOS) -> best share 1/3.
  # Problem 2: only model 1 well formed -> 1/3.
  strict = si.filter_labels(task, exs, answers, finished, "length+vote", 0.7)
  assert strict.labels == [["2340", None, None]] * 3
  assert strict.stats["kept"] == 3 and strict.stats["kept_wrong"] == 0
  assert strict.stats["dropped_vote"] == 3  # the well-formed answers of problems 1 and 2
  loose = si.filter_labels(task, exs, answers, finished, "length+vote", 1 / 3)
  assert [row[1] for row in loose.labels] == ["0001"] * 3  # a 1-1 tie goes to the first seen
  # The threshold is a share of all k models, compared with >=.
  assert si.majority_answer(["a", "a", "b"], 0.7) == (None, pytest.approx(2 / 3))
  assert si.majority_answer(["a", "a", "b"], 2 / 3) == ("a", pytest.approx(2 / 3))
  assert si.majority_answer(["a", "a", "a", "a", "b"], 0.7)[0] == "a"
  assert si.majority_answer(["a", "a", None, None, "b"], 0.5) == (None, pytest.approx(0.4))
  assert si.majority_answer([None, None], 0.5) == (None, 0.0)
  with pytest.raises(ConfigError, match="filter='vote'"):
    si.filter_labels(task, exs, answers, finished, "vote", 0.7)


def test_config_errors_name_key_and_value():
  bad = get_config("tiny")
  bad.self_improve.vote_threshold = 1.5
  with pytest.raises(ConfigError, match=r"self_improve.vote_threshold=1.5.*allowed"):
    si.validate(bad)
  bad = get_config("tiny")
  bad.model.position_embedding = "alibi"
  with pytest.raises(ConfigError, match=r"model.position_embedding='alibi'"):
    si.validate(bad)


def test_pod_config_is_the_paper_model_as_a_run_config():
  """`:pod` (what experiments/pod_compile.py compiles) is a valid run config with the paper's NoPE
  model, prompts of the longest evaluated sums and answers one digit longer."""
  from tlt_jax import config as config_lib
  from tlt_jax.data.tokenizer import CharTokenizer
  paper, pod = get_config("paper"), config_lib.finalize(get_config("pod"))
  for key in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "position_embedding"):
    assert pod.model[key] == paper.model[key], key
  task = config_lib.build_task(pod)
  n = paper.self_improve.eval_max_digits
  ex = task.make_example(10 ** n - 1, 10 ** n - 1)
  tok = CharTokenizer(task.charset)
  assert len(tok.encode(ex.prompt)) + 1 <= pod.rollout.max_prompt_len + 1
  assert len(tok.encode(ex.answer)) + 1 <= pod.rollout.max_new_tokens
  assert not pod.tlt.speculative and not pod.tlt.train_drafter


# ----------------------------------------------------------------------------- data mixture


def _pool(rounds_sizes):
  task = get_task("reverse_add")
  pool = []
  for r, size in rounds_sizes:
    for i in range(size):
      ex = task.make_example(10 ** (r + 2) + i, 7)
      pool.append({"prompt": ex.prompt, "label": ex.answer, "round": r, "digits": r + 3, "true": ex.answer})
  return pool


def test_mixture_gives_the_newest_round_half_of_each_batch():
  """The official mixture: half of every batch from the newest round's labels, whatever the
  pool's history; the rest older labels and fresh problems in proportion. The earlier "pool"
  mixture gives the newest round only its share of the pool."""
  config = get_config("tiny")
  config.sft.batch_size = 64
  parts = si.build_parts(config)
  pool = _pool([(1, 300), (2, 300), (3, 300), (4, 40)])
  newest = {e["prompt"] for e in pool if e["round"] == 4}
  older = {e["prompt"] for e in pool if e["round"] != 4}
  tok = parts.tokenizer

  def shares(cfg, steps=60):
    batches = si.batch_fn(parts, cfg, 0, pool)
    new = old = rows = 0
    for step in range(steps):
      b = batches(step)
      for row in b["tokens"]:
        text = tok.decode(row.tolist())
        prompt = text.split("=")[0] + "="
        new += prompt in newest
        old += prompt in older
        rows += 1
    return new / rows, old / rows, rows

  p_new, p_old, n = shares(config)
  assert si.mixture_shares(config, pool)[:2] == pytest.approx((0.5, 0.5 * 900 / 2900))
  noise = 4 * np.sqrt(0.25 / n)
  assert abs(p_new - 0.5) < noise, p_new
  assert abs(p_old - 0.5 * 900 / 2900) < noise, p_old
  legacy = copy.deepcopy(config)
  legacy.self_improve.mixture = "pool"
  p_new, p_old, n = shares(legacy)
  expected_pool = min(0.5, 940 / (940 + 2000))
  assert abs(p_new + p_old - expected_pool) < noise and abs(p_new - expected_pool * 40 / 940) < noise
  assert si.mixture_shares(config, []) == (0.0, 0.0, -1)
  bad = get_config("tiny")
  bad.self_improve.mixture = "uniform"
  with pytest.raises(ConfigError, match=r"self_improve.mixture='uniform'.*allowed"):
    si.validate(bad)


# ----------------------------------------------------------------------------- loop and resume


def test_fast_schedule_width_and_reach():
  config = get_config("tiny")
  acc = {1: 1.0, 2: 1.0, 3: 1.0, 4: 0.995, 5: 0.99, 6: 0.5, 7: 1.0}
  assert si.label_width(config, 3, acc) == 1  # fast off: digits_per_round
  config.self_improve.fast, config.self_improve.fast_max_width = True, 3
  assert si.label_width(config, 3, acc) == 2  # 4 and 5 are >= 0.99, 6 is not
  assert si.label_width(config, 5, acc) == 1  # never below digits_per_round
  assert si.label_width(config, 3, {d: 1.0 for d in range(1, 20)}) == 3  # capped
  assert si.reach({1: 1.0, 2: 0.95, 3: 0.5, 4: 1.0}, 0.9) == 2
  assert si.reach({1: 0.2, 2: 1.0}, 0.9) == 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """Two rounds of the tiny config without a filter (so that the pools fill: resuming must
  restore them, not only the models)."""
  config = get_config("tiny")
  config.self_improve.filter = "none"
  wd = str(tmp_path_factory.mktemp("si_full"))
  return config, wd, si.run_self_improve(config, wd)


def _same(a, b):
  strip = lambda r: {k: v for k, v in r.items() if k != "time_s"}  # noqa: E731
  assert strip(a) == strip(b)


def test_loop_records_and_labels(uninterrupted):
  config, wd, history = uninterrupted
  assert [r["round"] for r in history] == [0, 1, 2]
  assert [r["label_digits"] for r in history] == [None, [4, 4], [5, 5]]
  assert [r["frontier"] for r in history] == [3, 4, 5]
  k, p = config.self_improve.num_models, config.self_improve.problems_per_round
  for r in history[1:]:
    lab = r["labels"]
    assert lab["answers"] == k * p and len(r["acc"]) == config.self_improve.eval_max_digits
    assert lab["kept"] == k * p and lab["dropped_length"] == lab["dropped_vote"] == 0  # no filter
  assert sum(history[-1]["pool_sizes"]) == sum(r["labels"]["kept"] for r in history[1:])
  assert history[-1]["step"] == config.sft.round0_steps + 2 * config.sft.round_steps
  # The kept-label error rate counts labels against the true sums (the pools keep both).
  _, states = si.load_states(config, wd)
  assert len(states) == k and int(states[0].step) == history[-1]["step"]


def test_resume_after_a_stop_between_rounds_reproduces_the_next_round(uninterrupted, tmp_path):
  config, wd_full, full = uninterrupted
  wd = str(tmp_path / "stopped")
  first = si.run_self_improve(config, wd, stop_after_round=1)
  assert len(first) == 2
  _same(first[1], full[1])
  assert len(si.run_self_improve(config, wd, stop_after_round=0)) == 2  # already past it: no round
  resumed = si.run_self_improve(config, wd)
  assert len(resumed) == 3
  _same(resumed[2], full[2])
  _, a = si.load_states(config, wd_full)
  _, b = si.load_states(config, wd)
  for sa, sb in zip(a, b):  # the same program on the same bits: exact
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(sa.params), nnx.to_pure_dict(sb.params))
  other = copy.deepcopy(config)
  other.seed = 1
  with pytest.raises(CheckpointError, match="another config"):
    si.run_self_improve(other, wd)


# ----------------------------------------------------------------------------- repeats


def test_ensemble_repeats_gather_reach_and_spread(tmp_path):
  """experiments/self_improve.py --gather: per (filter, round) each repeat's reach in order and
  mean [min-max] over the repeats against numpy; a round missing from a repeat is left out; the
  last record of a round wins (a resumed run may write one twice)."""
  import json

  from experiments import self_improve as exp

  def rec(variant, r, reach, acc_front, kept_error):
    return {"kind": "round", "variant": variant, "round": r, "frontier": 8 + r, "reach": reach,
            "acc": {str(8 + r): acc_front, str(9 + r): acc_front / 2},
            "labels": None if r == 0 else {"kept_error_rate": kept_error}}

  a = [rec("none", 0, 9, 0.5, None), rec("none", 1, 5, 0.1, 0.9), rec("none", 1, 9, 0.9, 0.2),
       rec("length+vote", 1, 10, 1.0, 0.0)]
  b = [rec("none", 0, 9, 0.7, None), rec("none", 1, 10, 0.6, 0.4)]
  paths = []
  for name, recs in (("a.jsonl", a), ("b.jsonl", b)):
    paths.append(str(tmp_path / name))
    with open(paths[-1], "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in recs)
  rows = exp.write_ensembles(str(tmp_path / "ensembles.md"), paths)
  assert [(r["filter"], r["round"]) for r in rows] == [("none", 0), ("none", 1)]
  assert rows[1]["reach per repeat"] == "9 / 10"
  assert rows[1]["acc_frontier"] == f"{np.mean([0.9, 0.6]):.2f} [0.60-0.90]"
  assert rows[1]["acc_frontier+1"] == f"{np.mean([0.45, 0.3]):.2f} [0.30-0.45]"
  assert rows[1]["kept_error"] == f"{np.mean([0.2, 0.4]):.2f} [0.20-0.40]"
  assert rows[0]["kept_error"] == "-"
  assert "a.jsonl" in (tmp_path / "ensembles.md").read_text()
