"""Speculative decoding is lossless: greedy equals plain greedy token for token, sampled outputs
have the plain sampler's distribution (with a good and with a random drafter), and the returned
logprobs are the target's."""

import functools
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.stats import chi2_contingency

from tests.numerics import assert_close
from tests.spec_fixtures import (EOS, copying_drafter, nearly_context_free_target, random_drafter, random_prompts,
                                 target_config)
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.engine import FixedSelector, RolloutEngine
from tlt_jax.rollout.sampling import SamplingParams, policy_logprobs
from tlt_jax.rollout.speculative import SpeculativeDecoder, Strategy

STRATEGIES = [Strategy(1, 1, 1), Strategy(4, 1, 4), Strategy(3, 3, 6)]


@pytest.fixture(scope="module")
def models():
  cfg = target_config()
  target = nearly_context_free_target(cfg)
  return dict(cfg=cfg, target=nnx.split(target), good=nnx.split(copying_drafter(cfg)),
              bad=nnx.split(random_drafter(cfg)))


@pytest.fixture(scope="module")
def prompts():
  return random_prompts(6, 7)


_ENGINES = {}


def _engines(models, sp, strategies=tuple(STRATEGIES), threshold=4096, chunk=4):
  """(plain, speculative) engines, cached so that every test reuses their compiled chunks. The
  good and the bad drafter share one graph, so one decoder serves both."""
  key = (sp, tuple(strategies), threshold, chunk)
  if key not in _ENGINES:
    g, _ = models["target"]
    plain = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=chunk)
    dec = SpeculativeDecoder(g, models["good"][0], sp, EOS, strategies=strategies, rounds_per_chunk=3)
    _ENGINES[key] = plain, RolloutEngine(g, sp, eos_ids=EOS, chunk_size=chunk, speculative=dec,
                                         spec_threshold=threshold)
  return _ENGINES[key]


@pytest.mark.parametrize("drafter", ["good", "bad"])
def test_greedy_equals_plain_greedy(models, prompts, drafter):
  sp = SamplingParams(temperature=0.0)
  plain, spec = _engines(models, sp)
  _, params = models["target"]
  ref = plain.generate(params, *prompts, 40, jax.random.key(0))
  accept = []
  for strategy in STRATEGIES:
    out = spec.generate(params, *prompts, 40, jax.random.key(0), drafter_params=models[drafter][1],
                        selector=FixedSelector(strategy))
    np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=str(strategy))
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_array_equal(out.finished, ref.finished)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    accept.append(out.stats["spec_accept_len"])
  if drafter == "good":  # the paths that move accepted keys/values were really exercised
    assert max(accept) > 3.0, accept
  else:
    assert min(accept) < 1.5, accept


def test_spec_switches_on_below_threshold_with_compaction(models, prompts):
  """Plain decoding for the full batch, speculation once <= 2 rows remain: still exact."""
  sp = SamplingParams(temperature=0.0)
  plain, spec = _engines(models, sp, threshold=2, chunk=2)
  _, params = models["target"]
  toks, plen = prompts
  max_new = np.array([3, 5, 30, 8, 24, 2])  # rows finish at different times
  out = spec.generate(params, toks, plen, max_new, jax.random.key(0), drafter_params=models["good"][1],
                      selector=FixedSelector(STRATEGIES[1]))
  assert out.stats["spec_chunks"], "speculation never switched on"
  assert out.stats["active_trace"][0] == 6 and min(out.stats["active_trace"]) <= 2
  full = _engines(models, sp)[0].generate(params, toks, plen, 30, jax.random.key(0))
  np.testing.assert_array_equal(out.lengths, np.minimum(max_new, full.lengths))
  for i, m in enumerate(max_new):
    np.testing.assert_array_equal(out.tokens[i, :m], full.tokens[i, :m])


class _RecordingSelector:
  """Always `strategy`; records what the engine reports back."""

  def __init__(self, strategy):
    self.strategy, self.updates = strategy, []

  def select(self, batch_size):
    return self.strategy

  def update(self, *outcome):
    self.updates.append(outcome)


