"""Tokenizers behind one small interface: a character tokenizer for synthetic tasks and a
wrapper around HuggingFace `tokenizers` files (`tokenizer.json`) for real models.

Interface (`Tokenizer`):
  * `vocab_size`, `bos_id` (None when the model has no BOS, e.g. Qwen2), `eos_ids` (a tuple:
    several end tokens may stop a response, e.g. Qwen's `<|im_end|>` and `<|endoftext|>`),
    `eos_id` (the first of them, the one we append), `pad_id`;
  * `encode(text, add_bos=False) -> list[int]` never adds EOS or any template tokens;
  * `decode(ids, skip_special=True) -> str`;
  * `save(path)`: a path ending in `.json` is the file itself, anything else a directory that
    receives `tokenizer.json`. `load_tokenizer` reads either back;
  * `chat_template`: the checkpoint's `ChatTemplate` (tlt_jax/data/chat.py), None when it has none
    (always None for `CharTokenizer`).
"""

from __future__ import annotations

import abc
import json
import os
from typing import Iterable, Sequence

TOKENIZER_FILE = "tokenizer.json"
_CHAR_FORMAT = "tlt_jax.CharTokenizer"


class Tokenizer(abc.ABC):
  """Common tokenizer interface used by data, rollout and rewards."""

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    ...

  @property
  @abc.abstractmethod
  def bos_id(self) -> int | None:
    ...

  @property
  @abc.abstractmethod
  def eos_ids(self) -> tuple[int, ...]:
    ...

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    ...

  @property
  def eos_id(self) -> int:
    """The EOS appended to SFT targets: the first of `eos_ids`."""
    return self.eos_ids[0]

  @abc.abstractmethod
  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ...

  @abc.abstractmethod
  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    ...

  @abc.abstractmethod
  def save(self, path: str) -> str:
    """Writes the tokenizer; returns the file written."""

  @property
  def chat_template(self):
    """The conversation template shipped with the tokenizer, or None."""
    return None

  def is_special(self, token_id: int) -> bool:
    """True for control tokens (BOS/EOS/PAD and the vocabulary's special added tokens)."""
    return token_id == self.pad_id or token_id == self.bos_id or token_id in self.eos_ids


def _file_for(path: str) -> str:
  path = os.fspath(path)
  if path.endswith(".json"):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path
  os.makedirs(path, exist_ok=True)
  return os.path.join(path, TOKENIZER_FILE)


class CharTokenizer(Tokenizer):
  """One token per character of `charset`; ids 0, 1, 2 are PAD, BOS, EOS and chars follow from 3."""

  PAD, BOS, EOS = 0, 1, 2
  SPECIAL_NAMES = ("<pad>", "<bos>", "<eos>")

  def __init__(self, charset: str | Sequence[str]):
    chars = list(charset)
    if not chars:
      raise ValueError("CharTokenizer: charset is empty")
    bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
    if bad:
      raise ValueError(f"CharTokenizer: charset entries must be single characters, got {bad[:5]!r}")
    dupes = sorted({c for c in chars if chars.count(c) > 1})
    if dupes:
      raise ValueError(f"CharTokenizer: charset has duplicate characters {dupes!r}")
    self.charset = "".join(chars)
    self._offset = len(self.SPECIAL_NAMES)
    self._char_to_id = {c: i + self._offset for i, c in enumerate(chars)}

  @property
  def vocab_size(self) -> int:
    return self._offset + len(self.charset)

  @property
  def bos_id(self) -> int:
    return self.BOS

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return (self.EOS,)

  @property
  def pad_id(self) -> int:
    return self.PAD

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = [self.BOS] if add_bos else []
    for pos, c in enumerate(text):
      i = self._char_to_id.get(c)
      if i is None:
        raise ValueError(f"CharTokenizer: character {c!r} at position {pos} of {text[:40]!r} is not in "
                         f"the charset; allowed: {self.charset!r}")
      ids.append(i)
    return ids

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    out = []
    for i in ids:
      i = int(i)
      if 0 <= i < self._offset:
        if not skip_special:
          out.append(self.SPECIAL_NAMES[i])
      elif self._offset <= i < self.vocab_size:
        out.append(self.charset[i - self._offset])
      else:
        raise ValueError(f"CharTokenizer: id {i} is out of range [0, {self.vocab_size})")
    return "".join(out)

  def save(self, path: str) -> str:
    file = _file_for(path)
    with open(file, "w") as f:
      json.dump({"format": _CHAR_FORMAT, "charset": self.charset}, f)
    return file

  def __repr__(self) -> str:
    return f"CharTokenizer(vocab_size={self.vocab_size}, charset={self.charset!r})"


