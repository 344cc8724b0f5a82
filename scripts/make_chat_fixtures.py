"""Writes the chat-template fixtures: conversations rendered by `transformers`' `apply_chat_template`
for the Qwen2.5-Instruct and Llama-3.1-Instruct templates, and a tiny Qwen2 checkpoint in HF
layout that carries the Qwen2.5 template (tests/test_chat.py, tests/test_real_model.py).

Not run in CI: the fixtures are committed. It needs torch + transformers, kept out of the main
venv. To regenerate (CPU only, a few seconds):

  python3 -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers jinja2 safetensors tokenizers numpy
  /tmp/hfvenv/bin/python scripts/make_chat_fixtures.py     # from the repository root

It writes, under tests/fixtures/:
  chat/qwen2_5/   tokenizer.json (a byte-level BPE with Qwen's special tokens), tokenizer_config.json
                  carrying the Qwen2.5-Instruct `chat_template` string, expected.json.
  chat/llama3/    tokenizer.json (byte-level BPE with Llama-3's special tokens), tokenizer_config.json
                  (bos/eos) and chat_template.jinja holding the Llama-3.1-Instruct template (the
                  file form of a template), expected.json.
  hf/qwen2_chat_tiny/  Qwen2ForCausalLM (config.json, model.safetensors) with the qwen2_5 tokenizer
                  files beside it, and golden.npz: HF's float32 logits on two rendered chat prompts.

expected.json: {"cases": [{"messages", "add_generation_prompt", "text", "ids"}]}, where `text` is
`apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` and `ids` is the same
with tokenize=True.

The template strings are the published ones (Qwen/Qwen2.5-*-Instruct tokenizer_config.json;
meta-llama/Llama-3.1-*-Instruct, identical in Llama-3.3-70B-Instruct). The tokenizers are small
BPEs trained here on a fixed text (the real vocabularies are 150k tokens): what is pinned is the
rendering and the special-token handling, which do not depend on the merges.
"""

from __future__ import annotations

import json
import math
import pathlib
import shutil

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, trainers

ROOT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"

QWEN2_5_TEMPLATE = "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or (message.role == \"assistant\" and not message.tool_calls) %}\n        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"

LLAMA3_1_TEMPLATE = "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n{%- if not date_string is defined %}\n    {%- set date_string = \"26 Jul 2024\" %}\n{%- endif %}\n{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n{#- This block extracts the system message, so we can slot it into the right place. #}\n{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n{#- System message + builtin tools #}\n{{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n{%- if builtin_tools is defined or tools is not none %}\n    {{- \"Environment: ipython\\n\" }}\n{%- endif %}\n{%- if builtin_tools is defined %}\n    {{- \"Tools: \" + builtin_tools | reject('equalto', 'code_interpreter') | join(\", \") + \"\\n\\n\"}}\n{%- endif %}\n{{- \"Cutting Knowledge Date: December 2023\\n\" }}\n{{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n{%- if tools is not none and not tools_in_user_message %}\n    {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n{%- endif %}\n{{- system_message }}\n{{- \"<|eot_id|>\" }}\n\n{#- Custom tools are passed in a user message with some extra guidance #}\n{%- if tools_in_user_message and not tools is none %}\n    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n        {%- set first_user_message = messages[0]['content']|trim %}\n        {%- set messages = messages[1:] %}\n    {%- else %}\n        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n{%- for message in messages %}\n    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n        {%- if not message.tool_calls|length == 1 %}\n            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n            {{- \"<|python_tag|>\" + tool_call.name + \".call(\" }}\n            {%- for arg_name, arg_val in tool_call.arguments | items %}\n                {{- arg_name + '=\"' + arg_val + '\"' }}\n                {%- if not loop.last %}\n                    {{- \", \" }}\n                {%- endif %}\n                {%- endfor %}\n            {{- \")\" }}\n        {%- else  %}\n            {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n            {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n            {{- '\"parameters\": ' }}\n            {{- tool_call.arguments | tojson }}\n            {{- \"}\" }}\n        {%- endif %}\n        {%- if builtin_tools is defined %}\n            {#- This means we're in ipython mode #}\n            {{- \"<|eom_id|>\" }}\n        {%- else %}\n            {{- \"<|eot_id|>\" }}\n        {%- endif %}\n    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n        {%- if message.content is mapping or message.content is iterable %}\n            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n{%- endif %}\n"

GSM8K_INSTRUCTION = "Let's think step by step and output the final answer after \"####\"."
CONVERSATIONS = [
    ([{"role": "user", "content": "Natalia sold clips to 48 of her friends in April, and then she sold half as "
                                  "many clips in May. How many clips did she sell altogether? " + GSM8K_INSTRUCTION}],
     True),
    ([{"role": "system", "content": "You are a careful math tutor."},
      {"role": "user", "content": "What is 12 * 7?"}], True),
    ([{"role": "system", "content": "  Answer briefly.  "},
      {"role": "user", "content": "Compute 3 + 4."},
      {"role": "assistant", "content": "3 + 4 = 7\n#### 7"},
      {"role": "user", "content": "And 5 + 6?\n\nShow the steps."}], True),
    ([{"role": "user", "content": "Find x if 2x = 10. Put the answer in \\boxed{}."},
      {"role": "assistant", "content": "x = 10 / 2 = 5, so \\boxed{5}."}], False),
    ([{"role": "user", "content": "Unicode: π ≈ 3.14159, café, 数学 — and \"quotes\" <tags> {braces}."}], True),
]

