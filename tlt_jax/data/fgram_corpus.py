"""An offline natural-language corpus for SCONE's experiments, prepared reproducibly.

Sources (all present on a machine with this repository's Python, nothing downloaded):
  * "stdlib": the docstrings (module, class, function) of the running Python's standard library,
    read with `ast` from its .py files (tests, idlelib, tkinter, lib2to3 and site-packages left
    out): English prose about programming, identical for every install of the same Python version.
  * "debian_doc": the documentation text Debian packages ship under /usr/share/doc (README*,
    *.txt, *.md, *.rst, NEWS, gzipped or not; changelogs and copyright files left out; at most
    `max_file_chars` of each file). Machine-dependent: its manifest records what it found.
  * "traces": this codebase's own task traces (prompt + chain-of-thought trace of the `arith`
    task, a fixed seed).

Text is reduced to printable ASCII plus newline (tabs become spaces, other characters dropped,
runs of blank lines squeezed) and tokenized by a `CharTokenizer` over that charset. Documents are
split into train / validation by a hash of their name (stable across runs and machines). The
manifest (`corpus.json`) lists each source's document count, characters and a sha256 of its text.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import re
import string
import sysconfig
from typing import Iterator

import numpy as np

from tlt_jax.data.tokenizer import CharTokenizer
from tlt_jax.errors import ConfigError, DataError

SOURCES = ("stdlib", "debian_doc", "traces")
CHARSET = "\n" + "".join(c for c in string.printable if c.isprintable())  # newline + ASCII 32..126
_SKIP_STDLIB = {"test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo",
                "__pycache__", "ensurepip", "pydoc_data"}
_DOC_NAME = re.compile(r"^(readme|news|faq|authors|thanks|todo|usage|howto)|\.(txt|md|rst|markdown)$", re.I)


def tokenizer() -> CharTokenizer:
  return CharTokenizer(CHARSET)


def clean(text: str) -> str:
  """Printable ASCII and newlines only; blank-line runs squeezed to one."""
  text = text.replace("\t", "    ").replace("\r\n", "\n").replace("\r", "\n")
  text = "".join(c for c in text if c in CHARSET)
  text = re.sub(r"[ ]+\n", "\n", text)
  return re.sub(r"\n{3,}", "\n\n", text).strip()


def stdlib_docs(min_chars: int = 40) -> Iterator[tuple[str, str]]:
  root = sysconfig.get_paths()["stdlib"]
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_STDLIB)
    for name in sorted(filenames):
      if not name.endswith(".py"):
        continue
      path = os.path.join(dirpath, name)
      try:
        with open(path, encoding="utf-8") as f:
          tree = ast.parse(f.read())
      except (SyntaxError, UnicodeDecodeError, ValueError):
        continue
      docs = [ast.get_docstring(node) for node in ast.walk(tree)
              if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
      text = clean("\n\n".join(d for d in docs if d))
      if len(text) >= min_chars:
        yield "stdlib/" + os.path.relpath(path, root), text


def debian_docs(root: str = "/usr/share/doc", max_file_chars: int = 40_000,
                min_chars: int = 200) -> Iterator[tuple[str, str]]:
  if not os.path.isdir(root):
    return
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames.sort()
    for name in sorted(filenames):
      base = name[:-3] if name.endswith(".gz") else name
      low = base.lower()
      if low.startswith(("changelog", "copyright")) or not _DOC_NAME.search(low):
        continue
      path = os.path.join(dirpath, name)
      if os.path.islink(path):
        continue
      try:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", errors="ignore") as f:
          text = clean(f.read(4 * max_file_chars))[:max_file_chars]
      except (OSError, EOFError):
        continue
      if len(text) >= min_chars:
        yield "debian_doc/" + os.path.relpath(path, root), text


def task_traces(num: int = 3000, seed: int = 0) -> Iterator[tuple[str, str]]:
  from tlt_jax.data.tasks import get_task
  task = get_task("arith")
  rng = np.random.default_rng(seed)
  per_doc = 50
  for d in range(0, num, per_doc):
    examples = [task.sample(rng) for _ in range(min(per_doc, num - d))]
    yield f"traces/arith/{d // per_doc}", clean("\n\n".join(e.prompt + e.trace for e in examples))


def is_validation(name: str, every: int = 20) -> bool:
  """A stable 1-in-`every` split by the document's name."""
  return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) % every == 0


def prepare(out_dir: str, sources=SOURCES, max_chars_per_source: int = 2_000_000,
            num_traces: int = 3000) -> dict:
  """Writes `train.npy` / `val.npy` (int16 token streams; documents separated by EOS) and
  `corpus.json` (the manifest) under `out_dir`; returns the manifest."""
  unknown = sorted(set(sources) - set(SOURCES))
  if unknown:
    raise ConfigError(f"corpus.sources has unknown {unknown}; allowed: {list(SOURCES)}")
  tok = tokenizer()
  gens = {"stdlib": stdlib_docs, "debian_doc": debian_docs,
          "traces": lambda: task_traces(num_traces)}
  streams = {"train": [], "val": []}
  manifest = {"tokenizer": {"type": "char", "charset": CHARSET, "vocab_size": tok.vocab_size},
              "sources": {}, "max_chars_per_source": max_chars_per_source}
  for src in sources:
    h, docs, chars = hashlib.sha256(), 0, 0
    for name, text in gens[src]():
      if chars >= max_chars_per_source:
        break
      text = text[:max_chars_per_source - chars]
      ids = tok.encode(text) + [tok.eos_id]
      streams["val" if is_validation(name) else "train"].append(np.asarray(ids, np.int16))
      h.update(name.encode() + b"\0" + text.encode() + b"\0")
      docs, chars = docs + 1, chars + len(text)
    manifest["sources"][src] = {"documents": docs, "chars": chars, "sha256": h.hexdigest()}
  if not streams["train"] or not streams["val"]:
    raise DataError(f"corpus sources {list(sources)} gave no text for train or validation")
  os.makedirs(out_dir, exist_ok=True)
  for split, parts in streams.items():
    arr = np.concatenate(parts)
    np.save(os.path.join(out_dir, f"{split}.npy"), arr)
    manifest[f"{split}_tokens"] = int(arr.size)
  with open(os.path.join(out_dir, "corpus.json"), "w") as f:
    json.dump(manifest, f, indent=1)
  return manifest


def load(out_dir: str) -> tuple[np.ndarray, np.ndarray, dict]:
  """(train tokens, val tokens, manifest) written by `prepare`."""
  try:
    with open(os.path.join(out_dir, "corpus.json")) as f:
      manifest = json.load(f)
    train = np.load(os.path.join(out_dir, "train.npy"), mmap_mode="r")
    val = np.load(os.path.join(out_dir, "val.npy"), mmap_mode="r")
  except (OSError, ValueError) as e:
    raise DataError(f"{out_dir}: no prepared SCONE corpus there ({e}); run "
                    "scripts/prepare_scone_corpus.py") from None
  return train, val, manifest