def test_compaction_compiles_per_bucket_and_cold_chunks_are_not_scored(models, prompts):
  """Copy-out compiles once per state bucket and compaction once per pair of adjacent buckets (it
  goes down one level at a time), not once per number of finished rows or per (from, to); the
  tail's programs compile before the first chunk, and the selector never scores a chunk whose
  program compiled inside it (its time is mostly compile); outputs stay exact under any
  compaction pattern."""
  sp = SamplingParams(temperature=0.0)
  g, params = models["target"]
  dec = SpeculativeDecoder(g, models["good"][0], sp, EOS, strategies=[STRATEGIES[1]], rounds_per_chunk=3)
  eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=2, buckets=(1, 2, 4, 8), speculative=dec,
                      spec_threshold=2)
  toks, plen = prompts
  session = eng.start(params, toks, plen, 4, jax.random.key(0))  # 6 rows in a bucket of 8
  for k in range(1, 7):  # copy out 1..6 rows: each padded to the state's 8 rows
    session._copy_out(list(range(k)))
  assert sum(f._cache_size() for f in eng.programs("gather")) == 1
  state = session.state
  compact, rep = eng.jits.compact(session.mesh, state, 4), mesh_lib.replicated(session.mesh)
  for n in range(1, 5):  # 1..4 live rows into a bucket of 4: one program
    out = compact(state, mesh_lib.put_global(np.arange(4, dtype=np.int32), rep), mesh_lib.put_global(np.int32(n), rep))
    np.testing.assert_array_equal(np.asarray(out.done_B)[n:], True)
    np.testing.assert_array_equal(np.asarray(out.done_B)[:n], np.asarray(state.done_B)[:n])
  assert sum(f._cache_size() for f in eng.programs("compact")) == 1

  sel = _RecordingSelector(STRATEGIES[1])
  full = eng.generate(params, toks, plen, 12, jax.random.key(0))  # no drafter: plain throughout
  for i, max_new in enumerate([np.array([3, 5, 12, 8, 11, 2]), np.array([12, 4, 6, 3, 9, 5])]):
    out = eng.generate(params, toks, plen, max_new, jax.random.key(0), drafter_params=models["good"][1],
                       selector=sel)
    for r, m in enumerate(max_new):
      np.testing.assert_array_equal(out.tokens[r, :m], full.tokens[r, :m])
    assert sum(f._cache_size() for f in eng.programs("compact")) <= 3  # 8 -> 4 -> 2 -> 1, whatever the pattern
    spec = [c for c in out.stats["chunks"] if c["strategy"] is not None]
    assert spec, "speculation never switched on"
    # the session compiled the tail's programs before its first chunk (RolloutSession._warm_tail)
    assert not any(c["cold"] for c in spec)
    assert len(sel.updates) == len(spec)
    sel.updates.clear()
  # without compaction there is no tail bucket to warm: the first speculative chunk compiles its
  # program inside it, and only the later ones are scored
  flat = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=2, speculative=dec, spec_threshold=2, compact=False)
  out = flat.generate(params, toks, plen, np.array([3, 5, 12, 8, 11, 2]), jax.random.key(0),
                      drafter_params=models["good"][1], selector=sel)
  spec = [c for c in out.stats["chunks"] if c["strategy"] is not None]
  assert spec[0]["cold"] and not any(c["cold"] for c in spec[1:])
  assert len(sel.updates) == len(spec) - 1


def _sample_counts(engine, params, prompt, plen, n, max_new, key, **kw):
  toks = np.tile(prompt, (n, 1))
  lens = np.tile(plen, n)
  return engine.generate(params, toks, lens, max_new, key, **kw).tokens


def _chi2_p(a, b, min_count=5):
  ca, cb = Counter(a), Counter(b)
  keys = sorted(set(ca) | set(cb))
  rows = [[ca[k], cb[k]] for k in keys if ca[k] + cb[k] >= min_count]
  rare = [ca[k] + cb[k] < min_count for k in keys]
  if any(rare):
    rows.append([sum(ca[k] for k, r in zip(keys, rare) if r), sum(cb[k] for k, r in zip(keys, rare) if r)])
  if len(rows) < 2:
    return 1.0
  return chi2_contingency(np.asarray(rows).T)[1]