def _token_content(value) -> str | None:
  """tokenizer_config.json writes special tokens as strings or as {"content": ...} dicts."""
  if isinstance(value, dict):
    return value.get("content")
  return value


class HFTokenizer(Tokenizer):
  """A HuggingFace `tokenizers.Tokenizer` with explicit BOS / EOS / PAD ids.

  `bos`, `eos`, `pad` are token strings or ids (`eos` may be a list of either). Unset ones are
  read from `tokenizer_config.json` / `generation_config.json` next to the file when present
  (as HF writes them); `pad` falls back to the first EOS. A missing BOS leaves `bos_id=None`
  (Qwen2 has none), and `add_bos=True` then adds nothing.
  """

  def __init__(self, path: str, bos=None, eos=None, pad=None):
    from tokenizers import Tokenizer as _HFTok  # keep import lazy: only this class needs it

    path = os.fspath(path)
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path
    if not os.path.isfile(file):
      raise FileNotFoundError(f"HFTokenizer: no tokenizer file at {file!r}")
    self.path = file
    try:
      self._tok = _HFTok.from_file(file)
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception
      raise ValueError(f"HFTokenizer: {file!r} is not a tokenizer.json the tokenizers library can read "
                       f"({e})") from None
    cfg = self._side_configs(os.path.dirname(file))
    if bos is None:
      bos = _token_content(cfg.get("bos_token"))
    if eos is None:
      eos = [e for e in (_token_content(cfg.get("eos_token")),) if e is not None]
      gen_eos = cfg.get("generation_eos")
      if gen_eos is not None:
        eos += [gen_eos] if isinstance(gen_eos, int) else list(gen_eos)
    elif isinstance(eos, (str, int)):
      eos = [eos]
    if pad is None:
      pad = _token_content(cfg.get("pad_token"))
    self._bos = None if bos is None else self._resolve(bos, "bos")
    eos_ids = []
    for e in eos:
      i = self._resolve(e, "eos")
      if i not in eos_ids:
        eos_ids.append(i)
    if not eos_ids:
      raise ValueError(f"HFTokenizer({file!r}): no EOS token given and none found in tokenizer_config.json "
                       "/ generation_config.json; pass eos=<token string or id>")
    self._eos = tuple(eos_ids)
    self._pad = self._eos[0] if pad is None else self._resolve(pad, "pad")
    from tlt_jax.data.chat import ChatTemplate  # jinja2 only where a checkpoint is read
    self._chat = ChatTemplate.from_directory(os.path.dirname(file))
    self._special_ids = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

  @property
  def chat_template(self):
    return self._chat

  def is_special(self, token_id: int) -> bool:
    return super().is_special(token_id) or int(token_id) in self._special_ids

  def use_end_of_turn(self, token_id: int) -> None:
    """Makes `token_id` (a chat template's end-of-turn token) the EOS that SFT targets end with
    (the first of `eos_ids`); the other end tokens still stop a response."""
    token_id = self._resolve(int(token_id), "end-of-turn")
    self._eos = (token_id,) + tuple(i for i in self._eos if i != token_id)

  @staticmethod
  def _side_configs(directory: str) -> dict:
    out = {}
    tok_cfg = os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(tok_cfg):
      with open(tok_cfg) as f:
        out.update(json.load(f))
    gen_cfg = os.path.join(directory, "generation_config.json")
    if os.path.isfile(gen_cfg):
      with open(gen_cfg) as f:
        out["generation_eos"] = json.load(f).get("eos_token_id")
    return out

  def _resolve(self, token, role: str) -> int:
    if isinstance(token, bool) or not isinstance(token, (int, str)):
      raise ValueError(f"HFTokenizer: {role} must be a token string or an id, got {token!r}")
    if isinstance(token, int):
      if not 0 <= token < self.vocab_size:
        raise ValueError(f"HFTokenizer: {role} id {token} is out of range [0, {self.vocab_size})")
      return token
    i = self._tok.token_to_id(token)
    if i is None:
      raise ValueError(f"HFTokenizer: {role} token {token!r} is not in the vocabulary of {self.path!r}")
    return i

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  @property
  def bos_id(self) -> int | None:
    return self._bos

  @property
  def eos_ids(self) -> tuple[int, ...]:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad

  def encode(self, text: str, add_bos: bool = False) -> list[int]:
    ids = self._tok.encode(text, add_special_tokens=False).ids
    if add_bos and self._bos is not None:
      ids = [self._bos] + ids
    return ids

  def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
    ids = [int(i) for i in ids]
    if skip_special:
      specials = {self._pad, *self._eos} | ({self._bos} if self._bos is not None else set())
      ids = [i for i in ids if i not in specials]
    return self._tok.decode(ids, skip_special_tokens=skip_special)

  def save(self, path: str) -> str:
    file = _file_for(path)
    self._tok.save(file)
    side = os.path.join(os.path.dirname(file), "tokenizer_config.json")
    names = {"bos_token": None if self._bos is None else self._tok.id_to_token(self._bos),
             "eos_token": self._tok.id_to_token(self._eos[0]),
             "pad_token": self._tok.id_to_token(self._pad)}
    cfg = {}
    if os.path.isfile(side):
      with open(side) as f:
        cfg = json.load(f)
    cfg.update(names)
    if self._chat is not None and not os.path.isfile(os.path.join(os.path.dirname(file), "chat_template.jinja")):
      cfg["chat_template"] = self._chat.source
    with open(side, "w") as f:
      json.dump(cfg, f, indent=1, ensure_ascii=False)
    if len(self._eos) > 1:
      gen = os.path.join(os.path.dirname(file), "generation_config.json")
      gcfg = {}
      if os.path.isfile(gen):
        with open(gen) as f:
          gcfg = json.load(f)
      gcfg["eos_token_id"] = list(self._eos)
      with open(gen, "w") as f:
        json.dump(gcfg, f, indent=1)
    return file

  def __repr__(self) -> str:
    return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size}, bos_id={self._bos}, "
            f"eos_ids={self._eos}, pad_id={self._pad})")


