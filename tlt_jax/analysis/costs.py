"""Cost models for the RL step simulator (analysis/sim.py): seconds per unit of work, one interface.

Three sources, one interface (`CostModel`):

  (a) `MeasuredCosts` from a cost benchmark run on this CPU (`experiments/cost_bench.py`);
  (c) the same class from the same benchmark's output on a GPU (or any accelerator);
  (b) `CompiledCosts` from the TPU compiler's per-step estimates that `experiments/pod_compile.py`
      writes (bytes accessed / HBM bandwidth, the compiler's own `optimal_seconds` where it has
      one), completed by `RooflineCosts` where a compiled figure is missing or known not to be
      per-iteration;
  `RooflineCosts` is the documented analytic model: a step takes
      max(bytes read / HBM bandwidth, FLOPs / (peak FLOP/s x MFU)),
  bytes = the group's weights per chip + the live KV cache per chip, FLOPs = 2 x params x tokens
  (forward) per chip.

The units the simulator asks for are the rollout engine's and the trainer's:
  prefill(batch, prompt_len)         one group's prefill of `batch` rows
  decode_step(batch, ctx)            one plain decoding step at a padded batch and live context
  spec_round(batch, strategy, ctx)   one draft + verify round of `strategy` (d, k, n)
  drafter_train_step(num_groups)     one drafter step, data-parallel over `num_groups` idle groups
  update(tokens)                     old/ref log-probs + the policy update over `tokens` tokens
  chunk_overhead                     host seconds per dispatched chunk (dispatch, sync)
  compact(batch, ctx)                a compaction out of a `batch`-row state: copy out its finished
                                     rows, gather the live ones into their smaller bucket
  copy_out(batch, ctx, features)     the final copy-out of a group's `batch` rows (with the target
                                     features when the drafter buffer collects them)
  throughput(k)                      aggregate speed when k jobs share the same cores (1 per job
                                     on accelerators: groups are disjoint chips; on a CPU with fake
                                     devices the groups share the cores, see `shared_gain`)
  light_batch                        (shared cores) a job on at most this many rows runs beside
                                     the others without slowing them or being slowed
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from typing import Any, Mapping, Sequence

import numpy as np

from tlt_jax.rollout.strategy import parse_strategy, strategy_name  # noqa: F401 (re-exported)

Strategy = tuple[int, int, int]

# bf16 dense peak per chip (Google Cloud TPU system architecture pages).
PEAK_BF16_FLOPS = {"v4": 275e12, "v5e": 197e12, "v5p": 459e12, "v6e": 918e12}

# Fraction of HBM bandwidth a memory-bound decode step reaches in a current serving engine:
# vLLM 0.23 serving Llama-3.1-8B (bf16, 16.1 GB of weights) on one A100-40GB decodes about 75
# tokens/s at one request, "roughly 77% of the GPU's memory-bandwidth ceiling"
# (https://johnmusgrave.com/p/vllm-throughput-latency-sweep-on : 75 tok/s x 16.1 GB = 1.20 TB/s of
# 1.555 TB/s). No published TPU decode throughput of a 7-8B model at batch 1 was found in the
# sources searched; the same engine-class figure is used for TPUs, and the compiled costs
# (CompiledCosts) replace it with the TPU compiler's own estimate where they exist.
DECODE_EFFICIENCY = 0.77


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One chip's HBM bandwidth (bytes/s) and bf16 dense peak (FLOP/s), with where they come from."""

  name: str
  hbm_bandwidth: float
  peak_flops: float
  source: str


# NVIDIA H100 SXM5 80GB: 3.35 TB/s HBM3, 989 TFLOP/s dense BF16 (NVIDIA H100 datasheet,
# https://www.nvidia.com/en-us/data-center/h100/ ; the same figures in
# https://gist.github.com/mikasenghaas/d63ded03f1f0417b1677627119bacc0d ).
H100 = Accelerator("h100-sxm", 3.35e12, 989e12, "NVIDIA H100 SXM datasheet")

