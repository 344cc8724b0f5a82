"""Mesh construction, logical-axis rules, and sharded forwards equal to the single-device one
(8 fake CPU devices, see conftest.py)."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.parallel.mesh import SAMPLE_RULES, TRAIN_RULES, logical_to_spec, make_mesh
from tests.tiny import VOCAB, random_state, tiny_config
from tests.numerics import assert_close


def test_eight_fake_devices():
  assert jax.device_count() == 8


# ----------------------------------------------------------------------------- make_mesh


@pytest.mark.parametrize("shape,expected", [
    ((2, 2, 2), (2, 2, 2)),
    ((8, 1, 1), (8, 1, 1)),
    ((-1, 1, 1), (8, 1, 1)),
    ((2, -1, 2), (2, 2, 2)),
    ((1, 2, -1), (1, 2, 4)),
    ([1, 1, 8], (1, 1, 8)),
])
def test_make_mesh_shapes(shape, expected):
  mesh = make_mesh(shape)
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert tuple(mesh.shape[a] for a in mesh.axis_names) == expected
  assert list(mesh.devices.flat) == jax.devices()  # row-major over the given device order


def test_make_mesh_on_a_device_subset():
  devices = jax.devices()[4:]
  mesh = make_mesh((-1, 2, 1), devices=devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 1}
  assert list(mesh.devices.flat) == devices


@pytest.mark.parametrize("shape,pattern", [
    ((3, 1, 1), r"mesh shape \(3, 1, 1\) \(product 3\) does not match the 8 available devices"),
    ((2, 2, 4), r"mesh shape \(2, 2, 4\) \(product 16\) does not match the 8 available devices"),
    ((3, -1, 1), r"mesh shape \(3, -1, 1\) does not divide the 8 available devices"),
    ((0, -1, 1), r"mesh shape \(0, -1, 1\) does not divide the 8 available devices"),
    ((-1, -1, 2), r"at most one entry may be -1"),
    ((2, 4), r"mesh shape \(2, 4\) must have 3 entries"),
])
def test_make_mesh_errors_name_shape_and_device_count(shape, pattern):
  with pytest.raises(ValueError, match=pattern):
    make_mesh(shape)


# ----------------------------------------------------------------------------- logical_to_spec


def test_one_device_is_a_1x1x1_mesh_and_mesh_of_finds_the_arrays_mesh():
  devs = jax.devices()
  one = mesh_lib.local_mesh(devs[1])
  assert one.devices.shape == (1, 1, 1) and one.axis_names == mesh_lib.MESH_AXES and one.devices.flat[0] == devs[1]
  assert mesh_lib.mesh_of({"w": np.ones(3)}).devices.flat[0] == devs[0]  # no jax array: the default device
  assert mesh_lib.mesh_of({"w": jax.numpy.ones(3)}).devices.flat[0] == devs[0]  # uncommitted
  assert mesh_lib.mesh_of({"w": jax.device_put(np.ones(3), devs[2])}).devices.flat[0] == devs[2]
  mesh = make_mesh((2, 2, 1), devs[:4])
  sharded = jax.device_put(np.ones((4, 2)), jax.sharding.NamedSharding(mesh, P("data")))
  assert mesh_lib.mesh_of([sharded]) is mesh
  pos = jax.device_put(np.ones((4, 2)), jax.sharding.PositionalSharding(devs[:2]).reshape(2, 1)) if hasattr(
      jax.sharding, "PositionalSharding") else None
  if pos is not None:
    with pytest.raises(ValueError, match="without a NamedSharding"):
      mesh_lib.mesh_of(pos)


def test_logical_to_spec_maps_rules_and_replicates_what_does_not_divide():
  mesh = make_mesh((2, 2, 2))
  assert logical_to_spec(("embed", "mlp"), TRAIN_RULES, (32, 64), mesh) == P("fsdp", "tensor")
  assert logical_to_spec(("embed", "mlp"), TRAIN_RULES, (31, 64), mesh) == P(None, "tensor")
  assert logical_to_spec(("embed", "mlp"), TRAIN_RULES, (32, 63), mesh) == P("fsdp", None)
  assert logical_to_spec(("embed", "mlp"), SAMPLE_RULES, (32, 64), mesh) == P(None, "tensor")
  # A multi-axis rule needs the product of its axes to divide; otherwise the dim is replicated.
  assert logical_to_spec(("batch", "length"), TRAIN_RULES, (8, 5), mesh) == P(("data", "fsdp"), None)
  assert logical_to_spec(("batch", "length"), TRAIN_RULES, (6, 5), mesh) == P(None, None)
  assert logical_to_spec(("norm",), TRAIN_RULES, (32,), mesh) == P(None)
  assert logical_to_spec((None, "vocab"), TRAIN_RULES, (3, 40), mesh) == P(None, "tensor")
  # A mesh axis is used once per spec: heads takes 'tensor', kv_heads then stays whole.
  assert logical_to_spec(("heads", "kv_heads"), TRAIN_RULES, (8, 8), mesh) == P("tensor", None)
  # Without a shape nothing can be checked, so the rule applies as written.
  assert logical_to_spec(("embed", "mlp"), TRAIN_RULES) == P("fsdp", "tensor")
  with pytest.raises(KeyError, match="logical axis 'bogus' has no sharding rule"):
    logical_to_spec(("bogus",), TRAIN_RULES, (4,), mesh)


def test_logical_to_spec_drops_size_one_axes_and_checks_divisibility_per_mesh():
  wide = make_mesh((1, 1, 8))
  assert logical_to_spec(("embed", "vocab"), TRAIN_RULES, (32, 40), wide) == P(None, "tensor")
  assert logical_to_spec(("embed", "vocab"), TRAIN_RULES, (32, 36), wide) == P(None, None)  # 36 % 8
  assert logical_to_spec(("batch",), TRAIN_RULES, (8,), wide) == P(None)
  data = make_mesh((8, 1, 1))
  assert logical_to_spec(("batch", None), TRAIN_RULES, (8, 3), data) == P("data", None)
  assert logical_to_spec(("embed", "mlp"), TRAIN_RULES, (32, 64), data) == P(None, None)
  assert logical_to_spec(("batch",), TRAIN_RULES, (4,), data) == P(None)


def test_param_shardings_follow_logical_axes():
  cfg = tiny_config()
  _, params = random_state(cfg)
  mesh = make_mesh((1, 2, 4))
  sh = mesh_lib.param_shardings(params, mesh, TRAIN_RULES)
  layer = sh["layers"][0]
  assert sh["embed_tokens"].spec == P("tensor", "fsdp")  # (vocab 40, embed 32)
  assert layer["self_attn"]["q_proj"]["kernel"].spec == P("fsdp", "tensor")
  assert layer["mlp"]["down_proj"]["kernel"].spec == P("tensor", "fsdp")
  assert layer["input_layernorm"]["weight"].spec == P(None)
  placed = mesh_lib.shard_state(params, mesh, TRAIN_RULES)
  q = placed["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
  assert {s.data.shape for s in q.addressable_shards} == {(16, 8)}  # (32, 32) over fsdp 2 x tensor 4
  np.testing.assert_array_equal(q, params["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value())


# ----------------------------------------------------------------------------- sharded forward


@pytest.fixture(scope="module")
def reference():
  """Tiny model, a batch of 8 and its single-device forward (logits, hidden)."""
  cfg = tiny_config(qkv_bias=True, tie_word_embeddings=False)
  graphdef, params = random_state(cfg, seed=5)
  tokens = np.random.default_rng(0).integers(0, VOCAB, (8, 12)).astype(np.int32)

  def forward(p, t):
    logits, hidden, _ = nnx.merge(graphdef, p)(t)
    return logits, hidden

  one_device = jax.devices()[0]
  ref = jax.jit(forward)(jax.device_put(params, one_device), jax.device_put(tokens, one_device))
  return cfg, params, tokens, forward, jax.device_get(ref)


@pytest.mark.parametrize("shape,rules_name", [
    ((2, 2, 2), "train"),
    ((2, 2, 2), "sample"),
    ((8, 1, 1), "train"),
    ((1, 1, 8), "train"),
    ((1, 2, 4), "train"),
])
def test_sharded_forward_equals_single_device(reference, shape, rules_name):
  cfg, params, tokens, forward, (ref_logits, ref_hidden) = reference
  rules = mesh_lib.RULE_SETS[rules_name]
  mesh = make_mesh(shape)
  sharded_params = mesh_lib.shard_state(params, mesh, rules)
  sharded_tokens = mesh_lib.shard_batch(tokens, mesh, rules)
  if shape != (8, 1, 1):  # every mesh with a model axis > 1 really splits some weight
    specs = {v.get_value().sharding.spec for v in jax.tree.leaves(
        sharded_params, is_leaf=lambda x: isinstance(x, nnx.Variable))}
    assert any(any(s is not None for s in spec) for spec in specs)
  data_ways = mesh.shape["data"] * mesh.shape["fsdp"]
  assert {s.data.shape[0] for s in sharded_tokens.addressable_shards} == {8 // data_ways}

  logits, hidden = jax.jit(forward)(sharded_params, sharded_tokens)
  assert logits.sharding.mesh.shape == mesh.shape
  assert_close(logits, ref_logits)
  assert_close(hidden, ref_hidden)
