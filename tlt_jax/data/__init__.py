"""Data: tokenizers, tasks (registered by name), sources, a checkpointable prompt iterator and
token batching. Pure Python / numpy; nothing here needs jax.

`tlt_jax.data.sources` (TFDS, JSONL/parquet, in-process generators) is imported on first use,
so that importing the package does not load tensorflow_datasets.
"""

from tlt_jax.data.batching import encode_prompts, make_sft_batch, next_token_targets
from tlt_jax.data.iterator import PromptIterator, repeat_groups
from tlt_jax.data.tasks import (ArithTask, Example, FileTask, MathFileTask, Task, get_task, register_task,
                                registered_tasks)
from tlt_jax.data.tokenizer import CharTokenizer, HFTokenizer, Tokenizer, load_tokenizer

_SOURCE_NAMES = ("TaskSource", "TFDSSource", "RecordSource", "TaskDatasetBuilder", "build_task_dataset",
                 "load_jsonl", "load_parquet", "load_qa_file", "load_verl_parquet", "make_source")


def __getattr__(name):
  if name in _SOURCE_NAMES:
    from tlt_jax.data import sources
    return getattr(sources, name)
  raise AttributeError(f"module 'tlt_jax.data' has no attribute {name!r}")


__all__ = ["encode_prompts", "make_sft_batch", "next_token_targets", "PromptIterator", "repeat_groups",
           "ArithTask", "Example", "FileTask", "MathFileTask", "Task", "get_task", "register_task",
           "registered_tasks", "CharTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer",
           *_SOURCE_NAMES]