# The TLT paper's released 7B recipe (github.com/mit-han-lab/fastrl, examples/grpo_7B.sh): one node
# of 8 GPUs, SGLang rollouts at tensor_model_parallel_size=4 (2 rollout engines of 4 GPUs),
# 64 prompts x 8 responses, prompts <= 1,024 and responses <= 32,768 tokens, speculation at
# <= 32 running requests (speculative.bs_threshold=32), temperature 0.9; its BEG-MAB arms
# (verl/trainer/config/fastrl_trainer.yaml) are EAGLE depth 8, top-k 4 with 48/32/16/8 verified
# tokens, bucket thresholds [1, 2, 5, 21]. SGLang's EAGLE tree keeps top-4 of 16 candidates per
# level and verifies the best n of all levels' candidates; a (depth, topk, n) strategy here
# verifies at most depth x topk nodes, so the arms are written with the smallest top-k that holds
# n (48 -> k 6, 32 -> 4, 16 -> 2, 8 -> 1): the same depth and verified tokens, k tokens per row per
# draft level.
PAPER_LAYOUT = dict(total_chips=8, group_chips=4, spec_threshold=32,
                    arms=((8, 6, 48), (8, 4, 32), (8, 2, 16), (8, 1, 8)), mab_buckets=(1, 2, 5, 21))


class CostModel:
  """The interface (see the module docstring). `source` says where the figures come from."""

  source: str = ""
  chunk_overhead: float = 0.0
  shared_gain: float | None = None  # None: jobs never share cores (accelerators)
  light_batch: int = 0  # (shared cores) work on at most this many rows does not contend

  def prefill(self, batch: int, prompt_len: int) -> float:
    raise NotImplementedError

  def session_prefill(self, batch: int, prompt_len: int) -> float:
    """A rollout session's prefill, placement and the host's wait included. Default: the prefill;
    a measured model scales it by what the real path was measured to cost."""
    return self.prefill(batch, prompt_len)

  def decode_step(self, batch: int, ctx: int) -> float:
    raise NotImplementedError

  def spec_round(self, batch: int, strategy: Strategy, ctx: int) -> float:
    raise NotImplementedError

  def drafter_train_step(self, num_groups: int = 1) -> float:
    raise NotImplementedError

  def update(self, tokens: int) -> float:
    raise NotImplementedError

  def compact(self, batch: int, ctx: int) -> float:
    return 0.0

  def copy_out(self, batch: int, ctx: int, features: bool = False) -> float:
    return 0.0

  def throughput(self, jobs: int) -> float:
    """Aggregate progress rate of `jobs` concurrent jobs (each progresses at throughput / jobs)."""
    if self.shared_gain is None or jobs <= 1:
      return float(max(jobs, 1))
    return min(float(jobs), 1.0 + (jobs - 1) * float(self.shared_gain))

  def describe(self) -> dict[str, Any]:
    return {"source": self.source}


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
  """Piecewise-linear, extrapolated linearly past the last two points (cost grows past a grid)."""
  xs, ys = np.asarray(xs, float), np.asarray(ys, float)
  if len(xs) == 1:
    return float(ys[0])
  if x > xs[-1]:
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return float(ys[-1] + max(slope, 0.0) * (x - xs[-1]))
  return float(np.interp(x, xs, ys))


