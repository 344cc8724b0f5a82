"""Ahead-of-time compilation of every step of a run for a TPU pod slice, on any machine.

With `libtpu` installed (the `tpu` extra: `pip install -e .[tpu]`), XLA's TPU compiler runs on a
CPU host: `jax.experimental.topologies.get_topology_desc` gives the devices of a whole slice, a
`Mesh` over them takes the run's mesh shape, and `jax.jit(step).lower(*abstract).compile()`
compiles each step with abstract arguments (`jax.ShapeDtypeStruct` carrying the NamedShardings
the run would use). Nothing is allocated. Per step this reports:

  * per-chip bytes (`compiled.memory_analysis()`): arguments, outputs, temporaries, generated
    code, and their total (arguments + outputs + temporaries + code - donated aliases) against
    the chip's HBM;
  * compile time on this machine;
  * the compiler's cost model (`compiled.cost_analysis()`): flops, bytes accessed, and
    `optimal_seconds`, its own roofline estimate of the step's time on that chip;
  * the HBM-roofline time: bytes accessed / the chip's HBM bandwidth;
  * on request (`breakdown`), where the bytes accessed go: per instruction of the optimized HLO
    (`hlo_instruction_bytes`), summed per access (HBM or on-chip, read or written), per value
    (weights, KV cache...), opcode and source (`bytes_breakdown`), and for a one-step decode the
    excess over the bytes it must read (`decode_excess`).

These are the compiler's estimates, not measurements on a TPU.

The steps, at the shapes the run would use (configs/*.py):
  prefill                        a rollout group's prompts at its first bucket;
  decode_chunk@B                 `rollout.chunk_size` plain steps at every bucket B <= rows per group
                                 (attending to the whole cache: the worst case);
  decode_step@B[,window=W]       ONE decode step at the first bucket (or each of `window_buckets`),
                                 over the whole cache and at live windows W (how bytes accessed
                                 grow with the live context, beside the bytes it must read:
                                 `decode_bytes_needed`; the compiler has no time estimate for a
                                 chunk's while loop);
  draft_subhead                  the reduced draft vocabulary's columns of the LM head (tlt.draft_vocab_size
                                 > 0), gathered once per policy update or refresh;
  speculative_chunk[s]@B         every strategy s at every bucket B <= rollout.spec_threshold (with a
                                 reduced draft vocabulary, its ids and sub-head are arguments);
  drafter_sync@B                 the drafter's catch-up program at every speculative bucket (its
                                 loop's trip count follows the rows' lengths: the compiler's cost
                                 model counts the loop's setup, not its blocks);
  drafter_train_step             `tlt.drafter_batch_size` buffer rows on one group's devices;
  logprob_forward                the old / reference log-prob forward over the update batch;
  policy_update_step             the PPO update with its micro-batches, over the whole mesh.
The update batch is the worst case: every response at rollout.max_new_tokens, one sequence per
packed row (rows = the step's sequences, rounded as the trainer rounds them).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from typing import Any, Callable, Sequence

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice by its usual name: `get_topology_desc` arguments, HBM per chip and its bandwidth."""

  name: str
  topology: str  # e.g. "v5p:4x4x2"
  chip_config: str  # "megacore" (v4, v5p: one device per chip) or "default"
  chips: int
  hbm_bytes: int
  hbm_bandwidth: float  # bytes / s per chip
  chips_per_host_bounds: tuple[int, int, int] = (2, 2, 1)


# HBM sizes and bandwidths per chip from Google Cloud's TPU system architecture pages.
TOPOLOGIES: dict[str, Topology] = {t.name: t for t in (
    Topology("v4-8", "v4:2x2x1", "megacore", 4, 32 * GiB, 1.2e12),
    Topology("v4-32", "v4:2x2x4", "megacore", 16, 32 * GiB, 1.2e12),
    Topology("v5e-8", "v5e:2x4", "default", 8, 16 * GiB, 8.19e11, (2, 4, 1)),
    Topology("v5e-256", "v5e:16x16", "default", 256, 16 * GiB, 8.19e11, (2, 4, 1)),
    Topology("v5p-8", "v5p:2x2x1", "megacore", 4, 95 * GiB, 2.765e12),
    Topology("v5p-64", "v5p:4x4x2", "megacore", 32, 95 * GiB, 2.765e12),
    Topology("v5p-128", "v5p:4x4x4", "megacore", 64, 95 * GiB, 2.765e12),
    Topology("v6e-8", "v6e:2x4", "default", 8, 32 * GiB, 1.64e12, (2, 4, 1)),
    Topology("v6e-16", "v6e:4x4", "default", 16, 32 * GiB, 1.64e12),
    Topology("v6e-64", "v6e:8x8", "default", 64, 32 * GiB, 1.64e12),
)}


class PodFitError(RuntimeError):
  """A step needs more HBM per chip than the topology has."""


def topology(name: str) -> Topology:
  if name not in TOPOLOGIES:
    raise ValueError(f"--topology={name!r} is not known; allowed: {sorted(TOPOLOGIES)}")
  return TOPOLOGIES[name]


