"""SFT: packing is exact, the sharded step and gradient accumulation equal the plain step, and a
trivially learnable task is learned."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tlt_jax.data import CharTokenizer, Example
from tlt_jax.data.batching import make_sft_batch, pack_sft_batch, segment_mask
from tlt_jax.parallel.mesh import make_mesh, shard_batch
from tlt_jax.train.sft import make_sft_step, next_token_ce
from tlt_jax.train.state import create_train_state
from tests.tiny import random_state, tiny_config
from tests.numerics import assert_close

LETTERS = "abcdefgh"
TOKENIZER = CharTokenizer(LETTERS + "=")
ROWS, ROW_LEN = 8, 32


def _copy(x):
  """Fresh buffers: the jitted step donates its state, and create_train_state may alias params."""
  return jax.tree.map(jnp.array, x)


def _random_examples(n, seed):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    prompt = "".join(rng.choice(list(LETTERS), rng.integers(1, 6))) + "="
    trace = "".join(rng.choice(list(LETTERS), rng.integers(1, 8)))
    out.append(Example(prompt=prompt, trace=trace, answer=trace, prompt_id=i))
  return out


def _packed(examples, rows=ROWS, row_len=ROW_LEN):
  """pack_sft_batch over `examples` in order; returns the batch and the examples it holds."""
  it = iter(examples)
  batch = pack_sft_batch(lambda: next(it), TOKENIZER, rows, row_len)
  num_packed = int(batch["segment_ids"].max(axis=1).sum())
  return batch, examples[:num_packed]


@pytest.fixture(scope="module")
def setup():
  cfg = tiny_config()
  graphdef, params = random_state(cfg, seed=7)
  examples = _random_examples(40, seed=0)
  packed, held = _packed(examples)
  assert 2 * ROWS < len(held) < len(examples)  # several examples per row, and the batch is full
  tx = optax.sgd(0.3, momentum=0.9)  # smooth in the gradient, so small float differences stay small
  single = create_train_state(_copy(params), tx, None)
  step = make_sft_step(graphdef, tx, single, None)
  state, metrics = step(single, packed)
  after_one = jax.device_get((state.params, metrics))  # before the next call donates `state`
  state, metrics = step(state, packed)  # a second step exercises the momentum state
  after_two = jax.device_get((state.params, metrics))
  return dict(cfg=cfg, graphdef=graphdef, params=params, tx=tx, packed=packed, held=held,
              after_one=after_one, after_two=after_two)


def _assert_trees_close(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    assert_close(np.asarray(x), np.asarray(y), rtol=1e-4)


def _max_diff(a, b):
  return max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


# ----------------------------------------------------------------------------- packing


def test_packed_rows_keep_examples_whole_and_separate(setup):
  packed, held = setup["packed"], setup["held"]
  seg, pos = packed["segment_ids"], packed["positions"]
  k = 0
  for row in range(ROWS):
    for s in range(1, seg[row].max() + 1):
      cols = np.flatnonzero(seg[row] == s)
      expect = make_sft_batch([held[k]], TOKENIZER, len(cols))
      np.testing.assert_array_equal(packed["tokens"][row, cols], expect["tokens"][0])
      np.testing.assert_array_equal(packed["loss_mask"][row, cols], expect["loss_mask"][0])
      np.testing.assert_array_equal(pos[row, cols], np.arange(len(cols)))
      k += 1
  assert k == len(held)
  mask = np.asarray(segment_mask(seg))
  assert not mask[seg == 0].any()  # padding attends to nothing
  i, j = np.nonzero(mask[0])
  assert np.all(seg[0, i] == seg[0, j]) and np.all(j <= i)


def test_packed_loss_and_gradient_equal_unpacked(setup):
  """Packing is exact: the packed step's loss is the token-weighted mean of per-example losses
  computed unpacked (make_sft_batch), and its update equals the unpacked batch's update."""
  cfg, graphdef, params, tx = setup["cfg"], setup["graphdef"], setup["params"], setup["tx"]
  packed_params, packed_metrics = setup["after_one"]
  held = setup["held"]

  forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t)[0])
  unpacked = make_sft_batch(held, TOKENIZER, ROW_LEN)  # one example per row, causal attention only
  logits = forward(params, unpacked["tokens"])
  per_example = [next_token_ce(logits[i:i + 1], unpacked["tokens"][i:i + 1], unpacked["loss_mask"][i:i + 1])
                 for i in range(len(held))]
  mean_i = np.array([float(ce / n) for ce, n, _ in per_example])
  n_i = np.array([float(n) for _, n, _ in per_example])
  assert n_i.sum() == setup["packed"]["loss_mask"][:, 1:].sum()  # every target token counted once
  assert_close(packed_metrics["loss"], (mean_i * n_i).sum() / n_i.sum())

  state = create_train_state(_copy(params), tx, None)
  state, metrics = make_sft_step(graphdef, tx, state, None)(state, unpacked)
  assert_close(metrics["loss"], packed_metrics["loss"])
  np.testing.assert_allclose(metrics["grad_norm"], packed_metrics["grad_norm"], rtol=1e-5)
  np.testing.assert_allclose(metrics["token_acc"], packed_metrics["token_acc"], atol=1e-6)
  _assert_trees_close(state.params, packed_params)
  assert _max_diff(state.params, params) > 1e-2  # the step really moved the weights

  # Without the segment mask (examples attending to their row neighbours) the loss is different.
  no_mask = {k: setup["packed"][k] for k in ("tokens", "loss_mask")}
  logits = forward(params, no_mask["tokens"])
  ce, count, _ = next_token_ce(logits, no_mask["tokens"], no_mask["loss_mask"])
  assert abs(float(ce / count) - float(packed_metrics["loss"])) > 1e-2


