"""Random-access data sources of `Example`s: `len(source)` and `source[i]` (with prompt_id = i).

Three kinds, as the design map asks:
  * `TaskSource`: an in-process generator. Example i of a synthetic task is
    `task.sample(default_rng([seed, stream, i]))`, so any index is reproducible on its own,
    with nothing materialised.
  * `TFDSSource`: an array_record TFDS dataset written by `TaskDatasetBuilder` (no TensorFlow:
    `download_and_prepare()` and `tfds.data_source` / `builder.as_data_source()` only).
    Split j of a built dataset holds exactly `TaskSource(task, n_j, seed, stream=j)`.
  * `RecordSource`: question/answer records loaded from JSONL or parquet files
    (`load_jsonl`, `load_parquet`, `load_qa_file`; verl-style parquet through
    `load_verl_parquet`) and turned into Examples by a FileTask.

`make_source(kind, **kwargs)` builds any of them by name for configs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from tlt_jax.data.tasks import Example, FileTask, Task, get_task
from tlt_jax.errors import DataError

log = logging.getLogger(__name__)

QUESTION_FIELDS = ("question", "problem")
ANSWER_FIELDS = ("answer", "solution")
EXTRA_FIELDS = ("level",)  # kept when present (MATH difficulty)
JSONL_SUFFIXES = (".jsonl", ".json")
PARQUET_SUFFIXES = (".parquet", ".pq")


def _as_task(task: Task | str, task_kwargs: Mapping[str, Any] | None = None) -> Task:
  if isinstance(task, Task):
    if task_kwargs:
      raise ValueError("task_kwargs are only for a task given by name")
    return task
  return get_task(task, **dict(task_kwargs or {}))


# ----------------------------------------------------------------------------- in-process


class TaskSource:
  """Example i = `task.sample(np.random.default_rng([seed, stream, i]))`, prompt_id = i.

  With `min_difficulty` > 0, example i is the first draw from that same generator whose
  meta["difficulty"] >= min_difficulty (rejection sampling, still random-access and
  deterministic): e.g. RL prompts without the trivial ones, whose groups are all correct and
  carry no learning signal. At most `max_tries` draws are made per index.

  `unusable(example) -> str | None` names why the run cannot use an example (e.g. a prompt too
  long for the context; see `data.batching.prompt_check`). With on_bad_record="skip" such
  an example is skipped like a too-easy one, counted in `skipped` and logged; the draws stay a
  pure function of the index, so a resumed run skips the same ones again. With "error" it raises
  DataError naming the example.
  """

  def __init__(self, task: Task | str, num_examples: int, seed: int = 0, stream: int = 0,
               task_kwargs: Mapping[str, Any] | None = None, min_difficulty: int = 0,
               max_tries: int = 1000, unusable: Callable[[Example], str | None] | None = None,
               on_bad_record: str = "skip"):
    if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
      raise ValueError(f"TaskSource: num_examples={num_examples!r} must be a positive int")
    if on_bad_record not in ("skip", "error"):
      raise ValueError(f"TaskSource: on_bad_record={on_bad_record!r}; allowed: 'skip' or 'error'")
    self.task = _as_task(task, task_kwargs)
    self.num_examples, self.seed, self.stream = num_examples, int(seed), int(stream)
    self.min_difficulty, self.max_tries = int(min_difficulty), int(max_tries)
    self.unusable, self.on_bad_record = unusable, on_bad_record
    self.skipped = 0  # unusable examples skipped so far (this process)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, i: int) -> Example:
    i = int(i)
    if not 0 <= i < self.num_examples:
      raise IndexError(f"TaskSource index {i} out of range [0, {self.num_examples})")
    rng = np.random.default_rng([self.seed, self.stream, i])
    difficulties, unusable = set(), 0
    for _ in range(self.max_tries):
      example = self.task.sample(rng)
      difficulty = example.meta.get("difficulty", 0)
      difficulties.add(difficulty)
      if difficulty < self.min_difficulty:
        continue
      problem = self.unusable(example) if self.unusable is not None else None
      if problem is None:
        return example.with_id(i)
      where = f"{describe_task(self.task)}, {_example_name(example)}"
      if self.on_bad_record == "error":
        raise DataError(f"{where}: {problem} (data.on_bad_record='error'; allowed: 'skip' to skip "
                        "such records with a warning)")
      unusable += 1
      self.skipped += 1
      if self.skipped <= 5 or self.skipped % 100 == 0:
        log.warning("skipped %s: %s (%d skipped so far; data.on_bad_record='skip')", where, problem,
                    self.skipped)
    found = sorted(difficulties)
    raise DataError(
        f"{describe_task(self.task)}: no usable example in {self.max_tries} draws (index {i}): "
        f"{unusable} were unusable, and min_difficulty={self.min_difficulty} while the difficulties "
        f"drawn range over {found[0] if found else '-'}..{found[-1] if found else '-'}; allowed: a "
        f"min_difficulty <= {found[-1] if found else 0} (config.rl.min_difficulty)")

  def __repr__(self) -> str:
    extra = f", min_difficulty={self.min_difficulty}" if self.min_difficulty else ""
    return (f"TaskSource({self.task!r}, num_examples={self.num_examples}, seed={self.seed}, "
            f"stream={self.stream}{extra})")


def describe_task(task: Task) -> str:
  """'task arith' or 'task gsm8k (data.jsonl)': the name, and the file a file task reads."""
  path = getattr(task, "path", None)
  return f"task {task.name}" + (f" ({path})" if path else "")


def _example_name(example: Example) -> str:
  index = example.meta.get("source_index")
  return f"record {index}" if index is not None and index >= 0 else f"a drawn example ({example.prompt[:30]!r}...)"


# ----------------------------------------------------------------------------- TFDS


@dataclasses.dataclass
class TaskDatasetConfig(tfds.core.BuilderConfig):
  """What to materialise: `splits` maps split name -> number of examples, in stream order."""

  task: str = "arith"
  task_kwargs: str = "{}"  # JSON, so that the config stays a plain, printable record
  seed: int = 0
  splits: tuple[tuple[str, int], ...] = (("train", 1000),)


class TaskDatasetBuilder(tfds.core.GeneratorBasedBuilder):
  """Materialises a synthetic task into array_record files, deterministically from a seed.

  Build with `build_task_dataset(...)`. Shuffling is disabled, so record j of split s is
  example j of `TaskSource(task, n_s, seed, stream=index of s)`.
  """

  name = "tlt_task"
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [TaskDatasetConfig(name="arith_default")]
  # Nothing is downloaded, so there is no checksums file to find next to this module; TFDS's
  # lookup of one imports `importlib_resources` for a module inside a package, which we lack.
  code_path = None

  def _info(self) -> tfds.core.DatasetInfo:
    features = tfds.features.FeaturesDict({
        "prompt": tfds.features.Text(),
        "trace": tfds.features.Text(),
        "answer": tfds.features.Text(),
        "meta": tfds.features.Text(),  # JSON
        "index": tfds.features.Scalar(dtype=np.int64),
    })
    return tfds.core.DatasetInfo(builder=self, features=features, disable_shuffling=True,
                                 description="Synthetic task examples for tlt_jax.")

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    return {name: self._generate_examples(stream, n) for stream, (name, n) in enumerate(cfg.splits)}

  def _generate_examples(self, stream: int, num_examples: int):
    cfg = self.builder_config
    source = TaskSource(cfg.task, num_examples, seed=cfg.seed, stream=stream,
                        task_kwargs=json.loads(cfg.task_kwargs))
    for i in range(num_examples):
      ex = source[i]
      yield i, {"prompt": ex.prompt, "trace": ex.trace, "answer": ex.answer,
                "meta": json.dumps(ex.meta, sort_keys=True), "index": i}


def task_dataset_config(task: str = "arith", num_examples: int | Mapping[str, int] = 1000, seed: int = 0,
                        task_kwargs: Mapping[str, Any] | None = None, name: str | None = None
                        ) -> TaskDatasetConfig:
  """A builder config; `num_examples` is an int (one "train" split) or {split: n}."""
  splits = {"train": num_examples} if isinstance(num_examples, int) else dict(num_examples)
  for split, n in splits.items():
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
      raise ValueError(f"task dataset: split {split!r} has num_examples={n!r}; must be a positive int")
  kwargs_json = json.dumps(dict(task_kwargs or {}), sort_keys=True)
  get_task(task, **json.loads(kwargs_json))  # validate early, with the task's own error messages
  if name is None:
    import hashlib
    digest = hashlib.sha1(f"{kwargs_json}|{sorted(splits.items())}".encode()).hexdigest()[:8]
    name = f"{task}_s{seed}_{digest}"
  return TaskDatasetConfig(name=name, task=task, task_kwargs=kwargs_json, seed=int(seed),
                           splits=tuple(splits.items()))


def build_task_dataset(data_dir: str, task: str = "arith", num_examples: int | Mapping[str, int] = 1000,
                       seed: int = 0, task_kwargs: Mapping[str, Any] | None = None,
                       name: str | None = None) -> TaskDatasetBuilder:
  """Writes (or finds already written) the dataset under `data_dir`; returns the builder.

  Read it back with `TFDSSource(builder=...)`, `TFDSSource(name=f"tlt_task/{config.name}", data_dir=...)`
  or `TFDSSource(builder_dir=builder.data_dir)`.
  """
  config = task_dataset_config(task, num_examples, seed, task_kwargs, name)
  builder = TaskDatasetBuilder(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder


def _text(value) -> str:
  if isinstance(value, bytes):
    return value.decode("utf-8")
  if isinstance(value, np.ndarray):
    return _text(value.item())
  return str(value)


class TFDSSource:
  """Random-access Examples from an array_record TFDS dataset written by `TaskDatasetBuilder`.

  Give exactly one of: `builder` (a prepared builder), `name` (+ `data_dir`; resolved through
  `tfds.data_source`) or `builder_dir` (a prepared version directory; `tfds.builder_from_directory`).
  """

  def __init__(self, name: str | None = None, split: str = "train", data_dir: str | None = None,
               builder: tfds.core.DatasetBuilder | None = None, builder_dir: str | None = None):
    given = [k for k, v in (("name", name), ("builder", builder), ("builder_dir", builder_dir)) if v is not None]
    if len(given) != 1:
      raise ValueError(f"TFDSSource: give exactly one of name / builder / builder_dir, got {given}")
    if builder_dir is not None:
      builder = tfds.builder_from_directory(os.fspath(builder_dir))
    if builder is not None:
      splits = list(builder.info.splits.keys())
      if split not in splits:
        raise ValueError(f"TFDSSource: split {split!r} not in dataset {builder.info.full_name}; "
                         f"available: {splits}")
      self._source = builder.as_data_source()[split]
    else:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    self.split = split

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> Example:
    i = int(i)
    if not 0 <= i < len(self):
      raise IndexError(f"TFDSSource index {i} out of range [0, {len(self)})")
    record = self._source[i]
    return Example(prompt=_text(record["prompt"]), trace=_text(record["trace"]),
                   answer=_text(record["answer"]), meta=json.loads(_text(record["meta"])),
                   prompt_id=int(record["index"]))


# ----------------------------------------------------------------------------- files


def _check_file(path: str, suffixes: Sequence[str], kind: str) -> str:
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{kind} file {path!r} does not exist")
  if not path.endswith(tuple(suffixes)):
    raise ValueError(f"{kind} file {path!r}: unsupported extension; allowed: {tuple(suffixes)}")
  return path


def _pick_field(available: Sequence[str], explicit: str | None, aliases: Sequence[str], role: str,
                where: str) -> str:
  if explicit is not None:
    if explicit not in available:
      raise DataError(f"{where}: {role} field {explicit!r} is missing; fields present: {sorted(available)}")
    return explicit
  for name in aliases:
    if name in available:
      return name
  raise DataError(f"{where}: no {role} field; allowed names: {tuple(aliases)} (or pass "
                   f"{role}_field=...); fields present: {sorted(available)}")


def _field_text(value, field: str, where: str) -> str:
  if isinstance(value, str):
    return value
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return str(value)
  raise DataError(f"{where}: field {field!r} must be a string or a number, got {type(value).__name__} "
                   f"({value!r:.40})")


def _record(row: Mapping, qf: str, af: str, where: str) -> dict:
  out = {"question": _field_text(row[qf], qf, where), "answer": _field_text(row[af], af, where)}
  for extra in EXTRA_FIELDS:
    if row.get(extra) is not None:
      out[extra] = row[extra]
  return out


def _report_skipped(path: str, skipped: list[str], total: int) -> None:
  if skipped:
    log.warning("skipped %d of %d records of %s (data.on_bad_record='skip'; 'error' stops instead): %s%s",
                len(skipped), total, path, "; ".join(skipped[:5]), " ..." if len(skipped) > 5 else "")


def _parse_records(path: str, items, parse, on_bad_record: str) -> tuple[list[dict], list[str]]:
  """(records, skipped): `parse(where, raw)` of every (where, raw) of `items`. A DataError it
  raises stops the load (on_bad_record="error") or skips that item, its message kept."""
  records, skipped = [], []
  for where, raw in items:
    try:
      records.append(parse(where, raw))
    except DataError as e:
      if on_bad_record == "error":
        raise
      skipped.append(str(e).replace(f"{path}, ", ""))
  return records, skipped


def load_jsonl(path: str, question_field: str | None = None, answer_field: str | None = None,
               on_bad_record: str = "error") -> list[dict]:
  """Reads question/answer records, one JSON object a line (blank lines skipped).

  Fields: `question_field` / `answer_field`, else the first present of QUESTION_FIELDS
  ("question", "problem") / ANSWER_FIELDS ("answer", "solution"). Returns dicts
  {"question", "answer"} (+ "level" when present). Errors (DataError) name the file, the line
  and the field. With on_bad_record="skip" an unusable line (invalid JSON, missing or non-text
  field) is skipped, counted and logged instead; a file with no usable record still raises.
  """
  path = _check_file(path, JSONL_SUFFIXES, "JSONL")

  def parse(where, line):
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
      raise DataError(f"{where}: expected a JSON object with question/answer fields, got {type(row).__name__}")
    qf = _pick_field(list(row), question_field, QUESTION_FIELDS, "question", where)
    af = _pick_field(list(row), answer_field, ANSWER_FIELDS, "answer", where)
    return _record(row, qf, af, where)

  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [(f"{path}, line {lineno}", line) for lineno, line in enumerate(f, start=1) if line.strip()]
  records, skipped = _parse_records(path, lines, parse, on_bad_record)
  if not records:
    raise DataError(f"JSONL file {path!r} holds no usable records ({len(lines)} lines with text, "
                    f"{len(skipped)} unusable); allowed: one JSON object a line with question and "
                    "answer fields")
  _report_skipped(path, skipped, len(lines))
  return records


VERL_COLUMNS = ("prompt", "reward_model")  # a parquet file with both is read as verl-style data
VERL_TRACE_KEYS = ("answer", "solution")  # extra_info keys holding a worked solution (SFT traces)


def _verl_messages(value, where: str) -> list[dict]:
  from tlt_jax.data.chat import check_messages
  if hasattr(value, "tolist"):
    value = value.tolist()
  try:
    return check_messages(value, f"{where}, prompt")
  except ValueError as e:
    raise DataError(str(e)) from None


def _verl_record(row: Mapping, where: str) -> dict:
  """One verl-style row as a record: messages, answer (= reward_model.ground_truth),
  data_source, question (the last user turn), trace (extra_info's worked solution when it has
  one) and extra (every other column, JSON-ready)."""
  messages = _verl_messages(row.get("prompt"), where)
  reward = row.get("reward_model")
  if not isinstance(reward, Mapping) or reward.get("ground_truth") is None:
    raise DataError(f"{where}: reward_model.ground_truth is missing (reward_model={reward!r:.80}); allowed: "
                    "a struct with a ground_truth string")
  answer = _field_text(reward["ground_truth"], "reward_model.ground_truth", where)
  users = [m["content"] for m in messages if m["role"] == "user"]
  if not users:
    raise DataError(f"{where}: prompt has no user message (roles {[m['role'] for m in messages]})")
  record = {"messages": messages, "question": users[-1], "answer": answer}
  if row.get("data_source") is not None:
    record["data_source"] = _field_text(row["data_source"], "data_source", where)
  extra = {k: v for k, v in row.items() if k not in ("prompt", "reward_model", "data_source") and v is not None}
  info = extra.get("extra_info")
  if isinstance(info, Mapping):
    for key in VERL_TRACE_KEYS:
      if isinstance(info.get(key), str) and info[key].strip():
        record["trace"] = info[key]
        break
  if extra:
    record["extra"] = json.loads(json.dumps(extra, default=str))
  return record


def load_verl_parquet(path: str, on_bad_record: str = "error") -> list[dict]:
  """Reads verl-style RL data: a `prompt` column of chat messages [{role, content}], a
  `reward_model` struct whose `ground_truth` is the reference answer, and `data_source` (which
  picks the verifier, see tasks/file_task.py). Other columns (ability, extra_info, ...) are kept
  under "extra" and end up in each example's meta. Errors and `on_bad_record` as `load_jsonl`."""
  import pyarrow.parquet as pq

  path = _check_file(path, PARQUET_SUFFIXES, "parquet")
  rows = pq.read_table(path).to_pylist()
  records, skipped = _parse_records(path, ((f"{path}, row {i}", row) for i, row in enumerate(rows)),
                                    lambda where, row: _verl_record(row, where), on_bad_record)
  if not records:
    raise DataError(f"verl-style parquet file {path!r} holds no usable rows ({len(rows)} rows, {len(skipped)} "
                    f"unusable{': ' + skipped[0] if skipped else ''}); allowed: rows with a prompt of "
                    "{role, content} messages and reward_model.ground_truth")
  _report_skipped(path, skipped, len(rows))
  return records


