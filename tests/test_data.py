"""Data pipeline: tokenizers, tasks, sources (TFDS array_record, JSONL, parquet), the prompt
iterator and SFT / prompt batching."""

import json

import numpy as np
import pytest

from tlt_jax.data import (CharTokenizer, Example, HFTokenizer, PromptIterator, encode_prompts, get_task,
                          load_tokenizer, make_sft_batch, next_token_targets, register_task, repeat_groups)
from tlt_jax.data import sources


# ----------------------------------------------------------------------------- tokenizers


def test_char_tokenizer_round_trip_and_specials(tmp_path):
  tok = CharTokenizer("0123456789+=")
  assert (tok.pad_id, tok.bos_id, tok.eos_ids) == (0, 1, (2,))
  assert tok.vocab_size == 3 + 12
  ids = tok.encode("12+9=21", add_bos=True)
  assert ids[0] == tok.bos_id and len(ids) == 8
  assert tok.decode(ids) == "12+9=21"
  assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == "12+9=21"
  assert tok.decode([1, 3, 2], skip_special=False) == "<bos>0<eos>"
  tok.save(str(tmp_path / "char"))
  back = load_tokenizer(str(tmp_path / "char"))
  assert isinstance(back, CharTokenizer) and back.charset == tok.charset


def test_char_tokenizer_errors():
  tok = CharTokenizer("01+")
  with pytest.raises(ValueError, match=r"'x'.*allowed: '01\+'"):
    tok.encode("0x1")
  with pytest.raises(ValueError, match="out of range"):
    tok.decode([99])
  with pytest.raises(ValueError, match="duplicate"):
    CharTokenizer("001")
  default = load_tokenizer("char")
  assert default.charset == get_task("arith").charset
  with pytest.raises(FileNotFoundError, match="spec must be 'char'"):
    load_tokenizer("/nonexistent/tok")


def _train_hf_tokenizer(path):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<|im_end|>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  corpus = ["Natalia sold clips to 48 of her friends in April.", "How many clips did she sell?",
            "#### 72", "The answer is \\boxed{72}."] * 5
  tok.train_from_iterator(corpus, trainer=trainer)
  tok.save(str(path))


def test_hf_tokenizer_trained_in_test(tmp_path):
  _train_hf_tokenizer(tmp_path / "tokenizer.json")
  tok = load_tokenizer(str(tmp_path), bos="<s>", eos=["</s>", "<|im_end|>"], pad="<pad>")
  assert isinstance(tok, HFTokenizer)
  assert tok.bos_id == 1 and tok.eos_ids == (2, 3) and tok.pad_id == 0 and tok.eos_id == 2
  text = "Natalia sold 48 clips. #### 72"
  ids = tok.encode(text, add_bos=True)
  assert ids[0] == tok.bos_id and tok.bos_id not in ids[1:]
  assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
  assert "</s>" in tok.decode(ids + [tok.eos_id], skip_special=False)
  # Save writes tokenizer_config.json / generation_config.json; a plain load then finds the ids.
  tok.save(str(tmp_path / "saved"))
  again = load_tokenizer(str(tmp_path / "saved" / "tokenizer.json"))
  assert (again.bos_id, again.eos_ids, again.pad_id) == (1, (2, 3), 0)
  assert again.encode(text) == tok.encode(text)
  with pytest.raises(ValueError, match="eos token '<eot>' is not in the vocabulary"):
    HFTokenizer(str(tmp_path), eos="<eot>")
  with pytest.raises(ValueError, match="no EOS token given"):
    HFTokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- tasks


def test_task_registry_errors():
  with pytest.raises(ValueError, match=r"unknown task 'nope'; registered tasks: \[.*'arith'.*'gsm8k'"):
    get_task("nope")
  with pytest.raises(ValueError, match=r"no option\(s\) \['digits'\]; allowed: .*'max_digits'"):
    get_task("arith", digits=3)
  with pytest.raises(ValueError, match=r"arith.alpha=-1.0 must be >= 0"):
    get_task("arith", alpha=-1.0)
  with pytest.raises(ValueError, match="already registered"):
    register_task("arith")(type("Other", (), {}))


