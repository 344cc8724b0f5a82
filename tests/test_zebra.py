"""ZebraLogic puzzles: generator, uniqueness (SAT and brute force), minimality, determinism,
renderings and parsing, accuracies, the partial-credit reward and the RL reward path."""

import importlib.util
import json
import os

import numpy as np
import pytest

from tlt_jax.data.tasks import get_task
from tlt_jax.data.zebra import bench, render
from tlt_jax.data.zebra.generate import generate_puzzle
from tlt_jax.data.zebra.puzzle import Clue, reduce_clues, search_space, size_bucket
from tlt_jax.data.zebra.solve import (UniquenessOracle, brute_force_solutions, count_solutions, deduce,
                                      sat_solutions, z3_conflicts)
from tlt_jax.rl import rewards as rewards_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [(2, 2), (2, 3), (3, 2), (3, 3), (4, 2), (2, 5)]  # brute force: <= 576 assignments
MEDIUM = [(3, 4), (4, 3)]  # brute force: 1,296 and 13,824 assignments
LARGE = [(5, 4), (6, 3), (5, 5), (6, 6)]  # SAT only


def puzzle(n, m, k=0, seed=0):
  return generate_puzzle(np.random.default_rng([seed, n, m, k]), n, m)


@pytest.fixture(scope="module")
def puzzles():
  return {(n, m, k): puzzle(n, m, k) for n, m in SMALL + MEDIUM + LARGE for k in range(2)}


def test_intended_solution_satisfies_every_clue(puzzles):
  for p in puzzles.values():
    assert len(p.clues) > 0
    assert p.solution_satisfies_all(), p.size
    for a in range(p.num_attributes):
      assert sorted(p.house_of[a]) == list(range(p.num_houses))


def test_solution_is_unique_by_brute_force_and_sat(puzzles):
  for (n, m, _), p in puzzles.items():
    assert sat_solutions(n, m, p.clues, limit=3) == [p.house_of], p.size
    if (n, m) in SMALL + MEDIUM:
      assert brute_force_solutions(p) == [p.house_of], p.size


def test_removing_any_kept_clue_breaks_uniqueness(puzzles):
  for (n, m, _), p in puzzles.items():
    for i in range(len(p.clues)):
      rest = p.clues[:i] + p.clues[i + 1:]
      assert count_solutions(p, rest, limit=2) == 2, (p.size, p.clues[i])
      if (n, m) in SMALL + [(3, 4)]:
        assert len(brute_force_solutions(p, rest, limit=2)) == 2, (p.size, p.clues[i])


def test_sat_agrees_with_brute_force_on_random_clue_sets():
  """The CNF encoding of every clue kind against direct evaluation: solution counts agree."""
  rng = np.random.default_rng(5)
  kinds_seen = set()
  for trial in range(30):
    n, m = (3, 2) if trial % 2 else (3, 3)
    values = [(a, v) for a in range(m) for v in range(n)]
    clues = []
    for _ in range(int(rng.integers(1, 5))):
      kind = str(rng.choice(["found_at", "not_at", "same_house", "left_of", "right_of", "directly_left",
                             "beside", "one_between", "two_between"]))
      i, j = rng.choice(len(values), 2, replace=False)
      clue = (Clue(kind, values[i], house=int(rng.integers(n))) if kind in ("found_at", "not_at")
              else Clue(kind, values[i], values[j]))
      clues.append(clue)
      kinds_seen.add(kind)
    p = puzzle(n, m)
    brute = brute_force_solutions(p, clues)
    assert len(sat_solutions(n, m, clues, limit=10_000)) == len(brute)
  assert len(kinds_seen) == 9


def test_reduction_keeps_uniqueness_and_is_minimal_with_a_fresh_oracle():
  p = puzzle(4, 3, 7)
  oracle = UniquenessOracle(4, 3, p.clues, p.house_of)
  assert oracle.is_unique(p.clues)
  for i in range(len(p.clues)):
    assert not oracle.is_unique(p.clues[:i] + p.clues[i + 1:])
  # reduce_clues refuses a clue set that is not unique to begin with
  with pytest.raises(ValueError, match="does not determine a unique solution"):
    reduce_clues(p.clues[1:], oracle.is_unique, np.random.default_rng(0))