def load_parquet(path: str, question_field: str | None = None, answer_field: str | None = None,
                 on_bad_record: str = "error") -> list[dict]:
  """Reads question/answer records from a parquet file (pyarrow); same fields, errors and
  `on_bad_record` as `load_jsonl`, with rows counted from 0. A file with `prompt` and
  `reward_model` columns (and no explicit fields) is verl-style data: `load_verl_parquet`."""
  import pyarrow
  import pyarrow.parquet as pq

  path = _check_file(path, PARQUET_SUFFIXES, "parquet")
  try:
    names = pq.read_schema(path).names
  except (pyarrow.ArrowException, OSError) as e:
    raise DataError(f"parquet file {path!r} is unreadable ({type(e).__name__}: {e}); allowed: a parquet "
                    "file with question and answer columns") from None
  if question_field is None and answer_field is None and all(c in names for c in VERL_COLUMNS):
    return load_verl_parquet(path, on_bad_record)
  qf = _pick_field(names, question_field, QUESTION_FIELDS, "question", f"{path}, columns")
  af = _pick_field(names, answer_field, ANSWER_FIELDS, "answer", f"{path}, columns")
  columns = [qf, af] + [c for c in EXTRA_FIELDS if c in names and c not in (qf, af)]
  rows = pq.read_table(path, columns=columns).to_pylist()
  records, skipped = _parse_records(path, ((f"{path}, row {i}", row) for i, row in enumerate(rows)),
                                    lambda where, row: _record(row, qf, af, where), on_bad_record)
  if not records:
    raise DataError(f"parquet file {path!r} holds no usable rows ({len(rows)} rows, {len(skipped)} "
                    "unusable); allowed: rows with text question and answer columns")
  _report_skipped(path, skipped, len(rows))
  return records