@dataclasses.dataclass
class MeasuredCosts(CostModel):
  """Costs from `experiments/cost_bench.py`'s JSON (sources a and c).

  Grids: decode[ctx][batch] seconds per plain step; spec[strategy][batch] seconds per round (at
  the benchmark's context; scaled by the decode step's growth with context); prefill[batch]
  seconds per prompt token row-batch at the benchmark's prompt length; drafter_train_s; update
  seconds per token; chunk overhead; `shared_gain` (CPU): measured speed of two concurrent
  decodes relative to one, minus one (0: they serialise).
  """

  data: Mapping[str, Any]
  source: str = "measured"

  def __post_init__(self):
    d = self.data
    self.source = f"measured on {d.get('device', '?')}"
    self.chunk_overhead = float(d.get("chunk_overhead_s", 0.0))
    self.shared_gain = d.get("shared_gain_rollout", d.get("shared_gain"))
    self.light_batch = int(d.get("light_batch", 0))
    self._ctx = sorted(int(c) for c in d["decode"])
    self._batch = {c: sorted(int(b) for b in d["decode"][str(c)]) for c in self._ctx}

  def decode_step(self, batch, ctx):
    d = self.data["decode"]
    per_ctx = [_interp(batch, self._batch[c], [d[str(c)][str(b)] for b in self._batch[c]]) for c in self._ctx]
    return _interp(ctx, self._ctx, per_ctx)

  def spec_round(self, batch, strategy, ctx):
    s = self.data["spec"][strategy_name(strategy)]
    bs = sorted(int(b) for b in s)
    t = _interp(batch, bs, [s[str(b)] for b in bs])
    ref = int(self.data.get("spec_ctx", self._ctx[0]))
    return t * self.decode_step(batch, ctx) / self.decode_step(batch, ref)

  def prefill(self, batch, prompt_len):
    by_len = self.data.get("prefill_by_len") or {}
    if len(by_len) >= 2:  # interpolated in the prompt length between the measured ones
      lens = sorted(int(n) for n in by_len)
      per_len = [_interp(batch, sorted(int(b) for b in by_len[str(n)]),
                         [by_len[str(n)][str(b)] for b in sorted(int(b) for b in by_len[str(n)])]) for n in lens]
      return _interp(prompt_len, lens, per_len) if prompt_len >= lens[0] else per_len[0] * prompt_len / lens[0]
    p = self.data["prefill"]
    bs = sorted(int(b) for b in p)
    return _interp(batch, bs, [p[str(b)] for b in bs]) * prompt_len / float(self.data.get("prefill_len", prompt_len))

  def session_prefill(self, batch, prompt_len):
    sp = self.data.get("session_prefill")
    if not sp or not sp.get("bare_s"):
      return self.prefill(batch, prompt_len)
    return self.prefill(batch, prompt_len) * float(sp["first_s"]) / float(sp["bare_s"])

  def drafter_train_step(self, num_groups=1):
    t = float(self.data["drafter_train_s"])
    return t if self.shared_gain is not None else t / max(num_groups, 1)

  def update(self, tokens):
    return float(self.data["update_s_per_token"]) * tokens + float(self.data.get("update_fixed_s", 0.0))

  def _by_batch(self, key, batch):
    table = self.data.get(key) or {}
    if not table:
      return 0.0
    bs = sorted(int(b) for b in table)
    return _interp(batch, bs, [table[str(b)] for b in bs])

  def compact(self, batch, ctx):
    return self._by_batch("compact", batch) if batch > 1 else 0.0

  def copy_out(self, batch, ctx, features=False):
    return self._by_batch("copy_out_feat" if features else "copy_out", batch)

  def describe(self):
    return {"source": self.source, "shared_gain": self.shared_gain, "light_batch": self.light_batch,
            "chunk_overhead_s": self.chunk_overhead}

  @classmethod
  def load(cls, path: str) -> "MeasuredCosts":
    with open(path) as f:
      return cls(json.load(f))


