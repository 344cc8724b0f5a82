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
  assert {k.kind: f._cache_size() for k, f in dec.programs.items()} == {(strategy, None): 1, ("sync",): 1}
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
