"""Schedules from the convex bound (Schaipp et al. 2025): the shapes, the bound for any schedule,
the bound-optimal base LR against a brute-force grid and the WSD closed form, LR transfer, the
two-stage extension, the LR-table optimizer, the held-out loss, config keys and the notebook."""

import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tlt_jax.train import optim

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, options) of every shape the bound is checked on
SHAPES = [
    ("constant", {}),
    ("cosine", {}),
    ("wsd", {"decay_frac": 0.1}),
    ("wsd", {"decay_frac": 0.2}),
    ("wsd", {"decay_frac": 0.6}),
    ("wsd_sqrt", {"decay_frac": 0.2}),
    ("wsd_sqrt", {"decay_frac": 0.5}),
    ("wsd_two_stage", {"decay_frac": 0.2, "stage2_frac": 0.4, "stage2_lr_factor": 0.5}),
]


# --- shapes --------------------------------------------------------------------------------


def test_new_shapes_hand_computed():
  sqrt = optim.make_schedule("wsd_sqrt", 2.0, 100, 10, decay_frac=0.2)
  # cooldown over steps 80..100: lr = 2 (1 - sqrt((t - 80) / 20))
  np.testing.assert_allclose([sqrt(s) for s in (5, 10, 79, 80, 85, 95, 100)],
                             [1.0, 2.0, 2.0, 2.0, 2 * (1 - math.sqrt(0.25)), 2 * (1 - math.sqrt(0.75)),
                              0.0], atol=1e-6)
  two = optim.make_schedule("wsd_two_stage", 1.0, 100, 10, decay_frac=0.2, stage2_frac=0.4,
                            stage2_lr_factor=0.25, final_lr=0.05)
  np.testing.assert_allclose([two(s) for s in (5, 10, 39, 40, 79, 80, 90, 100)],
                             [0.5, 1.0, 1.0, 0.25, 0.25, 0.25, 0.15, 0.05], atol=1e-6)
  # stage2_lr_factor = 1 is plain WSD; decay_frac = 0 is a constant schedule.
  np.testing.assert_allclose(
      optim.schedule_shape("wsd_two_stage", 60, 5, decay_frac=0.2, stage2_frac=0.5, stage2_lr_factor=1.0),
      optim.schedule_shape("wsd", 60, 5, decay_frac=0.2), atol=1e-7)
  np.testing.assert_allclose(optim.schedule_shape("wsd_sqrt", 60, 5, decay_frac=0.0),
                             optim.schedule_shape("constant", 60, 5), atol=1e-7)
  # The wsd shapes at equal decay_frac differ only in the cooldown, where 1-sqrt is lower.
  lin, sq = optim.schedule_shape("wsd", 100, 0), optim.schedule_shape("wsd_sqrt", 100, 0)
  np.testing.assert_array_equal(lin[:81], sq[:81])
  assert np.all(sq[81:] < lin[81:])


def test_new_shape_errors():
  with pytest.raises(ValueError, match=r"stage2_frac=0\.9.*cooldown start 80"):
    optim.make_schedule("wsd_two_stage", 1.0, 100, 0, decay_frac=0.2, stage2_frac=0.9)
  with pytest.raises(ValueError, match=r"stage2_frac=0\.05.*warmup_steps=10"):
    optim.make_schedule("wsd_two_stage", 1.0, 100, 10, stage2_frac=0.05)
  with pytest.raises(ValueError, match=r"stage2_lr_factor=0\.0.*\(0, 1\]"):
    optim.make_schedule("wsd_two_stage", 1.0, 100, 0, stage2_lr_factor=0.0)
  with pytest.raises(ValueError, match=r"wsd_sqrt: decay_frac=1\.5"):
    optim.make_schedule("wsd_sqrt", 1.0, 100, 0, decay_frac=1.5)
  with pytest.raises(ValueError, match="cooldown shape 'cosine'"):
    optim.cooldown_schedule(1.0, 0.0, 10, "cosine")


# --- the bound -----------------------------------------------------------------------------