@dataclasses.dataclass
class RooflineCosts(CostModel):
  """The analytic model for one rollout group of `group_chips` chips (weights tensor-parallel
  over them) and a policy update data-parallel over all `total_chips` (module docstring).

  A speculative round of (d, k, n) is charged as the program runs it (rollout/speculative.py):
    catch-up   one drafter call over d + 1 positions per row: the drafter's weights and its own
               KV cache (ONE layer, the target's KV heads) over the live window;
    draft      d head reads (the root's top-k, then one per level), each of the draft vocabulary's
               rows of the LM head (`draft_vocab`, 0 = the whole vocabulary), and d - 1 drafter
               calls of k tokens per row, each reading the drafter's weights and its KV window;
    verify     one target forward of n + 1 tokens per row: the weights, the target's KV (all its
               layers) over the live window, 2 x params x (n + 1) FLOPs per row.
  Each part is max(bytes / (HBM bandwidth x decode_efficiency), FLOPs / (peak x mfu)) per chip.
  """

  params: int  # policy parameters
  layers: int
  kv_heads: int
  head_dim: int
  group_chips: int
  total_chips: int
  hbm_bandwidth: float  # bytes/s per chip
  peak_flops: float  # FLOP/s per chip
  drafter_params: int = 0  # the drafter's own (one layer + fc); it shares the policy's head
  head_params: int = 0  # LM head rows x hidden (used when vocab_size/hidden_size are not given)
  vocab_size: int = 0
  hidden_size: int = 0
  draft_vocab: int = 0  # rows of the head a draft level reads (0: all vocab_size)
  drafter_layers: int = 1  # the drafter's KV cache layers (EAGLE: one)
  bytes_per_param: int = 2
  mfu: float = 0.5  # fraction of peak FLOP/s the update and prefill reach
  decode_efficiency: float = DECODE_EFFICIENCY  # fraction of HBM bandwidth a decode step reaches
  chunk_overhead: float = 2e-3
  drafter_train_tokens: int = 8 * 9216
  source: str = "roofline model"

  # --------------------------------------------------------------- the terms (bytes and FLOPs)

  def _kv_bytes(self, batch, ctx, layers=None):
    layers = self.layers if layers is None else layers
    return 2 * layers * self.kv_heads * self.head_dim * self.bytes_per_param * batch * ctx

  def drafter_kv_bytes(self, batch, ctx):
    """The drafter's own KV cache over a live window of `ctx` slots (one layer)."""
    return self._kv_bytes(batch, ctx, self.drafter_layers)

  def head_rows(self) -> int:
    return int(self.draft_vocab) if self.draft_vocab else int(self.vocab_size)

  def draft_head_bytes(self) -> float:
    """The LM head rows one draft level reads (the draft vocabulary's, or all of them)."""
    if self.vocab_size and self.hidden_size:
      return self.head_rows() * self.hidden_size * self.bytes_per_param
    return self.head_params * self.bytes_per_param

  def _time(self, bytes_, flops):
    mem = bytes_ / self.group_chips / (self.hbm_bandwidth * self.decode_efficiency)
    return max(mem, flops / self.group_chips / (self.peak_flops * self.mfu))

  def _step(self, weight_bytes, batch, ctx, tokens_per_row):
    return self._time(weight_bytes + self._kv_bytes(batch, ctx), 2.0 * self.params * batch * tokens_per_row)

  def decode_step(self, batch, ctx):
    return self._step(self.params * self.bytes_per_param, batch, ctx, 1)

  def spec_round_terms(self, batch, strategy, ctx) -> dict[str, float]:
    """Seconds of each part of one round (class docstring): catch-up, draft head reads, drafter
    levels, verify."""
    d, k, n = strategy
    dbytes = self.drafter_params * self.bytes_per_param
    hidden = self.hidden_size or 0
    head_flops = 2.0 * self.head_rows() * hidden
    catchup = self._time(dbytes + self.drafter_kv_bytes(batch, ctx), 2.0 * self.drafter_params * batch * (d + 1))
    heads = self._time(self.draft_head_bytes(), head_flops * batch) + (d - 1) * self._time(
        self.draft_head_bytes(), head_flops * batch * k)
    levels = (d - 1) * self._time(dbytes + self.drafter_kv_bytes(batch, ctx), 2.0 * self.drafter_params * batch * k)
    verify = self._step(self.params * self.bytes_per_param, batch, ctx, n + 1)
    return {"catchup": catchup, "draft_heads": heads, "draft_levels": levels, "verify": verify}

  def spec_round(self, batch, strategy, ctx):
    return sum(self.spec_round_terms(batch, strategy, ctx).values())

  def prefill(self, batch, prompt_len):
    return 2.0 * self.params * batch * prompt_len / self.group_chips / (self.peak_flops * self.mfu)

  def compact(self, batch, ctx):
    # the live half of the KV cache read and written once (the copy-out is a few KB per row)
    return 2 * self._kv_bytes(batch // 2, ctx) / self.group_chips / self.hbm_bandwidth

  def drafter_train_step(self, num_groups=1):
    head = self.vocab_size * self.hidden_size if self.vocab_size and self.hidden_size else self.head_params
    p = self.drafter_params + head
    return 6.0 * p * self.drafter_train_tokens / (self.group_chips * max(num_groups, 1)) / (self.peak_flops * self.mfu)

  def update(self, tokens):
    # old + ref log-prob forwards (2 x 2P), update forward + backward (6P), full remat (+2P)
    return 12.0 * self.params * tokens / self.total_chips / (self.peak_flops * self.mfu)

  def describe(self):
    return {"source": self.source, "mfu": self.mfu, "decode_efficiency": self.decode_efficiency,
            "hbm_bandwidth": self.hbm_bandwidth, "peak_flops": self.peak_flops,
            "group_chips": self.group_chips, "total_chips": self.total_chips, "draft_vocab": self.draft_vocab}


def split_paths(paths: str | Sequence[str]) -> list[str]:
  """A comma-separated string (or a sequence) of paths as a list, blanks dropped."""
  if isinstance(paths, str):
    paths = paths.split(",")
  return [p.strip() for p in paths if p.strip()]


def load_compiled(paths: str | Sequence[str]) -> tuple[dict[str, dict], dict[str, str], dict[str, Any]]:
  """The step records of one or several pod_compile JSONL files, merged in the order given: a
  step held by several files is taken from the LAST of them (list the files oldest design first,
  so the current program's row replaces an earlier one). Returns (step -> record, step -> the
  file it came from, the layout record). A missing file, or files compiled for different layouts
  (topology, cache capacity), is a ConfigError."""
  from tlt_jax.errors import ConfigError
  paths = split_paths(paths)
  if not paths:
    raise ConfigError("compiled costs: no pod_compile JSONL given")
  compiled: dict[str, dict] = {}
  origin: dict[str, str] = {}
  layout: dict[str, Any] = {}
  for path in paths:
    try:
      with open(path) as f:
        lines = [line for line in f if line.strip()]
    except OSError as e:
      raise ConfigError(f"compiled costs: {path} cannot be read ({e.strerror or e}); run "
                        "experiments/pod_compile.py first, or use --costs=roofline") from None
    for line in lines:
      rec = json.loads(line)
      if "layout" in rec:
        lay = rec["layout"]
        for key in ("topology", "capacity"):
          if key in lay and key in layout and lay[key] != layout[key]:
            raise ConfigError(f"compiled costs: {path} was compiled for {key}={lay[key]}, an earlier file "
                              f"for {key}={layout[key]}; merge only one layout's files")
        layout.update(lay)
      elif "step" in rec:
        compiled[rec["step"]] = rec
        origin[rec["step"]] = path
  return compiled, origin, layout


@dataclasses.dataclass
class CompiledCosts(RooflineCosts):
  """Source (b): the TPU compiler's per-step figures from pod_compile JSONL (one file or several,
  merged by `load_compiled`: the last file holding a step wins).

  Used per program: a decode step at batch b from `decode_chunk@b` (XLA's cost analysis counts the
  chunk's while-loop body, one decoding step, once; the chunk is compiled over the whole cache),
  scaled to the live context by the `decode_step@B,window=W` entries of the nearest compiled
  batches (`ctx_scale`); a speculative round from `speculative_chunk[s]@b` (one round, same
  reason), scaled the same way (`round_ctx="kv"`: only a decode step's worth of it follows the
  live context); the drafter step from `drafter_train_step`. Each time is the
  compiler's `optimal_seconds` where it has one, else bytes accessed / HBM bandwidth; between
  compiled batches it is interpolated linearly. A program with no compiled row falls back to the
  roofline (`uses` says which). Prefill and the update come from the roofline: their compiled
  FLOP counts are per micro-batch / per scanned body and do not add up to 2 x params x tokens, so
  they are not used as totals.
  """

  compiled: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  capacity: int = 0  # the compiled cache's slots (the whole-cache decode_step's window); 0: unknown
  origin: Mapping[str, str] = dataclasses.field(default_factory=dict)  # step -> the file it came from
  # how a whole-cache round follows the live context: "scaled" (the whole round by the decode
  # step's live-window factor) or "kv" (only a decode step's worth of it, the verify's KV reads:
  # round(ctx) = round(whole) - (decode(whole) - decode(ctx)))
  round_ctx: str = "scaled"
  source: str = "compiler estimates"

  @staticmethod
  def _rec_time(rec):
    """A compiled record's seconds (the class docstring). Not `_time`, the roofline's own term."""
    t = rec.get("optimal_seconds")
    if t is None or not (isinstance(t, (int, float)) and math.isfinite(t) and t > 0):
      t = rec["hbm_roofline_s"]
    return float(t)

  def _by_batch(self, prefix):
    out = {}
    for name, rec in self.compiled.items():
      if name.startswith(prefix + "@") and "," not in name:
        out[int(name.split("@")[1])] = self._rec_time(rec)
    return dict(sorted(out.items()))

  @functools.cached_property
  def _window_tables(self) -> dict[int, tuple[list[int], list[float]]]:
    """batch -> (windows, their decode_step bytes over the whole cache's), for every batch with a
    whole-cache `decode_step@B` and at least one window (the whole cache counted at `capacity`)."""
    full, win = {}, {}
    for name, rec in self.compiled.items():
      if not name.startswith("decode_step@"):
        continue
      head, _, rest = name.partition(",")
      b = int(head.split("@")[1])
      if not rest:
        full[b] = float(rec["hbm_roofline_s"])
      elif rest.startswith("window="):
        win.setdefault(b, {})[int(rest.split("=")[1])] = float(rec["hbm_roofline_s"])
    out = {}
    for b in sorted(set(full) & set(win)):
      pts = dict(win[b])
      if self.capacity and self.capacity not in pts and self.capacity > max(pts):
        pts[self.capacity] = full[b]
      ws = sorted(pts)
      out[b] = (ws, [pts[w] / full[b] for w in ws])
    return out

  def ctx_scale(self, batch, ctx) -> float:
    """A whole-cache program's time at a live context of `ctx` slots, as a fraction: the
    decode_step bytes at that window over the whole cache's, at the compiled batches nearest
    `batch` (linear between two, the nearest beyond the ends; linear in the context past the
    last window, as `_interp`); 1.0 without window entries."""
    tables = self._window_tables
    if not tables:
      return 1.0
    bs = sorted(tables)
    per_b = [_interp(ctx, *tables[b]) for b in bs]
    return float(np.interp(batch, bs, per_b))

  def decode_step(self, batch, ctx):
    table = self._by_batch("decode_chunk")
    if not table:
      return super().decode_step(batch, ctx)
    return _interp(batch, list(table), list(table.values())) * self.ctx_scale(batch, ctx)

  def spec_round(self, batch, strategy, ctx):
    table = self._by_batch(f"speculative_chunk[{strategy_name(strategy)}]")
    if not table:
      return super().spec_round(batch, strategy, ctx)
    whole = _interp(batch, list(table), list(table.values()))
    dec = self._by_batch("decode_chunk")
    if self.round_ctx == "kv" and dec:
      return whole - _interp(batch, list(dec), list(dec.values())) * (1.0 - self.ctx_scale(batch, ctx))
    return whole * self.ctx_scale(batch, ctx)

  def drafter_train_step(self, num_groups=1):
    rec = self.compiled.get("drafter_train_step")
    if rec is None:
      return super().drafter_train_step(num_groups)
    return self._rec_time(rec) / max(num_groups, 1)

  def uses(self, strategies: Sequence[Strategy] = ()) -> list[dict[str, Any]]:
    """What stands for each simulated program: its compiled rows (step, file, seconds) or the
    roofline where none was compiled."""
    import os
    rows = []

    def add(unit, prefix):
      table = self._by_batch(prefix)
      if not table:
        rows.append(dict(unit=unit, step=None, file=None, seconds=None, source="roofline"))
      for b, t in table.items():
        step = f"{prefix}@{b}"
        rows.append(dict(unit=unit, step=step, file=os.path.basename(self.origin.get(step, "")),
                         seconds=t, source="compiled"))

    add("decode step", "decode_chunk")
    for s in strategies:
      add(f"round {strategy_name(s)}", f"speculative_chunk[{strategy_name(s)}]")
    for b in sorted(self._window_tables):
      names = [n for n in self.compiled if n == f"decode_step@{b}" or n.startswith(f"decode_step@{b},window=")]
      for name in sorted(names, key=lambda n: int(n.split("=")[1]) if "=" in n else -1):
        rows.append(dict(unit="live-context scale", step=name, file=os.path.basename(self.origin.get(name, "")),
                         seconds=float(self.compiled[name]["hbm_roofline_s"]), source="compiled"))
    rec = self.compiled.get("drafter_train_step")
    rows.append(dict(unit="drafter step", step="drafter_train_step" if rec else None,
                     file=os.path.basename(self.origin.get("drafter_train_step", "")) if rec else None,
                     seconds=self._rec_time(rec) if rec else None, source="compiled" if rec else "roofline"))
    for unit in ("prefill", "update (log-probs + policy update)"):
      rows.append(dict(unit=unit, step=None, file=None, seconds=None, source="roofline"))
    return rows

  @classmethod
  def from_jsonl(cls, paths: str | Sequence[str], **roofline) -> "CompiledCosts":
    """From one pod_compile JSONL or several (a sequence, or one comma-separated string), merged
    by `load_compiled` (the last file holding a step wins)."""
    compiled, origin, layout = load_compiled(paths)
    return cls(compiled=compiled, origin=origin, capacity=int(layout.get("capacity", 0) or 0), **roofline)


@dataclasses.dataclass
class ConstantCosts(CostModel):
  """Fixed costs (tests, hand-computable cases)."""

  decode_s: float = 1e-3
  spec_s: Mapping[str, float] = dataclasses.field(default_factory=dict)
  prefill_s: float = 0.0
  train_s: float = 1e-3
  update_s_per_token: float = 0.0
  chunk_overhead: float = 0.0
  compact_s: float = 0.0
  copy_out_s: float = 0.0
  shared_gain: float | None = None
  light_batch: int = 0
  source: str = "constant"

  def compact(self, batch, ctx):
    return self.compact_s

  def copy_out(self, batch, ctx, features=False):
    return self.copy_out_s

  def decode_step(self, batch, ctx):
    return self.decode_s

  def spec_round(self, batch, strategy, ctx):
    return self.spec_s[strategy_name(strategy)]

  def prefill(self, batch, prompt_len):
    return self.prefill_s

  def drafter_train_step(self, num_groups=1):
    return self.train_s

  def update(self, tokens):
    return self.update_s_per_token * tokens