@pytest.mark.parametrize("drafter,strategy", [("good", Strategy(3, 2, 4)), ("bad", Strategy(3, 2, 4)),
                                              ("good", Strategy(4, 1, 4))])
def test_sampling_distribution_matches_plain(models, prompts, drafter, strategy):
  """Chi-square two-sample tests on the next token, the 2nd token and the 3-token sequence."""
  sp = SamplingParams(temperature=1.0, top_p=0.9)
  g, params = models["target"]
  plain, spec = _engines(models, sp, strategies=(Strategy(3, 2, 4), Strategy(4, 1, 4)))
  toks, plen = prompts
  # a prompt whose continuation is uncertain at every step
  prompt, length = toks[1:2], plen[1:2]
  n = 1024
  a = _sample_counts(plain, params, prompt, length, n, 3, jax.random.key(11))
  b = _sample_counts(spec, params, prompt, length, n, 3, jax.random.key(12), drafter_params=models[drafter][1],
                     selector=FixedSelector(strategy))
  for name, fa, fb in [("t1", a[:, 0], b[:, 0]), ("t2", a[:, 1], b[:, 1]),
                       ("seq", [tuple(r) for r in a], [tuple(r) for r in b])]:
    assert len(set(fa)) > 1 or name == "t1"
    p = _chi2_p(list(fa), list(fb))
    assert p > 1e-3, (name, p)
  # and the test has power: a different temperature is detected
  hot = RolloutEngine(g, SamplingParams(temperature=2.0, top_p=0.9), eos_ids=EOS, chunk_size=4)
  c = _sample_counts(hot, params, prompt, length, n, 3, jax.random.key(13))
  assert _chi2_p([tuple(r) for r in a], [tuple(r) for r in c]) < 1e-3


def test_logprobs_are_target_logprobs(models, prompts):
  """Sampled speculative outputs carry the target's log_softmax(logits / T) of each token."""
  sp = SamplingParams(temperature=1.0, top_k=8)
  g, params = models["target"]
  _, spec = _engines(models, sp, strategies=(Strategy(3, 2, 4),))
  toks, plen = prompts
  out = spec.generate(params, toks, plen, 20, jax.random.key(3), drafter_params=models["good"][1])
  assert out.stats["spec_accept_len"] > 1.5
  model = nnx.merge(g, params)
  for i in range(len(plen)):
    seq = np.concatenate([toks[i, :plen[i]], out.tokens[i, :out.lengths[i]]])
    logits, _, _ = model(jnp.asarray(seq[None]))
    lp = policy_logprobs(logits[0, plen[i] - 1:-1], sp)
    ref = np.asarray(jnp.take_along_axis(lp, jnp.asarray(seq[plen[i]:, None]), axis=1)[:, 0])
    np.testing.assert_allclose(out.logprobs[i, :out.lengths[i]], ref, atol=2e-5)


def test_strategy_parsing_and_errors():
  assert Strategy.parse("d4k2n6") == Strategy(4, 2, 6)
  assert Strategy.parse([3, 1, 3]).name == "d3k1n3"
  with pytest.raises(ValueError, match="num_verify"):
    Strategy(2, 2, 5)
  with pytest.raises(ValueError, match="form"):
    Strategy.parse("depth4")


def test_sampling_params_errors():
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="temperature"):
    SamplingParams(temperature=-1.0)
  with pytest.raises(ValueError, match="top_k"):
    SamplingParams(top_k=-2)


def test_prompt_longer_than_context(models, prompts):
  g, params = models["target"]
  eng = RolloutEngine(g, SamplingParams(temperature=0.0), eos_ids=EOS, max_context=16)
  with pytest.raises(ValueError, match="exceeds the context"):
    eng.generate(params, *prompts, 40, jax.random.key(0))