def test_bound_is_t1_over_gamma_plus_gamma_t23_for_any_schedule():
  assert optim.wsd_convex_bound is optim.last_iterate_bound
  s = np.random.default_rng(1).uniform(0.05, 1.0, 64)
  D, G = 1.7, 0.6
  t1, t2, t3 = optim.last_iterate_bound(s, D, G, return_terms=True)
  for gamma in (1e-3, 0.05, 0.7, 4.0):
    np.testing.assert_allclose(optim.last_iterate_bound(gamma * s, D, G), t1 / gamma + gamma * (t2 + t3),
                               rtol=1e-12)


@pytest.mark.parametrize("name,options", SHAPES)
def test_optimal_base_lr_matches_a_brute_force_grid(name, options):
  T, D, G = 400, 2.0, 0.5
  s = optim.schedule_shape(name, T, 10, **options)
  best = optim.optimal_base_lr(name, T, D, G, warmup_steps=10, **options)
  grid = np.geomspace(best.lr / 10, best.lr * 10, 4001)  # ratio 1.00115 between points
  bounds = np.array([optim.last_iterate_bound(g * s, D, G) for g in grid])
  i = int(np.argmin(bounds))
  assert 0 < i < grid.size - 1
  np.testing.assert_allclose(grid[i], best.lr, rtol=2e-3)
  assert best.bound <= bounds.min() * (1 + 1e-12)
  np.testing.assert_allclose(bounds.min(), best.bound, rtol=1e-6)
  np.testing.assert_allclose(optim.last_iterate_bound(best.lr * s, D, G), best.bound, rtol=1e-12)
  # An array shape gives the same answer; gamma* scales as D / G.
  np.testing.assert_allclose(optim.optimal_base_lr(s, D=D, G=G).lr, best.lr, rtol=1e-12)
  np.testing.assert_allclose(optim.optimal_base_lr(s, D=1.0, G=1.0).lr * D / G, best.lr, rtol=1e-12)


def _harmonic(n):
  return sum(1.0 / j for j in range(1, n + 1))


def test_closed_forms():
  # Constant schedule: the optimum of t1/gamma + gamma (t2 + t3) in closed form,
  # t1 = D^2 / (2T), t2 = G^2 / 2, t3 = (G^2 / 2) H_{T-1}.
  T, D, G = 200, 3.0, 2.0
  t23 = G**2 / 2 * (1 + _harmonic(T - 1))
  best = optim.optimal_base_lr("constant", T, D, G)
  np.testing.assert_allclose(best.lr, math.sqrt(D**2 / (2 * T) / t23), rtol=1e-12)
  np.testing.assert_allclose(best.bound, 2 * math.sqrt(D**2 / (2 * T) * t23), rtol=1e-12)
  # WSD with a linear cooldown: the bound-optimal value stays below the closed-form bound of
  # Schaipp et al. (2025), Theorem 4.1 (T0 = the steps at the peak LR), which has no log T term.
  for T in (100, 500, 2000):
    s = optim.schedule_shape("wsd", T, 0, decay_frac=0.2)
    T0 = int(np.sum(s == 1.0))
    a = 4 / (T + T0) * (2 / 3 + (T + 2 * T0) / (3 * (T + T0)) + _harmonic(T + T0 - 2)
                        - _harmonic(T - T0 + 1) - (T - T0) * (T0 - 1) / (3 * (T - T0 + 2) * (T + T0))
                        + 1 / (T - T0) ** 2 + _harmonic(T - T0 - 1) / (T - T0 + 1))
    theorem = D * G * math.sqrt(a)
    best = optim.optimal_base_lr(s, D=D, G=G)
    assert best.bound <= theorem
    assert best.bound > 0.8 * theorem  # and the theorem is close to tight


def test_bound_predictions_of_the_paper():
  T = 1000
  gamma = {c: optim.optimal_base_lr("wsd", T, decay_frac=c).lr for c in (0.1, 0.2, 0.4, 0.6)}
  # gamma* rises with the cooldown fraction and falls with the horizon (their Fig. 3 and 6).
  assert gamma[0.1] < gamma[0.2] < gamma[0.4] < gamma[0.6]
  assert optim.optimal_base_lr("wsd", 2 * T, decay_frac=0.2).lr < gamma[0.2]
  # A cooldown beats the constant schedule, cosine and WSD are close at their own gamma*.
  bound = {n: optim.optimal_base_lr(n, T, **o).bound for n, o in
           [("constant", {}), ("cosine", {}), ("wsd", {"decay_frac": 0.2})]}
  assert bound["wsd"] < 0.9 * bound["constant"]
  assert abs(bound["wsd"] / bound["cosine"] - 1) < 0.1
  # Ratios do not depend on D and G; transfer_lr applies them.
  r = optim.predicted_lr_ratio("wsd", "cosine", T, {"decay_frac": 0.2})
  np.testing.assert_allclose(r, gamma[0.2] / optim.optimal_base_lr("cosine", T).lr, rtol=1e-12)
  np.testing.assert_allclose(optim.transfer_lr(3e-3, "wsd", "cosine", T, {"decay_frac": 0.2}), 3e-3 * r,
                             rtol=1e-12)


