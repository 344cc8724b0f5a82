"""SCONE: f-gram counting and longest-suffix matching against brute force, training-time
embeddings equal to the exported host table's, cached (engine) decoding with the table equal to
full-forward decoding (plain and speculative), SCONE off bitwise the plain model, checkpoints
that rebuild the table."""

from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.numerics import assert_close
from tests.spec_fixtures import random_drafter
from tlt_jax.data.fgram import NO_TOKEN, FgramVocab, NgramCounter, build_vocab, sequence_contexts
from tlt_jax.errors import ConfigError
from tlt_jax.models import scone
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import init_model
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rollout.engine import FixedSelector, RolloutEngine
from tlt_jax.rollout.sampling import SamplingParams
from tlt_jax.rollout.speculative import SpeculativeDecoder, Strategy

V, MAX_N, EOS = 24, 4, (2,)


def _docs(seed=0, n_docs=6, length=300):
  """Token streams built from a few recurring phrases plus noise: long f-grams recur."""
  rng = np.random.default_rng(seed)
  phrases = [rng.integers(3, V, size=rng.integers(2, 6)) for _ in range(8)]
  docs = []
  for _ in range(n_docs):
    parts = [phrases[i] if rng.random() < 0.7 else rng.integers(3, V, size=2)
             for i in rng.integers(0, len(phrases), size=length // 3)]
    docs.append(np.concatenate(parts)[:length])
  return docs


def _brute_counts(docs, max_n):
  c = Counter()
  for d in docs:
    d = [int(x) for x in d]
    for n in range(2, max_n + 1):
      for i in range(len(d) - n + 1):
        c[tuple(d[i:i + n])] += 1
  return c


@pytest.fixture(scope="module")
def setup():
  docs = _docs()
  vocab, _ = build_vocab(docs, 120, MAX_N)
  cfg = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                    num_kv_heads=2, max_position_embeddings=128)
  scfg = scone.SconeConfig(fgram_vocab_size=120, max_n=MAX_N, fgram_layers=1, fgram_hidden=32, fgram_heads=4)
  model = scone.build_model(cfg, scfg, seed=0)
  table = scone.build_table(model, vocab)
  return dict(docs=docs, vocab=vocab, cfg=cfg, scfg=scfg, model=model, table=table)


def test_counter_streaming_exact_and_bounded(setup):
  docs = setup["docs"]
  truth = _brute_counts(docs, MAX_N)
  # Exact when the distinct n-grams fit, whatever the chunking.
  c = NgramCounter(MAX_N, capacity=1 << 20)
  rng = np.random.default_rng(1)
  for d in docs:
    c.new_document()
    cuts = np.sort(rng.choice(np.arange(1, len(d)), size=7, replace=False))
    for piece in np.split(d, cuts):
      c.update(piece)
  got = {tuple(int(t) for t in row if t != NO_TOKEN): int(n) for row, n in zip(c.tokens, c.counts)}
  assert got == dict(truth) and c.total == sum(truth.values()) and c.error_bound == 0
  # Bounded: at most `capacity` kept, undercounts within the Misra-Gries bound.
  cap = 150
  small = NgramCounter(MAX_N, capacity=cap)
  for d in docs:
    small.new_document()
    for piece in np.array_split(d, 5):
      small.update(piece)
  assert len(small.keys) <= cap and 0 < small.error_bound <= small.total / (cap + 1)
  est = {tuple(int(t) for t in row if t != NO_TOKEN): int(n) for row, n in zip(small.tokens, small.counts)}
  for g, n in truth.items():
    assert n - small.error_bound <= est.get(g, 0) <= n
  heavy = [g for g, n in truth.items() if n > small.error_bound]
  assert heavy and all(g in est for g in heavy)  # Misra-Gries keeps every heavy hitter


def test_longest_suffix_matches_brute_force(setup):
  vocab = setup["vocab"]
  grams = {tuple(int(t) for t in row if t != NO_TOKEN): i for i, row in enumerate(vocab.tokens_FxN)}
  rng = np.random.default_rng(2)
  seqs = np.stack([np.concatenate(setup["docs"])[s:s + 40] for s in rng.integers(0, 1500, 16)])
  seqs[:4, :5] = rng.integers(3, V, (4, 5))
  ids = vocab.match_sequences(seqs)
  for b in range(seqs.shape[0]):
    for t in range(seqs.shape[1]):
      want = -1
      for n in range(2, MAX_N + 1):
        if t - n + 1 >= 0 and tuple(int(x) for x in seqs[b, t - n + 1:t + 1]) in grams:
          want = grams[tuple(int(x) for x in seqs[b, t - n + 1:t + 1])]
      assert ids[b, t] == want, (b, t)
  assert (ids >= 0).mean() > 0.3
  ctx = sequence_contexts(seqs, MAX_N).reshape(-1, MAX_N)  # decode-sized batches take the dict path
  small = np.concatenate([vocab.match(part) for part in np.array_split(ctx, 16)])
  np.testing.assert_array_equal(small, ids.reshape(-1))
  assert (vocab.lengths_F[ids[ids >= 0]] >= 3).any()  # longer f-grams really won over shorter


def test_training_embeddings_equal_table_and_gradients_reach_both(setup):
  model, vocab, table = setup["model"], setup["vocab"], setup["table"]
  tokens = np.stack([d[:32] for d in setup["docs"][:3]]).astype(np.int32)
  ft, idx = scone.fgram_batch(vocab, tokens)
  assert (idx >= 0).any() and ft.shape[0] >= (idx.max() + 1)
  x_train = model.input_embeddings(jnp.asarray(tokens), jnp.asarray(ft), jnp.asarray(idx))
  x_table = table.embed_sequences(model.main, tokens)
  assert_close(np.asarray(x_train), np.asarray(x_table))
  plain = np.asarray(model.main.embed(jnp.asarray(tokens)))
  np.testing.assert_array_equal(np.asarray(x_table)[idx < 0], plain[idx < 0])
  assert np.abs(np.asarray(x_table)[idx >= 0] - plain[idx >= 0]).max() > 1e-3

  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    logits, _, _ = nnx.merge(graphdef, p)(jnp.asarray(tokens), jnp.asarray(ft), jnp.asarray(idx))
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.asarray(tokens)[..., None], -1)[..., 0])

  grads = jax.jit(jax.grad(loss))(params)
  assert float(jnp.abs(grads["fgram"]["out_proj"]["kernel"][...]).max()) > 0
  assert float(jnp.abs(grads["fgram"]["encoder"]["embed_tokens"][...]).max()) > 0
  assert float(jnp.abs(grads["main"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]).max()) > 0