CORPUS = [
    "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether in April and May. #### 72",
    "Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10. #### 10",
    "The answer is \\boxed{5}. Let x = 2, then 2x = 4 and x^2 = 4. \\frac{1}{2} + \\frac{1}{3} = \\frac{5}{6}.",
    "Question: What is 12 * 7? Answer: 12 * 7 = 84 #### 84",
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    "system user assistant Let's think step by step and output the final answer after \"####\".",
    "How many clips did she sell altogether in April and May? Compute the sum. Show the steps.",
    "Find x if 2x = 10. Put the answer in the box. You are a careful math tutor. Answer briefly.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) . , ? !",
]

FLAVOURS = {
    "qwen2_5": dict(specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], template=QWEN2_5_TEMPLATE,
                    config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                            "unk_token": None, "model_max_length": 131072,
                            "tokenizer_class": "Qwen2Tokenizer", "chat_template": QWEN2_5_TEMPLATE},
                    template_file=False),
    "llama3": dict(specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                             "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"], template=LLAMA3_1_TEMPLATE,
                   config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                           "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast"},
                   template_file=True),
}
VOCAB = 384


def _bpe(specials: list[str]) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS * 4, trainer=trainer)
  return tok


def _write_flavour(name: str) -> tuple[pathlib.Path, transformers.PreTrainedTokenizerFast]:
  spec = FLAVOURS[name]
  out = ROOT / "chat" / name
  shutil.rmtree(out, ignore_errors=True)
  out.mkdir(parents=True)
  tok = _bpe(spec["specials"])
  tok.save(str(out / "tokenizer.json"))
  cfg = dict(spec["config"])
  with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=2, ensure_ascii=False)
  if spec["template_file"]:
    (out / "chat_template.jinja").write_text(spec["template"], encoding="utf-8")
  hf_tok = transformers.PreTrainedTokenizerFast(
      tokenizer_file=str(out / "tokenizer.json"),
      **{k: v for k, v in cfg.items() if k.endswith("_token") and v is not None})
  hf_tok.chat_template = spec["template"]
  cases = []
  for messages, add_gen in CONVERSATIONS:
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_gen)
    ids = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_gen, return_dict=True)
    cases.append({"messages": messages, "add_generation_prompt": add_gen, "text": text,
                  "ids": [int(i) for i in ids["input_ids"]]})
  with open(out / "expected.json", "w", encoding="utf-8") as f:
    json.dump({"transformers": transformers.__version__, "cases": cases}, f, indent=1, ensure_ascii=False)
  print(f"{name}: vocab {tok.get_vocab_size()}, {len(cases)} cases, first ids {cases[0]['ids'][:12]}")
  return out, hf_tok


def _write_checkpoint(tok_dir: pathlib.Path, hf_tok) -> None:
  out = ROOT / "hf" / "qwen2_chat_tiny"
  shutil.rmtree(out, ignore_errors=True)
  torch.manual_seed(0)
  vocab = hf_tok.backend_tokenizer.get_vocab_size()
  config = transformers.Qwen2Config(
      vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0,
      tie_word_embeddings=True, use_sliding_window=False,
      eos_token_id=hf_tok.convert_tokens_to_ids("<|im_end|>"))
  config._attn_implementation = "eager"
  model = transformers.Qwen2ForCausalLM(config).to(torch.float32).eval()
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():  # O(1) logits and non-zero biases, as in make_golden_fixtures.py
    for pname, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      if pname.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * noise)
      elif pname.endswith(".bias"):
        p.copy_(0.1 * noise)
      elif "embed_tokens" in pname:
        p.copy_(0.5 * noise)
      else:
        p.copy_(noise / math.sqrt(p.shape[1]))
  model.save_pretrained(out)
  for f in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(tok_dir / f, out / f)
  prompts = [hf_tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
             for m, _ in CONVERSATIONS[:2]]
  length = min(len(p) for p in prompts)
  tokens = np.array([p[:length] for p in prompts], np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  np.savez(out / "golden.npz", tokens=tokens, logits=logits)
  files = sorted(out.iterdir())
  print(f"qwen2_chat_tiny: vocab {vocab}, {sum(f.stat().st_size for f in files)} bytes, "
        f"files {[f.name for f in files]}, golden tokens {tokens.shape}, logits std {logits.std():.3f}")


def main():
  torch.set_default_dtype(torch.float32)
  qwen_dir, qwen_tok = _write_flavour("qwen2_5")
  _write_flavour("llama3")
  _write_checkpoint(qwen_dir, qwen_tok)


if __name__ == "__main__":
  main()