def test_bound_curve():
  s = optim.schedule_shape("wsd", 120, 5, decay_frac=0.2)
  curve = optim.bound_curve(0.1 * s)
  assert np.isnan(curve[0])  # the warmup's first step has lr 0
  np.testing.assert_allclose(curve[-1], optim.last_iterate_bound(0.1 * s), rtol=1e-12)
  np.testing.assert_allclose(curve[49], optim.last_iterate_bound(0.1 * s[:50]), rtol=1e-12)
  # the cooldown drop: the bound falls faster during the cooldown than before it
  assert curve[-1] - curve[95] < 2 * (curve[95] - curve[71])


def test_two_stage_extension_keeps_the_tuned_lr_optimal():
  T1, T2 = 150, 300
  options = optim.two_stage_options(T1, T2, decay_frac=0.2)
  assert options["stage2_frac"] == 0.4  # the T1 run's cooldown start, 120 / 300
  rho = options["stage2_lr_factor"]
  assert 0.3 < rho < 0.8
  np.testing.assert_allclose(optim.optimal_base_lr("wsd_two_stage", T2, **options).lr,
                             optim.optimal_base_lr("wsd", T1, decay_frac=0.2).lr, rtol=1e-4)
  # Its bound at the T1-tuned LR beats plain WSD extended at the same LR, and the longer the
  # extension, the lower the second stage.
  gamma = optim.optimal_base_lr("wsd", T1, decay_frac=0.2).lr
  two = optim.last_iterate_bound(gamma * optim.schedule_shape("wsd_two_stage", T2, **options))
  same = optim.last_iterate_bound(gamma * optim.schedule_shape("wsd", T2, decay_frac=0.2))
  assert two < same
  assert optim.two_stage_lr_factor(T1, 4 * T1) < rho
  with pytest.raises(ValueError, match="first_steps"):
    optim.two_stage_lr_factor(300, 300)


# --- optimizer, lr_from_bound, config ------------------------------------------------------


