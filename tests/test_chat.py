"""Chat templates and verl-style data.

The chat-template cases are pinned to `transformers`' `apply_chat_template` (strings and token
ids) for the Qwen2.5-Instruct and Llama-3.1-Instruct templates: tests/fixtures/chat/, made by
scripts/make_chat_fixtures.py.
"""

import json
import pathlib
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tlt_jax.data import encode_prompts, get_task, load_tokenizer, make_sft_batch
from tlt_jax.data.chat import ChatTemplate, configure_prompts, end_of_turn
from tlt_jax.data.readers import load_qa_file, load_verl_parquet
from tlt_jax.data.tokenizer import CharTokenizer
from tlt_jax.errors import DataError

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "chat"
FLAVOURS = ("qwen2_5", "llama3")
GSM8K_INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."


def _expected(name):
  with open(FIXTURES / name / "expected.json", encoding="utf-8") as f:
    return json.load(f)["cases"]


# ----------------------------------------------------------------------------- rendering


@pytest.mark.parametrize("name", FLAVOURS)
def test_render_matches_transformers_strings_and_ids(name):
  tok = load_tokenizer(str(FIXTURES / name))
  template = tok.chat_template
  assert template is not None
  cases = _expected(name)
  assert len(cases) == 5
  for case in cases:
    text = template.render(case["messages"], add_generation_prompt=case["add_generation_prompt"])
    assert text == case["text"]
    assert tok.encode(text) == case["ids"]


@pytest.mark.parametrize("name", FLAVOURS)
def test_task_prompts_batch_to_transformers_ids(name):
  """A task's chat prompt, through the batching code (which adds BOS itself), gives the ids of
  apply_chat_template(..., add_generation_prompt=True, tokenize=True)."""
  tok = load_tokenizer(str(FIXTURES / name))
  for index in (0, 1):  # a lone user turn; system + user
    case = _expected(name)[index]
    system = [m["content"] for m in case["messages"] if m["role"] == "system"]
    question = [m["content"] for m in case["messages"] if m["role"] == "user"][0]
    task = get_task("gsm8k", records=[{"question": question, "answer": "#### 1"}],
                    system_prompt=system[0] if system else None)
    assert configure_prompts(task, tok) == "chat"
    example = task.example_from_record(task.records[0], 0)
    tokens, lengths = encode_prompts([example], tok, 256)
    assert tokens[0, :lengths[0]].tolist() == case["ids"]


def test_template_file_wins_and_special_tokens(tmp_path):
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(FIXTURES / "qwen2_5" / f, tmp_path / f)
  (tmp_path / "chat_template.jinja").write_text("{{ bos_token or 'nobos' }}|{{ eos_token }}|"
                                                "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}")
  template = ChatTemplate.from_directory(str(tmp_path))
  assert template.origin.endswith("chat_template.jinja")
  assert template.render([{"role": "user", "content": "hi"}]) == "nobos|<|im_end|>|user:hi;"


def test_template_globals_and_sandbox():
  t = ChatTemplate("{{ messages[0].content | tojson }}|{{ {'k': 'é<'} | tojson }}"
                   "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{{ m.content }}{% endfor %}"
                   "{% generation %}G{% endgeneration %}{{ dict(a=1)['a'] }}{{ tools }}")
  out = t.render([{"role": "user", "content": "a \"q\" <b>"}, {"role": "assistant", "content": "X"}])
  assert out == '"a \\"q\\" <b>"|{"k": "é<"}XG1None'  # no HTML escapes, non-ASCII kept (HF's tojson)
  with pytest.raises(ValueError, match="rejected the conversation: only one system"):
    ChatTemplate("{{ raise_exception('only one system') }}").render([{"role": "user", "content": "x"}])
  with pytest.raises(ValueError, match="rejected the conversation"):  # the sandbox
    ChatTemplate("{{ messages.__class__.__mro__ }}").render([{"role": "user", "content": "x"}])
  with pytest.raises(ValueError, match="rejected the conversation"):
    ChatTemplate("{% set ns = namespace(_x=1) %}").render([{"role": "user", "content": "x"}])
  with pytest.raises(ValueError, match="does not compile"):
    ChatTemplate("{% for m in messages %}")
  with pytest.raises(ValueError, match=r"role 'robot' is not allowed"):
    t.render([{"role": "robot", "content": "x"}])