def test_drafter_target_size_mismatch(models, prompts):
  sp = SamplingParams(temperature=0.0)
  _, spec = _engines(models, sp)
  wide = random_drafter(target_config(hidden_size=48, num_heads=4))
  with pytest.raises(ValueError, match="hidden_size=48 does not match the target's hidden_size=32"):
    spec.generate(models["target"][1], *prompts, 8, jax.random.key(0), drafter_params=nnx.split(wide)[1])


class _ListSelector:
  """Answers the strategies of `plan` in turn (then the last one)."""

  def __init__(self, plan):
    self.plan, self.i = list(plan), 0

  def select(self, batch_size):
    s = self.plan[min(self.i, len(self.plan) - 1)]
    self.i += 1
    return s

  def update(self, *outcome):
    pass


def test_each_chunk_program_compiles_once_per_kind(models, prompts):
  """Speculative and plain chunks in any order compile one program each: a plain chunk does not
  carry the drafter's cache, and the prefill's state and the empty drafter cache are committed
  like every chunk's output (jit keys on committedness; a mix compiled each program twice, the
  second time inside a timed, scored chunk)."""
  from tlt_jax.rollout.engine import PLAIN
  sp = SamplingParams(temperature=0.0)
  g, dg = models["target"][0], models["good"][0]
  strategy = Strategy(3, 1, 3)
  toks, plen = prompts
  uncommitted = lambda t: jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), t)  # noqa: E731
  committed = lambda t: jax.device_put(t, jax.devices()[0])  # noqa: E731
  # e.g. a policy from HF safetensors (uncommitted) and a drafter restored by orbax (committed)
  for place_t, place_d in [(uncommitted, committed), (uncommitted, uncommitted), (committed, committed)]:
    params, dparams = place_t(models["target"][1]), place_d(models["good"][1])
    dec = SpeculativeDecoder(g, dg, sp, EOS, strategies=(strategy,), rounds_per_chunk=2)
    eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=3, speculative=dec, spec_threshold=4096, compact=False)
    for plan in ([strategy, strategy, PLAIN, strategy, PLAIN, PLAIN], [PLAIN, PLAIN, strategy, strategy, PLAIN]):
      out = eng.generate(params, toks, plen, 40, jax.random.key(0), drafter_params=dparams,
                         selector=_ListSelector(plan))
      kinds = [c["strategy"] for c in out.stats["chunks"]]
      assert None in kinds and str(strategy) in kinds, kinds
    # the chunk and the drafter catch-up dispatched before it (SpeculativeDecoder.dispatch_sync)
    # keyed by kind (and the group's mesh and shape): one mesh here
    assert {k.kind: f._cache_size() for k, f in dec.programs.items()} == {(strategy, None): 1, ("sync",): 1}
    assert [f._cache_size() for f in eng.programs("chunk")] == [1]