def test_arith_worked_example_and_verifier():
  task = get_task("arith")
  ex = task.make_example(347, 85)
  assert ex.prompt == "743+58="
  assert ex.trace == "7+5=12,4+8+1=13,3+0+1=4;A:234"
  assert ex.answer == "234" and ex.meta["difficulty"] == 3
  assert task.make_example(99, 1).trace == "9+1=10,9+0+1=10;A:001"
  assert task.verify(ex.trace, ex)
  assert task.verify("junk;A:1|R:7+5=12;A:234", ex)  # the LAST marker counts
  assert not task.verify(ex.trace[:-1] + "5", ex)
  assert not task.verify(ex.trace.replace(";A:", ";"), ex)  # no marker: wrong
  assert not task.verify(ex.trace + "0", ex)
  assert task.extract_answer("7+5=12") is None
  assert task.extract_answer("x;A: 234 ") == "234"


def test_arith_samples_verify_and_fit_the_bounds():
  task = get_task("arith")
  tok = CharTokenizer(task.charset)
  rng = np.random.default_rng(0)
  for _ in range(2000):
    ex = task.sample(rng)
    a, b = int(ex.meta["a"]), int(ex.meta["b"])
    assert ex.answer == str(a + b)[::-1]
    assert ex.prompt == f"{str(a)[::-1]}+{str(b)[::-1]}="
    assert task.verify(ex.trace, ex)
    wrong = str(a + b + 1)[::-1]
    assert not task.verify(ex.trace[: -len(ex.answer)] + wrong, ex)
    assert len(ex.prompt) <= task.max_prompt_len and len(ex.trace) <= task.max_trace_len
    tok.encode(ex.prompt + ex.trace)  # the charset covers everything
    for recheck in ex.trace.split(";A:")[0].split("|R:")[1:]:
      assert recheck in ex.trace.split("|R:")[0].split(",")
  same = [task.sample(np.random.default_rng(7)) for _ in range(2)]
  assert same[0] == same[1]


def test_arith_difficulty_is_long_tailed_and_length_grows():
  task = get_task("arith", max_digits=8, alpha=1.5)
  rng = np.random.default_rng(1)
  exs = [task.sample(rng) for _ in range(4000)]
  n = np.array([e.meta["difficulty"] for e in exs])
  trace_len = np.array([len(e.trace) for e in exs])
  assert n.min() == 1 and n.max() == 8
  assert np.mean(n <= 2) > 0.6  # P(n <= 2) = 0.70
  assert 0.005 < np.mean(n == 8) < 0.05  # P(8) = 0.023
  np.testing.assert_allclose(np.bincount(n, minlength=9)[1:] / len(n), task.digit_probs, atol=0.03)
  means = [trace_len[n == d].mean() for d in range(1, 9)]
  assert all(x < y for x, y in zip(means, means[1:])), means
  clean = np.array([e.meta["clean_trace_len"] for e in exs])
  assert (trace_len >= clean).all()
  assert 0.4 < np.mean(trace_len > clean) < 0.6  # p_recheck = 0.5
  no_recheck = get_task("arith", p_recheck=0.0)
  ex = no_recheck.sample(np.random.default_rng(3))
  assert len(ex.trace) == ex.meta["clean_trace_len"] and "|R:" not in ex.trace


