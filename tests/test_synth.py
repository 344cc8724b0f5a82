"""Compute-optimal synthetic data (tlt_jax/synth): FLOPs against a hand count, compute-matched
sample counts, the step verifier on good and corrupted traces, each data metric on a hand-built
sample set (brute force over subsets; FPR with planted wrong steps), and sampling through the
rollout engine into the filtered JSONL dataset with provenance."""

import itertools
import json
import os
import sys

import numpy as np
import pytest

from tlt_jax.data.tasks import TraceCheck, get_task
from tlt_jax.models.config import ModelConfig
from tlt_jax.synth import (coverage_at_k, data_metrics, dense_flops_per_token, diversity_at_k,
                           false_positive_rate, filter_correct, matched_sample_counts, read_samples,
                           read_sft_examples, sample_solutions, sequence_flops, write_jsonl)
from tlt_jax.synth.sampling import Sample, group_by_problem

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = get_task("arith", max_digits=6)


def _cfg(**changes):
  base = dict(vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
              max_position_embeddings=128)
  return ModelConfig(**{**base, **changes})


# --- FLOPs -----------------------------------------------------------------------------------

def test_flops_hand_count():
  # L=2, d=32, f=64, h=4, kv=2, hd=8, V=40. Per layer: q 32*32, k and v 2 * 32*16, o 32*32,
  # MLP 3 * 32*64 = 1024 + 1024 + 1024 + 6144 = 9216; two layers 18432; head 32*40 = 1280.
  assert dense_flops_per_token(_cfg()) == 2 * (18432 + 1280) == 39424
  # 3 prompt + 2 response tokens: 5 * 39424, attention 4 * L * h * hd * (1 + 2 + 3 + 4 + 5) = 256 * 15.
  assert sequence_flops(_cfg(), 3, 2, include_attention=False) == 197120
  assert sequence_flops(_cfg(), 3, 2, include_attention=True) == 197120 + 3840
  # The 2N rule: dense / 2 = the parameters less the norms (2d per layer + d), tied embeddings.
  for cfg in (_cfg(), _cfg(num_layers=3, hidden_size=48, intermediate_size=144, num_kv_heads=4)):
    assert dense_flops_per_token(cfg) == 2 * (cfg.num_params - 2 * cfg.hidden_size * cfg.num_layers
                                              - cfg.hidden_size)


def test_matched_sample_counts():
  se, wc = _cfg(num_layers=6, hidden_size=64, intermediate_size=192), _cfg(num_layers=2)
  ratio = dense_flops_per_token(se) / dense_flops_per_token(wc)
  cost = {m: sequence_flops(c, 10, 40, include_attention=False) for m, c in (("se", se), ("wc", wc))}
  for k_se in (1, 2, 5, 10):
    counts = matched_sample_counts(cost, k_se * cost["se"])
    assert counts["se"] == k_se and counts["wc"] == int(np.floor(k_se * ratio))  # S_WC = S_SE * P_SE / P_WC
    assert counts["wc"] * cost["wc"] <= k_se * cost["se"] < (counts["wc"] + 1) * cost["wc"]
  with pytest.raises(ValueError, match="must be > 0"):
    matched_sample_counts({"x": 0}, 10)


# --- the step verifier ------------------------------------------------------------------------

def test_check_trace_good_and_corrupted():
  rng = np.random.default_rng(0)
  for _ in range(40):
    ex = TASK.sample(rng)
    n = ex.meta["num_digits"]
    assert TASK.check_trace(ex.trace, ex) == TraceCheck(True, True, None)
    body, answer = ex.trace.split(";A:")
    steps = body.split("|R:")[0].split(",")
    i = int(rng.integers(0, n))
    # a planted wrong step (one operand digit changed, the sum kept): right answer, wrong step i
    a, rest = steps[i].split("+", 1)
    bad = steps[:i] + [f"{(int(a) + 1) % 10}+{rest}"] + steps[i + 1:]
    assert TASK.check_trace(",".join(bad) + ";A:" + answer, ex) == TraceCheck(True, False, i)
    # a missing last step, an extra step, a wrong re-check, a wrong answer with right steps
    clean = ",".join(steps)
    assert TASK.check_trace(",".join(steps[:-1]) + ";A:" + answer, ex) == TraceCheck(True, False, n - 1)
    assert TASK.check_trace(clean + ",0+0=0;A:" + answer, ex) == TraceCheck(True, False, n)
    assert TASK.check_trace(clean + "|R:" + steps[0] + "|R:9+9=17;A:" + answer, ex) == TraceCheck(True, False, n + 1)
    wrong = str((int(answer[0]) + 1) % 10) + answer[1:]
    assert TASK.check_trace(clean + ";A:" + wrong, ex) == TraceCheck(False, True, None)
  ex = TASK.make_example(347, 85)  # the module docstring's example, by hand
  assert TASK.check_trace("7+5=12,4+8+1=13,3+0+1=4|R:4+8+1=13;A:234", ex) == (True, True, None)
  assert TASK.check_trace("7+5=12,4+8=13,3+0+1=4;A:234", ex) == (True, False, 1)  # the carry left out
  assert TASK.check_trace("7+5=12,4+8+1=13,3+0+1=4", ex) == (False, True, None)  # no answer
  assert TASK.check_trace("", ex) == (False, False, 0)