def load_qa_file(path: str, question_field: str | None = None, answer_field: str | None = None,
                 on_bad_record: str = "error") -> list[dict]:
  """`load_jsonl` or `load_parquet`, chosen by the file's extension."""
  path = os.fspath(path)
  if path.endswith(JSONL_SUFFIXES):
    return load_jsonl(path, question_field, answer_field, on_bad_record)
  if path.endswith(PARQUET_SUFFIXES):
    return load_parquet(path, question_field, answer_field, on_bad_record)
  if not os.path.exists(path):
    raise FileNotFoundError(f"question/answer file {path!r} does not exist")
  raise ValueError(f"question/answer file {path!r}: unsupported extension; allowed: "
                   f"{JSONL_SUFFIXES + PARQUET_SUFFIXES}")


class RecordSource:
  """Examples from question/answer records through a FileTask; prompt_id = record index."""

  def __init__(self, records: Sequence[Mapping], task: FileTask | str = "gsm8k",
               task_kwargs: Mapping[str, Any] | None = None):
    self.task = _as_task(task, task_kwargs)
    if not hasattr(self.task, "example_from_record"):
      raise ValueError(f"RecordSource: task {self.task.name!r} cannot read records; "
                       "use a FileTask such as 'gsm8k' or 'math'")
    self.records = list(records)

  @classmethod
  def from_file(cls, path: str, task: FileTask | str = "gsm8k", question_field: str | None = None,
                answer_field: str | None = None, task_kwargs: Mapping[str, Any] | None = None) -> "RecordSource":
    return cls(load_qa_file(path, question_field, answer_field), task, task_kwargs)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> Example:
    i = int(i)
    if not 0 <= i < len(self.records):
      raise IndexError(f"RecordSource index {i} out of range [0, {len(self.records)})")
    return self.task.example_from_record(self.records[i], i)


SOURCES: dict[str, Callable[..., Any]] = {
    "task": TaskSource,
    "tfds": TFDSSource,
    "file": RecordSource.from_file,
}


def make_source(kind: str, **kwargs):
  """Builds a source by kind: "task" (TaskSource), "tfds" (TFDSSource), "file" (RecordSource.from_file)."""
  if kind not in SOURCES:
    raise ValueError(f"unknown data source kind {kind!r}; allowed: {sorted(SOURCES)}")
  return SOURCES[kind](**kwargs)