def test_file_task_answers():
  gsm = get_task("gsm8k")
  ex = gsm.example_from_record({"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}, 5)
  assert ex.prompt == "Question: 2+2?\nAnswer:" and ex.answer == "4" and ex.prompt_id == 5
  assert ex.trace.endswith("#### 4") and ex.meta["difficulty"] == 2
  assert gsm.verify("so #### 4", ex) and gsm.verify("#### 4.0", ex) and gsm.verify("\\boxed{4}", ex)
  assert not gsm.verify("#### 5", ex) and not gsm.verify("4", ex)
  assert gsm.verify("#### 1,000", gsm.example_from_record({"question": "q", "answer": "#### 1000"}))
  math = get_task("math")
  ex = math.example_from_record({"question": "q", "answer": "So $x=\\boxed{\\frac{1}{2}}$.", "level": "Level 4"})
  assert ex.answer == "\\frac{1}{2}" and ex.meta["difficulty"] == 4
  assert math.verify("\\boxed{1} then \\boxed{\\dfrac{1}{2}}", ex)
  assert not math.verify("\\boxed{\\frac{1}{3}}", ex) and not math.verify("\\boxed{\\frac{1}{2}", ex)
  short = math.example_from_record({"question": "q", "answer": "7"})
  assert short.trace == "\\boxed{7}" and short.answer == "7"


# ----------------------------------------------------------------------------- sources


def test_tfds_array_record_round_trip(tmp_path):
  builder = sources.build_task_dataset(str(tmp_path), "arith", num_examples={"train": 40, "test": 8}, seed=5,
                                       task_kwargs={"max_digits": 5})
  files = sorted(p.name for p in (tmp_path / "tlt_task").rglob("*.array_record*"))
  assert files == ["tlt_task-test.array_record-00000-of-00001", "tlt_task-train.array_record-00000-of-00001"]
  ref = sources.TaskSource("arith", 40, seed=5, task_kwargs={"max_digits": 5})
  via_builder = sources.TFDSSource(builder=builder)
  via_name = sources.TFDSSource(name=f"tlt_task/{builder.builder_config.name}", data_dir=str(tmp_path))
  via_dir = sources.TFDSSource(builder_dir=builder.data_dir)
  for src in (via_builder, via_name, via_dir):
    assert len(src) == 40
    assert [src[i] for i in range(40)] == [ref[i] for i in range(40)]
  test_ref = sources.TaskSource("arith", 8, seed=5, stream=1, task_kwargs={"max_digits": 5})
  test_split = sources.TFDSSource(builder=builder, split="test")
  assert [test_split[i] for i in range(8)] == [test_ref[i] for i in range(8)]
  assert [test_split[i] for i in range(8)] != [ref[i] for i in range(8)]
  with pytest.raises(ValueError, match=r"split 'validation' not in .* available: \['test', 'train'\]|"
                                       r"available: \['train', 'test'\]"):
    sources.TFDSSource(builder=builder, split="validation")


_GSM = [{"question": "Tom has 3 apples and buys 4. How many?", "answer": "3+4=<<3+4=7>>7\n#### 7"},
        {"question": "Half of 10?", "answer": "10/2=<<10/2=5>>5\n#### 5"},
        {"problem": "Compute 1/2 + 0.", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "level": "Level 2"}]


def test_jsonl_loader_and_errors(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text("\n".join(json.dumps(r) for r in _GSM) + "\n\n")
  records = sources.load_jsonl(str(path))
  assert [r["question"] for r in records] == [r.get("question", r.get("problem")) for r in _GSM]
  assert records[2] == {"question": "Compute 1/2 + 0.", "answer": _GSM[2]["solution"], "level": "Level 2"}
  src = sources.make_source("file", path=str(path), task="gsm8k")
  assert len(src) == 3 and src[1].answer == "5" and src[1].prompt_id == 1 and src[2].answer == "\\frac{1}{2}"
  assert all(src.task.verify(src[i].trace, src[i]) for i in range(3))

  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    sources.load_jsonl(str(tmp_path / "missing.jsonl"))
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps(_GSM[0]) + "\n" + json.dumps({"question": "q", "reply": "#### 1"}) + "\n")
  with pytest.raises(ValueError, match=r"bad.jsonl, line 2: no answer field; allowed names: "
                                       r"\('answer', 'solution'\).*present: \['question', 'reply'\]"):
    sources.load_jsonl(str(bad))
  with pytest.raises(ValueError, match=r"line 1: answer field 'reply' is missing"):
    sources.load_jsonl(str(bad), answer_field="reply")
  broken = tmp_path / "broken.jsonl"
  broken.write_text(json.dumps(_GSM[0]) + "\n{not json\n")
  with pytest.raises(ValueError, match=r"broken.jsonl, line 2: invalid JSON"):
    sources.load_jsonl(str(broken))
  typed = tmp_path / "typed.jsonl"
  typed.write_text(json.dumps({"question": ["a"], "answer": 3}) + "\n")
  with pytest.raises(ValueError, match=r"typed.jsonl, line 1: field 'question' must be a string or a number"):
    sources.load_jsonl(str(typed))
  (tmp_path / "x.csv").write_text("q,a\n")
  with pytest.raises(ValueError, match=r"x.csv': unsupported extension; allowed: \('.jsonl'"):
    sources.load_qa_file(str(tmp_path / "x.csv"))


def test_parquet_loader_and_errors(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq

  path = tmp_path / "math.parquet"
  pq.write_table(pa.table({"problem": ["What is 1+1?", "Simplify 2/4."],
                           "solution": ["$\\boxed{2}$", "$\\boxed{\\frac{1}{2}}$"],
                           "level": ["Level 1", "Level 3"]}), str(path))
  src = sources.RecordSource.from_file(str(path), task="math")
  assert [src[i].answer for i in range(2)] == ["2", "\\frac{1}{2}"]
  assert [src[i].meta["difficulty"] for i in range(2)] == [1, 3]
  assert src.task.verify("thus \\boxed{2}", src[0])

  with pytest.raises(FileNotFoundError, match="nope.parquet"):
    sources.load_parquet(str(tmp_path / "nope.parquet"))
  nocol = tmp_path / "nocol.parquet"
  pq.write_table(pa.table({"question": ["q"], "text": ["#### 1"]}), str(nocol))
  with pytest.raises(ValueError, match=r"nocol.parquet, columns: no answer field; allowed names: "
                                       r"\('answer', 'solution'\).*present: \['question', 'text'\]"):
    sources.load_parquet(str(nocol))
  assert sources.load_parquet(str(nocol), answer_field="text") == [{"question": "q", "answer": "#### 1"}]
  nulls = tmp_path / "nulls.parquet"
  pq.write_table(pa.table({"question": ["q0", None], "answer": ["#### 1", "#### 2"]}), str(nulls))
  with pytest.raises(ValueError, match=r"nulls.parquet, row 1: field 'question' must be a string"):
    sources.load_parquet(str(nulls))


def test_task_source_random_access_is_deterministic():
  src = sources.TaskSource("arith", 100, seed=1)
  assert src[17] == src[17] and src[17].prompt_id == 17
  assert [src[i] for i in range(10)] != [sources.TaskSource("arith", 100, seed=2)[i] for i in range(10)]
  with pytest.raises(IndexError):
    src[100]
  with pytest.raises(ValueError, match="unknown data source kind 'csv'"):
    sources.make_source("csv")


def test_task_source_min_difficulty_rejection_samples_per_index():
  plain = sources.TaskSource("arith", 200, seed=3)
  hard = sources.TaskSource("arith", 200, seed=3, min_difficulty=3)
  diffs = [hard[i].meta["difficulty"] for i in range(200)]
  assert min(diffs) >= 3 and hard[11] == hard[11] and hard[11].prompt_id == 11
  # An index whose first draw already qualifies is the unfiltered example.
  same = [i for i in range(200) if plain[i].meta["difficulty"] >= 3]
  assert same and all(hard[i] == plain[i] for i in same)
  with pytest.raises(ValueError, match="no usable example in .* draws .*min_difficulty=9"):
    sources.TaskSource("arith", 5, min_difficulty=9, max_tries=20)[0]


# ----------------------------------------------------------------------------- iterator


def _ids(batches):
  return [[ex.prompt_id for ex in b] for b in batches]


def test_iterator_is_deterministic_and_covers_each_epoch():
  src = sources.TaskSource("arith", 24, seed=0)
  it_a, it_b = PromptIterator(src, 8, seed=3), PromptIterator(src, 8, seed=3)
  a = [next(it_a) for _ in range(6)]
  assert _ids(a) == _ids([next(it_b) for _ in range(6)])
  assert _ids(a) != _ids([next(PromptIterator(src, 8, seed=4)) for _ in range(6)])
  epoch0, epoch1 = sum(_ids(a[:3]), []), sum(_ids(a[3:]), [])
  assert sorted(epoch0) == sorted(epoch1) == list(range(24)) and epoch0 != epoch1
  assert all(ex == src[ex.prompt_id] for ex in a[0])
  plain = PromptIterator(src, 5, seed=3, shuffle=False)
  assert _ids([next(plain) for _ in range(5)]) == [[(5 * j + k) % 24 for k in range(5)] for j in range(5)]


def test_iterator_state_restores_exactly_mid_epoch():
  src = sources.TaskSource("arith", 10, seed=0)
  it = PromptIterator(src, 4, seed=11)
  for _ in range(2):  # 8 of 10: mid-epoch; the next batch crosses the epoch boundary
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert all(isinstance(v, int) for v in state.values())
  expected = [next(it) for _ in range(5)]
  restored = PromptIterator(src, 4, seed=11)
  restored.set_state(state)
  assert [[ex for ex in b] for b in (next(restored) for _ in range(5))] == expected
  with pytest.raises(ValueError, match="state has seed=11 but this iterator has seed=12"):
    PromptIterator(src, 4, seed=12).set_state(state)


def test_iterator_process_slices_and_groups():
  src = sources.TaskSource("arith", 30, seed=0)
  whole = next(PromptIterator(src, 8, seed=2))
  parts = [next(PromptIterator(src, 8, seed=2, process_index=p, process_count=2)) for p in range(2)]
  assert parts[0] + parts[1] == whole
  groups = repeat_groups(whole[:3], 4)
  assert [ex.prompt_id for ex in groups] == [whole[r // 4].prompt_id for r in range(12)]
  with pytest.raises(ValueError, match="divisible by process_count=3"):
    PromptIterator(src, 8, seed=0, process_count=3, process_index=0)


# ----------------------------------------------------------------------------- batching


def test_sft_batch_alignment():
  task = get_task("arith")
  tok = load_tokenizer("char")
  exs = [task.make_example(347, 85).with_id(0), task.make_example(5, 4).with_id(1)]
  batch = make_sft_batch(exs, tok, max_len=40)
  tokens, mask = batch["tokens"], batch["loss_mask"]
  assert tokens.shape == mask.shape == (2, 40) and tokens.dtype == np.int32 and mask.dtype == np.float32
  np.testing.assert_array_equal(batch["prompt_lens"], [8, 5])  # BOS + "743+58=", BOS + "5+4="
  for row, ex in enumerate(exs):
    n, p = batch["lengths"][row], batch["prompt_lens"][row]
    assert tokens[row, 0] == tok.bos_id and tokens[row, n - 1] == tok.eos_id
    assert (tokens[row, n:] == tok.pad_id).all()
    assert tok.decode(tokens[row, 1:p]) == ex.prompt
    # The mask marks target tokens: trace + EOS, aligned with `tokens`.
    assert tok.decode(tokens[row][mask[row] == 1]) == ex.trace and mask[row].sum() == len(ex.trace) + 1
  inputs, targets, weights = next_token_targets(batch)
  for row, ex in enumerate(exs):
    p = batch["prompt_lens"][row]
    first = np.flatnonzero(weights[row])[0]
    assert first == p - 1 and inputs[row, first] == tok.encode(ex.prompt)[-1]  # '=' predicts the trace
    assert list(targets[row][weights[row] == 1]) == tok.encode(ex.trace) + [tok.eos_id]
  with pytest.raises(ValueError, match=r"prompt id 0 has 38 tokens .* over max_len=30"):
    make_sft_batch(exs, tok, max_len=30)


def test_encode_prompts():
  tok = load_tokenizer("char")
  exs = [Example("743+58=", "", "234", {"difficulty": 3}, prompt_id=4), Example("1+2=", "", "3", {"difficulty": 1}, 9)]
  tokens, lengths = encode_prompts(exs, tok, max_prompt_len=10)
  assert tokens.shape == (2, 10) and tokens.dtype == np.int32
  np.testing.assert_array_equal(lengths, [8, 5])
  assert tok.decode(tokens[0]) == "743+58=" and tokens[1, 0] == tok.bos_id and (tokens[1, 5:] == tok.pad_id).all()
  with pytest.raises(ValueError, match=r"prompt id 4 has 8 tokens \(BOS included\), over max_prompt_len=6"):
    encode_prompts(exs, tok, max_prompt_len=6)