def test_check_trace_answer_only_tasks():
  gsm = get_task("gsm8k", records=[{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
  ex = gsm.example_from_record(gsm.records[0], 0)
  assert gsm.check_trace("1+1=3 so #### 2", ex) == TraceCheck(True, None, None)  # steps not checkable
  assert gsm.check_trace("#### 3", ex) == TraceCheck(False, None, None)


# --- the metrics ------------------------------------------------------------------------------

def _hand_samples():
  """3 problems: p0 with 4 samples (2 identical right, 1 other right via a wrong step, 1 wrong);
  p1 with 4 (all wrong); p2 with 4 (one right)."""
  exs = [TASK.make_example(347, 85).with_id(0), TASK.make_example(12, 9).with_id(1),
         TASK.make_example(5, 5).with_id(2)]
  texts = [["7+5=12,4+8+1=13,3+0+1=4;A:234", "7+5=12,4+8+1=13,3+0+1=4;A:234",
            "7+5=12,4+9+1=13,3+0+1=4;A:234", "7+5=12;A:2"],
           ["2+9=11,1+0+1=2;A:13", "2+9=11;A:1", "x", "2+9=1;A:13"],
           ["5+5=10;A:01", "5+5=10;A:1", "5+5=11;A:11", "5+5=10;A:00"]]
  samples = []
  for ex, ts in zip(exs, texts):
    for j, t in enumerate(ts):
      c = TASK.check_trace(t, ex)
      samples.append(Sample(ex.prompt_id, j, "m", t, True, len(t), c.answer_correct, c.steps_correct,
                            c.first_wrong_step, 100 + j))
  return exs, samples


def test_metrics_on_a_hand_built_set():
  exs, samples = _hand_samples()
  per = group_by_problem(samples)
  assert [sum(s.answer_correct for s in p) for p in per] == [3, 0, 1]
  # by hand: coverage@1 = (3/4 + 0 + 1/4) / 3; coverage@4 = 2/3
  assert coverage_at_k(per, 1) == pytest.approx((0.75 + 0.25) / 3)
  assert coverage_at_k(per, 4) == pytest.approx(2 / 3)
  # diversity@4: p0 has 2 distinct right texts, p2 one: 3 / 3
  assert diversity_at_k(per, 4) == pytest.approx(1.0)
  # the exact FPR: of the 4 answer-correct samples one has a wrong step (p0, sample 2)
  assert false_positive_rate(per) == pytest.approx(1 / 4)
  assert false_positive_rate(per, k=2) == 0.0  # the first two of each: p0's two clean ones
  assert false_positive_rate([p[1:2] for p in per[1:2]]) is None
  # brute force: the mean over all k-subsets of each problem's samples
  for k in (1, 2, 3):
    cov, div = [], []
    for p in per:
      subsets = list(itertools.combinations(p, k))
      cov.append(np.mean([any(s.answer_correct for s in sub) for sub in subsets]))
      div.append(np.mean([len({s.text for s in sub if s.answer_correct}) for sub in subsets]))
    assert coverage_at_k(per, k) == pytest.approx(np.mean(cov))
    assert diversity_at_k(per, k) == pytest.approx(np.mean(div))
  m = data_metrics(samples, 2)
  assert m["correct_samples"] == 3 and m["flops_per_problem"] == pytest.approx(201)
  with pytest.raises(ValueError, match="k=5"):
    coverage_at_k(per, 5)


def test_filter_and_dataset_roundtrip(tmp_path):
  exs, samples = _hand_samples()
  records = filter_correct(samples, exs, k=3)
  assert [(r["provenance"]["problem_id"], r["provenance"]["sample_index"]) for r in records] == [(0, 0), (0, 1), (0, 2),
                                                                                            (2, 0)]
  assert [r["provenance"]["steps_correct"] for r in records] == [True, True, False, True]  # the false positive stays
  path = str(tmp_path / "d.jsonl")
  write_jsonl(records, path)
  back = read_sft_examples(path)
  assert [e.trace for e in back] == [s.text for s in samples[:3]] + [samples[8].text] and back[0].prompt == exs[0].prompt
  assert back[2].meta["provenance"]["flops"] == 102
  write_jsonl(samples, str(tmp_path / "s.jsonl"))
  assert read_samples(str(tmp_path / "s.jsonl")) == samples


# --- sampling through the rollout engine --------------------------------------------------------

def test_sample_solutions_through_the_engine():
  from flax import nnx

  from tlt_jax.data.tokenizer import CharTokenizer
  from tlt_jax.models.transformer import Transformer
  tok = CharTokenizer(TASK.charset)
  cfg = _cfg(vocab_size=tok.vocab_size)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(1)
  exs = [TASK.sample(rng, num_digits=2).with_id(i) for i in range(3)]
  kw = dict(model_name="tiny", max_new_tokens=12, batch_size=16, show_progress=False, compact=False)
  a = sample_solutions(model, tok, TASK, exs, 3, temperature=1.0, seed=5, **kw)
  b = sample_solutions(model, tok, TASK, exs, 3, temperature=1.0, seed=5, **kw)  # same key: same samples
  assert a == b and len(a) == 9
  assert [(s.problem_id, s.sample_index) for s in a] == [(i, j) for i in range(3) for j in range(3)]
  for s in a:
    ex = exs[s.problem_id]
    assert s.flops == sequence_flops(cfg, len(tok.encode(ex.prompt)) + 1, s.length, True)
    check = TASK.check_trace(s.text, ex)
    assert s.answer_correct == (s.finished and check.answer_correct) and s.steps_correct == check.steps_correct
  assert all(0 < s.length <= 12 and (s.finished or s.length == 12) for s in a)
  c = sample_solutions(model, tok, TASK, exs, 3, temperature=1.0, seed=6, **kw)
  assert [s.text for s in c] != [s.text for s in a]  # another key, other samples


# --- configs ------------------------------------------------------------------------------------

def test_synth_configs():
  sys.path.insert(0, ROOT)
  from experiments.common import load_config
  from tlt_jax import config as config_lib
  cfgs = {}
  for role in ("se", "wc", "student"):
    c = load_config(f"configs/synth.py:{role}")
    config_lib.finalize(c)
    m = dict(c.model)
    m["vocab_size"] = 21
    cfgs[role] = ModelConfig.from_dict(m)
  ratio = cfgs["se"].num_params / cfgs["wc"].num_params
  assert 2.7 <= ratio <= 3.5 and cfgs["student"].num_params <= cfgs["wc"].num_params
  # each role's SFT steps and LR (synth.base_steps / base_lr), by the role argument and by the
  # experiment's role_config from the default (SE) config
  from experiments.compute_optimal import role_config
  default = load_config("configs/synth.py")
  for role in ("se", "wc", "student"):
    c = load_config(f"configs/synth.py:{role}")
    want = (c.synth.base_steps[role], c.synth.base_lr[role])
    assert (c.sft.steps, c.sft.lr) == want
    rc = role_config(default, role)
    assert (rc.sft.steps, rc.sft.lr) == want and rc.model.hidden_size == c.model.hidden_size
  # no policy's gold traces hold the sampled and evaluated length
  task = config_lib.build_task(default)
  evaluated = range(default.synth.min_digits, default.synth.max_digits + 1)
  assert all(task.digit_probs[n - task.min_digits] == 0 for n in evaluated if n <= task.max_digits)
  for role in ("se", "wc", "student"):  # fine-tuning LR and steps per role
    assert default.synth.finetune.lr[role] > 0 and default.synth.finetune.steps[role] > 0
  with pytest.raises(config_lib.ConfigError, match="configs/synth.py"):
    load_config("configs/synth.py:huge")
  with pytest.raises(config_lib.ConfigError, match="synth.budgets"):
    config_lib.finalize(load_config("configs/synth.py:tiny", {"synth.budgets": (4, 1)}))


def test_synth_config_rejects_gold_lengths_and_shared_seeds():
  sys.path.insert(0, ROOT)
  from experiments.common import load_config
  from tlt_jax import config as config_lib
  with pytest.raises(config_lib.ConfigError, match=r"gold traces hold \[4\]-digit"):
    config_lib.finalize(load_config("configs/synth.py", {"synth.min_digits": 4}))
  with pytest.raises(config_lib.ConfigError, match=r"gold traces hold \[5\]-digit"):
    config_lib.finalize(load_config("configs/synth.py", {"task.skip_digits": ()}))
  with pytest.raises(config_lib.ConfigError, match="three distinct seeds"):
    config_lib.finalize(load_config("configs/synth.py", {"synth.val_seed": 202}))
  with pytest.raises(config_lib.ConfigError, match="synth.finetune.lr.wc"):
    config_lib.finalize(load_config("configs/synth.py", {"synth.finetune.lr.wc": 0.0}))
  config_lib.finalize(load_config("configs/synth.py", {"task.skip_digits": (), "task.max_digits": 4}))  # shorter gold


def test_arith_skip_digits():
  task = get_task("arith", max_digits=6, alpha=1.0, skip_digits=(5,))
  assert task.digit_probs[4] == 0 and task.digit_probs.sum() == pytest.approx(1.0)
  rng = np.random.default_rng(0)
  drawn = {task.sample(rng).meta["num_digits"] for _ in range(2000)}
  assert drawn == {1, 2, 3, 4, 6}
  assert task.sample(rng, num_digits=5).meta["num_digits"] == 5  # asked for: still made
  with pytest.raises(ValueError, match="skip_digits"):
    get_task("arith", max_digits=2, skip_digits=(1, 2))


def test_problem_sets_are_disjoint():
  sys.path.insert(0, ROOT)
  from experiments.compute_optimal import problems
  task = get_task("arith", max_digits=2)
  a = problems(task, 40, 1, 1, seed=1)  # 1-digit sums: 100 distinct problems, collisions certain
  b = problems(task, 40, 1, 1, seed=2, exclude=(a,))
  assert len({e.prompt for e in a}) == 40 and not {e.prompt for e in a} & {e.prompt for e in b}
  assert [e.prompt_id for e in b] == list(range(40)) and problems(task, 40, 1, 1, seed=1) == a


def test_summary_seed_spreads_and_verdicts():
  sys.path.insert(0, ROOT)
  from experiments.compute_optimal import agreement, selection, summarize
  rows = [{"kind": "base", "policy": "wc", "greedy_acc": 0.2, "pass@2": 0.3}]
  accs = {("wc", 1): (0.5, 0.4, 0.6), ("se", 1): (0.3, 0.5, 0.4), ("wc", 4): (0.1, 0.2, 0.3), ("se", 4): (0.4, 0.3, 0.5)}
  for (m, b), values in accs.items():
    for seed, a in enumerate(values):
      rows.append({"kind": "finetune", "setting": "self_improve", "policy": "wc", "source": m, "budget": b,
                   "seed": seed, "lr": 1e-3, "steps": 30, "dataset": 10, "greedy_acc": a, "pass@2": a})
  summ = {(r["budget"], r["source"]): r for r in summarize(rows, 2)}
  wc1 = summ[(1, "wc")]
  assert wc1["greedy_acc"] == pytest.approx(0.5) and wc1["std"] == pytest.approx(0.1)
  assert (wc1["min"], wc1["max"]) == (0.4, 0.6) and wc1["gain"] == pytest.approx(0.3)
  assert wc1["wc_minus_se"] == pytest.approx(0.1) and wc1["diff_range"] == "-0.100 .. +0.200"
  assert summ[(4, "wc")]["diff_max"] == pytest.approx(-0.1)  # per seed: -0.3, -0.1, -0.2
  res = {"data": [{"budget": b, "source": m, "coverage": 0.5, "diversity": 0.5, "fpr": None}
                  for b in (1, 4) for m in ("wc", "se")], "summary": list(summ.values())}
  verdict = agreement(res)["self_improve"]
  assert verdict.startswith("b1: mixed across seeds (+0.100") and "b4: no (-0.200" in verdict
  grid = [{"policy": "wc", "lr": lr, "steps": st, "source": m, "val_greedy_acc": v}
          for lr, st, m, v in ((1e-3, 30, "wc", 0.4), (1e-3, 30, "se", 0.2), (3e-3, 30, "wc", 0.5),
                               (3e-3, 30, "se", 0.1), (1e-3, 90, "wc", 0.3), (1e-3, 90, "se", 0.3))]
  best = [(r["lr"], r["steps"]) for r in selection(grid) if r["best"]]
  assert best == [(1e-3, 30)]  # three cells at a mean of 0.3: the fewest steps, then the lower LR