def test_end_of_turn_and_sft_targets():
  qwen = load_tokenizer(str(FIXTURES / "qwen2_5"))
  llama = load_tokenizer(str(FIXTURES / "llama3"))
  im_end = qwen.encode("<|im_end|>")
  eot = llama.encode("<|eot_id|>")
  assert len(im_end) == 1 and len(eot) == 1
  assert end_of_turn(qwen.chat_template, qwen) == im_end[0]
  assert end_of_turn(llama.chat_template, llama) == eot[0]
  # A base checkpoint whose EOS is <|endoftext|>: the chat format makes the end-of-turn token the
  # EOS that SFT targets end with, and keeps <|endoftext|> as a stop token.
  base = load_tokenizer(str(FIXTURES / "qwen2_5"), eos="<|endoftext|>")
  endoftext = base.eos_id
  task = get_task("gsm8k", records=[{"question": "1+1?", "answer": "1+1=2\n#### 2"}])
  configure_prompts(task, base)
  assert base.eos_ids == (im_end[0], endoftext)
  example = task.example_from_record(task.records[0], 0)
  batch = make_sft_batch([example], base, 96)
  n = int(batch["lengths"][0])
  assert batch["tokens"][0, n - 1] == im_end[0] and batch["loss_mask"][0, n - 1] == 1
  assert base.decode(batch["tokens"][0, :n][batch["loss_mask"][0, :n] > 0]) == "1+1=2\n#### 2"


def test_prompt_formats():
  record = {"question": "What is 2+3?", "answer": "#### 5"}
  qwen = load_tokenizer(str(FIXTURES / "qwen2_5"))
  plain = get_task("gsm8k", records=[record], prompt_format="plain")
  assert configure_prompts(plain, qwen) == "plain"
  assert plain.example_from_record(record).prompt == "Question: What is 2+3?\nAnswer:"
  auto = get_task("gsm8k", records=[record], instruction=GSM8K_INSTRUCTION)
  assert configure_prompts(auto, CharTokenizer(auto.charset)) == "plain"  # no template: plain
  assert auto.example_from_record(record).prompt == f"Question: What is 2+3? {GSM8K_INSTRUCTION}\nAnswer:"
  chat = get_task("gsm8k", records=[record], prompt_format="chat")
  with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
    configure_prompts(chat, CharTokenizer(chat.charset))
  assert configure_prompts(get_task("arith"), qwen) == "plain"  # synthetic tasks have no chat prompts
  with pytest.raises(ValueError, match="prompt_format='html' is not supported"):
    get_task("gsm8k", records=[record], prompt_format="html")


# ----------------------------------------------------------------------------- verl-style parquet


def _verl_rows():
  return [
      {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "Tom has 3 apples and buys 4. "
                                                 + GSM8K_INSTRUCTION}],
       "ability": "math", "reward_model": {"style": "rule", "ground_truth": "7"},
       "extra_info": {"split": "train", "index": 0, "answer": "3 + 4 = 7\n#### 7"}},
      {"data_source": "DigitalLearningGmbH/MATH-lighteval",
       "prompt": [{"role": "system", "content": "Be exact."},
                  {"role": "user", "content": "Simplify 2/4. Output the final answer within \\boxed{}."}],
       "ability": "math", "reward_model": {"style": "rule", "ground_truth": "\\frac{1}{2}"},
       "extra_info": {"split": "train", "index": 1, "answer": None}},
      {"data_source": "openai/gsm8k", "prompt": [], "ability": "math",  # bad: no messages
       "reward_model": {"style": "rule", "ground_truth": "1"},
       "extra_info": {"split": "train", "index": 2, "answer": None}},
      {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "No answer."}], "ability": "math",
       "reward_model": {"style": "rule", "ground_truth": None},  # bad: no ground truth
       "extra_info": {"split": "train", "index": 3, "answer": None}},
      {"data_source": "some/trivia", "prompt": [{"role": "user", "content": "Capital of France?"}],  # unknown source
       "ability": "qa", "reward_model": {"style": "rule", "ground_truth": "Paris"},
       "extra_info": {"split": "train", "index": 4, "answer": None}},
  ]


