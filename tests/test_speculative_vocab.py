"""The reduced draft vocabulary (EAGLE-3's) and the drafter's live window keep speculative
decoding lossless: greedy equals plain greedy token for token and sampled outputs keep the plain
sampler's distribution with a draft vocabulary that misses tokens the target emits (those come
from the target's own draw, as bonus tokens); a refresh of the draft vocabulary reuses the
compiled chunks; a chunk's drafter reads only its live window."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.spec_fixtures import EOS, VOCAB
from tests.test_speculative import STRATEGIES, _chi2_p, _sample_counts, models, prompts  # noqa: F401
from tlt_jax.rollout.decode import live_window
from tlt_jax.rollout.engine import PLAIN, FixedSelector, RolloutEngine
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.speculative import SpeculativeDecoder, Strategy, draft_window, drafter_prefill, speculative_chunk
from tlt_jax.tlt.draft_vocab import DraftVocabCounter

SMALL = np.random.default_rng(3).permutation(VOCAB)[:10].astype(np.int32)  # 10 of the 32 ids
PERM = np.random.default_rng(4).permutation(VOCAB).astype(np.int32)  # every id, in another order
_ENGINES = {}
# one worker runs the file, so the engines (and their compiled chunks) are shared by its tests
pytestmark = pytest.mark.xdist_group("draft_vocab")


def _engines(models, sp, ids, strategies=tuple(STRATEGIES)):
  """(plain, speculative) engines; the speculative one drafts among `ids` (None: all)."""
  key = (sp, None if ids is None else len(ids), tuple(strategies))
  if key not in _ENGINES:
    g, _ = models["target"]
    # without compaction: one program per strategy (compaction is covered by test_speculative)
    plain = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4, compact=False)
    dec = SpeculativeDecoder(g, models["good"][0], sp, EOS, strategies=strategies, rounds_per_chunk=3,
                             draft_vocab_size=0 if ids is None else len(ids))
    _ENGINES[key] = plain, RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4, speculative=dec, spec_threshold=4096,
                                         compact=False)
  plain, spec = _ENGINES[key]
  if ids is not None:
    spec.speculative.set_draft_vocab(ids)
  return plain, spec


@pytest.mark.parametrize("drafter", ["good", "bad"])
def test_greedy_with_reduced_draft_vocab_equals_plain(models, prompts, drafter):
  sp = SamplingParams(temperature=0.0)
  _, params = models["target"]
  plain, spec = _engines(models, sp, SMALL)
  ref = plain.generate(params, *prompts, 40, jax.random.key(0))
  outside = ~np.isin(ref.tokens, SMALL) & (np.arange(ref.tokens.shape[1])[None] < ref.lengths[:, None])
  assert outside.sum() > 20, "the draft vocabulary should miss tokens the target emits"
  full = _engines(models, sp, None)[1]
  for strategy in STRATEGIES:
    out = spec.generate(params, *prompts, 40, jax.random.key(0), drafter_params=models[drafter][1],
                        selector=FixedSelector(strategy))
    np.testing.assert_array_equal(out.tokens, ref.tokens, err_msg=str(strategy))
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5)
    if drafter == "good":  # drafts are accepted, but fewer than with every token draftable
      base = full.generate(params, *prompts, 40, jax.random.key(0), drafter_params=models[drafter][1],
                           selector=FixedSelector(strategy))
      assert 1.0 < out.stats["spec_accept_len"] < base.stats["spec_accept_len"], strategy


def test_draft_vocab_of_every_id_drafts_what_the_full_vocab_does(models, prompts):
  """V_d = all ids in a permuted order: the index -> id mapping gives the full vocabulary's drafts,
  hence its acceptance, round for round."""
  sp = SamplingParams(temperature=0.0)
  _, params = models["target"]
  for strategy in (Strategy(3, 3, 6),):  # a tree: every draft level's top-k goes through the mapping
    runs = [eng.generate(params, *prompts, 40, jax.random.key(0), drafter_params=models["good"][1],
                         selector=FixedSelector(strategy)) for eng in (_engines(models, sp, PERM)[1],
                                                                        _engines(models, sp, None)[1])]
    assert [c["tokens"] for c in runs[0].stats["chunks"]] == [c["tokens"] for c in runs[1].stats["chunks"]]
    assert runs[0].stats["spec_accept_len"] == runs[1].stats["spec_accept_len"] > 1.5


@pytest.mark.parametrize("strategy", [Strategy(3, 2, 4), Strategy(4, 1, 4)])
def test_sampling_with_reduced_draft_vocab_matches_plain(models, prompts, strategy):
  """Chi-square two-sample tests on the 1st and 2nd tokens and the 3-token sequence, with a draft
  vocabulary of 6 ids that misses most of what the target samples."""
  sp = SamplingParams(temperature=1.0, top_p=0.9)
  _, params = models["target"]
  ids = SMALL[:6]
  plain, spec = _engines(models, sp, ids, strategies=(Strategy(3, 2, 4), Strategy(4, 1, 4)))
  toks, plen = prompts
  prompt, length = toks[1:2], plen[1:2]
  n = 1024
  a = _sample_counts(plain, params, prompt, length, n, 3, jax.random.key(11))
  b = _sample_counts(spec, params, prompt, length, n, 3, jax.random.key(12), drafter_params=models["good"][1],
                     selector=FixedSelector(strategy))
  assert (~np.isin(b, ids)).mean() > 0.3  # many samples lie outside the draft vocabulary
  for name, fa, fb in [("t1", a[:, 0], b[:, 0]), ("t2", a[:, 1], b[:, 1]),
                       ("seq", [tuple(r) for r in a], [tuple(r) for r in b])]:
    p = _chi2_p(list(fa), list(fb))
    assert p > 1e-3, (name, p)


def test_refresh_reuses_the_compiled_chunks(models, prompts):
  """A new draft vocabulary is an argument of the chunk: no program compiles again, and the new
  ids are the ones drafted (a vocabulary of every id accepts more than one of 10)."""
  sp = SamplingParams(temperature=0.0)
  g, params = models["target"]
  strategy = Strategy(3, 1, 3)
  dec = SpeculativeDecoder(g, models["good"][0], sp, EOS, strategies=(strategy,), rounds_per_chunk=3,
                           draft_vocab_size=VOCAB)
  eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4, speculative=dec, spec_threshold=4096, compact=False)
  accept = []
  for ids in (PERM, np.concatenate([SMALL, np.setdiff1d(np.arange(VOCAB), SMALL)[::-1]]), PERM[::-1]):
    dec.set_draft_vocab(ids)
    out = eng.generate(params, *prompts, 30, jax.random.key(0), drafter_params=models["good"][1],
                       selector=FixedSelector(strategy))
    accept.append(out.stats["spec_accept_len"])
  assert {k.kind: f._cache_size() for k, f in dec.programs.items()} == {(strategy, None): 1, ("sync",): 1,
                                                                       "subhead": 1}
  assert dec.subhead_builds == 3  # one per refresh
  assert accept[0] == accept[1] == accept[2]  # permutations of the full vocabulary draft the same
  small = SpeculativeDecoder(g, models["good"][0], sp, EOS, strategies=(strategy,), rounds_per_chunk=3,
                             draft_vocab_size=10)
  eng2 = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4, speculative=small, spec_threshold=4096, compact=False)
  small.set_draft_vocab(SMALL)
  out = eng2.generate(params, *prompts, 30, jax.random.key(0), drafter_params=models["good"][1],
                      selector=FixedSelector(strategy))
  assert out.stats["spec_accept_len"] < accept[0]


def test_draft_vocab_errors(models):
  sp = SamplingParams(temperature=0.0)
  g = models["target"][0]
  with pytest.raises(ValueError, match="below the largest strategy topk"):
    SpeculativeDecoder(g, models["good"][0], sp, EOS, strategies=(Strategy(3, 3, 6),), draft_vocab_size=2)
  dec = SpeculativeDecoder(g, models["good"][0], sp, EOS, strategies=(Strategy(3, 1, 3),), draft_vocab_size=4)
  np.testing.assert_array_equal(dec.draft_vocab, np.arange(4))
  for bad in ([1, 2, 3], [1, 1, 2, 3], [-1, 2, 3, 4]):
    with pytest.raises(ValueError, match="needs 4 distinct ids"):
      dec.set_draft_vocab(bad)
  with pytest.raises(ValueError, match="draft_vocab_size > 0"):
    SpeculativeDecoder(g, models["good"][0], sp, EOS).set_draft_vocab([1, 2])


def test_counter_top_ids_follow_the_recent_rollouts():
  c = DraftVocabCounter(vocab_size=8, size=3, decay=0.5)
  c.observe(np.array([[1, 1, 1, 2, 2, 7], [3, 3, 3, 3, 0, 0]]), lengths_B=np.array([5, 4]))  # 7 and 0s cut
  np.testing.assert_array_equal(c.ids(), [3, 1, 2])
  assert c.coverage(np.array([[1, 2, 5, 6]])) == 0.5
  for _ in range(2):  # the policy moves to 5 and 6: the old counts decay away
    c.observe(np.array([[5, 5, 5, 6, 6, 6]]))
  np.testing.assert_array_equal(c.ids(), [5, 6, 3])
  d = DraftVocabCounter(vocab_size=8, size=3)
  d.load_state_dict(c.state_dict())
  np.testing.assert_array_equal(d.ids(), c.ids())
  with pytest.raises(ValueError):
    DraftVocabCounter(vocab_size=8, size=9)


def test_drafter_reads_only_its_live_window(models, prompts):
  """A chunk with a live window never reads the drafter cache past `draft_window`: slots there set
  to NaN leave its outputs equal to a whole-cache chunk's (masked NaNs would still poison the
  softmax's weighted sum). The engine with a window block stays exact."""
  sp = SamplingParams(temperature=0.0)
  g, params = models["target"]
  dg, dparams = models["bad"]
  strategy = Strategy(3, 2, 4)
  dec = SpeculativeDecoder(g, dg, sp, EOS, strategies=(strategy,), rounds_per_chunk=3)
  eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4, speculative=dec, spec_threshold=4096, compact=False,
                      window_block=8)
  ref = _engines(models, sp, None)[0].generate(params, *prompts, 40, jax.random.key(0))
  out = eng.generate(params, *prompts, 40, jax.random.key(0), drafter_params=dparams,
                     selector=FixedSelector(strategy))
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  assert out.stats["spec_chunks"]

  session = eng.start(params, *prompts, 200, jax.random.key(0), drafter_params=dparams,
                      selector=FixedSelector(PLAIN))
  session.advance()
  session.advance()
  state = jax.tree.map(jnp.copy, session.state)
  cap = state.seq_BxS.shape[1]
  dcap = dec.draft_capacity(cap)
  state = state.replace(draft_cache=drafter_prefill(g, dg, params, dparams, state, capacity=dcap))
  bound = int(np.asarray(state.cache.lengths).max()) + dec.max_tokens_per_chunk(strategy) + dec.max_verify_tokens + 1
  window = live_window(bound, cap, 8)
  dwin = draft_window(window, cap, dcap)
  assert window is not None and dwin is not None and dwin < dcap
  poison = lambda c: c.at[:, :, dwin:].set(jnp.nan)  # noqa: E731
  dc = state.draft_cache
  poisoned = state.replace(draft_cache=dc.replace(k=tuple(map(poison, dc.k)), v=tuple(map(poison, dc.v))))
  run = lambda st, w: jax.jit(functools.partial(  # noqa: E731
      speculative_chunk, g, dg, strategy=strategy, num_rounds=3, sp=sp, eos_ids=EOS,
      catchup_width=dec.max_depth + 1, window=w))(params, dparams, st)
  got, (_, tok_a, _) = run(poisoned, window)
  want, (_, tok_b, _) = run(state, None)
  assert int(tok_a) == int(tok_b) > 0
  np.testing.assert_array_equal(np.asarray(got.seq_BxS), np.asarray(want.seq_BxS))
  assert np.isfinite(np.asarray(got.feat_BxSxD)).all()


