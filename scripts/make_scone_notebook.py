"""Writes colab/scone.ipynb: SCONE's contextual f-gram embeddings (Yu et al. 2025) end to end at a
small size: offline corpus, streaming f-gram counting, longest-suffix matching, joint training,
the exported host table, and decoding through the rollout engine with the table.
Run from the repository root: python scripts/make_scone_notebook.py"""

import os

import nbformat as nbf

from notebook_cells import SETUP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

nb = nbf.v4.new_notebook()
cells = []
md = lambda s: cells.append(nbf.v4.new_markdown_cell(s))  # noqa: E731
code = lambda s: cells.append(nbf.v4.new_code_cell(s))  # noqa: E731

md("""# SCONE: a larger input embedding at fixed inference FLOPs

Yu et al. (2025), *Scaling Embedding Layers in Language Models*. The token vocabulary stays; frequent
n-grams (**f-grams**, 2 ≤ n ≤ max_n) get contextual embeddings:

* at each position the input embedding is that of the **longest f-gram ending at the token** (else the
  token embedding);
* during training a separate small transformer, the **f-gram model**, computes those embeddings and is
  trained jointly with the main model;
* for inference the f-gram model is run once over all f-grams into a **table kept in host memory**; each
  device step receives only the looked-up `[B, T, D]` rows. The main model's FLOPs do not change.

Code: `tlt_jax/data/fgram.py` (counting, matching), `tlt_jax/models/scone.py` (model, table, lookup),
`tlt_jax/models/scone_train.py`, `experiments/scone.py` (the full grid).""")
code(SETUP)
code("""# 'notebook' (a few minutes on a CPU) or 'test' (seconds)
SIZE = os.environ.get('SCONE_NOTEBOOK_SIZE', 'notebook')
S = dict(notebook=dict(chars=400_000, steps=300, batch=16, seq=128, vf=4096, width=64, eval=16, new=48),
         test=dict(chars=30_000, steps=12, batch=4, seq=32, vf=256, width=16, eval=2, new=8))[SIZE]
print(SIZE, S)""")

md("""## 1. An offline natural-language corpus

Python standard-library docstrings, the documentation Debian packages ship in `/usr/share/doc`, and this
codebase's own `arith` task traces (`tlt_jax/data/fgram_corpus.py`; the manifest hashes each source).""")
code("""import tempfile, numpy as np
from tlt_jax.data import fgram_corpus
corpus_dir = tempfile.mkdtemp(prefix='scone_corpus_')
manifest = fgram_corpus.prepare(corpus_dir, max_chars_per_source=S['chars'], num_traces=200)
train, val, _ = fgram_corpus.load(corpus_dir)
tok = fgram_corpus.tokenizer()
print({k: v['chars'] for k, v in manifest['sources'].items()}, 'train tokens', train.size, 'val tokens', val.size)
print(repr(tok.decode(train[:160])))""")

md("""## 2. Streaming f-gram counting and longest-suffix matching

The counter streams chunks through a bounded Misra–Gries summary (exact while the distinct n-grams fit);
matching hashes every suffix of every context and probes the sorted f-gram hashes, verifying tokens.""")
code("""import time
from tlt_jax.data.fgram import NgramCounter, sequence_contexts
MAX_N = 6
counter = NgramCounter(MAX_N, capacity=1 << 20)
for chunk in np.array_split(np.asarray(train), 16):
  counter.update(chunk)
vocab = counter.top(S['vf'])
print('n-grams counted', counter.total, 'distinct', counter.keys.size, 'error bound', counter.error_bound)
for i in [0, 1, 2, vocab.size // 2, vocab.size - 1]:
  print(f'f-gram {i}: {tok.decode(int(t) for t in vocab.tokens_FxN[i] if t >= 0)!r} x{vocab.counts_F[i]}')
ctx = sequence_contexts(np.asarray(val[:64 * 64]).reshape(64, 64), MAX_N)
t0 = time.perf_counter(); ids = vocab.match(ctx); dt = time.perf_counter() - t0
print(f'matched {ids.size} positions in {dt * 1e3:.1f} ms ({ids.size / dt:,.0f} positions/s); match rate {(ids >= 0).mean():.2f}')""")

