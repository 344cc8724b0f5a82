"""Chat templates: a checkpoint's own conversation format, rendered as HF `transformers` does.

An instruct checkpoint ships its conversation format as a Jinja template: the `chat_template`
string of `tokenizer_config.json`, or a `chat_template.jinja` file beside it (which wins).
`ChatTemplate.render(messages, add_generation_prompt=True)` renders it the way
`transformers`' `apply_chat_template(..., tokenize=False)` does:

  * a sandboxed `jinja2.sandbox.ImmutableSandboxedEnvironment` with `trim_blocks` and
    `lstrip_blocks`, the `loopcontrols` extension and a no-op `{% generation %}` block;
  * the globals templates call: `raise_exception(msg)` (a `TemplateError`), `strftime_now(fmt)`,
    and a `tojson` filter that is `json.dumps(x, ensure_ascii=False, ...)` (Jinja's own escapes
    HTML characters);
  * `dict(...)` and a `namespace(...)` that refuses underscore-prefixed attributes;
  * the variables: `messages`, `add_generation_prompt`, `tools=None`, `documents=None` and the
    named special tokens that are set (`bos_token`, `eos_token`, `unk_token`, `sep_token`,
    `pad_token`, `cls_token`, `mask_token`).

Tokenizing the rendered text with the special tokens recognised and no extra BOS gives
`apply_chat_template(..., tokenize=True)`'s ids (tests/test_chat.py pins both to transformers
for the Qwen2.5 and Llama-3 templates).

`end_of_turn(tokenizer)` finds the token that closes an assistant turn (Qwen's `<|im_end|>`,
Llama-3's `<|eot_id|>`): the first token the template writes after an assistant message's
content. In the chat prompt format a response stops there and SFT targets end with it.
"""

from __future__ import annotations

import datetime
import functools
import json
import os
from typing import Any, Mapping, Sequence

TOKENIZER_CONFIG = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
PROMPT_FORMATS = ("auto", "chat", "plain")
ROLES = ("system", "user", "assistant", "tool")