def test_generation_is_deterministic_from_the_seed():
  for n, m in [(2, 2), (3, 3), (5, 4)]:
    a, b = puzzle(n, m, seed=11), puzzle(n, m, seed=11)
    assert a == b
    assert render.compact_prompt(a) == render.compact_prompt(b)
    assert render.puzzle_text(a) == render.puzzle_text(b)
  assert puzzle(4, 4, seed=1) != puzzle(4, 4, seed=2)
  task = get_task("zebra")
  ex1, ex2 = task.sample(np.random.default_rng(3)), task.sample(np.random.default_rng(3))
  assert ex1 == ex2


def test_difficulty_measures():
  assert search_space(3, 4) == 6 ** 4 == 1296
  assert [size_bucket(search_space(n, m)) for n, m in [(3, 3), (3, 4), (4, 5), (5, 5)]] == [
      "small", "medium", "large", "xl"]
  p = puzzle(5, 5)
  c1, c2 = z3_conflicts(p), z3_conflicts(p)
  assert isinstance(c1, int) and c1 == c2 >= 0
  ex = get_task("zebra", max_houses=6, max_attributes=6).make_example(p)
  meta = ex.meta
  assert meta["difficulty"] == 11 and isinstance(meta["difficulty"], int)  # ceil(log10(120^5))
  assert (meta["num_houses"], meta["num_attributes"], meta["size"]) == (5, 5, "5x5")
  assert meta["search_space"] == 120 ** 5 and meta["bucket"] == "xl" and meta["z3_conflicts"] == c1
  json.dumps(meta)


def test_deduction_trace_fixes_each_value_once_and_ends_at_the_solution(puzzles):
  for p in puzzles.values():
    steps = deduce(p)
    assert sorted(s.value for s in steps) == [(a, v) for a in range(p.num_attributes) for v in range(p.num_houses)]
    assert all(s.house == p.house_of[s.value[0]][s.value[1]] for s in steps)
    for s in steps:
      if isinstance(s.reason, Clue):
        assert s.reason in p.clues


def test_compact_rendering_round_trips_and_fits_the_tiny_context():
  task = get_task("zebra", max_houses=4, max_attributes=3)
  rng = np.random.default_rng(0)
  for _ in range(20):
    ex = task.sample(rng)
    assert set(ex.prompt + ex.trace) <= set(task.charset)
    assert task.extract_answer(ex.trace) == ex.answer
    assert task.verify(ex.trace, ex)
    assert len(ex.prompt) + len(ex.trace) + 2 <= 256
  ex = task.sample(np.random.default_rng(1), num_houses=2, num_attributes=2)
  grid = ex.trace.split("A:")[1]
  spaced = "blah;a: " + " | ".join(" ".join(grid.upper().split("|")[h]) for h in range(2)) + " \n"
  assert task.verify(spaced, ex)  # whitespace and case are ignored


def test_natural_rendering_and_json_extraction():
  task = get_task("zebra", style="natural")
  p = puzzle(3, 3, 4)
  ex = task.make_example(p)
  assert "## Clues:" in ex.prompt and "House 1" in ex.prompt
  assert task.verify(ex.trace, ex)
  grid = render.answer_json(p)
  shouted = {k.upper().replace(" ", "  "): {a.upper(): f"  {v.upper()} " for a, v in row.items()}
             for k, row in grid.items()}
  response = "Some reasoning {not json}.\n```json\n" + json.dumps({"solution": shouted}, indent=3) + "\n```"
  assert task.verify(response, ex)
  assert task.extract_answer("no answer here") is None
  assert task.extract_answer('{"reasoning": "x"}') is None