def test_lr_table_optimizer_equals_the_schedule_optimizer():
  cfg = types.SimpleNamespace(lr=0.05, steps=12, schedule="wsd_sqrt", warmup_steps=2, decay_frac=0.5,
                              weight_decay=0.01, max_grad_norm=1.0)
  lrs = optim.schedule_values(optim.schedule_from_config(cfg), cfg.steps)
  a, b = optim.make_optimizer(cfg), optim.make_optimizer(cfg, lr_table=lrs)
  params = {"w": jnp.array([3.0, -4.0, 0.5])}
  grad_fn = jax.grad(lambda p: jnp.sum(p["w"] ** 4))
  pa, pb, sa, sb = params, params, a.init(params), b.init(params)
  for _ in range(cfg.steps):
    ua, sa = a.update(grad_fn(pa), sa, pa)
    ub, sb = b.update(grad_fn(pb), sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  np.testing.assert_allclose(pa["w"], pb["w"], rtol=1e-6)
  # One compilation serves another table of the same length.
  step = jax.jit(lambda g, s, p: b.update(g, s, p))
  step(grad_fn(params), b.init(params), params)
  other = optim.make_optimizer(cfg, lr_table=lrs * 2)
  step(grad_fn(params), other.init(params), params)
  assert step._cache_size() == 1


def test_lr_from_bound():
  base = dict(lr=3e-3, steps=200, schedule="wsd", warmup_steps=10, decay_frac=0.2)
  assert optim.lr_from_config(dict(base, lr_from_bound="")) == 3e-3
  moved = optim.lr_from_config(dict(base, lr_from_bound="cosine"))
  np.testing.assert_allclose(moved, optim.transfer_lr(3e-3, "wsd", "cosine", 200, {"decay_frac": 0.2},
                                                      warmup_steps=10), rtol=1e-12)
  # a tuned 100-step WSD run moved to 200 steps: a lower LR
  longer = optim.lr_from_config(dict(base, lr_from_bound="wsd:steps=100,decay_frac=0.2"))
  assert longer < 3e-3
  np.testing.assert_allclose(optim.schedule_from_config(dict(base, lr_from_bound="cosine"))(100), moved,
                             rtol=1e-6)
  assert optim.parse_lr_reference("wsd:steps=100,decay_frac=0.1") == ("wsd", {"decay_frac": 0.1}, 100)
  for bad, pattern in [("step", "not registered"), ("wsd:foo=1", "not an option"),
                       ("wsd:decay_frac=x", "not a number"), ("wsd:steps=1.5", "steps must be")]:
    with pytest.raises(ValueError, match=pattern):
      optim.parse_lr_reference(bad)


@pytest.mark.parametrize("key,value,pattern", [
    ("sft.schedule", "wsd_cubic", r"config\.sft\.schedule='wsd_cubic'.*wsd_sqrt.*wsd_two_stage"),
    ("sft.stage2_frac", 1.5, r"config\.sft\.stage2_frac=1\.5 is not allowed; allowed: a float in \[0, 1\]"),
    ("sft.stage2_lr_factor", 0.0, r"config\.sft\.stage2_lr_factor=0\.0 is not allowed; allowed: a float in \(0, 1\]"),
    ("sft.lr_from_bound", "cosine:decay_frac=0.2",
     r"config\.sft\.lr_from_bound='cosine:decay_frac=0\.2' is not allowed: .*not an option"),
])
def test_config_errors_name_key_value_and_allowed(key, value, pattern):
  from experiments.common import load_config
  from tlt_jax import config as config_lib
  config = load_config("configs/default.py:tiny", {key: value})
  with pytest.raises(config_lib.ConfigError, match=pattern):
    config_lib.validate(config)


def test_config_two_stage_that_does_not_fit_is_refused():
  from experiments.common import load_config
  from tlt_jax import config as config_lib
  config = load_config("configs/default.py:tiny", {"sft.schedule": "wsd_two_stage", "sft.stage2_frac": 0.95})
  with pytest.raises(config_lib.ConfigError, match=r"config\.sft \(schedule 'wsd_two_stage'\).*stage2_frac"):
    config_lib.validate(config)
  for schedule in ("wsd_sqrt", "wsd_two_stage"):
    ok = load_config("configs/default.py:tiny", {"sft.schedule": schedule, "sft.lr_from_bound": "cosine"})
    config_lib.validate(ok)


# --- held-out loss -------------------------------------------------------------------------


def test_heldout_loss_equals_the_sft_loss_before_the_update():
  from tlt_jax.models.transformer import init_model
  from tlt_jax.train.sft import heldout_loss, make_sft_step
  from tlt_jax.train.state import create_train_state
  from tests.tiny import tiny_config
  from flax import nnx
  model = init_model(tiny_config(), 0)
  rng = np.random.default_rng(0)
  batch = {"tokens": rng.integers(1, 40, (4, 24)).astype(np.int32),
           "loss_mask": (rng.uniform(size=(4, 24)) < 0.6).astype(np.int32)}
  out = heldout_loss(model, [batch])
  half = {k: v[:2] for k, v in batch.items()}
  rest = {k: v[2:] for k, v in batch.items()}
  two_batches = heldout_loss(model, [half, rest])
  graphdef, params = nnx.split(model)
  tx = optax.sgd(0.0)
  state = create_train_state(params, tx, None)
  _, metrics = make_sft_step(graphdef, tx, state, None)(state, batch)  # donates the params
  np.testing.assert_allclose(out["val_loss"], float(metrics["loss"]), rtol=1e-5)
  np.testing.assert_allclose(out["val_token_acc"], float(metrics["token_acc"]), rtol=1e-5)
  # two batches: the token-weighted mean
  np.testing.assert_allclose(two_batches["val_loss"], out["val_loss"], rtol=1e-5)