def test_tree_contexts_match_path_walk():
  rng = np.random.default_rng(3)
  b, s, n = 2, 12, MAX_N
  seq = rng.integers(3, V, (b, s)).astype(np.int32)
  L = np.array([1, 6], np.int32)
  par = np.array([[-1, 0, 1, 0, 3, 2], [-1, 0, 0, 1, 2, 4]], np.int32)
  depth = np.zeros_like(par)
  for r in range(b):
    for j in range(1, par.shape[1]):
      depth[r, j] = depth[r, par[r, j]] + 1
  tok = rng.integers(3, V, par.shape).astype(np.int32)
  tok[:, 0] = seq[np.arange(b), L]
  pos = L[:, None] + depth
  got = np.asarray(scone.tree_contexts(jnp.asarray(seq), jnp.asarray(tok), jnp.asarray(pos), jnp.asarray(par), n))
  for r in range(b):
    for j in range(par.shape[1]):
      path, cur = [], j
      while cur >= 0:
        path.append(int(tok[r, cur]))
        cur = int(par[r, cur])
      full = [int(x) for x in seq[r, :L[r]]] + path[::-1]
      want = ([NO_TOKEN] * n + full)[-n:]
      assert list(got[r, j]) == want, (r, j)


def _full_forward_greedy(model, table, prompts, plen, steps):
  """Greedy decoding by a whole-sequence forward per step (no cache), the table's embeddings
  looked up for every position; rows right-padded to one width (one compile)."""
  g, params = nnx.split(model.main)

  @jax.jit
  def logits_of(p, toks):
    m = nnx.merge(g, p)
    pos = jnp.broadcast_to(jnp.arange(toks.shape[1], dtype=jnp.int32), toks.shape)
    return m(toks, input_embeds_BxTxD=table.embed_positions(m, toks, pos))[0]

  seq = np.zeros((len(plen), int(plen.max()) + steps), np.int32)
  seq[:, :prompts.shape[1]] = prompts
  lens = plen.copy()
  for _ in range(steps):
    logits = np.asarray(logits_of(params, jnp.asarray(seq)))
    seq[np.arange(len(lens)), lens] = logits[np.arange(len(lens)), lens - 1].argmax(-1)
    lens += 1
  return seq, np.asarray(jax.nn.log_softmax(logits_of(params, jnp.asarray(seq)), -1))