def test_cell_and_puzzle_accuracy_by_hand():
  task = get_task("zebra")
  ex = task.make_example(puzzle(2, 3, 0))
  reference = json.loads(ex.answer)
  rows = [reference["1"], reference["2"]]
  letters = sorted(rows[0])
  compact = lambda r1, r2: "A:" + "".join(r1[a] for a in letters) + "|" + "".join(r2[a] for a in letters)  # noqa: E731
  assert task.cell_accuracy(compact(rows[0], rows[1]), ex) == 1.0
  swapped_a = ({**rows[0], "a": rows[1]["a"]}, {**rows[1], "a": rows[0]["a"]})  # 2 of 6 cells wrong
  assert task.cell_accuracy(compact(*swapped_a), ex) == pytest.approx(4 / 6)
  assert not task.verify(compact(*swapped_a), ex)
  all_swapped = (rows[1], rows[0])  # every cell wrong
  assert task.cell_accuracy(compact(*all_swapped), ex) == 0.0
  one_house = "A:" + "".join(rows[0][a] for a in letters)  # house 2 missing: 3 of 6
  assert task.cell_accuracy(one_house, ex) == pytest.approx(0.5)
  assert task.cell_accuracy("garbage", ex) == 0.0


def test_partial_credit_reward():
  task = get_task("zebra")
  ex = task.make_example(puzzle(2, 2, 1))
  ref = json.loads(ex.answer)
  good = "A:" + "|".join(ref[h]["a"] + ref[h]["b"] for h in ("1", "2"))
  half = "A:" + ref["2"]["a"] + ref["1"]["b"] + "|" + ref["1"]["a"] + ref["2"]["b"]  # names swapped
  fn = rewards_lib.get_reward("partial_credit")
  out = fn([good, half, good, "x"], [True, True, False, True], [5, 5, 5, 1], ex, task)
  np.testing.assert_allclose(out, [1.0, 0.5, 0.0, 0.0])
  arith = get_task("arith")
  with pytest.raises(rewards_lib.RewardConfigError, match="partial_credit"):
    fn(["1"], [True], [1], arith.sample(np.random.default_rng(0)), arith)
  safe = rewards_lib.safe_reward(rewards_lib.combine_rewards({"partial_credit": 1.0}))
  with pytest.raises(rewards_lib.RewardConfigError):  # a config error is not swallowed as a bad response
    safe(["1"], [True], [1], arith.sample(np.random.default_rng(0)), arith)


def test_rewards_on_a_group_as_the_trainer_scores_it():
  """The trainer's scoring path: TaskSource prompts (rl.min_difficulty filter) and the combined,
  safe reward over a group of G responses."""
  from tlt_jax.data.iterator import repeat_groups
  from tlt_jax.data.sources import TaskSource

  task = get_task("zebra", max_houses=3, max_attributes=3)
  source = TaskSource(task, 8, seed=0, stream=2, min_difficulty=2)
  examples = [source[i] for i in range(4)]
  assert all(isinstance(e.meta["difficulty"], int) and e.meta["difficulty"] >= 2 for e in examples)
  groups = repeat_groups(examples, 3)
  reward_fn = rewards_lib.safe_reward(rewards_lib.combine_rewards(
      {"verifier": 1.0, "format": 0.1, "partial_credit": 0.5}))
  ex = groups[0]
  responses = [ex.trace, ex.trace.split("A:")[0] + "A:" + "zz", ex.trace]
  r = reward_fn(responses, [True, True, False], [len(x) for x in responses], ex, task)
  np.testing.assert_allclose(r, [1.0 + 0.1 + 0.5, 0.0, 0.0], rtol=1e-6)
  assert reward_fn.failures == 0


def test_task_options_are_checked():
  with pytest.raises(ValueError, match=r"zebra.max_houses=7 is not allowed; allowed: an int in \[2, 6\]"):
    get_task("zebra", max_houses=7)
  with pytest.raises(ValueError, match="zebra.min_attributes=4 must be <= zebra.max_attributes=3"):
    get_task("zebra", min_attributes=4, max_attributes=3)
  with pytest.raises(ValueError, match=r"zebra.style='chat' is not allowed; allowed: \('compact', 'natural'\)"):
    get_task("zebra", style="chat")
  with pytest.raises(ValueError, match="num_houses=1 is not allowed"):
    generate_puzzle(np.random.default_rng(0), 1, 3)


