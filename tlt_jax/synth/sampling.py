"""Samples per problem through the rollout engine, checked step by step, costed in FLOPs, and the
answer-filtered SFT dataset they make.

A dataset record (one JSON line) holds the fields SFT reads (an `Example`: prompt, trace = the
sampled response, answer, meta) and its provenance: the model that wrote it, the problem and
sample index, the FLOPs of sampling it, and the step checker's verdict.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import numpy as np

from tlt_jax.data.tasks.base import Example


@dataclasses.dataclass(frozen=True)
class Sample:
  """One sampled solution. answer_correct is False for a response that did not end (no EOS)."""

  problem_id: int
  sample_index: int
  model: str
  text: str
  finished: bool
  length: int
  answer_correct: bool
  steps_correct: bool | None
  first_wrong_step: int | None
  flops: int


def group_by_problem(samples: Sequence[Sample]) -> list[list[Sample]]:
  """Samples grouped by problem (ordered by problem id), each group ordered by sample index."""
  groups: dict[int, list[Sample]] = {}
  for s in samples:
    groups.setdefault(s.problem_id, []).append(s)
  return [sorted(groups[p], key=lambda s: s.sample_index) for p in sorted(groups)]


_ENGINES: dict = {}


def _engine(graphdef, temperature: float, tokenizer, chunk_size: int, max_context: int, compact: bool):
  """One RolloutEngine per (model graph, temperature, ...): its jits compile once per process,
  however many policies of the same architecture sample through it."""
  from tlt_jax.rollout.engine import RolloutEngine
  from tlt_jax.rollout.sampling import SamplingParams
  key = (graphdef, float(temperature), tuple(tokenizer.eos_ids), tokenizer.pad_id, chunk_size, max_context, compact)
  if key not in _ENGINES:
    _ENGINES[key] = RolloutEngine(graphdef, SamplingParams(temperature=float(temperature)),
                                  eos_ids=tokenizer.eos_ids, pad_id=tokenizer.pad_id, chunk_size=chunk_size,
                                  max_context=max_context, compact=compact)
  return _ENGINES[key]


def sample_solutions(model, tokenizer, task, examples: Sequence[Example], num_samples: int, *,
                     model_name: str, temperature: float, max_new_tokens: int, batch_size: int = 256,
                     seed: int = 0, chunk_size: int = 16, include_attention: bool = True,
                     show_progress: bool = True, compact: bool = True) -> list[Sample]:
  """`num_samples` responses per example from `model` at `temperature` (softmax(logits / T)),
  through the rollout engine in batches of `batch_size` rows, each checked by
  `task.check_trace` and costed by `flops.sequence_flops` (its own prompt and response lengths).
  `compact`: the engine compacts finished rows into smaller batch buckets (each bucket compiles
  once); off, every batch is padded to `batch_size` rows and decoded at that one shape (one
  compile per engine: small runs). Sample j of example i is row i * num_samples + j; the batch of rows [b, b + batch_size) uses the
  key fold_in(key(seed), b), so the samples are a pure function of the arguments."""
  import jax
  from flax import nnx

  from tlt_jax.data.batching import encode_prompts
  from tlt_jax.synth.flops import sequence_flops
  from tlt_jax.utils.console import progress

  cfg = model.cfg
  graphdef, params = nnx.split(model)
  engine = _engine(graphdef, temperature, tokenizer, chunk_size, cfg.max_position_embeddings, compact)
  rows = [(i, j) for i in range(len(examples)) for j in range(num_samples)]
  width = max(len(tokenizer.encode(e.prompt)) for e in examples) + 1
  width = -(-width // 8) * 8
  out: list[Sample] = []
  bar = progress(len(rows), f"sample {model_name}", unit="sample", leave=False) if show_progress else None
  try:
    for b in range(0, len(rows), batch_size):
      chunk = rows[b:b + batch_size]
      prompts, plens = encode_prompts([examples[i] for i, _ in chunk], tokenizer, width)
      if not compact and len(chunk) < batch_size:  # one batch shape: pad with copies of row 0
        pad = batch_size - len(chunk)
        prompts = np.concatenate([prompts, np.repeat(prompts[:1], pad, 0)])
        plens = np.concatenate([plens, np.repeat(plens[:1], pad)])
      res = engine.generate(params, prompts, plens, max_new_tokens, jax.random.fold_in(jax.random.key(seed), b))
      for r, (i, j) in enumerate(chunk):
        ex = examples[i]
        length = int(res.lengths[r])
        text = tokenizer.decode(res.tokens[r, :length])
        finished = bool(res.finished[r])
        check = task.check_trace(text, ex)
        out.append(Sample(problem_id=int(ex.prompt_id if ex.prompt_id >= 0 else i), sample_index=j,
                          model=model_name, text=text, finished=finished, length=length,
                          answer_correct=finished and bool(check.answer_correct),
                          steps_correct=check.steps_correct, first_wrong_step=check.first_wrong_step,
                          flops=sequence_flops(cfg, int(plens[r]), length, include_attention)))
      if bar is not None:
        bar.update(len(chunk))
  finally:
    if bar is not None:
      bar.close()
  return out


def filter_correct(samples: Sequence[Sample], examples: Sequence[Example], k: int | None = None) -> list[dict]:
  """Dataset records of the answer-correct samples among the first k of each problem (all with
  k=None): the fields SFT reads plus provenance (module docstring). Filtering is by the final
  answer only, as in the paper: false positives stay in, marked by `steps_correct`."""
  by_id = {int(e.prompt_id if e.prompt_id >= 0 else i): e for i, e in enumerate(examples)}
  records = []
  for s in samples:
    if not s.answer_correct or (k is not None and s.sample_index >= k):
      continue
    ex = by_id[s.problem_id]
    records.append({"prompt": ex.prompt, "trace": s.text, "answer": ex.answer, "meta": ex.meta,
                    "provenance": {"model": s.model, "problem_id": s.problem_id,
                                   "sample_index": s.sample_index, "flops": s.flops,
                                   "steps_correct": s.steps_correct, "first_wrong_step": s.first_wrong_step}})
  return records


def write_jsonl(records: Sequence[dict], path: str) -> None:
  """One JSON object per line, written atomically (a rerun never sees half a file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    for r in records:
      f.write(json.dumps(dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r) + "\n")
  os.replace(tmp, path)


def read_samples(path: str) -> list[Sample]:
  """The samples `write_jsonl(samples, path)` wrote."""
  with open(path) as f:
    return [Sample(**json.loads(line)) for line in f if line.strip()]


def read_sft_examples(path: str) -> list[Example]:
  """The SFT examples of a dataset file: prompt, trace, answer; meta carries the provenance."""
  from tlt_jax.errors import DataError
  out = []
  with open(path) as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        r = json.loads(line)
        out.append(Example(prompt=r["prompt"], trace=r["trace"], answer=r["answer"],
                           meta={**r.get("meta", {}), "provenance": r.get("provenance", {})},
                           prompt_id=len(out)))
      except (ValueError, KeyError) as e:
        raise DataError(f"{path}:{n}: not a dataset record ({e}); allowed: JSON with prompt, trace, "
                        "answer[, meta, provenance]") from None
  return out


def dataset_sampler(examples: Sequence[Example], seed: int):
  """sample_fn(step) -> a function drawing examples uniformly (with replacement) for
  `pack_sft_batch`: the batch of a step is a pure function of (seed, step)."""
  def for_step(step: int):
    rng = np.random.default_rng([seed, 29, step])
    return lambda: examples[int(rng.integers(0, len(examples)))]
  return for_step