def test_cached_decode_with_table_equals_full_forward(setup):
  model, table, cfg = setup["model"], setup["table"], setup["cfg"]
  prompts = np.stack([d[5:13] for d in setup["docs"][:3]]).astype(np.int32)
  plen = np.array([8, 5, 7], np.int32)
  for i, p in enumerate(plen):
    prompts[i, p:] = 0
  steps = 10
  sp = SamplingParams(temperature=0.0)
  g, params = nnx.split(model.main)
  eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4, input_embedder=table, compact=False)
  out = eng.generate(params, prompts, plen, steps, jax.random.key(0))
  ref_seq, ref_logp = _full_forward_greedy(model, table, prompts, plen, steps)
  for i in range(len(plen)):
    k = out.lengths[i]
    np.testing.assert_array_equal(out.tokens[i, :k], ref_seq[i, plen[i]:plen[i] + k])
    positions = np.arange(plen[i] - 1, plen[i] - 1 + k)
    assert_close(out.logprobs[i, :k], ref_logp[i, positions, out.tokens[i, :k]], rtol=1e-4)
  assert out.lengths.max() == steps and out.lengths.sum() > steps  # decoding really ran
  # Speculative decoding (a draft tree, random drafter) commits the same tokens.
  dg, dparams = nnx.split(random_drafter(cfg))
  dec = SpeculativeDecoder(g, dg, sp, EOS, strategies=(Strategy(2, 2, 3),), rounds_per_chunk=3,
                           input_embedder=table)
  spec = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4, speculative=dec, spec_threshold=64,
                       input_embedder=table, compact=False)
  s_out = spec.generate(params, prompts, plen, steps, jax.random.key(0), drafter_params=dparams)
  np.testing.assert_array_equal(s_out.tokens, out.tokens)
  assert s_out.stats["spec_chunks"]


def test_scone_off_is_bitwise_the_plain_model(setup):
  cfg = setup["cfg"]
  off = scone.build_model(cfg, scone.SconeConfig(fgram_vocab_size=0), seed=0)
  plain = init_model(cfg, seed=0)
  assert type(off) is type(plain)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(off), nnx.state(plain))
  jax.tree.map(np.testing.assert_array_equal, nnx.state(setup["model"].main), nnx.state(plain))  # same init
  tokens = jnp.asarray(np.stack([d[:16] for d in setup["docs"][:2]]), jnp.int32)
  g, params = nnx.split(plain)

  def fwd(p, t, explicit):
    m = nnx.merge(g, p)
    return m(t, input_embeds_BxTxD=m.embed(t) if explicit else None)[0]

  a = jax.jit(fwd, static_argnums=2)(params, tokens, False)
  b = jax.jit(fwd, static_argnums=2)(params, tokens, True)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # An engine without an embedder compiles the plain programs: no host callback anywhere.
  sp = SamplingParams(temperature=0.0)
  prompts, plen = np.asarray(tokens[:, :6]), np.array([6, 4], np.int32)
  plain_eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4)
  off_eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4, input_embedder=None)
  args = (params, jnp.asarray(prompts), jnp.asarray(plen), jnp.asarray([4, 4], jnp.int32), jax.random.key(0))
  mesh = mesh_lib.mesh_of(params)
  text = [e.jits.prefill(mesh, params, prompts.shape, 16).lower(*args).as_text() for e in (plain_eng, off_eng)]
  assert text[0] == text[1] and "callback" not in text[0]
  state = plain_eng.jits.prefill(mesh, params, prompts.shape, 16)(*args)
  chunk = [e.jits.chunk(mesh, params, state, None).lower(params, state).as_text() for e in (plain_eng, off_eng)]
  assert chunk[0] == chunk[1] and "callback" not in chunk[0]
  tab_eng = RolloutEngine(g, sp, eos_ids=EOS, chunk_size=4, input_embedder=setup["table"])
  assert "callback" in tab_eng.jits.chunk(mesh, params, state, None).lower(params, state).as_text()


def test_checkpoint_and_table_file_rebuild_the_table(setup, tmp_path):
  model, vocab, table = setup["model"], setup["vocab"], setup["table"]
  scone.save_checkpoint(str(tmp_path / "ckpt"), 7, model, vocab, {"note": "test"})
  restored, rvocab, meta = scone.load_checkpoint(str(tmp_path / "ckpt"))
  assert meta["note"] == "test" and restored.scone == model.scone
  np.testing.assert_array_equal(rvocab.tokens_FxN, vocab.tokens_FxN)
  np.testing.assert_array_equal(scone.build_table(restored, rvocab).table_FxD, table.table_FxD)
  path = table.save(str(tmp_path / "table.safetensors"))
  loaded = scone.HostTable.load(path)
  np.testing.assert_array_equal(loaded.table_FxD, table.table_FxD)
  ctx = sequence_contexts(np.stack([d[:20] for d in setup["docs"][:2]]), MAX_N)
  np.testing.assert_array_equal(loaded.lookup(ctx)[0], table.lookup(ctx)[0])


def test_config_errors():
  with pytest.raises(ConfigError, match="scone.max_n"):
    scone.SconeConfig(fgram_vocab_size=10, max_n=1)
  with pytest.raises(ConfigError, match="fgram_heads"):
    scone.SconeConfig(fgram_hidden=30, fgram_heads=4)
  with pytest.raises(ConfigError, match="unknown scone config keys"):
    scone.SconeConfig.from_mapping({"fgram_vocab": 3})
  with pytest.raises(Exception, match="duplicate"):
    FgramVocab(np.array([[NO_TOKEN, 3, 4], [NO_TOKEN, 3, 4]]), np.array([2, 1]))