def load_tokenizer(spec: str, charset: str | None = None, **hf_kwargs) -> Tokenizer:
  """Builds a tokenizer from a config string.

  spec: "char" (a `CharTokenizer` over `charset`, by default the "arith" task's charset), or a
  path to a `tokenizer.json` / a directory holding one. A file saved by `CharTokenizer.save`
  loads back as a `CharTokenizer`; any other file as an `HFTokenizer(path, **hf_kwargs)`.
  """
  spec = os.fspath(spec)
  if spec == "char":
    if charset is None:
      from tlt_jax.data.tasks import get_task
      charset = get_task("arith").charset
    return CharTokenizer(charset)
  file = os.path.join(spec, TOKENIZER_FILE) if os.path.isdir(spec) else spec
  if not os.path.isfile(file):
    what = f"directory {spec!r} has no {TOKENIZER_FILE}" if os.path.isdir(spec) else f"{spec!r} does not exist"
    raise FileNotFoundError(f"load_tokenizer: {what}; spec must be 'char', a path to {TOKENIZER_FILE} "
                            "or a directory holding one")
  with open(file) as f:
    head = f.read(256)
  if _CHAR_FORMAT in head:
    with open(file) as f:
      data = json.load(f)
    if data.get("format") == _CHAR_FORMAT:
      if charset is not None and charset != data["charset"]:
        raise ValueError(f"load_tokenizer: {file!r} holds charset {data['charset']!r}, "
                         f"but charset={charset!r} was asked for")
      return CharTokenizer(data["charset"])
  return HFTokenizer(file, **hf_kwargs)