@pytest.mark.parametrize("tied", [False, True])
def test_subhead_is_the_heads_columns(tied):
  """The sub-head program gathers exactly the draft vocabulary's columns of the head ([D, V] or
  the tied embeddings' transpose), in the activation dtype."""
  from flax import nnx

  from tests.spec_fixtures import copying_drafter, target_config
  from tlt_jax.models.transformer import Transformer
  from tlt_jax.parallel import mesh as mesh_lib
  cfg = target_config(tie_word_embeddings=tied)
  g, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(5)))
  dec = SpeculativeDecoder(g, nnx.split(copying_drafter(cfg))[0], SamplingParams(temperature=0.0), EOS,
                           strategies=(Strategy(3, 1, 3),), draft_vocab_size=10)
  mesh = mesh_lib.make_mesh((1, 1, 1), jax.devices()[:1])
  dec.set_draft_vocab(SMALL)
  w = dec.subhead(params, mesh)
  head = np.asarray(params["embed_tokens"][...]).T if tied else np.asarray(params["lm_head"][...])
  assert w.shape == (cfg.hidden_size, 10) and w.dtype == cfg.jnp_dtype
  np.testing.assert_array_equal(np.asarray(w), head[:, SMALL].astype(cfg.jnp_dtype))


def test_subhead_is_built_once_per_params_and_vocab(models, prompts):
  """The sub-head is built once per (policy parameters, draft vocabulary): the chunks of one
  rollout and a second rollout with the same parameters reuse it, a refresh or new parameters
  rebuild it (with the new columns), and no chunk program compiles again."""
  sp = SamplingParams(temperature=0.0)
  g, params = models["target"]
  strategy = Strategy(3, 1, 3)
  dec = SpeculativeDecoder(g, models["good"][0], sp, EOS, strategies=(strategy,), rounds_per_chunk=2,
                           draft_vocab_size=10)
  eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4, speculative=dec, spec_threshold=4096, compact=False)
  ref = _engines(models, sp, None)[0].generate(params, *prompts, 30, jax.random.key(0))
  run = lambda p: eng.generate(p, *prompts, 30, jax.random.key(0), drafter_params=models["good"][1],  # noqa: E731
                               selector=FixedSelector(strategy))
  dec.set_draft_vocab(SMALL)
  out = run(params)
  assert len(out.stats["spec_chunks"]) > 1 and dec.subhead_builds == 1  # every chunk of the rollout
  run(params)
  assert dec.subhead_builds == 1  # the same parameters: reused
  dec.set_draft_vocab(PERM[:10])
  run(params)
  assert dec.subhead_builds == 2  # a refresh
  new = jax.tree.map(jnp.copy, params)  # the policy update's new parameters (same values here)
  out = run(new)
  assert dec.subhead_builds == 3
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  (_, (_, _, w)), = dec._subheads.items()
  np.testing.assert_array_equal(np.asarray(w), np.asarray(new["lm_head"][...])[:, PERM[:10]])
  sizes = {k.kind: f._cache_size() for k, f in dec.programs.items()}
  assert sizes == {(strategy, None): 1, ("sync",): 1, "subhead": 1}, sizes