# ----------------------------------------------------------------------------- sharding, micro-batches


def test_sharded_step_equals_single_device(setup):
  graphdef, params, tx, packed = setup["graphdef"], setup["params"], setup["tx"], setup["packed"]
  mesh = make_mesh((2, 2, 2))
  state = create_train_state(_copy(params), tx, mesh)
  q = state.params["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
  assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  momentum = state.opt_state[0].trace  # optax.sgd = chain(trace, scale): moments laid out like params
  assert momentum["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value().sharding == q.sharding
  step = make_sft_step(graphdef, tx, state, mesh)
  batch = shard_batch(packed, mesh)
  for ref_params, ref_metrics in (setup["after_one"], setup["after_two"]):
    state, metrics = step(state, batch)
    for key in ("loss", "token_acc"):
      assert_close(metrics[key], ref_metrics[key])
    np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
    _assert_trees_close(state.params, ref_params)
  # The step keeps every leaf in the sharding it came in with.
  assert state.params["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value().sharding.spec == q.sharding.spec
  assert int(state.step) == 2


def test_micro_batches_equal_one_batch(setup):
  graphdef, params, tx, packed = setup["graphdef"], setup["params"], setup["tx"], setup["packed"]
  ref_params, ref_metrics = setup["after_one"]
  # The two halves hold different numbers of target tokens, so per-half means would not add up.
  halves = packed["loss_mask"][:ROWS // 2, 1:].sum(), packed["loss_mask"][ROWS // 2:, 1:].sum()
  assert halves[0] != halves[1]
  state = create_train_state(_copy(params), tx, None)
  state, metrics = make_sft_step(graphdef, tx, state, None, micro_batches=2)(state, packed)
  for key in ("loss", "token_acc"):
    assert_close(metrics[key], ref_metrics[key])
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-5)
  _assert_trees_close(state.params, ref_params)


# ----------------------------------------------------------------------------- learning


def test_sft_learns_to_copy():
  """Prompt 'abcd=' -> trace 'abcd'. Teacher-forced accuracy on fresh batches near 1 needs the
  model to attend back to the prompt: without copying, at most the EOS (1 target in 5) and a
  1/8 guess per letter are right (~0.3)."""
  rng = np.random.default_rng(0)

  def sample():
    s = "".join(rng.choice(list(LETTERS), 4))
    return Example(prompt=s + "=", trace=s, answer=s)

  graphdef, params = random_state(tiny_config(), seed=0)
  tx = optax.adam(1e-2)
  state = create_train_state(params, tx, None)
  step = make_sft_step(graphdef, tx, state, None)
  history = []
  for _ in range(60):
    state, metrics = step(state, pack_sft_batch(sample, TOKENIZER, 8, 33))  # a fresh batch each step
    history.append({k: float(v) for k, v in metrics.items()})
  first, last = history[0], history[-1]
  assert last["loss"] < 0.2 and last["loss"] < 0.05 * first["loss"], (first, last)
  assert first["token_acc"] < 0.4 and last["token_acc"] > 0.95, (first, last)
