"""TLT's host scheduler, rollout groups and drafter buffer.

Scheduling is tested against fake sessions on a fake clock (exact times), with the real
DrafterTrainer publication code and a real, donating jitted train step whose every parameter
counts its completed steps: a half-updated or deleted (donated) drafter is caught when read.
One test runs the real engine (greedy, speculative, drafter swapped mid-rollout) against plain
greedy decoding.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.spec_fixtures import EOS, nearly_context_free_target, random_drafter, target_config
from tlt_jax.drafter.train import (DrafterTrainState, TargetHead, init_drafter_train_state,
                                   make_drafter_train_step)
from tlt_jax.parallel.mesh import make_mesh
from tlt_jax.rollout.engine import RolloutEngine, RolloutResult
from tlt_jax.rollout.records import ChunkRecord, RolloutStats
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.speculative import SpeculativeDecoder
from tlt_jax.tlt.bandit import PLAIN, BegMab
from tlt_jax.tlt.buffer import DrafterBuffer
from tlt_jax.tlt.groups import split_mesh, split_rows, union_mesh
from tlt_jax.tlt.scheduler import DrafterTrainer, HostScheduler, merge_results
from tlt_jax.train.checkpoint import Checkpointer

H, L = 4, 8


def two_groups(n=2):
  return split_mesh(make_mesh((n, 1, 1), jax.devices()[:n]), n)


# ----------------------------------------------------------------------------- groups


def test_split_mesh_names_r_data_and_allowed():
  mesh = make_mesh((4, 2, 1), jax.devices()[:8])
  groups = split_mesh(mesh, 2)
  assert [g.mesh.shape["data"] for g in groups] == [2, 2] and groups[1].mesh.shape["fsdp"] == 2
  assert set(groups[0].devices).isdisjoint(groups[1].devices)
  assert len(union_mesh(groups).devices.flat) == 8
  with pytest.raises(ValueError, match=r"tlt.rollout_groups=3 .*data=4.*\[1, 2, 4\]"):
    split_mesh(mesh, 3)


def test_groups_place_the_drafter_tensor_parallel_and_decode_with_it_exactly():
  """A group lays the drafter's layer out over its `tensor` axis as the policy's (a draft level
  then reads 1/tensor of it per chip), keeps its values, and a speculative greedy rollout with the
  placed drafter on that group equals plain greedy decoding."""
  cfg = target_config()
  (group,) = split_mesh(make_mesh((1, 1, 2), jax.devices()[:2]), 1)
  dgraph, dparams = nnx.split(random_drafter(cfg))
  placed = group.place_drafter(dparams)
  kernel = placed["layer"]["mlp"]["up_proj"]["kernel"][...]
  assert "tensor" in tuple(kernel.sharding.spec) and kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 2
  for a, b in zip(jax.tree.leaves(dparams), jax.tree.leaves(placed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.MonkeyPatch.context() as mp:  # the multi-host path: each leaf built shard by shard
    mp.setattr(jax, "process_count", lambda: 2)
    per_leaf = group.place_drafter(dparams)
  for a, b in zip(jax.tree.leaves(placed), jax.tree.leaves(per_leaf)):
    assert a.sharding == b.sharding
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  graphdef, params = nnx.split(nearly_context_free_target(cfg))
  sp = SamplingParams(temperature=0.0)
  dec = SpeculativeDecoder(graphdef, dgraph, sp, EOS, strategies=[(3, 1, 3)], rounds_per_chunk=2)
  engine = RolloutEngine(graphdef, sp, eos_ids=EOS, chunk_size=4, buckets=(4,), speculative=dec, spec_threshold=4)
  rng = np.random.default_rng(1)
  prompts, plens = rng.integers(3, 32, (4, 5)).astype(np.int32), np.full(4, 5, np.int32)
  max_new = np.array([9, 12, 20, 24], np.int32)
  ref, _ = HostScheduler(engine, [group]).rollout(params, prompts, plens, max_new, jax.random.key(0))
  out, _ = HostScheduler(engine, [group], drafter_params=dparams).rollout(params, prompts, plens, max_new,
                                                                         jax.random.key(0))
  assert out.stats["spec_chunks"]
  np.testing.assert_array_equal(out.tokens, ref.tokens)


def test_split_rows_keeps_prompt_groups_whole():
  rows = split_rows(5 * 4, 4, 2)
  assert [r.tolist() for r in rows] == [list(range(12)), list(range(12, 20))]
  assert [len(r) for r in split_rows(8, 4, 3)] == [4, 4, 0]


# ----------------------------------------------------------------------------- buffer


def _rows(n, step, seed=0, h=H):
  rng = np.random.default_rng(seed)
  tokens = np.full((n, L), step, np.int32)
  hidden = rng.standard_normal((n, L, h)).astype(np.float32)
  mask = np.zeros((n, L), np.float32)
  mask[:, 2:6] = 1.0
  return tokens, hidden, mask


def test_buffer_is_bounded_and_overwrites_the_oldest():
  buf = DrafterBuffer(capacity=5, seq_len=L, hidden_size=H)
  for step in range(4):
    buf.add(*_rows(2, step), step=step)
  assert len(buf) == 5 and buf.added == 8
  assert sorted(buf.steps.tolist()) == [1, 2, 2, 3, 3]  # steps 0 and one row of 1 overwritten
  no_response = np.zeros((1, L), np.float32)
  assert buf.add(_rows(1, 9)[0], _rows(1, 9)[1], no_response, step=9) == 0  # nothing to learn


def test_buffer_sampling_prefers_recent_steps():
  buf = DrafterBuffer(capacity=20, seq_len=L, hidden_size=H, decay=0.5, seed=0)
  buf.add(*_rows(10, 0), step=0)
  buf.add(*_rows(10, 3), step=3)
  counts = np.zeros(4)
  for _ in range(400):
    for tok in buf.sample(1)["tokens"][:, 0]:
      counts[tok] += 1
  assert abs(counts[0] / counts[3] - 0.5 ** 3) < 0.06  # weights decay^(3 - 0) : 1
  batch = buf.sample(12)
  assert batch["tokens"].shape == (12, L) and batch["hidden"].shape == (12, L, H)


def test_buffer_formats_update_batches_and_engine_rows():
  buf = DrafterBuffer(capacity=4, seq_len=L, hidden_size=H)
  resp = np.zeros((1, 6), np.float32)
  resp[0, 3:5] = 1.0  # response tokens at 3, 4
  buf.add_update_batch(np.arange(6)[None], np.ones((1, 6, H)), resp, step=1)
  np.testing.assert_array_equal(buf.loss_mask[0], [0, 0, 1, 1, 0, 0, 0, 0])  # mask[t] = resp[t+1]
  buf.add_sequences([(np.arange(5), np.ones((5, H)), 3)], step=1)  # prompt 3 tokens, response 2
  np.testing.assert_array_equal(buf.loss_mask[1], [0, 0, 1, 1, 0, 0, 0, 0])


def test_buffer_state_round_trip_continues_identically():
  buf = DrafterBuffer(capacity=6, seq_len=L, hidden_size=H, seed=3)
  for step in range(3):
    buf.add(*_rows(3, step, seed=step), step=step)
  buf.sample(2)
  state = json.loads(json.dumps(buf.state_dict()["meta"])), buf.state_dict()["arrays"]
  twin = DrafterBuffer(capacity=6, seq_len=L, hidden_size=H, seed=99)
  twin.load_state_dict({"meta": state[0], "arrays": state[1]})
  for _ in range(3):
    a, b = buf.sample(4), twin.sample(4)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(ValueError, match="capacity"):
    DrafterBuffer(capacity=7, seq_len=L, hidden_size=H).load_state_dict(buf.state_dict())


# ----------------------------------------------------------------------------- fake sessions


class FakeClock:

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


class FakeSession:
  """`chunks` chunks of `chunk_s` fake seconds; advance() waits for the chunk in flight (moving
  the clock), then dispatches the next. Records the drafter version every chunk is given (every
  leaf of a counting drafter holds its version)."""

  def __init__(self, clock, n, chunks, chunk_s, drafter_params, seen):
    self.clock, self.n, self.left, self.chunk_s = clock, n, chunks, chunk_s
    self.drafter_params, self.seen = drafter_params, seen
    self.in_flight = False
    self.finished_features = []
    self.chunks = []

  def advance(self):
    if self.in_flight:
      self.clock.t += self.chunk_s
      self.chunks.append(ChunkRecord(batch=self.n, rows=self.n, strategy="d1k1n1", tokens=self.n, rounds=1,
                                     row_rounds=self.n, time_s=self.chunk_s))
    if self.left == 0:
      self.in_flight = False
      return False
    leaves = [np.asarray(x) for x in jax.tree.leaves(self.drafter_params)]  # raises if donated
    assert all(np.all(x == leaves[0].flat[0]) for x in leaves), "half-updated drafter"
    self.seen.append(int(leaves[0].flat[0]))
    self.left -= 1
    self.in_flight = True
    return True

  def result(self):
    z = np.zeros((self.n, 2), np.int32)
    return RolloutResult(z, np.zeros(self.n, np.int32), z.astype(np.float32), np.ones(self.n, bool),
                         RolloutStats(time_s={}, num_tokens=0))


@jax.jit
def counting_step(state, head, batch):
  """Adds 1 to every parameter (a drafter whose leaves all hold its number of steps)."""
  del head
  params = jax.tree.map(lambda p: p + 1.0, state.params)
  return state.replace(params=params, step=state.step + 1), {"loss": jnp.mean(batch["hidden"])}


counting_step_donating = jax.jit(counting_step.__wrapped__, donate_argnums=0)


class FakeTimeTrainer(DrafterTrainer):
  """The real DrafterTrainer (placement, snapshot, publication), with train steps that take
  `train_s` fake seconds each, one after another."""

  def __init__(self, clock, train_s, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.clock, self.train_s = clock, train_s
    self.ready_at, self.dispatch_times = [], []

  def dispatch(self, mesh, head):
    super().dispatch(mesh, head)
    start = max([self.clock.t] + self.ready_at[-1:])
    self.ready_at.append(start + self.train_s)
    self.dispatch_times.append(self.clock.t)

  def oldest_ready(self):
    return bool(self._queue) and self.ready_at[-len(self._queue)] <= self.clock.t

  def complete_one(self):
    self.clock.t = max(self.clock.t, self.ready_at[-len(self._queue)])
    return super().complete_one()


def counting_trainer(clock, train_s, groups, buffer_rows=8):
  buf = DrafterBuffer(capacity=16, seq_len=L, hidden_size=H)
  buf.add(*_rows(buffer_rows, 0), step=0)
  params = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
  state = DrafterTrainState(params=params, opt_state=(), step=jnp.zeros((), jnp.int32))
  return FakeTimeTrainer(clock, train_s, lambda mesh: counting_step_donating, state, groups, buf,
                         batch_size=4)


def fake_scheduler(clock, trainer, groups, chunks, seen, chunk_s=1.0, **kwargs):
  def start(group, params, prompts, plens, max_new, rng, drafter_params):
    return FakeSession(clock, len(prompts), chunks[group.index], chunk_s, drafter_params, seen[group.index])

  return HostScheduler(None, groups, trainer=trainer, clock=clock, start_session=start, **kwargs)


def run_fake(scheduler, n=8):
  prompts = np.zeros((n, 3), np.int32)
  return scheduler.rollout(None, prompts, np.full(n, 3), 4, jax.random.key(0), group_size=2,
                           head=jnp.zeros((1,)))


def test_bubble_training_fills_the_idle_group_and_accounts_exactly():
  clock, groups = FakeClock(), two_groups()
  trainer = counting_trainer(clock, 0.5, groups)
  seen = [[], []]
  _, acc = run_fake(fake_scheduler(clock, trainer, groups, [1, 4], seen, max_in_flight=2))
  # group 0 decodes [0, 1] and trains [1, 5], two 0.5 s steps queued per 1 s tick of group 1
  g0, g1 = acc["groups"]
  assert acc["wall_s"] == pytest.approx(5.0)
  assert (g0["decode_s"], g0["idle_s"], g0["train_s"]) == pytest.approx((1.0, 0.0, 4.0))
  assert (g1["decode_s"], g1["idle_s"], g1["train_s"]) == pytest.approx((5.0, 0.0, 0.0))
  for g in (g0, g1):
    assert g["decode_s"] + g["train_s"] + g["idle_s"] == pytest.approx(acc["wall_s"])
    # the host timings the replay reads: session start <= first dispatch <= done, host time >= 0
    assert 0.0 <= g["start_s"] <= g["first_dispatch_s"] <= g["done_s"] and g["host_s"] >= 0.0
  assert acc["decode_s"] + acc["train_s"] + acc["idle_s"] == pytest.approx(2 * acc["wall_s"])
  assert acc["bubble_s"] == pytest.approx(4.0) and acc["bubble_utilisation"] == pytest.approx(1.0)
  assert acc["drafter_steps"] == 8 and trainer.version == 8
  # group 1's chunks got versions 0, 0, 2, 4: each tick publishes the two completed steps
  assert seen == [[0], [0, 0, 2, 4]]
  assert acc.drafter_versions_used == (0, 2, 4)


def test_training_is_preempted_at_a_step_boundary_and_published_whole():
  clock, groups = FakeClock(), two_groups()
  trainer = counting_trainer(clock, 2.5, groups)
  seen = [[], []]
  _, acc = run_fake(fake_scheduler(clock, trainer, groups, [1, 4], seen, max_in_flight=1))
  # steps run [1, 3.5] and [4, 6.5]; the last group finishes at 5: no new step is dispatched, the
  # running one completes and is published whole; versions grow by one per completed step
  assert trainer.dispatch_times == [1.0, 4.0]
  assert trainer.version == 2 and acc["drafter_steps"] == 2
  assert acc["preempt_wait_s"] == pytest.approx(1.5) and acc["wall_s"] == pytest.approx(6.5)
  assert seen[1] == [0, 0, 0, 0]  # the first step completes (3.5) after chunk 4 left (3)
  g0, g1 = acc["groups"]
  assert (g0["decode_s"], g0["idle_s"], g0["train_s"]) == pytest.approx((1.0, 0.0, 5.5))
  assert (g1["decode_s"], g1["idle_s"], g1["train_s"]) == pytest.approx((5.0, 1.5, 0.0))
  leaves = jax.tree.leaves(trainer.published.params)
  assert all(np.all(np.asarray(x) == 2.0) for x in leaves)
  # the published copies survive the trainer's next (donating) step
  trainer.dispatch(groups[0].mesh, jnp.zeros((1,)))
  trainer.complete_all()
  assert all(np.all(np.asarray(x) == 2.0) for x in leaves) and trainer.version == 3


def test_no_training_without_buffered_rows_or_with_a_cap():
  clock, groups = FakeClock(), two_groups()
  trainer = counting_trainer(clock, 0.5, groups, buffer_rows=2)  # fewer than a batch
  _, acc = run_fake(fake_scheduler(clock, trainer, groups, [1, 4], [[], []]))
  assert acc["drafter_steps"] == 0 and acc["bubble_utilisation"] == 0.0
  trainer = counting_trainer(clock, 0.5, groups)
  _, acc = run_fake(fake_scheduler(clock, trainer, groups, [1, 4], [[], []], max_train_steps=3))
  assert acc["drafter_steps"] == 3 and trainer.version == 3


def test_single_group_modes():
  clock = FakeClock()
  group = split_mesh(make_mesh((1, 1, 1), jax.devices()[:1]), 1)
  for mode, expected in (("between_steps", 3), ("off", 0)):
    trainer = counting_trainer(clock, 0.5, group)
    sched = fake_scheduler(clock, trainer, group, [3], [[]], single_group=mode, between_steps=3)
    _, acc = run_fake(sched)
    assert acc["drafter_steps"] == 0 and acc["idle_s"] == 0.0  # one group: never idle
    out = sched.train_between_steps(jnp.zeros((1,)))
    assert out["drafter_steps"] == expected and trainer.version == expected
  with pytest.raises(ValueError, match=r"tlt.single_group='sometimes'.*between_steps"):
    HostScheduler(None, group, single_group="sometimes")


def test_merge_results_restores_row_order():
  rows = split_rows(6, 2, 2)
  parts = [RolloutResult(np.full((len(r), 3), g + 1, np.int32), np.full(len(r), g + 1, np.int32),
                         np.zeros((len(r), 3), np.float32), np.ones(len(r), bool),
                         RolloutStats(time_s={"decode": 1.0}, num_tokens=0, active_trace=(len(r),)))
           for g, r in enumerate(rows)]
  out = merge_results(parts, rows, 6)
  np.testing.assert_array_equal(out.lengths, [1, 1, 1, 1, 2, 2])
  assert out.stats["time_s"]["decode"] == 2.0


# ----------------------------------------------------------------------------- real engine


def test_real_groups_speculative_greedy_with_drafter_swaps_equals_plain_greedy():
  """Two rollout groups of the real engine, speculative tails, the drafter trained in group 0's
  bubble and swapped in between chunks: greedy output equals plain greedy decoding, row for row,
  and finished rows fill the buffer."""
  cfg = target_config()
  graphdef, params = nnx.split(nearly_context_free_target(cfg))
  drafter = random_drafter(cfg)
  sp = SamplingParams(temperature=0.0)
  dec = SpeculativeDecoder(graphdef, nnx.graphdef(drafter), sp, EOS, strategies=[(3, 1, 3)],
                           rounds_per_chunk=2)
  engine = RolloutEngine(graphdef, sp, eos_ids=EOS, chunk_size=4, buckets=(2, 4, 8), speculative=dec,
                         spec_threshold=2)
  groups = two_groups()
  tx = optax.adam(1e-3)
  buf = DrafterBuffer(capacity=32, seq_len=48, hidden_size=cfg.hidden_size)
  trainer = DrafterTrainer(lambda mesh: make_drafter_train_step(nnx.graphdef(drafter), tx, cfg, mesh=mesh),
                           init_drafter_train_state(drafter, tx), groups, buf, batch_size=2)
  tlt = HostScheduler(engine, groups, trainer=trainer)  # the decoder's strategy on every tail chunk
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, 32, (8, 5)).astype(np.int32)
  plens = np.full(8, 5, np.int32)
  max_new = np.array([3, 4, 3, 5, 30, 24, 36, 40], np.int32)  # group 0 short, group 1 long
  # plain decoding on the same groups (no drafter) shares the compiled plain chunks
  ref, ref_acc = HostScheduler(engine, groups).rollout(params, prompts, plens, max_new,
                                                       jax.random.key(0), group_size=2)
  np.testing.assert_array_equal(ref.lengths, max_new)  # no EOS here: lengths pin the row order
  assert ref_acc["drafter_steps"] == 0 and not ref.stats["spec_chunks"]
  versions = set()
  for step in range(2):
    out, acc = tlt.rollout(params, prompts, plens, max_new, jax.random.key(step), step=step, group_size=2)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    assert out.stats["spec_chunks"]
    for g in acc["groups"]:
      assert g["decode_s"] + g["train_s"] + g["idle_s"] == pytest.approx(acc["wall_s"], rel=1e-6)
    assert acc["groups"][0]["train_s"] > 0 and acc["drafter_steps"] >= 1
    assert acc["buffered_rows"].all() and len(buf) == 8 * (step + 1)
    versions |= set(acc["drafter_versions_used"])
  assert max(versions) >= 1 and trainer.version == acc["drafter_version"]


def _runtime(seed=0):
  """A TLTRuntime of the default config on a tiny policy and drafter (built, never compiled)."""
  from tests.test_config import default_config
  from tlt_jax.drafter.eagle import EagleDrafter
  from tlt_jax.models.transformer import Transformer
  from tlt_jax.run import drafter_bundle
  from tlt_jax.tlt.runtime import TLTRuntime

  config = default_config()
  config.seed = seed
  cfg = target_config()
  graphdef = nnx.graphdef(Transformer(cfg, rngs=nnx.Rngs(0)))
  drafter = EagleDrafter(cfg, rngs=nnx.Rngs(seed))
  return TLTRuntime(config, graphdef, cfg, SamplingParams(temperature=1.0), EOS, 0,
                    make_mesh((2, 1, 1), jax.devices()[:2]), drafter_bundle(config, drafter), seq_len=L)


def test_tlt_state_round_trips_through_the_checkpoint(tmp_path):
  """Drafter + optimizer, version, buffer rows and position, and the bandit's statistics and RNG
  all go through the run's one orbax checkpoint and continue exactly."""
  rt = _runtime(seed=0)
  assert rt.speculative and rt.train_drafter and len(rt.groups) == 2
  assert rt.bandit.strategies[1] == [(3, 1, 3), (4, 1, 4), PLAIN]  # tlt.strategies, bucket 1
  for i in range(20):
    b = 1 + i % 4
    rt.bandit.update(b, rt.bandit.select(b), 2.0, 0.01 * (1 + i % 3))
  rt.buffer.add(*_rows(3, 0, seed=0, h=rt.buffer.hidden_size), step=0)
  rt.trainer.published = dataclasses.replace(rt.trainer.published, version=7)
  ckpt = Checkpointer(str(tmp_path), max_to_keep=1)
  ckpt.save(3, rt.checkpoint_tree(), {"tlt": rt.checkpoint_meta()})
  twin = _runtime(seed=1)  # other drafter init, other bandit seed
  step, tree, meta = ckpt.restore_latest(twin.checkpoint_tree())
  ckpt.close()
  twin.restore(tree, json.loads(json.dumps(meta["tlt"])))
  assert step == 3 and twin.trainer.version == 7
  for a, b in zip(jax.tree.leaves(rt.trainer.state), jax.tree.leaves(twin.trainer.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(rt.trainer.published.params), jax.tree.leaves(twin.trainer.published.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [rt.bandit.select(b) for b in (1, 2, 4) * 5] == [twin.bandit.select(b) for b in (1, 2, 4) * 5]
  np.testing.assert_array_equal(rt.buffer.sample(3)["hidden"], twin.buffer.sample(3)["hidden"])


def test_train_where_auto_avoids_bubbles_on_shared_cpu_cores():
  """auto: between steps when the rollout groups are fake CPU devices (a bubble's training would
  take cores from the group still decoding), bubbles on accelerators; an explicit choice wins."""
  from tlt_jax.tlt.runtime import resolve_train_where
  assert resolve_train_where("auto", 2, "cpu").startswith("between_steps")
  assert resolve_train_where("auto", 4, "tpu").startswith("bubbles")
  assert resolve_train_where("auto", 4, "gpu").startswith("bubbles")
  assert resolve_train_where("bubbles", 2, "cpu").startswith("bubbles")
  assert resolve_train_where("auto", 1, "tpu").startswith("between_steps")
  with pytest.raises(ValueError, match="tlt.train_where='nowhere' is not allowed"):
    resolve_train_where("nowhere", 2, "cpu")
  rt = _runtime()  # the default config (auto) on this CPU's 2 fake devices
  assert rt.train_where.startswith("between_steps") and not rt.scheduler.train_in_bubbles
  # ... and the drafter then trains after the update, on both groups
  rt.buffer.add(*_rows(rt.trainer.batch_size, 0, seed=0, h=rt.buffer.hidden_size), step=0)
  from tlt_jax.models.transformer import Transformer
  head = TargetHead.from_target(Transformer(target_config(), rngs=nnx.Rngs(0)))
  out = rt.scheduler.train_between_steps(head)
  assert out["drafter_steps"] == rt.scheduler.between_steps > 0 and out["drafter_version"] == out["drafter_steps"]
