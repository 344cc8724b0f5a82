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
  * the HBM-roofline time: bytes accessed / the chip's HBM bandwidth.

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

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return dict(cost or {})


_HLO_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]\{([^}]*)\}")


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
    arrays = _HLO_ARRAY.findall(head)
    if len(arrays) >= 2 and "S(1)" in arrays[0][2] and "S(1)" not in arrays[1][2]:
      dtype, dims, _ = arrays[0]
      width = 1 if dtype == "pred" else int(re.sub(r"\D", "", dtype)) // 8
      total += math.prod(int(d) for d in dims.split(",") if d) * width
  return total


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


def compile_step(name: str, fn, args: Sequence[Any], topo: Topology, note: str = "") -> tuple[StepReport, Any]:
  """Lowers and compiles jitted `fn` at abstract `args`; returns (report, compiled)."""
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
      fn = jax.jit(lambda p, s: decode_step(nnx.merge(graphdef, p), s, sp, eos, window),
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
            "attention": cfg.attention, **dataclasses.asdict(shapes)}
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
                only: Sequence[str] = (),
                on_report: Callable[[StepReport], None] | None = None) -> tuple[list[StepReport], dict]:
  """Compiles every step of `config` for `topo` (see the module docstring); returns the reports
  and the layout. `only`: step-name prefixes to keep (default all)."""
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
    report, _ = compile_step(name, fn, args, topo, note)
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
