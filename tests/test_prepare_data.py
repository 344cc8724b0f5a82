"""scripts/prepare_data.py: published GSM8K / MATH layouts -> verl-style parquet the `verl` task reads."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scripts import prepare_data
from tlt_jax.data import get_task
from tlt_jax.data.readers import load_verl_parquet

GSM8K = [
    {"question": "Natalia sold clips to 48 friends in April and half as many in May. How many in all?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"},
    {"question": "Weng earns $12 an hour. How much for 50 minutes?", "answer": "12/60*50 = 10\n#### 10"},
    {"question": "A row without a final answer.", "answer": "no marker here"},
    {"question": "Betty needs $100 and has half. Parents give $15, grandparents twice that. How much more?",
     "answer": "50 - 15 - 30 = 5\n#### 5"},
]
MATH = [
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "Divide: $\\boxed{\\frac{1}{2}}$.", "level": "Level 1",
     "type": "Prealgebra"},
    {"problem": "What is $\\sqrt{16}$?", "solution": "It is $\\boxed{4}$.", "level": "Level 2", "type": "Algebra"},
    {"problem": "No box.", "solution": "The answer is 3.", "level": "Level 1", "type": "Algebra"},
]
MATH500 = [{"problem": "Compute $1+1$.", "solution": "$1+1=\\boxed{2}$", "answer": "2", "subject": "Algebra",
            "level": 1, "unique_id": "test/algebra/1.json"}]


def test_gsm8k_parquet_to_verl_splits(tmp_path, capsys):
  train = tmp_path / "train.parquet"
  pq.write_table(pa.Table.from_pylist(GSM8K), train)
  out = tmp_path / "gsm8k"
  assert prepare_data.main(["gsm8k", "--train", str(train), "--test_size", "1", "--out", str(out)]) == 0
  assert json.loads(capsys.readouterr().out)["rows"] == {"train": 2, "test": 1}  # the bad row skipped
  rows = pq.read_table(out / "train.parquet").to_pylist() + pq.read_table(out / "test.parquet").to_pylist()
  assert sorted(r["reward_model"]["ground_truth"] for r in rows) == ["10", "5", "72"]
  first = [r for r in rows if r["reward_model"]["ground_truth"] == "72"][0]
  assert first["data_source"] == "openai/gsm8k" and first["ability"] == "math"
  assert first["prompt"] == [{"role": "user", "content": GSM8K[0]["question"] + " Let's think step by step "
                              "and output the final answer after \"####\"."}]
  assert first["extra_info"]["answer"] == GSM8K[0]["answer"]
  task = get_task("verl", path=str(out / "train.parquet"))
  examples = [task.example_from_record(r, i) for i, r in enumerate(task.records)]
  for ex in examples:
    assert ex.meta["answer_format"] == "gsm8k" and task.verify(ex.trace, ex)  # worked solution as SFT trace
    assert not task.verify("#### 999", ex)


def test_math_jsonl_with_math500_test(tmp_path):
  train, test = tmp_path / "math.jsonl", tmp_path / "math500.jsonl"
  train.write_text("".join(json.dumps(r) + "\n" for r in MATH))
  test.write_text("".join(json.dumps(r) + "\n" for r in MATH500))
  out = tmp_path / "math"
  assert prepare_data.main(["math", "--train", str(train), "--test", str(test), "--out", str(out)]) == 0
  records = load_verl_parquet(str(out / "train.parquet"))
  assert [r["answer"] for r in records] == ["\\frac{1}{2}", "4"]
  assert records[0]["extra"]["extra_info"]["level"] == "Level 1"
  assert records[0]["messages"][0]["content"].endswith("output the final answer within \\boxed{}.")
  held = load_verl_parquet(str(out / "test.parquet"))
  assert held[0]["answer"] == "2" and held[0]["extra"]["extra_info"]["unique_id"] == "test/algebra/1.json"
  task = get_task("verl", path=str(out / "train.parquet"))
  ex = task.example_from_record(task.records[0], 0)
  assert ex.meta["answer_format"] == "math" and task.verify("so \\boxed{\\dfrac{1}{2}}", ex)


def test_errors_exit_2(tmp_path, capsys):
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(GSM8K[2]) + "\n")
  assert prepare_data.main(["gsm8k", "--train", str(bad), "--out", str(tmp_path / "o")]) == 2
  assert "data error:" in capsys.readouterr().err
  assert prepare_data.main(["gsm8k", "--train", str(tmp_path / "missing.parquet"), "--out", str(tmp_path)]) == 2
  mixed = tmp_path / "mixed.jsonl"
  mixed.write_text("".join(json.dumps(r) + "\n" for r in GSM8K))
  assert prepare_data.main(["gsm8k", "--train", str(mixed), "--out", str(tmp_path / "o2"),
                            "--on_bad_record", "error"]) == 2
  assert "row 2: no final answer" in capsys.readouterr().err