def test_drafter_cache_is_fresh_after_a_plain_chunk(models, prompts):
  """[speculative, plain, speculative]: the drafter's cache is then what a fresh `drafter_prefill`
  of the same state gives at every committed slot, and the last chunk accepts exactly what an
  all-speculative control with a freshly prefilled drafter cache accepts from the same state."""
  from tlt_jax.rollout.engine import PLAIN
  from tlt_jax.rollout.speculative import drafter_prefill, speculative_chunk
  sp = SamplingParams(temperature=0.0)
  g, params = models["target"]
  dg, dparams = models["bad"]  # a random drafter: its cache entries depend on the whole context
  strategy = Strategy(3, 1, 3)
  dec = SpeculativeDecoder(g, dg, sp, EOS, strategies=(strategy,), rounds_per_chunk=3)
  eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=6, speculative=dec, spec_threshold=4096, compact=False)
  toks, plen = prompts
  session = eng.start(params, toks, plen, 48, jax.random.key(0), drafter_params=dparams,
                      selector=_ListSelector([strategy, PLAIN, strategy, strategy]))
  copy = lambda st: jax.tree.map(jnp.copy, st)  # noqa: E731
  session.advance()  # speculative chunk dispatched
  session.advance()  # plain chunk dispatched
  session.advance()  # speculative chunk dispatched
  # the state the last speculative chunk started from: replay the engine's own first two chunks
  session2 = eng.start(params, toks, plen, 48, jax.random.key(0), drafter_params=dparams,
                       selector=_ListSelector([strategy, PLAIN, strategy]))
  session2.advance()
  session2.advance()
  after_plain = copy(session2.state)
  final = copy(session.state)
  session.advance()  # collects the last speculative chunk's statistics
  assert [c["strategy"] for c in session.chunks] == [str(strategy), None, str(strategy)]
  last = session.chunks[2]
  assert last["row_rounds"] > 0

  # (1) the drafter cache equals a fresh prefill at every committed slot of every row
  dcache = final.draft_cache
  fresh = drafter_prefill(g, dg, params, dparams, final, capacity=dcache.capacity)
  upto = np.minimum(np.asarray(dcache.lengths), np.asarray(final.cache.lengths) - 1)
  assert upto.min() > 6, upto  # the plain chunk's positions are among the compared slots
  for got_l, want_l in zip(dcache.k + dcache.v, fresh.k + fresh.v):
    for b, n in enumerate(upto):
      assert_close(np.asarray(got_l[b, :, :n]), np.asarray(want_l[b, :, :n]), rtol=1e-5, atol=1e-6)  # [K, S, D]

  # (2) an all-speculative control from the state after the plain chunk, its drafter cache
  # prefilled explicitly, accepts the same tokens
  ctl_cache = drafter_prefill(g, dg, params, dparams, after_plain,
                              capacity=dec.draft_capacity(after_plain.seq_BxS.shape[1]))
  chunk = jax.jit(functools.partial(speculative_chunk, g, dg, strategy=strategy, num_rounds=3, sp=sp,
                                    eos_ids=EOS, catchup_width=dec.max_depth + 1))
  ctl_state, (rounds, tokens, row_rounds) = chunk(params, dparams, after_plain.replace(draft_cache=ctl_cache))
  assert (int(tokens), int(row_rounds)) == (last["tokens"], last["row_rounds"])
  np.testing.assert_array_equal(np.asarray(ctl_state.seq_BxS), np.asarray(final.seq_BxS))


@pytest.mark.parametrize("speculate", [False, True])
def test_batch_above_the_bucket_ladder(models, prompts, speculate):
  """A group of 12 rows with a ladder that stops at 4 (plain) or 8 (speculative below 2 live rows):
  the state keeps its own 12 rows until the live rows fit the largest bucket, then compacts down
  the ladder. Greedy outputs equal those of an engine whose ladder covers the batch."""
  sp = SamplingParams(temperature=0.0)
  g, params = models["target"]
  toks, plen = (np.concatenate([x, x]) for x in prompts)
  max_new = np.array([3, 5, 30, 8, 24, 2, 7, 1, 16, 4, 12, 6])  # rows finish one by one
  ref = _engines(models, sp)[0].generate(params, toks, plen, max_new, jax.random.key(0))
  if speculate:
    dec = SpeculativeDecoder(g, models["good"][0], sp, EOS, strategies=[STRATEGIES[1]], rounds_per_chunk=3)
    eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=2, buckets=(1, 2, 4, 8), speculative=dec,
                        spec_threshold=2)
    out = eng.generate(params, toks, plen, max_new, jax.random.key(0), drafter_params=models["good"][1],
                       selector=FixedSelector(STRATEGIES[1]))
    assert out.stats["spec_chunks"], "speculation never switched on"
  else:
    eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=2, buckets=(1, 2, 4))
    out = eng.generate(params, toks, plen, max_new, jax.random.key(0))
  trace = out.stats["active_trace"]
  assert trace[0] > max(eng.buckets) and min(trace) <= 2, trace  # above the ladder, then down it
  np.testing.assert_array_equal(out.lengths, ref.lengths)
  np.testing.assert_array_equal(out.finished, ref.finished)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