@functools.lru_cache(maxsize=1)
def _environment():
  """The sandboxed environment of transformers' chat templates (jinja2 is imported here, so that
  plain-format runs never need it)."""
  import jinja2
  import jinja2.ext
  import jinja2.nodes
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant tokens for masks): its body."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.Scope(body, lineno=lineno)

  class Namespace(jinja2.utils.Namespace):
    """Jinja's `namespace()`, refusing underscore-prefixed attributes (as transformers does)."""

    def __init__(*args, **kwargs):  # noqa: N805 - Namespace's own signature
      self, args = args[0], args[1:]
      attrs = dict(*args, **kwargs)
      for name in attrs:
        Namespace.check(name)
      jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
      Namespace.check(name)
      jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def check(name):
      if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"a chat template cannot set the attribute {name!r} on a namespace")

  class TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` inside templates."""

    def __call__(self, *args, **kwargs):
      return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
      return dict.fromkeys(*args, **kwargs)

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  def strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[GenerationBlock, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  env.globals["dict"] = TemplateDict()
  env.globals["namespace"] = Namespace
  return env


def _token_text(value) -> str | None:
  """tokenizer_config.json writes a special token as a string or as {"content": ...}."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def check_messages(messages: Sequence[Mapping], where: str = "messages") -> list[dict]:
  """Plain `{"role", "content"}` dicts; ValueError naming the message for anything else."""
  if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
    raise ValueError(f"{where}: expected a non-empty list of {{role, content}} messages, got "
                     f"{type(messages).__name__}")
  out = []
  for i, m in enumerate(messages):
    if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
      raise ValueError(f"{where}[{i}]: expected {{'role': str, 'content': str}}, got {m!r:.80}")
    if m["role"] not in ROLES:
      raise ValueError(f"{where}[{i}]: role {m['role']!r} is not allowed; allowed: {ROLES}")
    out.append({"role": m["role"], "content": m["content"]})
  return out


class ChatTemplate:
  """A compiled chat template with the special tokens it is rendered with."""

  def __init__(self, source: str, special_tokens: Mapping[str, Any] | None = None, origin: str = "<string>"):
    if not isinstance(source, str) or not source.strip():
      raise ValueError(f"chat template from {origin}: expected a non-empty Jinja string")
    self.source, self.origin = source, origin
    self.special_tokens = dict(special_tokens or {})
    import jinja2
    try:
      self._template = _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ValueError(f"chat template from {origin} does not compile: {e.message} (line {e.lineno})") from None

  @classmethod
  def from_directory(cls, directory: str) -> "ChatTemplate | None":
    """The template of a checkpoint / tokenizer directory, or None when it carries none.

    `chat_template.jinja` wins over `tokenizer_config.json`'s `chat_template`; a list of named
    templates (`[{"name": "default", "template": ...}, ...]`) gives its "default" one.
    """
    directory = os.fspath(directory)
    cfg = {}
    cfg_file = os.path.join(directory, TOKENIZER_CONFIG)
    if os.path.isfile(cfg_file):
      with open(cfg_file, encoding="utf-8") as f:
        cfg = json.load(f)
    source, origin = cfg.get("chat_template"), cfg_file
    jinja_file = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(jinja_file):
      with open(jinja_file, encoding="utf-8") as f:
        source, origin = f.read(), jinja_file
    if isinstance(source, list):
      named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
      if "default" not in named:
        raise ValueError(f"{origin}: chat_template is a list without a 'default' entry; names: {sorted(named)}")
      source = named["default"]
    if source is None:
      return None
    specials = {name: _token_text(cfg.get(name)) for name in SPECIAL_TOKEN_NAMES}
    return cls(source, {k: v for k, v in specials.items() if v is not None}, origin)

  def render(self, messages: Sequence[Mapping], add_generation_prompt: bool = True, **kwargs) -> str:
    """The conversation as text, as `apply_chat_template(messages, tokenize=False,
    add_generation_prompt=...)` writes it."""
    messages = check_messages(messages)
    variables = {**self.special_tokens, **kwargs}
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    import jinja2
    try:
      return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
      raise ValueError(f"chat template from {self.origin} rejected the conversation: {e}") from None

  def __repr__(self) -> str:
    return f"ChatTemplate({self.origin!r}, {len(self.source)} chars)"


_PROBE_USER, _PROBE_REPLY = "Probe question 7.", "Probe reply 7."


def end_of_turn(template: ChatTemplate, tokenizer) -> int | None:
  """The id of the token the template writes right after an assistant message's content (the
  end-of-turn token: Qwen's `<|im_end|>`, Llama-3's `<|eot_id|>`), or None when what follows is
  not a single special token (e.g. a template that writes nothing after a reply)."""
  text = template.render([{"role": "user", "content": _PROBE_USER},
                          {"role": "assistant", "content": _PROBE_REPLY}], add_generation_prompt=False)
  pos = text.rfind(_PROBE_REPLY)
  if pos < 0:
    return None
  after = text[pos + len(_PROBE_REPLY):].lstrip(" ")
  if not after:
    return None
  ids = tokenizer.encode(after)
  if not ids:
    return None
  first = ids[0]
  return first if tokenizer.is_special(first) else None


def user_messages(question: str, system_prompt: str | None = None, instruction: str | None = None,
                  messages: Sequence[Mapping] | None = None) -> list[dict]:
  """The prompt of one problem as chat messages: `messages` when given (e.g. a verl-style row)
  else one user turn `question`; `instruction` is appended to the last user turn after a space
  (as verl's GSM8K preparation writes it), and a system turn `system_prompt` is put first
  unless the messages already open with one."""
  out = list(messages) if messages is not None else [{"role": "user", "content": question}]
  out = [dict(m) for m in out]
  if instruction:
    users = [i for i, m in enumerate(out) if m.get("role") == "user"]
    if users:
      last = out[users[-1]]
      last["content"] = f"{last['content']} {instruction}"
  if system_prompt and not (out and out[0].get("role") == "system"):
    out.insert(0, {"role": "system", "content": system_prompt})
  return out


def configure_prompts(task, tokenizer) -> str:
  """Settles a task's prompt format against the tokenizer; returns "chat" or "plain".

  A task with a `prompt_format` option ("auto", "chat", "plain") renders its prompts with the
  tokenizer's chat template in the chat format. "auto" is "chat" when the tokenizer carries a
  template and "plain" otherwise; "chat" without a template raises ValueError. In the chat format
  the template's end-of-turn token becomes the tokenizer's first EOS (SFT targets end with it,
  and it stops a response). Tasks without the option (the synthetic ones) stay plain.
  """
  wanted = getattr(task, "prompt_format", None)
  if wanted is None:
    return "plain"
  template = tokenizer.chat_template
  if wanted == "plain" or (wanted == "auto" and template is None):
    task.use_chat(None)
    return "plain"
  if template is None:
    raise ValueError(f"task {task.name!r}: prompt_format='chat' needs a tokenizer with a chat template "
                     f"(tokenizer_config.json 'chat_template' or chat_template.jinja), and {tokenizer!r} has "
                     "none; allowed: prompt_format='plain' or 'auto'")
  eot = end_of_turn(template, tokenizer)
  if eot is not None and hasattr(tokenizer, "use_end_of_turn"):
    tokenizer.use_end_of_turn(eot)
  bos = tokenizer.decode([tokenizer.bos_id], skip_special=False) if tokenizer.bos_id is not None else None
  task.use_chat(template, bos_text=bos)
  return "chat"
