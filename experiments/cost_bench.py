"""Costs of the rollout's and the drafter's units of work on this machine, for the step simulator.

Times (analysis/costs.MeasuredCosts reads the JSON this writes; wall clock, medians of `--repeats`):

  decode[ctx][batch]    one plain decoding step: the engine's jitted `decode_chunk` of
                        rollout.chunk_size steps at a padded batch and live context, / chunk_size
  spec[strategy][batch] one speculative round: `speculative_chunk` of rollout.rounds_per_chunk
                        rounds / rounds (at `spec_ctx`)
  prefill[batch]        the prefill of `batch` rows of `prefill_len` tokens (prefill_by_len[len][batch]:
                        at each of --prefill_lens too; the simulator interpolates in the length)
  drafter_train_s       one `drafter_train_step` (tlt.drafter_batch_size rows of the buffer's length)
  chunk_overhead_s      host time per chunk of a RolloutSession (its advance loop minus the device
                        time of the same chunks)
  compact[batch]        a session's compaction out of a `batch`-row state: copy out the finished
                        half (gather padded to the state's rows + device->host + the host's row
                        copies) and `DecodeState.compact` of the other half into the next bucket
                        down (the engine goes down the buckets one level at a time)
  copy_out[batch]       the final copy-out of all `batch` rows (with features: `copy_out_feat`,
                        what a run that feeds the drafter buffer copies)
  shared_gain           (CPU) two decode chunks dispatched at once on two devices, against one:
                        (2 x t_one / t_two) - 1 (0: the fake devices serialise on the cores)
  pair_slowdown[batch]  (CPU) a chunk at `batch` rows beside one at the largest batch, against alone
  pair_slowdown_large[batch]  (CPU) the largest-batch chunk beside that one, against alone
  light_batch           (CPU) the largest batch up to which neither chunk of such a pair slows by
                        15 % or more
  shared_gain_rollout   (CPU) the same gain through the real rollout path (TLTRuntime, two groups of
                        the largest batch at fixed lengths against one group): the simulator uses
                        this one when present
  session_prefill       (CPU) a session's prefill through that path: the first group's (alone) and
                        the next group's (beside the first one's decoding), against the bare jit

No EOS can end a row early (the EOS id is outside the vocabulary), so every chunk runs its full
length. Weights are random (a cost does not depend on them). The update's cost per token is not
timed here: a replay takes it from the replayed run's own measurements (experiments/pod_sim.py).

  python experiments/cost_bench.py [--config=configs/default.py] [--out experiments/results/cost_bench/cpu.json]
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tlt_jax import cli  # noqa: E402

cli.set_cpu_devices(sys.argv, minimum=2)

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

from experiments.common import Output, define_output_flags, run_experiment, timed  # noqa: E402

_CONFIG = cli.define_config_flag()
define_output_flags("experiments/results/cost_bench/cpu.json", out_help="output JSON")
flags.DEFINE_string("ctx", "48,96,160", "live contexts (tokens) of the decode grid")
flags.DEFINE_string("batches", "", "batch sizes (default: the config's rollout buckets up to the rows per group)")
flags.DEFINE_integer("spec_ctx", 96, "context of the speculative-round grid")
flags.DEFINE_integer("prefill_len", 48, "prompt width of the prefill timings")
flags.DEFINE_string("prefill_lens", "24", "more prompt widths to time the prefill at (comma-separated)")
flags.DEFINE_integer("repeats", 5, "timed repeats per cell (median)")
flags.DEFINE_bool("tiny", False, "a few cells only (tests)")
FLAGS = flags.FLAGS


def _timeit(fn, repeats):
  """Median seconds of `repeats` calls after a warm-up call (experiments.common.timed)."""
  return float(np.median(timed(fn, repeats)))


def measure(config, repeats: int, ctxs, batches, spec_ctx: int, prefill_len: int, log=print,
            prefill_lens=()) -> dict:
  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from tlt_jax.drafter.eagle import EagleDrafter
  from tlt_jax.drafter.train import TargetHead, init_drafter_train_state, make_drafter_train_step
  from tlt_jax.analysis import aot
  from tlt_jax.parallel import mesh as mesh_lib
  from tlt_jax.rollout.engine import RolloutEngine
  from tlt_jax.rollout.sampling import SamplingParams
  from tlt_jax.rollout.speculative import SpeculativeDecoder, Strategy
  from tlt_jax.analysis.costs import strategy_name
  from tlt_jax.tlt.runtime import parse_arms
  from tlt_jax.models.transformer import Transformer

  r, t = config.rollout, config.tlt
  cfg = aot.model_config_for(config)
  model = Transformer(cfg, rngs=nnx.Rngs(0))
  drafter = EagleDrafter(cfg, rngs=nnx.Rngs(1))
  graphdef, params = nnx.split(model)
  dgraph, dparams = nnx.split(drafter)
  sp = SamplingParams(temperature=float(r.temperature), top_p=float(r.top_p), top_k=int(r.top_k))
  eos = (cfg.vocab_size + 7,)  # never sampled: every chunk runs in full
  k = int(r.chunk_size)
  rounds = int(r.rounds_per_chunk)
  arms = [a for a in parse_arms(t.strategies) if a != (0, 0, 0)]
  dec = SpeculativeDecoder(graphdef, dgraph, sp, eos, strategies=[Strategy(*a) for a in arms], rounds_per_chunk=rounds)
  eng = RolloutEngine(graphdef, sp, eos_ids=eos, chunk_size=k, buckets=tuple(batches), speculative=dec,
                      spec_threshold=max(batches), max_context=cfg.max_position_embeddings, compact=False)
  rng = np.random.default_rng(0)
  reps = 2 + repeats  # chunks per state: warm-up + timed

  mesh = mesh_lib.mesh_of(params)  # one device: a 1x1x1 mesh

  def state_for(b, ctx, extra, p=params):
    prompts = rng.integers(3, cfg.vocab_size, (b, ctx)).astype(np.int32)
    cap = ctx + extra
    return eng.jits.prefill(mesh_lib.mesh_of(p), p, (b, ctx), cap)(
        p, jnp.asarray(prompts), jnp.full((b,), ctx, jnp.int32), jnp.full((b,), extra, jnp.int32),
        jax.random.key(0))

  def plain_chunk(p, st):
    return eng.jits.chunk(mesh_lib.mesh_of(p), p, st, None)(p, st)

  out = {"device": f"{jax.devices()[0].device_kind} ({jax.default_backend()}, {os.cpu_count()} cores)",
         "config": cli.config_path_of(sys.argv), "chunk_size": k, "rounds_per_chunk": rounds,
         "decode": {}, "spec": {}, "prefill": {}, "spec_ctx": spec_ctx, "prefill_len": prefill_len}
  for ctx in ctxs:
    out["decode"][str(ctx)] = {}
    for b in batches:
      holder = {"st": state_for(b, ctx - k, k * (reps + 1))}

      def chunk():
        holder["st"], stats = plain_chunk(params, holder["st"])
        jax.block_until_ready(stats)
      out["decode"][str(ctx)][str(b)] = _timeit(chunk, repeats) / k
      log(json.dumps({"what": "decode_step", "ctx": ctx, "batch": b, "s": out["decode"][str(ctx)][str(b)]}))
  spec_batches = [b for b in batches if b <= max(int(r.spec_threshold), 8)]
  for a in arms:
    name = strategy_name(a)
    out["spec"][name] = {}
    for b in spec_batches:
      holder = {"st": state_for(b, spec_ctx, (a[0] + 1) * rounds * (reps + 1) + 64)}

      def chunk(a=a):
        holder["st"], stats = dec.dispatch_chunk(params, dparams, holder["st"], Strategy(*a), mesh=mesh)
        jax.block_until_ready(stats)
      out["spec"][name][str(b)] = _timeit(chunk, repeats) / rounds
      log(json.dumps({"what": "spec_round", "strategy": name, "batch": b, "s": out["spec"][name][str(b)]}))
  for b in batches:
    out["prefill"][str(b)] = _timeit(lambda b=b: jax.block_until_ready(state_for(b, prefill_len, k).done_B), repeats)
    log(json.dumps({"what": "prefill", "batch": b, "s": out["prefill"][str(b)]}))
  out["prefill_by_len"] = {str(prefill_len): out["prefill"]}
  for n in sorted(set(prefill_lens) - {prefill_len}):
    out["prefill_by_len"][str(n)] = {}
    for b in batches:
      out["prefill_by_len"][str(n)][str(b)] = _timeit(
          lambda b=b: jax.block_until_ready(state_for(b, n, k).done_B), repeats)
      log(json.dumps({"what": "prefill", "len": n, "batch": b, "s": out["prefill_by_len"][str(n)][str(b)]}))

  # compaction and the final copy-out, as a session does them (RolloutSession._copy_out, advance)
  from tlt_jax.rollout.engine import bucket_for
  out["compact"], out["copy_out"], out["copy_out_feat"] = {}, {}, {}
  ctx0 = prefill_len + k
  for b in batches:
    st = state_for(b, prefill_len, k)
    half = b // 2

    def copy(rows, feat):
      idx = jnp.asarray(np.asarray(rows + rows[:1] * (b - len(rows)), np.int32))
      seq, lp, ng, pl, *f = jax.device_get(eng.jits.gather(mesh, st, b, feat)(st, idx))
      tokens = np.zeros((len(rows), ctx0), np.int32)
      for j in range(len(rows)):
        tokens[j, :int(ng[j])] = seq[j, pl[j]:pl[j] + ng[j]]
      return tokens

    def compact():
      copy(list(range(half, b)), False)
      keep = bucket_for(half, batches)
      idx = np.concatenate([np.arange(half), np.zeros(keep - half, np.int64)]).astype(np.int32)
      jax.block_until_ready(eng.jits.compact(mesh, st, keep)(st, jnp.asarray(idx), np.int32(half)).done_B)
    if half >= 1:
      out["compact"][str(b)] = _timeit(compact, repeats)
    out["copy_out"][str(b)] = _timeit(lambda: copy(list(range(b)), False), repeats)
    out["copy_out_feat"][str(b)] = _timeit(lambda: copy(list(range(b)), True), repeats)
    log(json.dumps({"what": "compact", "batch": b, "s": out["compact"].get(str(b)),
                    "copy_out_s": out["copy_out"][str(b)], "copy_out_feat_s": out["copy_out_feat"][str(b)]}))

  # host overhead per chunk: a session's advance loop against the same chunks' device time
  b = batches[len(batches) // 2]
  n_chunks = 6
  prompts = rng.integers(3, cfg.vocab_size, (b, prefill_len)).astype(np.int32)
  plain = RolloutEngine(graphdef, sp, eos_ids=eos, chunk_size=k, buckets=tuple(batches),
                        max_context=cfg.max_position_embeddings)
  plain.generate(params, prompts, np.full(b, prefill_len), k * n_chunks, jax.random.key(1))  # compile
  sess_t = []
  for _ in range(repeats):
    s = plain.start(params, prompts, np.full(b, prefill_len), k * n_chunks, jax.random.key(1))
    t0 = time.perf_counter()
    while s.advance():
      pass
    sess_t.append(time.perf_counter() - t0)
  device = sum(out["decode"][str(min(ctxs, key=lambda c: abs(c - (prefill_len + k * i))))][str(b)] * k
               for i in range(n_chunks))
  out["chunk_overhead_s"] = max(float(np.median(sess_t)) - device, 0.0) / n_chunks
  log(json.dumps({"what": "chunk_overhead", "batch": b, "s": out["chunk_overhead_s"]}))

  # drafter train step
  tx = optax.adamw(1e-4)
  dstate = init_drafter_train_state(drafter, tx)
  step = make_drafter_train_step(dgraph, tx, cfg)
  head = TargetHead.from_target(model)
  rows = int(t.drafter_batch_size)
  length = int(t.get("buffer_seq_len", 0)) or int(max(ctxs))
  batch = {"tokens": jnp.asarray(rng.integers(3, cfg.vocab_size, (rows, length)).astype(np.int32)),
           "hidden": jnp.asarray(rng.normal(size=(rows, length, cfg.hidden_size)).astype(np.float32)),
           "loss_mask": jnp.ones((rows, length), jnp.float32)}
  holder = {"st": dstate}

  def train():
    holder["st"], m = step(holder["st"], head, batch)
    jax.block_until_ready(m)
  out["drafter_train_s"] = _timeit(train, repeats)
  log(json.dumps({"what": "drafter_train_step", "rows": rows, "len": length, "s": out["drafter_train_s"]}))

  # shared cores: one chunk alone vs two at once on two devices
  devs = jax.devices()
  if len(devs) >= 2 and jax.default_backend() == "cpu":
    b = batches[-1]
    p2 = [jax.device_put(params, d) for d in devs[:2]]
    holder = {"st": [state_for(b, ctxs[0], k * (3 * reps + 2), p2[i]) for i in range(2)]}

    def run(which):
      outs = []
      for i in which:
        holder["st"][i], stats = plain_chunk(p2[i], holder["st"][i])
        outs.append(stats)
      jax.block_until_ready(outs)
    one = _timeit(lambda: run([0]), repeats)
    two = _timeit(lambda: run([0, 1]), repeats)
    out["shared_gain"] = max(2 * one / two - 1.0, 0.0)
    log(json.dumps({"what": "shared_gain", "one_s": one, "two_s": two, "gain": out["shared_gain"]}))

    # a small batch beside the largest: how much each of the two slows down (a latency-bound
    # batch may run on a core the large one leaves idle); light_batch: the largest batch up to
    # which neither slows by 15 % or more
    out["pair_slowdown"], out["light_batch"] = {}, 0
    for small in batches[:-1]:
      for i, rows in ((0, small), (1, b)):  # fresh states: room for every chunk below
        holder["st"][i] = state_for(rows, ctxs[0], k * (3 * reps + 2), p2[i])

      def finish_times(which):
        t0, stats = time.perf_counter(), {}
        for i in which:
          holder["st"][i], stats[i] = plain_chunk(p2[i], holder["st"][i])
        done = {}
        while len(done) < len(stats):
          for i, x in stats.items():
            if i not in done and all(y.is_ready() for y in x):
              done[i] = time.perf_counter() - t0
          time.sleep(1e-4)
        return done
      finish_times([0, 1])  # compile / warm
      alone = min(finish_times([0])[0] for _ in range(repeats))
      alone_big = min(finish_times([1])[1] for _ in range(repeats))
      pairs = [finish_times([0, 1]) for _ in range(repeats)]
      beside = min(x[0] for x in pairs)
      beside_big = min(x[1] for x in pairs)
      out["pair_slowdown"][str(small)] = beside / alone
      out.setdefault("pair_slowdown_large", {})[str(small)] = beside_big / alone_big
      log(json.dumps({"what": "pair_slowdown", "batch": small, "beside": b, "slowdown": beside / alone,
                      "large_slowdown": beside_big / alone_big}))
    for small in batches[:-1]:  # light: neither the small one nor the large one beside it slows much
      if max(out["pair_slowdown"][str(small)], out["pair_slowdown_large"][str(small)]) >= 1.15:
        break
      out["light_batch"] = small
    log(json.dumps({"what": "light_batch", "rows": out["light_batch"]}))

    # The same through the real rollout path (TLTRuntime's host scheduler driving two groups,
    # polling, copying out, compacting), at fixed lengths: two groups of `b` rows against one.
    # The simulator's shared gain (a replay's groups run this way, not as bare chunks).
    from tlt_jax.parallel import mesh as mesh_lib
    from tlt_jax.tlt.runtime import TLTRuntime
    cfg_g = config.copy_and_resolve_references()
    cfg_g.tlt.update(speculative=False, train_drafter=False)
    new = k * 4
    times, prefills = {}, {}
    for groups in (1, 2):
      cfg_g.tlt.rollout_groups = groups
      rt = TLTRuntime(cfg_g, graphdef, cfg, sp, eos, 0, mesh_lib.make_mesh((groups, 1, 1), devs[:groups]),
                      None, prefill_len + new)
      prompts = rng.integers(3, cfg.vocab_size, (b * groups, prefill_len)).astype(np.int32)
      plens = np.full(b * groups, prefill_len, np.int32)
      runs = []

      def rollout():
        runs.append(rt.rollout(params, prompts, plens, new, jax.random.key(2))[0].stats.time_s["prefill"])
      times[groups] = _timeit(rollout, repeats)
      prefills[groups] = float(np.median(runs[1:]))  # the sessions' prefills, summed over groups
    out["shared_gain_rollout"] = max(2 * times[1] / times[2] - 1.0, 0.0)
    # A session's prefill through the real path (mesh placement, block on its result), alone (the
    # first group) and beside the first group's decoding (the next group: the host starts the
    # groups one after another), against the bare prefill timed above
    out["session_prefill"] = {"batch": b, "len": prefill_len, "bare_s": out["prefill"][str(b)],
                              "first_s": prefills[1], "beside_s": max(prefills[2] - prefills[1], 0.0)}
    log(json.dumps({"what": "shared_gain_rollout", "rows_per_group": b, "tokens": new, "one_group_s": times[1],
                    "two_groups_s": times[2], "gain": out["shared_gain_rollout"],
                    "session_prefill": out["session_prefill"]}))
  return out


def main(argv):
  del argv
  config = _CONFIG.value
  r = config.rollout
  ctxs = [int(c) for c in FLAGS.ctx.split(",") if c.strip()]
  per_group = max(1, int(config.rl.prompts_per_step) * int(config.rl.group_size) // int(config.tlt.rollout_groups))
  batches = ([int(b) for b in FLAGS.batches.split(",")] if FLAGS.batches
             else [int(b) for b in r.buckets if b <= per_group] or [per_group])
  if FLAGS.tiny:
    ctxs, batches = ctxs[:2], batches[:2]
  lens = [int(x) for x in FLAGS.prefill_lens.split(",") if x.strip()]
  out = measure(config, FLAGS.repeats, ctxs, batches, FLAGS.spec_ctx, FLAGS.prefill_len,
                prefill_lens=[] if FLAGS.tiny else lens)
  path = os.path.abspath(FLAGS.out)
  Output(os.path.dirname(path)).json(os.path.basename(path), out)
  print(f"wrote {FLAGS.out}", flush=True)


if __name__ == "__main__":
  run_experiment(main)
