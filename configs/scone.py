"""SCONE (contextual f-gram input embeddings, models/scone.py) on the offline natural-language corpus.

  python experiments/scone.py --config=configs/scone.py [--config.train.steps=600]
  python experiments/scone.py --config=configs/scone.py:tiny    # seconds: tests and the notebook

`scone.fgram_vocab_size` = |V_f| (0: SCONE off, the plain model); `experiment.vocab_sizes` and
`experiment.fgram_models` ("<layers>x<width>") span the grid; the main model stays fixed.
`experiment.plain_models` ("<layers>x<hidden>", intermediate 3 x hidden) are the larger plain
baselines (about 2x and 4x the main model's parameters, so 2x and 4x its inference FLOPs), every
row trained with each of `experiment.seeds`. The f-gram models are no larger than the main model.
"""

import ml_collections

SIZES = ("", "tiny")


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in SIZES:
    raise ValueError(f"configs/scone.py:{arg}: unknown argument {arg!r}; allowed: {SIZES[1:]} (or none)")
  tiny = arg == "tiny"
  c = ml_collections.ConfigDict()
  c.seed = 0
  # Offline corpus (tlt_jax/data/fgram_corpus.py): prepared into `dir` when absent.
  c.corpus = ml_collections.ConfigDict(dict(
      dir="runs/scone_corpus_tiny" if tiny else "runs/scone_corpus",
      sources="stdlib,debian_doc,traces", max_chars_per_source=150_000 if tiny else 2_000_000,
      num_traces=300 if tiny else 3000))
  # The main model (fixed across the grid): a character-level LM.
  c.model = ml_collections.ConfigDict(dict(
      hidden_size=32 if tiny else 64, intermediate_size=96 if tiny else 192,
      num_layers=2, num_heads=4, num_kv_heads=2, max_position_embeddings=256,
      param_dtype="float32", dtype="float32"))
  c.scone = ml_collections.ConfigDict(dict(
      fgram_vocab_size=512 if tiny else 8192, max_n=6, fgram_layers=1, fgram_hidden=32 if tiny else 64,
      fgram_heads=4, fgram_intermediate=0, count_capacity=1 << 20))
  c.train = ml_collections.ConfigDict(dict(
      steps=40 if tiny else 150, batch_size=8 if tiny else 16, seq_len=64 if tiny else 128,
      lr=3e-3, warmup_steps=5 if tiny else 30, weight_decay=0.01, eval_batches=4 if tiny else 16))
  c.experiment = ml_collections.ConfigDict(dict(
      vocab_sizes=(0, 128, 512) if tiny else (0, 8192),
      fgram_models=("1x32",) if tiny else ("1x32", "2x56"),
      plain_models=("2x48",) if tiny else ("2x96", "2x128"),
      seeds=(0,) if tiny else (0, 1, 2),
      decode_batch=4 if tiny else 8, decode_prompt=16 if tiny else 32,
      decode_tokens=16 if tiny else 96, decode_repeats=1 if tiny else 3))
  return c