def test_benchmark_split_and_public_record_reader(tmp_path):
  sizes = [(2, 2), (3, 4), (6, 6)]
  split = bench.benchmark_puzzles(2, sizes=sizes)
  assert [p.size for p in split] == ["2x2", "2x2", "3x4", "3x4", "6x6", "6x6"]
  assert split == bench.benchmark_puzzles(2, sizes=sizes)
  assert split[0] != split[1]
  assert len(bench.BENCHMARK_SIZES) == 25
  records = [bench.to_public_record(p) for p in split[:4]]
  jsonl = tmp_path / "grid_mode.jsonl"
  jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
  import pyarrow as pa
  import pyarrow.parquet as pq
  parquet = tmp_path / "grid_mode.parquet"
  pq.write_table(pa.Table.from_pylist(records), parquet)
  natural = get_task("zebra", style="natural")
  for path in (jsonl, parquet):
    loaded = bench.load_public_records(str(path))
    assert [r["size"] for r in loaded] == ["2*2", "2*2", "3*4", "3*4"]
    for p, record in zip(split, loaded):
      ex = natural.example_from_public_record(record)
      assert ex.meta["size"] == p.size and ex.meta["search_space"] == p.search_space
      assert render.puzzle_text(p) in ex.prompt
      assert natural.verify(render.natural_trace(p, deduce(p)), ex)  # our JSON answer grades right
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"id": "x", "puzzle": "..."}) + "\n")
  with pytest.raises(ValueError, match="no field 'solution'"):
    bench.load_public_records(str(bad))