md("""## 3. Joint training, then the exported table

Same main model and data order with and without SCONE; perplexity is measured through the host table,
the way inference runs.""")
code("""from tlt_jax.models import scone
from tlt_jax.models.config import ModelConfig
from tlt_jax.models.scone_train import train_lm, eval_lm, eval_windows
cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=S['width'], intermediate_size=3 * S['width'], num_layers=2,
                  num_heads=4, num_kv_heads=2, max_position_embeddings=256)
scfg = scone.SconeConfig(fgram_vocab_size=vocab.size, max_n=MAX_N, fgram_layers=1, fgram_hidden=S['width'], fgram_heads=4)
kw = dict(steps=S['steps'], batch_size=S['batch'], seq_len=S['seq'], lr=3e-3, warmup_steps=max(S['steps'] // 10, 1))
val_tokens = eval_windows(val, S['eval'] * S['batch'], S['seq'])
results = {}
runs = (('baseline', None), ('scone', scfg)) if SIZE == 'notebook' else (('scone', scfg),)  # test: SCONE only
for name, sc in runs:
  model = scone.build_model(cfg, sc, seed=0)
  stats = train_lm(model, vocab if sc else None, train, **kw)
  table = scone.build_table(model, vocab) if sc else None
  results[name] = (model, table, eval_lm(model.main if sc else model, table, val_tokens, S['batch']))
  print(f"{name:8s} val ppl {results[name][2]['val_ppl']:.3f}  train {stats['train_s']:.1f} s")
model, table, _ = results['scone']""")
code("""import jax.numpy as jnp
from tlt_jax.models.scone import HostTable
toks = np.asarray(val_tokens[:2])
ft, idx = scone.fgram_batch(vocab, toks)
x_train = np.asarray(model.input_embeddings(jnp.asarray(toks), jnp.asarray(ft), jnp.asarray(idx)))
x_table = np.asarray(table.embed_sequences(model.main, toks))
print('training-time embeddings equal the table lookups:', np.allclose(x_train, x_table, atol=1e-6, rtol=1e-5),
      f'(max diff {np.abs(x_train - x_table).max():.1e})')
path = table.save(os.path.join(corpus_dir, 'fgram_table.safetensors'))
table = HostTable.load(path)
print(f'table {table.table_FxD.shape} in host RAM: {table.nbytes / 2**20:.2f} MB (file {os.path.getsize(path) / 2**20:.2f} MB)')""")

md("""## 4. Decoding with the host table

The rollout engine takes the table as `input_embedder`: prefill and every decode step (plain or
speculative) call a host lookup for the tokens in flight. Greedy cached decoding equals greedy decoding by
full forwards; the lookup's cost shows in tokens/s.""")
code("""import jax
from flax import nnx
from tlt_jax.rollout.engine import RolloutEngine
from tlt_jax.rollout.sampling import SamplingParams
g, params = nnx.split(model.main)
prompts = np.asarray(eval_windows(val[len(val) // 2:], 4, 16)); plen = np.full((4,), 16, np.int32)
new = S['new']
embedders = (('plain', None), ('scone', table)) if SIZE == 'notebook' else (('scone', table),)
engines = {name: RolloutEngine(g, SamplingParams(temperature=0.0), eos_ids=(0,), chunk_size=8, compact=False,
                               input_embedder=emb) for name, emb in embedders}
out = engines['scone'].generate(params, prompts, plen, new, jax.random.key(0))

@jax.jit
def logits_of(p, t):
  m = nnx.merge(g, p)
  pos = jnp.broadcast_to(jnp.arange(t.shape[1], dtype=jnp.int32), t.shape)
  return m(t, input_embeds_BxTxD=table.embed_positions(m, t, pos))[0]
seq = np.concatenate([prompts, np.zeros((4, new), np.int32)], 1)
for i in range(new):
  seq[:, 16 + i] = np.asarray(logits_of(params, jnp.asarray(seq)))[:, 15 + i].argmax(-1)
assert (seq[:, 16:] == out.tokens).all()
print('cached decode equals full forward, greedy:', repr(tok.decode(out.tokens[0])))
for name, eng in engines.items():
  eng.generate(params, prompts, plen, new, jax.random.key(0))
  t0 = time.perf_counter(); o = eng.generate(params, prompts, plen, new, jax.random.key(1)); dt = time.perf_counter() - t0
  print(f'{name:6s} decode {o.lengths.sum() / dt:,.0f} tok/s (batch 4)')""")
md("""The full grid (|V_f| ∈ {0, 1k, 8k, 64k} × two f-gram model sizes, FLOPs, host RAM, decode cost) is
`python experiments/scone.py`; its measured table is in `experiments/results/scone/REPORT.md`.""")

nb["cells"] = cells
nb["metadata"] = {"kernelspec": {"name": "python3", "display_name": "Python 3"}, "language_info": {"name": "python"}}
nbf.write(nb, os.path.join(ROOT, "colab", "scone.ipynb"))
print("wrote colab/scone.ipynb")
