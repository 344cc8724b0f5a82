"""Tiny model configs and O(1)-scale random weights shared by the foundation tests.

The model's own init (normal * 0.02) makes attention nearly uniform and the logits nearly zero,
which hides bugs in masks, RoPE and caching. `random_state` draws weights at unit scale instead
(kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norms ~ 1 + N(0, 0.1^2), biases ~ N(0, 0.1^2)),
so every test that compares two computations of the same logits compares numbers of order one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tlt_jax.models.config import ModelConfig
from tlt_jax.models.transformer import init_model

VOCAB = 40


def tiny_config(**changes) -> ModelConfig:
  """hidden 32, 2 layers, 4 query heads over 2 kv heads (head_dim 8), vocab 40."""
  base = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
              num_kv_heads=2, rope_theta=10000.0, max_position_embeddings=128)
  base.update(changes)
  return ModelConfig(**base)


def random_state(cfg: ModelConfig, seed: int = 0):
  """(graphdef, params) of a Transformer(cfg) with unit-scale random weights in cfg.param_dtype."""
  # eval_shape: the layout (shapes, dtypes, logical axes) without running the model's init eagerly.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: init_model(cfg, seed)))
  paths_vars = jax.tree_util.tree_flatten_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  rng = np.random.default_rng(seed)
  new = {}
  for path, var in paths_vars:
    name = jax.tree_util.keystr(path)
    abstract = var.get_value()  # a ShapeDtypeStruct
    shape = abstract.shape
    if "norm" in name:
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif name.endswith("['bias']"):
      value = 0.1 * rng.standard_normal(shape)
    elif "embed_tokens" in name:
      value = rng.standard_normal(shape)
    else:
      value = rng.standard_normal(shape) / np.sqrt(shape[0])
    new[name] = jnp.asarray(value, abstract.dtype)

  leaves = [new[jax.tree_util.keystr(p)] for p, _ in paths_vars]
  treedef = jax.tree.structure(state)
  return graphdef, jax.tree.unflatten(treedef, leaves)


def cast_params(params, dtype):
  """The same params stored in another dtype."""
  return jax.tree.map(lambda x: x.astype(dtype), params)