def test_zebra_config_is_valid():
  from tlt_jax import config as config_lib

  spec = importlib.util.spec_from_file_location("zebra_config", os.path.join(ROOT, "configs", "zebra.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for arg in ("", "quick"):
    config = config_lib.finalize(module.get_config(arg))
    assert config.task.name == "zebra"
    task = get_task("zebra", **{k: v for k, v in config.task.items() if k != "name"})
    ex = task.sample(np.random.default_rng(0))
    assert len(ex.prompt) + 1 + config.rollout.max_new_tokens <= config.model.max_position_embeddings
  with pytest.raises(ValueError, match="argument 'big' is not allowed"):
    module.get_config("big")


def test_removal_follows_the_zebralogic_weights_and_batch_schedule():
  """The reference generator's removal: draws with replacement in proportion to the type weights
  (relational clues first), batches of 10 % -> 5 % -> 1 of the current count."""
  from tlt_jax.data.zebra.puzzle import REMOVAL_WEIGHTS, all_true_clues, removal_draw

  rng = np.random.default_rng(0)
  house_of = tuple(tuple(int(h) for h in rng.permutation(4)) for _ in range(4))
  clues = all_true_clues(house_of, rng)
  counts = {k: sum(c.kind == k for c in clues) for k in REMOVAL_WEIGHTS}
  assert counts["directly_left"] + counts["beside"] == 3 * 16  # one of the two per adjacent pair
  assert counts["directly_left"] > 0 and counts["beside"] > 0
  total_weight = sum(REMOVAL_WEIGHTS[k] * c for k, c in counts.items())
  draws = removal_draw(clues, 200_000, REMOVAL_WEIGHTS, np.random.default_rng(1))
  drawn = {k: 0 for k in REMOVAL_WEIGHTS}
  for i in draws.tolist():
    drawn[clues[i].kind] += 1
  for kind, c in counts.items():
    expected = REMOVAL_WEIGHTS[kind] * c / total_weight
    share = drawn[kind] / len(draws)
    assert abs(share - expected) < 4 * np.sqrt(expected * (1 - expected) / len(draws)) + 1e-9, kind
  # per clue, a one_between clue is drawn twice as often as a found_at clue (1.5 vs 0.75)
  per_clue = {k: drawn[k] / counts[k] for k in ("found_at", "one_between", "left_of") if counts[k]}
  assert per_clue["one_between"] / per_clue["found_at"] == pytest.approx(2.0, rel=0.05)
  assert per_clue["left_of"] / per_clue["found_at"] == pytest.approx(1.6, rel=0.05)

  # the batch schedule, with an oracle that accepts removals while more than 30 clues remain
  trace = []
  kept = reduce_clues(clues, lambda cs: len(cs) >= 30, np.random.default_rng(2), trace=trace)
  assert len(kept) == 30
  size = len(clues)
  step = "tenth"
  for n, distinct, ok in trace:
    want = {"tenth": size // 10, "twentieth": size // 20, "one": 1}[step]
    assert n == want, (n, want, step)
    assert distinct <= n
    if ok:
      size -= distinct
      step = "tenth"
    else:
      step = {"tenth": "twentieth", "twentieth": "one", "one": "end"}[step]
  assert step == "end" and {n for n, _, _ in trace} >= {size // 10, 1}
  # generated puzzles keep relational clues more often than the halving recipe does
  def relational_share(recipe):
    kinds = [c.kind for k in range(6) for c in generate_puzzle(np.random.default_rng([3, 4, 4, k]), 4, 4,
                                                               recipe=recipe).clues]
    return sum(k not in ("found_at", "not_at", "same_house") for k in kinds) / len(kinds)
  assert relational_share("zebralogic") < relational_share("halving")


def test_recipes_give_unique_minimal_puzzles_and_reject_unknown_names():
  for recipe in ("zebralogic", "halving"):
    for n, m in [(3, 3), (4, 3)]:
      p = generate_puzzle(np.random.default_rng([9, n, m]), n, m, recipe=recipe)
      assert brute_force_solutions(p) == [p.house_of]
      for i in range(len(p.clues)):
        assert count_solutions(p, p.clues[:i] + p.clues[i + 1:], limit=2) == 2
  with pytest.raises(ValueError, match="recipe='nope' is not allowed"):
    generate_puzzle(np.random.default_rng(0), 3, 3, recipe="nope")
  halving = get_task("zebra", recipe="halving").sample(np.random.default_rng(4), 3, 3)
  assert halving.answer == get_task("zebra").make_example(
      generate_puzzle(np.random.default_rng(4), 3, 3, recipe="halving")).answer
  with pytest.raises(ValueError, match="zebra.recipe='nope' is not allowed"):
    get_task("zebra", recipe="nope")


def test_pooled_cell_accuracy_is_zeroevals_micro_average():
  """ZeroEval pools cells over puzzles (unparsed answers count 0); the per-sample mean weights
  every puzzle equally. A 2x2 fully right and an unparsed 4x4: mean 0.5, pooled 4 / 20."""
  from experiments.zebra_scaling import aggregate, score_puzzles

  task = get_task("zebra", style="natural")
  small, big = task.make_example(puzzle(2, 2)), task.make_example(puzzle(4, 4))
  right = render.natural_trace(puzzle(2, 2), deduce(puzzle(2, 2)))
  rows = score_puzzles(task, [small, big], [[(right, True)], [("no grid here", True)]], best_of=[1])
  assert [(r["cells_right"], r["cells_total"]) for r in rows] == [(4, 4), (0, 16)]
  for r in rows:
    r["bucket"] = "all"
  (rec,) = aggregate(rows, "bucket", "p", [1])
  assert rec["cell_acc"] == pytest.approx(0.5)
  assert rec["cell_acc_pooled"] == pytest.approx(4 / 20)


def test_public_records_reject_blanked_solutions_and_json_arrays(tmp_path):
  record = bench.to_public_record(puzzle(2, 2))
  blanked = json.loads(json.dumps(record))
  blanked["solution"]["rows"] = [[r[0]] + ["___"] * (len(r) - 1) for r in blanked["solution"]["rows"]]
  path = tmp_path / "blank.jsonl"
  path.write_text(json.dumps(blanked) + "\n")
  with pytest.raises(ValueError, match="record 0: the solution is blanked"):
    bench.load_public_records(str(path))
  empty = dict(record, solution={"header": record["solution"]["header"], "rows": []})
  path.write_text(json.dumps(empty) + "\n")
  with pytest.raises(ValueError, match="the solution is blanked"):
    bench.load_public_records(str(path))
  array = tmp_path / "array.json"
  array.write_text(json.dumps([record, record]))
  with pytest.raises(ValueError, match="line 1: the file holds a JSON array"):
    bench.load_public_records(str(array))
  array.write_text(json.dumps([record], indent=1))
  with pytest.raises(ValueError, match="the file holds a JSON array"):
    bench.load_public_records(str(array))


def test_answer_targets_and_holdout_keep_training_draws_off_the_evaluation_puzzles(monkeypatch):
  """trace="answer": the SFT target is the grid alone and grades right. holdout: a puzzle key is
  its size and clue set (order-free), and `sample` never returns a held-out one, while the same
  rng without holdout does."""
  from tlt_jax.data.tasks.zebra import puzzle_key

  p = puzzle(3, 3)
  for style in ("compact", "natural"):
    task = get_task("zebra", style=style, trace="answer", z3=False)
    ex = task.make_example(p)
    assert "@" not in ex.trace and "By clue" not in ex.trace
    assert task.verify(ex.trace, ex) and ex.meta["key"] == puzzle_key(p)
  facts = get_task("zebra", trace="facts", z3=False)
  ex = facts.make_example(p)
  assert ex.trace == "A:" + render.compact_facts(p) and facts.verify(ex.trace, ex)
  assert ex.answer == get_task("zebra", z3=False).make_example(p).answer  # the same grid
  first = ex.trace.split(",")[0]  # "A:a?@h": one right cell of nine
  assert facts.cell_accuracy(first, ex) == pytest.approx(1 / 9) and not facts.verify(first, ex)
  assert facts.extract_answer("A:a1@2,a2@") is None
  ordered = get_task("zebra", trace="ordered", z3=False).make_example(p)  # the solver's order
  steps = deduce(p)
  assert ordered.trace == "A:" + ",".join(f"{render.compact_value(s.value)}@{s.house + 1}" for s in steps)
  assert sorted(ordered.trace[2:].split(",")) == sorted(ex.trace[2:].split(","))  # the same facts
  assert facts.verify(ordered.trace, ex)
  shuffled = type(p)(p.num_houses, p.attributes, p.values, p.house_of, tuple(reversed(p.clues)), "")
  assert puzzle_key(shuffled) == puzzle_key(p) != puzzle_key(puzzle(3, 3, k=1))
  with pytest.raises(ValueError, match="zebra.trace='steps' is not allowed"):
    get_task("zebra", trace="steps")
  plain = get_task("zebra", z3=False)
  keys = [plain.sample(np.random.default_rng([1, i]), 2, 2).meta["key"] for i in range(200)]
  held = {k for k in keys[:20]}
  heldout = get_task("zebra", z3=False, holdout=held)
  drawn = [heldout.sample(np.random.default_rng([1, i]), 2, 2).meta["key"] for i in range(200)]
  assert sum(k in held for k in keys) >= 20 and not any(k in held for k in drawn)
  monkeypatch.setattr("tlt_jax.data.tasks.zebra.puzzle_key", lambda p: "every puzzle")
  with pytest.raises(ValueError, match="zebra.holdout: 1,000 draws in a row were held out"):
    get_task("zebra", z3=False, holdout={"every puzzle"}).sample(np.random.default_rng(0), 2, 2)


def test_seed_spread_is_mean_std_min_max_over_seeds():
  from experiments.zebra_scaling import across_seeds, parse_seeds

  recs = [{"kind": "size", "seed": s, "policy": "sft", "size": "2x2", "puzzles": 4, "search_space": 4,
           "chance_puzzle": 0.25, "chance_cell": 0.5, "puzzle_acc": a, "cell_acc": a, "answered": 1.0}
          for s, a in ((0, 0.2), (1, 0.5), (2, 0.8))]
  (rec,) = across_seeds(recs, "size", "size", (1,))
  assert rec["seeds"] == [0, 1, 2] and rec["chance_puzzle"] == 0.25
  assert rec["puzzle_acc_mean"] == pytest.approx(0.5) and rec["puzzle_acc_min"] == 0.2
  assert rec["puzzle_acc_max"] == 0.8 and rec["puzzle_acc_std"] == pytest.approx(np.std([0.2, 0.5, 0.8]))
  assert "greedy_acc_mean" not in rec  # absent from the seeds' records
  assert parse_seeds("0, 1,2") == [0, 1, 2]
  with pytest.raises(ValueError, match="config.zebra.seeds='a' is not allowed"):
    parse_seeds("a")