def _write_verl(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), path)
  return str(path)


def test_verl_parquet_reading_and_verifiers(tmp_path):
  path = _write_verl(tmp_path / "train.parquet", _verl_rows())
  with pytest.raises(DataError, match=r"row 2, prompt: expected a non-empty list"):
    load_verl_parquet(path)
  records = load_qa_file(path, on_bad_record="skip")  # detected by its columns
  assert [r["answer"] for r in records] == ["7", "\\frac{1}{2}", "Paris"]
  assert records[0]["trace"] == "3 + 4 = 7\n#### 7" and "trace" not in records[1]
  with pytest.raises(DataError, match=r"row 2, prompt: expected a non-empty list"):
    get_task("verl", path=path, on_bad_record="error").records
  rows = _verl_rows()
  unknown = _write_verl(tmp_path / "unknown.parquet", [rows[0], rows[1], rows[4]])
  with pytest.raises(DataError, match=r"record 2: data_source='some/trivia' names no known verifier"):
    get_task("verl", path=unknown, on_bad_record="error").records
  task = get_task("verl", path=path, on_bad_record="skip")
  assert len(task.records) == 2  # rows 2, 3 and the unknown data_source skipped
  qwen = load_tokenizer(str(FIXTURES / "qwen2_5"))
  configure_prompts(task, qwen)
  gsm, math = (task.example_from_record(r, i) for i, r in enumerate(task.records))
  assert gsm.meta["answer_format"] == "gsm8k" and math.meta["answer_format"] == "math"
  assert gsm.meta["extra"]["ability"] == "math" and gsm.meta["extra"]["extra_info"]["index"] == 0
  assert gsm.meta["data_source"] == "openai/gsm8k"
  assert gsm.trace == "3 + 4 = 7\n#### 7" and math.trace == "\\boxed{\\frac{1}{2}}"
  assert gsm.prompt == qwen.chat_template.render(task.records[0]["messages"])
  assert math.prompt.startswith("<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nSimplify 2/4.")
  # Each row's data_source picks which marker counts first.
  assert task.verify("so 3 + 4 = 7 \\boxed{8}\n#### 7", gsm)
  assert not task.verify("so 3 + 4 = 7 \\boxed{8}\n#### 7", math)
  assert task.verify("#### 0.5 but really \\boxed{\\dfrac{1}{2}}", math)
  assert not task.verify("no marker at all", gsm)
  # The plain format joins the turns' texts.
  plain = get_task("verl", path=path, on_bad_record="skip", prompt_format="plain")
  assert plain.example_from_record(plain.records[1]).prompt.startswith("Question: Be exact.\n\nSimplify 2/4.")


def test_verl_answer_format_override_and_json_meta(tmp_path):
  rows = _verl_rows()[:2]
  path = _write_verl(tmp_path / "two.parquet", rows)
  task = get_task("gsm8k", path=path)  # a fixed format: data_source is not consulted
  ex = task.example_from_record(task.records[1], 1)
  assert "answer_format" not in ex.meta and ex.answer == "\\frac{1}{2}"
  json.dumps(ex.meta)
  rng = np.random.default_rng(0)
  assert task.sample(rng).prompt.startswith("Question: ")