def _vocab_runtime(models):
  """A TLTRuntime of the default config on the tiny policy: a static drafter, a draft vocabulary
  of 8 of the 32 ids refreshed every RL step, greedy sampling, 2 rollout groups."""
  from tests.test_config import default_config
  from tlt_jax.drafter.eagle import EagleDrafter
  from tlt_jax.models.transformer import Transformer  # noqa: F401
  from tlt_jax.parallel.mesh import make_mesh
  from tlt_jax.run import drafter_bundle
  from tlt_jax.tlt.runtime import TLTRuntime
  from flax import nnx

  config = default_config()
  config.tlt.update(draft_vocab_size=8, draft_vocab_refresh=1, train_drafter=False,
                    strategies=("d3k1n3", "plain"))
  config.rollout.update(buckets=(4,), spec_threshold=4, chunk_size=4, rounds_per_chunk=2)
  g = models["target"][0]
  drafter = nnx.merge(*models["good"])
  assert isinstance(drafter, EagleDrafter)
  return TLTRuntime(config, g, models["cfg"], SamplingParams(temperature=0.0), EOS, 0,
                    make_mesh((2, 1, 1), jax.devices()[:2]), drafter_bundle(config, drafter), seq_len=64)


def test_runtime_refreshes_the_draft_vocab_losslessly_and_resumes_it(models, tmp_path):
  """Two RL steps of the TLT runtime with a draft vocabulary refreshed every step: after each
  step the chunks draft among the counter's top ids (checked against counts kept here), greedy
  output equals plain greedy decoding, and the counter and the vocabulary go through the run's
  checkpoint so that a resumed runtime continues with the same counts and ids."""
  import json

  from tlt_jax.tlt.scheduler import HostScheduler
  from tlt_jax.train.checkpoint import Checkpointer
  _, params = models["target"]
  rt = _vocab_runtime(models)
  dec = rt.engine.speculative
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, 32, (8, 5)).astype(np.int32)
  plens = np.full(8, 5, np.int32)
  max_new = np.array([6, 9, 12, 20, 24, 28, 30, 30], np.int32)
  counts = np.zeros(VOCAB)
  seen_vocab = [dec.draft_vocab]
  spec_chunks = 0
  for step in range(2):
    ref, _ = HostScheduler(rt.engine, rt.groups).rollout(params, prompts, plens, max_new, jax.random.key(step),
                                                         group_size=2)
    out, _ = rt.rollout(params, prompts, plens, max_new, jax.random.key(step), step=step, group_size=2)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    spec_chunks += len(out.stats["spec_chunks"])
    toks = [t for row, n in zip(out.tokens, out.lengths) for t in row[:n]]
    counts = 0.5 * counts + np.bincount(toks, minlength=VOCAB)
    want = np.argsort(-counts, kind="stable")[:8]
    np.testing.assert_array_equal(dec.draft_vocab, want)
    seen_vocab.append(dec.draft_vocab)
  assert spec_chunks > 0 and dec.vocab_version == 2
  assert not np.array_equal(seen_vocab[0], seen_vocab[1])  # the refresh replaced the initial ids
  assert dec.subhead_builds >= 1

  ckpt = Checkpointer(str(tmp_path), max_to_keep=1)
  ckpt.save(2, rt.checkpoint_tree(), {"tlt": rt.checkpoint_meta()})
  twin = _vocab_runtime(models)
  _, tree, meta = ckpt.restore_latest(twin.checkpoint_tree())
  ckpt.close()
  twin.restore(tree, json.loads(json.dumps(meta["tlt"])))
  np.testing.assert_array_equal(twin.engine.speculative.draft_vocab, dec.draft_vocab)
  np.testing.assert_array_equal(twin.draft_vocab.counts, rt.draft_vocab.counts)
  assert twin.draft_vocab.steps == rt.draft_vocab.steps == 2
  # the next RL step continues the same counts: both then draft among the same new ids
  outs = [r.rollout(params, prompts[:, ::-1], plens, max_new, jax.random.key(2), step=2, group_size=2)[0]
          for r in (rt, twin)]
  np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
  assert twin.draft_vocab.steps == 3
  np.testing.assert_array_equal(twin.engine.speculative.draft_vocab, dec.draft_vocab)
  np.testing.assert_array_equal(twin.draft_vocab.counts, rt.draft_vocab.counts)