def tpu_env(topo: Topology) -> dict[str, str]:
  """Environment that keeps libtpu from probing for a real TPU on this machine (STACK-NOTES)."""
  return {"TPU_ACCELERATOR_TYPE": topo.name, "TPU_WORKER_HOSTNAMES": "localhost",
          "TPU_SKIP_MDS_QUERY": "1",
          # compile-only: several processes (pytest-xdist workers, two pod compiles) may load libtpu
          "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def topology_devices(topo: Topology) -> list:
  """The TPU devices of the whole slice (compile-only: nothing runs on them)."""
  for k, v in tpu_env(topo).items():
    os.environ.setdefault(k, v)
  try:
    from jax.experimental import topologies
  except ImportError as e:  # pragma: no cover
    raise RuntimeError(f"jax.experimental.topologies is unavailable: {e}") from None
  try:
    desc = topologies.get_topology_desc(
        platform="tpu", topology_name=topo.topology, chip_config_name=topo.chip_config,
        chips_per_host_bounds=topo.chips_per_host_bounds, num_slices=1, wrap=(False, False, False))
  except Exception as e:  # noqa: BLE001 - libtpu missing or refusing: one clear line
    raise RuntimeError(f"cannot build the {topo.name} topology ({topo.topology}): {e}. Install the TPU "
                       "compiler with `pip install -e .[tpu]` (libtpu==0.0.42)") from None
  # by id, as jax.devices() orders them on the pod (a rollout group is then ids 0..n-1, which
  # the TPU compiler needs of a program that runs on part of the slice)
  return sorted(desc.devices, key=lambda d: d.id)


# ------------------------------------------------------------------------------- abstract values


def abstract(tree: Any, shardings: Any) -> Any:
  """`tree` (arrays or ShapeDtypeStructs, nnx Variables allowed) as ShapeDtypeStructs that carry
  `shardings` (a matching tree, or a prefix with one sharding per nnx Variable)."""
  import jax
  from flax import nnx

  def one(x, sh):
    if isinstance(x, nnx.Variable):
      value = x.get_value()
      return x.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sh))
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh)

  return jax.tree.map(one, tree, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


@dataclasses.dataclass
class StepReport:
  """One compiled step: per-chip bytes and the compiler's cost model."""

  step: str
  topology: str
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  code_bytes: int
  alias_bytes: int
  total_bytes: int
  hbm_bytes: int
  fits: bool
  compile_s: float
  flops: float
  bytes_accessed: float
  optimal_seconds: float
  hbm_roofline_s: float
  note: str = ""
  prefetch_bytes: int = 0  # bytes the program copies from HBM into on-chip memory (`prefetch_bytes`)
  # per access and label, opcode and top instructions (`bytes_breakdown`; compile_step(breakdown=N));
  # a one-step decode's also holds "needed": {"weights", "kv"} (`decode_bytes_needed`)
  breakdown: dict = dataclasses.field(default_factory=dict)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


def prefetch_bytes(hlo_text: str) -> int:
  """Bytes an optimized TPU program copies from HBM into on-chip memory (VMEM, memory space
  S(1)) by asynchronous copies (`copy-start`, e.g. weights prefetched for a matmul), from its
  HLO text: each such byte is read once from HBM, but the compiler's "bytes accessed" also counts
  its reads and writes in on-chip memory."""
  total = 0
  for line in hlo_text.splitlines():
    head, sep, _ = line.partition(" copy-start(")
    if not sep:
      continue
    arrays = hlo_arrays(head, padded=False)  # (VMEM destination, HBM source, context)
    if len(arrays) >= 2 and arrays[0][1] == 1 and arrays[1][1] != 1:
      total += arrays[0][0]
  return total


# ------------------------------------------------------------------------------- per-instruction bytes
#
# `compiled.cost_analysis()` gives one "bytes accessed" per program (its other keys sum the bytes
# per operand position over all instructions), not per instruction. `hlo_instruction_bytes`
# rebuilds a per-instruction view from the optimized HLO text: every instruction of the entry
# computation and of the while / call / conditional bodies it runs, with the bytes of its operands
# and of its result. Operands are printed by name only, so their shapes come from the
# instructions that define them.

_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\](?:\{([^}]*)\})?")
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%([\w.\-]+)\s*\(.*\{\s*$")
_OPCODE = re.compile(r"([a-z][\w\-]*)\(")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
# ops whose result holds (part of) their first operand's data: the result keeps that operand's label
_MOVES = frozenset({"bitcast", "copy", "copy-start", "copy-done", "reshape", "transpose", "slice",
                    "dynamic-slice", "dynamic-update-slice", "scatter", "all-gather", "all-gather-start",
                    "all-gather-done", "collective-permute", "collective-permute-start",
                    "collective-permute-done", "all-to-all", "convert", "gather", "optimization-barrier"})
_SLICES = frozenset({"slice", "dynamic-slice", "gather"})
_VIEWS = frozenset({"bitcast", "reshape"})


def _balanced(s: str, i: int) -> int:
  """Index just past the parenthesis that closes the one at s[i]."""
  depth = 0
  for j in range(i, len(s)):
    depth += {"(": 1, ")": -1}.get(s[j], 0)
    if depth == 0:
      return j + 1
  return len(s)


def hlo_arrays(shape: str, padded: bool = True) -> list[tuple[int, int]]:
  """[(bytes, memory space)] of every array of an HLO shape (a tuple's elements in order). With
  `padded`, each array's dims are padded to its layout's first tile (e.g. `T(8,128)`: the minor
  dim to 128, the next to 8), as the TPU stores it and XLA's cost model counts it; else logical
  bytes. Memory space 0 is HBM, S(1) a TPU's on-chip VMEM."""
  out = []
  for dtype, dims, layout in _SHAPE.findall(shape):
    digits = re.search(r"\d+", dtype)
    bits = 8 if dtype == "pred" else int(digits[0]) if digits else 0  # token[]: no bytes
    d = [int(x) for x in dims.split(",") if x]
    minor_to_major, _, tiling = (layout or "").partition(":")
    tile = re.search(r"T\(([\d,]+)\)", tiling)
    if padded and tile and d:
      order = [int(x) for x in minor_to_major.split(",") if x] or list(range(len(d)))[::-1]
      for k, t in enumerate(reversed([int(x) for x in tile[1].split(",")])):
        if k < len(order):
          d[order[k]] = -(-d[order[k]] // t) * t
    space = re.search(r"S\((\d+)\)", tiling)
    out.append((math.prod(d) * bits // 8, int(space[1]) if space else 0))
  return out


@dataclasses.dataclass
class HloInstruction:
  """One instruction of an HLO module as printed: result shape, opcode, operands by name, the raw
  text between its parentheses and its attributes."""

  name: str
  computation: str
  opcode: str
  shape: str
  operands: list[str]
  args: str
  attrs: str

  @property
  def kind(self) -> str:
    m = re.search(r"\bkind=(k\w+)", self.attrs)
    return m[1] if m else ""

  def called(self, *keys: str) -> list[str]:
    out = []
    for key in keys:
      m = re.search(rf"\b{key}=\{{([^}}]*)\}}", self.attrs) or re.search(rf"\b{key}=(%[\w.\-]+)", self.attrs)
      out += re.findall(r"%([\w.\-]+)", m[1]) if m else []
    return out

  @property
  def op_name(self) -> str:
    m = _OP_NAME.search(self.attrs)
    return m[1].replace("\\'", "'").replace('\\"', '"') if m else ""


def parse_hlo(hlo_text: str) -> tuple[dict[str, list[HloInstruction]], str]:
  """({computation name: its instructions in order}, the entry computation's name) of HLO text."""
  comps: dict[str, list[HloInstruction]] = {}
  entry, current = "", None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMPUTATION.match(line)
      if m:
        current = m[2]
        comps[current] = []
        entry = current if m[1] else entry
      continue
    if line.startswith("}"):
      current = None
      continue
    m = _DEF.match(line)
    if not m:
      continue
    name, rest = m[1], m[2]
    end = _balanced(rest, 0) if rest.startswith("(") else rest.find(" ")
    shape, rest = rest[:end], rest[end:].lstrip()
    op = _OPCODE.match(rest)
    if not op:
      continue
    close = _balanced(rest, op.end() - 1)
    args = rest[op.end():close - 1]
    comps[current].append(HloInstruction(name, current, op[1], shape, re.findall(r"%([\w.\-]+)", args),
                                         args, rest[close:]))
  return comps, entry


# ops that update their first operand in place (a donated buffer): the buffer is not read, and
# only the update is written
_IN_PLACE = frozenset({"dynamic-update-slice", "scatter"})


def _update_operand(i: HloInstruction) -> str | None:
  """The operand an in-place update writes: dynamic-update-slice(buffer, update, indices...),
  scatter(buffer, indices, updates); None for other ops."""
  if i.opcode == "dynamic-update-slice" and len(i.operands) > 1:
    return i.operands[1]
  if i.opcode == "scatter" and len(i.operands) == 3:
    return i.operands[2]
  return None


def _param_number(i: HloInstruction) -> int:
  return int(re.match(r"\s*(\d+)", i.args)[1])


def _fused_reads(comps: dict[str, list[HloInstruction]], fname: str,
                 cache: dict[str, tuple]) -> tuple[dict[int, int | None], int | None, dict[int, int]]:
  """Of fused computation `fname`: {parameter number: bytes it reads} where every use of the
  parameter (through bitcasts, reshapes and nested fusions) is a slice, dynamic slice or gather of
  it (their results' bytes) or the buffer of an in-place dynamic-update-slice (0); None where it is
  read whole. Then the bytes the root writes when it updates a parameter in place (the update's
  bytes; else None), and {output index: parameter number} for outputs that move a parameter's data."""
  if fname in cache:
    return cache[fname]
  fused = comps.get(fname, [])
  by_name = {i.name: i for i in fused}
  users: dict[str, list[HloInstruction]] = {}
  for i in fused:
    for o in dict.fromkeys(i.operands):
      users.setdefault(o, []).append(i)

  root = fused[-1] if fused else None
  outputs = set(root.operands if root.opcode == "tuple" else [root.name]) if root else set()

  def reads(name: str) -> int | None:
    if name in outputs:  # leaves the fusion whole
      return None
    total = 0
    for u in users.get(name, []):
      if u.opcode in _VIEWS:
        sub = reads(u.name)
      elif u.opcode in _SLICES and u.operands[0] == name and name not in u.operands[1:]:
        sub = sum(b for b, _ in hlo_arrays(u.shape))
      elif u.opcode in _IN_PLACE and u.operands[0] == name and name not in u.operands[1:]:
        sub = 0  # the buffer updated in place: not read
      elif u.opcode == "fusion" and u.called("calls") and u.operands.count(name) == 1:
        sub = _fused_reads(comps, u.called("calls")[0], cache)[0].get(u.operands.index(name))
      else:
        sub = None
      if sub is None:
        return None
      total += sub
    return total

  def source(name: str) -> HloInstruction | None:  # the parameter whose data `name` moves, if any
    i = by_name.get(name)
    while i is not None and i.opcode in _MOVES and i.operands:
      i = by_name.get(i.operands[0])
    return i if i is not None and i.opcode == "parameter" else None

  params = {_param_number(i): reads(i.name) for i in fused if i.opcode == "parameter"}
  written, carried = None, {}
  if root is not None:
    outs = root.operands if root.opcode == "tuple" else [root.name]
    for k, o in enumerate(outs):
      p = source(o)
      if p is not None:
        carried[k] = _param_number(p)
    update = _update_operand(root)
    if update is not None and source(root.operands[0]) is not None and update in by_name:
      written = sum(b for b, _ in hlo_arrays(by_name[update].shape))
  cache[fname] = (params, written, carried)
  return cache[fname]


@dataclasses.dataclass
class InstructionBytes:
  """One instruction's bytes, as `hlo_instruction_bytes` counts them.

  operands: [(name, label, bytes, bytes read, memory space)]: bytes read is the operand's bytes, or,
  for a fusion that only slices it, the slices' bytes (0 for a buffer updated in place, and for the
  operand of an async done, which its start read). results: [(bytes, bytes written, memory space)]
  per array of the result: an in-place dynamic-update-slice writes its update's bytes; an async
  start's result tuple (destination, the source it aliases, a context) is written whole, as XLA's
  cost model counts it."""

  name: str
  computation: str
  opcode: str
  op_name: str  # its metadata's op_name, or (a copy, a bitcast...) that of its first operand having one
  label: str
  operands: list[tuple[str, str, int, int, int]]
  results: list[tuple[int, int, int]]

  @property
  def read(self) -> int:
    return sum(o[3] for o in self.operands)

  @property
  def written(self) -> int:
    return sum(r[1] for r in self.results)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


# no bytes of their own: their operands and results are counted where computed and used
_NO_BYTES = frozenset({"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "partition-id",
                       "replica-id", "after-all", "while", "call", "conditional"})


def hlo_instruction_bytes(hlo_text: str, labels: dict[str, str] | None = None) -> list[InstructionBytes]:
  """Every instruction that reads or writes data in the entry computation of optimized HLO text
  and in the while / call / conditional bodies it runs (each body once), with its operands' and
  result's bytes (`InstructionBytes`). Parameters, constants, tuples, bitcasts and control flow
  count no bytes. Shapes are tile-padded (`hlo_arrays`), a fusion that only slices an operand reads
  the slices, an in-place update writes its update, an async start writes its whole result tuple:
  the rules of the TPU compiler's "bytes accessed", whose total the sum, read + written, matches
  (the 7B config's one-step decodes on v5p-64: within 0.2 %). Instructions inside a fusion are not
  seen: a fusion is its operands and results (a gather fusion's inner index custom call, which the
  compiler counts, is missed).

  `labels`: {label: regex}. An entry parameter whose `op_name` metadata matches a regex (first
  match wins) carries that label, and so does every value that moves its data: bitcast, copy,
  copy-start/done, all-gather, collective-permute, slices, a dynamic-update-slice of it, a fusion
  output that is such a move of one of its operands; a tuple's elements keep their own. Other
  values are "other"."""
  comps, entry = parse_hlo(hlo_text)
  patterns = [(k, re.compile(v)) for k, v in (labels or {}).items()]
  shapes: dict[str, str] = {}
  label_of: dict[str, Any] = {}  # name -> label, or a tuple of labels for a tuple-shaped value
  fused_cache: dict[str, tuple] = {}
  origin: dict[str, str] = {}  # name -> its op_name, or its first operand's that has one
  rows: list[InstructionBytes] = []

  def one(label, index=0):
    if isinstance(label, tuple):
      return label[index] if index < len(label) else "other"
    return label if label is not None else "other"

  def visit(comp: str, param_labels: Any = None) -> None:
    for i in comps.get(comp, []):
      shapes[i.name] = i.shape
      origin[i.name] = i.op_name or next((origin[o] for o in i.operands if origin.get(o)), "")
      ins = [label_of.get(o, "other") for o in i.operands]
      op = i.opcode
      n_out = len(hlo_arrays(i.shape)) if i.shape.startswith("(") else 0
      if op == "parameter":
        if comp == entry:
          label_of[i.name] = next((k for k, rx in patterns if rx.search(i.op_name)), "other")
        else:
          label_of[i.name] = param_labels if param_labels is not None else "other"
        continue
      if op == "get-tuple-element":
        label_of[i.name] = one(ins[0], int(re.search(r"index=(\d+)", i.attrs)[1])) if ins else "other"
        continue
      if op == "tuple":
        label_of[i.name] = tuple(one(lab) for lab in ins)
        continue
      if op == "while":
        for body in i.called("condition", "body"):
          visit(body, ins[0] if ins else None)
        label_of[i.name] = ins[0] if ins else "other"
        continue
      if op in ("call", "conditional"):
        for body in i.called("to_apply", "branch_computations", "true_computation", "false_computation"):
          visit(body, tuple(one(lab) for lab in ins) if op == "call" else None)
        label_of[i.name] = "other"
        continue
      reads: list[int | None] = [None] * len(ins)
      written = None
      if op == "fusion" and i.called("calls"):
        params, written, carried = _fused_reads(comps, i.called("calls")[0], fused_cache)
        reads = [params.get(k) for k in range(len(ins))]
        outs = tuple(one(ins[carried[k]]) if carried.get(k, len(ins)) < len(ins) else "other"
                     for k in range(max(n_out, 1)))
        label_of[i.name] = outs if n_out else outs[0]
      elif op in _MOVES and ins:
        label_of[i.name] = (one(ins[0]),) * n_out if n_out else one(ins[0])
      else:
        label_of[i.name] = "other"
      if _update_operand(i) is not None:
        reads[0] = 0  # updated in place
        written = sum(b for b, _ in hlo_arrays(shapes.get(_update_operand(i), "")))
      if op.endswith("-done"):
        reads = [0] * len(ins)  # its start read the operand
      if op in _NO_BYTES:
        continue
      operands = []
      for k, o in enumerate(i.operands):
        arrays = hlo_arrays(shapes.get(o, ""))
        full = sum(b for b, _ in arrays)
        operands.append((o, one(ins[k]), full, full if reads[k] is None else min(reads[k], full),
                         arrays[0][1] if arrays else 0))
      results = [(b, b if written is None else min(written, b), space) for b, space in hlo_arrays(i.shape)]
      rows.append(InstructionBytes(i.name, comp, f"fusion:{i.kind}" if op == "fusion" else op, origin[i.name],
                                   one(label_of[i.name]), operands, results))

  visit(entry)
  return rows


# labels of a decode step's values by the parameter they come from (`hlo_instruction_bytes`)
DECODE_LABELS = {"embedding": r"^p\['embed_tokens'\]", "lm_head": r"^p\['lm_head'\]", "weight": r"^p\[",
                 "kv": r"^s\.cache\.[kv]\[", "state": r"^s\."}
_ACCESS = ("HBM read", "on-chip read", "HBM write", "on-chip write", "async start result")


def bytes_breakdown(rows: Sequence[InstructionBytes], top: int = 15) -> dict:
  """Sums of `hlo_instruction_bytes` rows: the total (read + written), a table {access: {label:
  bytes}} over the accesses _ACCESS (an operand read from HBM, memory space 0, or from on-chip
  memory; a result written to either; an async start's result tuple, which XLA's cost model counts
  as written although it holds the destination, the source it aliases and a context), bytes per
  opcode (a fusion by its kind), the `top` sources by bytes (an instruction's op_name, layer
  indices as [*]: e.g. every layer's gate_proj kernel with its copies) and the `top` instructions."""
  table: dict[str, dict[str, int]] = {a: {} for a in _ACCESS}
  by_op: dict[str, dict[str, int]] = {}
  by_source: dict[str, dict[str, int]] = {}

  def add(access, label, n):
    table[access][label] = table[access].get(label, 0) + n

  for r in rows:
    for _, label, _, got, space in r.operands:
      add("HBM read" if space == 0 else "on-chip read", label, got)
    for _, w, space in r.results:
      add("async start result" if r.opcode.endswith("-start") else
          "HBM write" if space == 0 else "on-chip write", r.label, w)
    for e in (by_op.setdefault(r.opcode, {"count": 0, "read": 0, "written": 0}),
              by_source.setdefault(re.sub(r"\[\d+\]", "[*]", r.op_name) or "(none)",
                                   {"count": 0, "read": 0, "written": 0})):
      e["count"] += 1
      e["read"] += r.read
      e["written"] += r.written

  def reads(r):
    out: dict[str, int] = {}
    for _, label, _, got, space in r.operands:
      if got:
        key = f"{label}{'' if space == 0 else ' (on-chip)'}"
        out[key] = out.get(key, 0) + got
    return out

  order = sorted(rows, key=lambda r: -(r.read + r.written))[:top]
  return {"total": sum(r.read + r.written for r in rows), "instructions": len(rows), "access": table,
          "by_opcode": dict(sorted(by_op.items(), key=lambda kv: -(kv[1]["read"] + kv[1]["written"]))),
          "by_source": dict(sorted(by_source.items(), key=lambda kv: -(kv[1]["read"] + kv[1]["written"]))[:top]),
          "top": [{"name": r.name, "opcode": r.opcode, "op_name": r.op_name, "read": r.read,
                   "written": r.written, "reads": reads(r), "label": r.label} for r in order]}


_WEIGHTS = ("weight", "lm_head", "embedding")


def decode_excess(breakdown: dict, bytes_accessed: float) -> dict[str, float]:
  """What a one-step decode's counted bytes hold beyond the bytes it must read, from its
  `bytes_breakdown` (with "needed": {"weights", "kv"}) and the compiler's total `bytes_accessed`:
    weight copies beyond one HBM read       on-chip reads and writes and async start results of
                                            weights (prefetched HBM -> VMEM: read once from HBM,
                                            counted five times), weights written back to HBM (a
                                            relaid-out copy);
    weights read from HBM beyond the share  HBM reads of weights - the chip's share;
    KV beyond the live window               every KV access (reads, in-place writes) - the live KV;
    other values                            activations, attention scores, sampling, state;
    not attributed                          the compiler's total - the parser's.
  The five sum to bytes_accessed - needed."""
  acc, need = breakdown["access"], breakdown["needed"]
  def of(labels, accesses):
    return float(sum(acc[a].get(l, 0) for a in accesses for l in labels))
  on_chip = ("on-chip read", "on-chip write", "async start result")
  labels = {l for a in acc.values() for l in a}
  return {"weight copies beyond one HBM read": of(_WEIGHTS, on_chip) + of(_WEIGHTS, ("HBM write",)),
          "weights read from HBM beyond the share": of(_WEIGHTS, ("HBM read",)) - need["weights"],
          "KV beyond the live window": of(("kv",), _ACCESS) - need["kv"],
          "other values": of(labels - set(_WEIGHTS) - {"kv"}, _ACCESS),
          "not attributed": float(bytes_accessed) - breakdown["total"]}


def markdown_breakdown(reports: Sequence[StepReport]) -> str:
  """Per report with a breakdown: its bytes per access and label, per opcode and source, its top
  instructions, and for a one-step decode the excess over what it must read (`decode_excess`)."""
  out = []
  gb = lambda n: f"{n / 1e9:.3f}"  # noqa: E731
  decodes = [r for r in reports if r.breakdown and "needed" in r.breakdown]
  if decodes:
    parts = list(decode_excess(decodes[0].breakdown, decodes[0].bytes_accessed))
    out.append("\n| step | GB counted | GB to read | counted / to read | " + " | ".join(parts)
               + " |\n|---|---|---|---|" + "---|" * len(parts))
    for r in decodes:
      need = r.breakdown["needed"]["weights"] + r.breakdown["needed"]["kv"]
      out.append(f"| {r.step} | {gb(r.bytes_accessed)} | {gb(need)} | {r.bytes_accessed / max(need, 1):.2f}x | "
                 + " | ".join(gb(v) for v in decode_excess(r.breakdown, r.bytes_accessed).values()) + " |")
  for r in reports:
    b = r.breakdown
    if not b:
      continue
    out.append(f"\n## {r.step}\n")
    out.append(f"Counted by the compiler: {gb(r.bytes_accessed)} GB per chip; summed over the program's "
               f"{b['instructions']} instructions: {gb(b['total'])} GB "
               f"({100 * b['total'] / max(r.bytes_accessed, 1):.1f} %).")
    if "needed" in b:
      need = b["needed"]
      out.append(f"To read: {gb(need['weights'])} GB of weights + {gb(need['kv'])} GB of live KV = "
                 f"{gb(need['weights'] + need['kv'])} GB; counted / to read "
                 f"{r.bytes_accessed / max(need['weights'] + need['kv'], 1):.2f}x; excess "
                 f"{gb(r.bytes_accessed - need['weights'] - need['kv'])} GB:\n")
      out.append("| excess part | GB per chip |\n|---|---|")
      for k, v in decode_excess(b, r.bytes_accessed).items():
        out.append(f"| {k} | {gb(v)} |")
    labels = sorted({l for a in b["access"].values() for l in a})
    out.append("\nBytes per access and value (GB per chip):\n")
    out.append("| access | " + " | ".join(labels) + " | all |\n|---|" + "---|" * (len(labels) + 1))
    for a, d in b["access"].items():
      out.append(f"| {a} | " + " | ".join(gb(d.get(l, 0)) for l in labels) + f" | {gb(sum(d.values()))} |")
    out.append("\nPer opcode:\n\n| opcode | count | GB read | GB written |\n|---|---|---|---|")
    for k, v in list(b["by_opcode"].items())[:8]:
      out.append(f"| {k} | {v['count']} | {gb(v['read'])} | {gb(v['written'])} |")
    out.append("\nPer source (op_name; a copy takes its operand's):\n\n| source | count | GB read | GB written |"
               "\n|---|---|---|---|")
    for k, v in b["by_source"].items():
      out.append(f"| `{k[-90:]}` | {v['count']} | {gb(v['read'])} | {gb(v['written'])} |")
    out.append("\nTop instructions:\n\n| instruction | opcode | GB read (by value) | GB written | source |"
               "\n|---|---|---|---|---|")
    for t in b["top"]:
      reads = ", ".join(f"{k} {gb(v)}" for k, v in t["reads"].items() if v >= 5e5)
      out.append(f"| {t['name']} | {t['opcode']} | {gb(t['read'])} ({reads}) | {gb(t['written'])} | "
                 f"`{t['op_name'][-70:]}` |")
  return "\n".join(out)


def shard_bytes(args: Sequence[Any]) -> int:
  """Bytes per device that abstract `args` ask for: every leaf's shard shape under its sharding
  (the largest shard, i.e. the first device's when shards are even)."""
  import jax
  import numpy as np
  total = 0
  for x in jax.tree.leaves(args):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def tpu_padded_bytes(args: Sequence[Any]) -> int:
  """An upper bound of `shard_bytes` after TPU tiling: each shard's minor dim padded to 128 and
  its second-minor to 8 / 16 / 32 rows (32 / 16 / 8-bit types), vectors to 128 elements."""
  import jax
  import numpy as np
  total = 0
  for x in jax.tree.leaves(args):
    shape = list(x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape)
    size = np.dtype(x.dtype).itemsize
    if len(shape) == 1:
      shape = [-(-shape[0] // 128) * 128]
    elif len(shape) >= 2:
      shape[-1] = -(-shape[-1] // 128) * 128
      shape[-2] = -(-shape[-2] // {4: 8, 2: 16, 1: 32}.get(size, 8)) * {4: 8, 2: 16, 1: 32}.get(size, 8)
    total += max(int(np.prod(shape, dtype=np.int64)) * size, 4)
  return total


def compile_step(name: str, fn, args: Sequence[Any], topo: Topology, note: str = "", breakdown: int = 0,
                 labels: dict[str, str] | None = None) -> tuple[StepReport, Any]:
  """Lowers and compiles jitted `fn` at abstract `args`; returns (report, compiled). `breakdown` > 0:
  the report also holds `bytes_breakdown` of the optimized HLO with that many top instructions
  (values labelled by `labels`)."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  arg, out, tmp = mem.argument_size_in_bytes, mem.output_size_in_bytes, mem.temp_size_in_bytes
  code, alias = mem.generated_code_size_in_bytes, mem.alias_size_in_bytes
  total = arg + out + tmp + code - alias
  cost = _cost(compiled)
  accessed = float(cost.get("bytes accessed", 0.0))
  optimal = float(cost.get("optimal_seconds", float("nan")))
  if optimal < 0:  # no estimate (a while loop with a dynamic trip count)
    optimal = float("nan")
  report = StepReport(step=name, topology=topo.name, argument_bytes=int(arg), output_bytes=int(out),
                      temp_bytes=int(tmp), code_bytes=int(code), alias_bytes=int(alias),
                      total_bytes=int(total), hbm_bytes=topo.hbm_bytes, fits=total <= topo.hbm_bytes,
                      compile_s=compile_s, flops=float(cost.get("flops", 0.0)), bytes_accessed=accessed,
                      optimal_seconds=optimal,
                      hbm_roofline_s=accessed / topo.hbm_bandwidth, note=note,
                      prefetch_bytes=prefetch_bytes(compiled.as_text() or ""))
  if breakdown > 0:
    report.breakdown = bytes_breakdown(hlo_instruction_bytes(compiled.as_text() or "", labels), breakdown)
  return report, compiled


def check_fits(reports: Sequence[StepReport]) -> None:
  """PodFitError naming the first step that does not fit, its bytes and the HBM."""
  for r in reports:
    if not r.fits:
      raise PodFitError(f"step {r.step} needs {r.total_bytes / GiB:.2f} GiB per chip "
                        f"(arguments {r.argument_bytes / GiB:.2f}, temporaries {r.temp_bytes / GiB:.2f}, "
                        f"outputs {r.output_bytes / GiB:.2f}); {r.topology} has {r.hbm_bytes / GiB:.0f} GiB "
                        "of HBM per chip")


# ------------------------------------------------------------------------------- the run's steps


def model_config_for(config):
  """The run's ModelConfig without loading weights: the `init_from` checkpoint's config.json when
  it exists here, else `config.model` (vocab 0: the tokenizer's); execution fields from the config."""
  from tlt_jax import config as config_lib
  from tlt_jax.models import hf
  from tlt_jax.models.config import ModelConfig
  if config.init_from and os.path.exists(os.path.join(config.init_from, "config.json")):
    return hf.check_checkpoint(config.init_from).with_execution(dict(config.model))
  mdict = dict(config.model)
  if mdict["vocab_size"] == 0:
    from tlt_jax.data.tokenizer import CharTokenizer
    mdict["vocab_size"] = CharTokenizer(config_lib.build_task(config).charset).vocab_size
  return ModelConfig.from_dict(mdict)


def round_up(n: int, m: int) -> int:
  return -(-int(n) // m) * m


@dataclasses.dataclass
class RunShapes:
  """The static shapes of one RL step under a config (see the module docstring)."""

  prompt_width: int
  max_new_tokens: int
  capacity: int
  rows_per_group: int
  buckets: tuple[int, ...]
  spec_buckets: tuple[int, ...]
  update_rows: int
  pack_len: int
  buffer_len: int


def run_shapes(config, model_cfg, mesh, engine) -> RunShapes:
  from tlt_jax.rl.trainer import rl_lengths
  from tlt_jax.rollout.engine import bucket_for
  r, rl, t = config.rollout, config.rl, config.tlt
  fixed = int(r.max_prompt_len)
  if fixed <= 0:
    from tlt_jax import config as config_lib
    bound = getattr(config_lib.build_task(config), "max_prompt_len", None)
    fixed = bound if isinstance(bound, int) else model_cfg.max_position_embeddings - int(r.max_new_tokens) - 1
  width = round_up(fixed + 1, 8)
  pack_len, buffer_len = rl_lengths(config, model_cfg, width)
  rows = int(rl.prompts_per_step) * int(rl.group_size)
  groups = int(t.rollout_groups)
  per_group = -(-rows // groups)
  first = bucket_for(per_group, tuple(int(b) for b in r.buckets))
  buckets = tuple(b for b in (int(b) for b in r.buckets) if b <= first)
  # speculation runs at active batches <= spec_threshold, compacted into their buckets
  spec = tuple(sorted({bucket_for(n, buckets) for n in range(1, int(r.spec_threshold) + 1)})) \
      if t.speculative else ()
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  multiple = int(math.lcm(int(rl.pack_rows_multiple), int(rl.micro_batches) * shards))
  update_rows = round_up(rows, multiple) if rl.pack else rows
  return RunShapes(width, int(r.max_new_tokens), engine.capacity_for(width, int(r.max_new_tokens)),
                   per_group, buckets, spec, update_rows, pack_len if rl.pack else
                   round_up(width + int(r.max_new_tokens), rl.length_bucket), buffer_len)


def pod_steps(config, devices: Sequence, *, windows: Sequence[int] = (),
              window_buckets: Sequence[int] = ()) -> tuple[list[tuple[str, Callable[[], tuple]]], dict]:
  """[(step name, build)] for every step of `config` on `devices` (build() -> (jitted fn, abstract
  args, note)), and a dict describing the layout (mesh, groups, shapes). The one-step decodes at
  live `windows` run at the first bucket, or at each of `window_buckets`."""
  import jax
  import jax.numpy as jnp
  import optax  # noqa: F401
  from flax import nnx

  from tlt_jax.drafter.eagle import EagleDrafter
  from tlt_jax.drafter.train import (DrafterTrainState, TargetHead, drafter_state_shardings,
                                     make_drafter_train_step, target_head_shardings)
  from tlt_jax.models.attention import AttentionSpec
  from tlt_jax.models.transformer import Transformer
  from tlt_jax.parallel import mesh as mesh_lib
  from tlt_jax.rl.update import UpdateConfig, make_logprob_fn, make_policy_update_step, update_batch_shardings
  from tlt_jax.rollout.engine import RolloutEngine, state_shardings
  from tlt_jax.rollout.sampling import SamplingParams
  from tlt_jax.rollout.speculative import SpeculativeDecoder, Strategy, drafter_prefill
  from tlt_jax.tlt.groups import split_mesh
  from tlt_jax.tlt.runtime import parse_arms
  from tlt_jax.train import optim
  from tlt_jax.train.state import TrainState

  cfg = model_config_for(config)
  mesh = mesh_lib.make_mesh(tuple(config.mesh.shape), devices)
  groups = split_mesh(mesh, int(config.tlt.rollout_groups))
  gmesh = groups[0].mesh
  r, rl, t = config.rollout, config.rl, config.tlt
  sp = SamplingParams(temperature=float(r.temperature), top_k=int(r.top_k), top_p=float(r.top_p))
  eos = (1,)
  graphdef, params0 = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  arms = [a for a in parse_arms(t.strategies) if a != (0, 0, 0)]
  decoder = None
  dgraph = dparams0 = None
  if t.speculative and arms:
    dgraph, dparams0 = nnx.split(nnx.eval_shape(lambda: EagleDrafter(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    decoder = SpeculativeDecoder(graphdef, dgraph, sp, eos, strategies=[Strategy(*a) for a in arms],
                                 rounds_per_chunk=int(r.rounds_per_chunk),
                                 draft_vocab_size=int(t.draft_vocab_size))
  engine = RolloutEngine(graphdef, sp, eos_ids=eos, chunk_size=int(r.chunk_size),
                         buckets=tuple(int(b) for b in r.buckets),
                         max_context=cfg.max_position_embeddings, speculative=decoder,
                         spec_threshold=int(r.spec_threshold), window_block=int(r.window_block))
  shapes = run_shapes(config, cfg, mesh, engine)

  sample_params = abstract(params0, mesh_lib.tree_shardings(params0, gmesh, mesh_lib.SAMPLE_RULES))
  train_params = abstract(params0, mesh_lib.tree_shardings(params0, mesh, mesh_lib.TRAIN_RULES))
  rep_g = mesh_lib.replicated(gmesh)

  def decode_state(bucket: int, with_draft: bool):
    fn = engine.jits.prefill_fn
    st = jax.eval_shape(lambda p, x, l, m, k: fn(p, x, l, m, k, capacity=shapes.capacity), sample_params,
                        jax.ShapeDtypeStruct((bucket, shapes.prompt_width), jnp.int32),
                        jax.ShapeDtypeStruct((bucket,), jnp.int32), jax.ShapeDtypeStruct((bucket,), jnp.int32),
                        jax.ShapeDtypeStruct((2,), jnp.uint32))
    if with_draft:
      dcache = jax.eval_shape(functools_partial(drafter_prefill, graphdef, dgraph,
                                                capacity=decoder.draft_capacity(shapes.capacity)),
                              sample_params, drafter_abstract(), st)
      st = st.replace(draft_cache=dcache)
    return abstract(st, state_shardings(st, gmesh))

  def drafter_abstract():
    # as the rollout groups place it (RolloutGroup.place_drafter): by the sampling rules
    return abstract(dparams0, mesh_lib.tree_shardings(dparams0, gmesh, mesh_lib.SAMPLE_RULES))

  steps: list[tuple[str, Callable[[], tuple]]] = []
  first = shapes.buckets[-1]

  def prefill():
    fn = engine.jits.prefill(gmesh, sample_params, (first, shapes.prompt_width), shapes.capacity)
    prompts = jax.ShapeDtypeStruct((first, shapes.prompt_width), jnp.int32,
                                   sharding=mesh_lib.batch_sharding(gmesh, 2, mesh_lib.SAMPLE_RULES, first))
    vec = jax.ShapeDtypeStruct((first,), jnp.int32, sharding=rep_g)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep_g)
    return fn, (sample_params, prompts, vec, vec, key), f"{first} rows x {shapes.prompt_width} prompt tokens"
  steps.append((f"prefill@{first}", prefill))

  def decode(bucket, window=None):
    def build():
      st = decode_state(bucket, False)
      fn = engine.jits.chunk(gmesh, sample_params, st, window)
      what = "whole cache" if window is None else f"live window {window}"
      return fn, (sample_params, st), f"{engine.chunk_size} steps, cache {shapes.capacity}, {what}"
    return build
  for b in shapes.buckets:
    steps.append((f"decode_chunk@{b}", decode(b)))
  def one_step(bucket, window=None):
    def build():
      from tlt_jax.rollout.engine import decode_step
      st = decode_state(bucket, False)
      st_sh = state_shardings(st, gmesh)
      spec = AttentionSpec.for_cache(cfg, gmesh)
      fn = jax.jit(lambda p, s: decode_step(nnx.merge(graphdef, p), s, sp, eos, window, attn_spec=spec),
                   in_shardings=(jax.tree.map(lambda x: x.sharding, sample_params), st_sh),
                   out_shardings=st_sh, donate_argnums=(1,))
      what = "whole cache" if window is None else f"live window {window}"
      weights, kv = decode_bytes_needed(sample_params, st, window)
      return fn, (sample_params, st), (f"one token, cache {shapes.capacity}, {what}; must read per chip "
                                       f"{weights / 1e9:.3f} GB of weights + {kv / 1e9:.3f} GB of live KV")
    return build
  for b in (window_buckets or (first,)):
    steps.append((f"decode_step@{b}", one_step(b)))
    for w in windows:
      if w < shapes.capacity:
        steps.append((f"decode_step@{b},window={w}", one_step(b, w)))

  def spec(strategy, bucket):
    def build():
      st = decode_state(bucket, True)
      dp = drafter_abstract()
      fn = decoder._chunk_fn(strategy, None, gmesh, sample_params, dp, st)
      vd = decoder.draft_vocab_size
      if vd:  # the draft vocabulary and its sub-head: int32[V_d] and [D, V_d] arguments of the chunk
        return (fn, (sample_params, dp, st) + subhead_args(),
                f"{decoder.rounds_per_chunk} rounds, draft vocabulary {vd} (sub-head an argument)")
      return fn, (sample_params, dp, st), f"{decoder.rounds_per_chunk} rounds, full draft vocabulary"
    return build

  def head_of_sample():
    head, tied = decoder._head_of(sample_params)
    decoder.set_target_config(cfg)
    return head, tied

  def subhead_args():
    head, tied = head_of_sample()
    vd = decoder.draft_vocab_size
    w = jax.ShapeDtypeStruct((cfg.hidden_size, vd), cfg.jnp_dtype,
                             sharding=decoder.subhead_sharding(head, tied, gmesh))
    return jax.ShapeDtypeStruct((vd,), jnp.int32, sharding=rep_g), w

  def subhead():
    head, tied = head_of_sample()
    fn = decoder.subhead_fn(gmesh, head, tied)
    w = decoder.subhead_sharding(head, tied, gmesh)
    return (fn, (head, subhead_args()[0]),
            f"{decoder.draft_vocab_size} of {cfg.vocab_size} head columns, once per policy update or refresh "
            f"(sub-head sharded {tuple(w.spec)})")

  def sync(bucket):
    def build():
      st = decode_state(bucket, True)
      dp = drafter_abstract()
      fn = decoder.sync_fn(gmesh, sample_params, dp, st)
      return fn, (sample_params, dp, st), (f"drafter catch-up, blocks of {decoder.sync_block} "
                                          "(a loop whose trip count follows the rows' lengths)")
    return build
  if decoder is not None and decoder.draft_vocab_size:
    steps.append(("draft_subhead", subhead))
  for s in (decoder.strategies if decoder is not None else ()):
    for b in shapes.spec_buckets:
      steps.append((f"speculative_chunk[{s}]@{b}", spec(s, b)))
  if decoder is not None:
    for b in shapes.spec_buckets:
      steps.append((f"drafter_sync@{b}", sync(b)))

  if dgraph is not None and t.train_drafter:
    def drafter_step():
      tx = optim.make_optimizer(dict(lr=float(t.drafter_lr), steps=1, schedule="constant"))
      fn = make_drafter_train_step(dgraph, tx, cfg, mesh=gmesh)
      st = jax.eval_shape(lambda p: DrafterTrainState(p, tx.init(p), jnp.zeros((), jnp.int32)), dparams0)
      st = abstract(st, drafter_state_shardings(st, gmesh))
      head = TargetHead(embed_tokens=params0["embed_tokens"].get_value(),
                        lm_head=None if cfg.tie_word_embeddings else params0["lm_head"].get_value(), cfg=cfg)
      head = abstract(head, target_head_shardings(cfg, gmesh))
      n, length = int(t.drafter_batch_size), shapes.buffer_len
      bsh = mesh_lib.batch_sharding(gmesh, 1)
      hdt = jnp.bfloat16 if str(t.buffer_dtype) == "bfloat16" else jnp.float32
      batch = {"tokens": jax.ShapeDtypeStruct((n, length), jnp.int32, sharding=bsh),
               "hidden": jax.ShapeDtypeStruct((n, length, cfg.hidden_size), hdt, sharding=bsh),
               "loss_mask": jax.ShapeDtypeStruct((n, length), jnp.float32, sharding=bsh)}
      return fn, (st, head, batch), f"{n} rows x {length} tokens on one group ({gmesh.size} chips)"
    steps.append(("drafter_train_step", drafter_step))

  n_rows, length = shapes.update_rows, shapes.pack_len
  b2 = mesh_lib.batch_sharding(mesh, 2)
  row = lambda dt: jax.ShapeDtypeStruct((n_rows, length), dt, sharding=b2)  # noqa: E731
  with_ref = float(rl.kl_coef) > 0 or bool(rl.track_kl)

  def logprob():
    fn = make_logprob_fn(graphdef, float(r.temperature) or 1.0, train_params, mesh,
                         micro_batches=int(rl.micro_batches))
    return fn, (train_params, row(jnp.int32), row(jnp.int32), row(jnp.int32), row(jnp.float32),
                row(jnp.float32)), f"{n_rows} rows x {length} tokens, {rl.micro_batches} micro-batches"
  steps.append(("logprob_forward", logprob))

  def update():
    tx = optim.make_optimizer(rl)
    opt = jax.eval_shape(tx.init, train_params)
    opt = abstract(opt, mesh_lib.tree_shardings(opt, mesh, mesh_lib.TRAIN_RULES))
    state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=mesh_lib.replicated(mesh)),
                       params=train_params, opt_state=opt)
    ucfg = UpdateConfig.from_config(rl, float(r.temperature) or 1.0)
    fn = make_policy_update_step(graphdef, tx, ucfg, state, mesh, with_ref=with_ref)
    dtypes = {"tokens": jnp.int32, "positions": jnp.int32, "segment_ids": jnp.int32}
    batch = {k: row(dtypes.get(k, jnp.float32)) for k in update_batch_shardings(mesh, with_ref)}
    return fn, (state, batch), f"{n_rows} rows x {length} tokens, {rl.micro_batches} micro-batches"
  steps.append(("policy_update_step", update))

  layout = {"mesh": dict(mesh.shape), "rollout_groups": len(groups), "group_chips": gmesh.size,
            "model_params": cfg.num_params, "scan_layers": cfg.scan_layers, "remat": cfg.remat,
            "attention": cfg.attention, "cache_attention": AttentionSpec.for_cache(cfg, gmesh).cache,
            **dataclasses.asdict(shapes)}
  return steps, layout


def decode_bytes_needed(params, state, window: int | None) -> tuple[int, int]:
  """(weights, live KV) bytes per chip that one decode step must read: the chip's shard of every
  weight but the token embeddings (a step reads only its rows' embeddings), and of the KV cache's
  first `window` slots (None: all of them)."""
  import jax
  leaves = jax.tree_util.tree_leaves_with_path(params)
  weights = sum(shard_bytes([x]) for path, x in leaves if "embed_tokens" not in jax.tree_util.keystr(path))
  kv = shard_bytes([state.cache.k, state.cache.v])
  capacity = state.seq_BxS.shape[1]
  return weights, kv * min(int(window or capacity), capacity) // capacity


def functools_partial(fn, *args, **kwargs):
  import functools
  return functools.partial(fn, *args, **kwargs)


def compile_pod(config, topo: Topology, *, windows: Sequence[int] = (), window_buckets: Sequence[int] = (),
                only: Sequence[str] = (), breakdown: int = 0,
                on_report: Callable[[StepReport], None] | None = None) -> tuple[list[StepReport], dict]:
  """Compiles every step of `config` for `topo` (see the module docstring); returns the reports
  and the layout. `only`: step-name prefixes to keep (default all). `breakdown` > 0: each report
  holds its program's bytes per access, label (DECODE_LABELS), opcode and top `breakdown`
  instructions, and a one-step decode the bytes it must read."""
  devices = topology_devices(topo)
  if math.prod(int(s) for s in config.mesh.shape if int(s) > 0) > len(devices):
    raise ValueError(f"config.mesh.shape={tuple(config.mesh.shape)} needs more than the {len(devices)} "
                     f"devices of {topo.name}")
  steps, layout = pod_steps(config, devices, windows=windows, window_buckets=window_buckets)
  layout.update(topology=topo.name, devices=len(devices), hbm_gib=topo.hbm_bytes / GiB)
  reports = []
  for name, build in steps:
    if only and not any(name.startswith(o) for o in only):
      continue
    fn, args, note = build()
    report, _ = compile_step(name, fn, args, topo, note, breakdown=breakdown, labels=DECODE_LABELS)
    if breakdown > 0 and name.startswith("decode_step@"):
      window = int(name.partition(",window=")[2] or 0) or None
      weights, kv = decode_bytes_needed(args[0], args[1], window)
      report.breakdown["needed"] = {"weights": weights, "kv": kv}
    reports.append(report)
    if on_report is not None:
      on_report(report)
  return reports, layout


# ------------------------------------------------------------------------------- outputs


def markdown_table(reports: Sequence[StepReport]) -> str:
  head = ("| step | args GiB | temp GiB | out GiB | total GiB / HBM | fits | compiler est. (optimal_seconds) "
          "| HBM roofline | TFLOP | GB accessed | compile s |\n|---|---|---|---|---|---|---|---|---|---|---|")
  lines = [head]
  for r in reports:
    lines.append(f"| {r.step} | {r.argument_bytes / GiB:.2f} | {r.temp_bytes / GiB:.2f} | "
                 f"{r.output_bytes / GiB:.2f} | {r.total_bytes / GiB:.2f} / {r.hbm_bytes / GiB:.0f} | "
                 f"{'yes' if r.fits else '**no**'} | {_time(r.optimal_seconds)} | {_time(r.hbm_roofline_s)} | "
                 f"{r.flops / 1e12:.2f} | {r.bytes_accessed / 1e9:.1f} | {r.compile_s:.1f} |")
  return "\n".join(lines)


def _time(s: float) -> str:
  if s != s:  # nan
    return "-"
  return f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def write_outputs(reports: Sequence[StepReport], layout: dict, out_dir: str, stem: str) -> list[str]:
  """`<stem>.jsonl` (the layout, then one line per step), `<stem>.md` and `<stem>.png`."""
  os.makedirs(out_dir, exist_ok=True)
  paths = [os.path.join(out_dir, f"{stem}.{ext}") for ext in ("jsonl", "md", "png")]
  with open(paths[0], "w") as f:
    f.write(json.dumps({"layout": layout}) + "\n")
    for r in reports:
      f.write(json.dumps(r.to_json()) + "\n")
  with open(paths[1], "w") as f:
    f.write(f"# {stem}\n\nCompiled ahead of time for {layout['topology']} ({layout['devices']} devices, "
            f"mesh {layout['mesh']}, {layout['hbm_gib']:.0f} GiB HBM per chip) on a CPU host. Times are "
            "the TPU compiler's cost model (`optimal_seconds`) and bytes accessed / HBM bandwidth, not "
            f"measurements on a TPU.\n\nLayout: {json.dumps(layout)}\n\n{markdown_table(reports)}\n")
    if any(r.breakdown for r in reports):
      f.write("\n# Bytes per instruction\n\nFrom each program's optimized HLO (`aot.hlo_instruction_bytes`): "
              "operands and results of every instruction, tile-padded as the TPU lays them out; "
              "values labelled by the parameter they come from (weights, LM head, token embeddings, "
              "KV cache, other state; \"other\": computed values). GB = 1e9 bytes.\n"
              + markdown_breakdown(reports) + "\n")
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(14, max(3, 0.35 * len(reports) + 1)))
  names = [r.step for r in reports][::-1]
  rs = reports[::-1]
  y = range(len(rs))
  left = [0.0] * len(rs)
  for label, key in (("arguments", "argument_bytes"), ("temporaries", "temp_bytes"), ("outputs", "output_bytes")):
    vals = [getattr(r, key) / GiB for r in rs]
    ax0.barh(list(y), vals, left=left, label=label)
    left = [a + b for a, b in zip(left, vals)]
  ax0.axvline(layout["hbm_gib"], color="k", ls="--", label="HBM per chip")
  ax0.set_yticks(list(y), names, fontsize=7)
  ax0.set_xlabel("GiB per chip")
  ax0.legend(fontsize=7)
  ax1.barh([i - 0.2 for i in y], [r.optimal_seconds * 1e3 for r in rs], height=0.4, label="compiler optimal_seconds")
  ax1.barh([i + 0.2 for i in y], [r.hbm_roofline_s * 1e3 for r in rs], height=0.4, label="bytes / HBM bandwidth")
  ax1.set_xscale("log")
  ax1.set_yticks(list(y), [""] * len(rs))
  ax1.set_xlabel("ms per step (compiler's cost model, not a measurement)")
  ax1.legend(fontsize=7)
  fig.suptitle(f"{stem}: {layout['topology']}, mesh {layout['mesh']}")
  fig.tight_layout()
  fig.savefig(paths[2], dpi=110)
  plt.close(fig)
  return paths
