"""PRIME: implicit process rewards from a PRM trained online on outcome labels only.

Cui et al. (2025), "Process Reinforcement through Implicit Rewards". The implicit PRM is a
language model pi_psi (started from the SFT policy) beside a frozen reference pi_ref (the SFT
policy). Its token reward is the scaled log-ratio

    r_t = beta * (log pi_psi(y_t | y_<t) - log pi_ref(y_t | y_<t))

and it learns from the verifier's outcome labels alone, with the cross-entropy

    L(psi) = mean_i BCE( sigmoid(beta * sum_t log pi_psi(y_t) / pi_ref(y_t)), correct_i )

(the sum of its token rewards is an outcome-reward model's logit), on its own optimizer
(`prime.lr`). Order (`prime.update_order`): "after" scores the batch with the current PRM, then
updates it (the paper's); "before" updates first and scores with the updated PRM. The token
rewards then go to a token advantage estimator (rl/advantages.py: rloo_returns).

The PRM's params and optimizer state are a `TrainState` checkpointed with the run
(`scorers/prime` in the RL checkpoint). `prm_accuracy` is measured before the PRM sees the
batch: how well sign(sum_t r_t) predicts the verifier on fresh responses.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tlt_jax.errors import ConfigError
from tlt_jax.parallel import mesh as mesh_lib
from tlt_jax.rl.losses import aggregation_weights, segment_sum
from tlt_jax.rl.scorers import ScorerContext, register_scorer
from tlt_jax.rl.update import make_logprob_fn, policy_forward
from tlt_jax.train import optim
from tlt_jax.train.state import TrainState, accumulate_gradients, create_train_state, guarded_update, jit_step

UPDATE_ORDERS = ("after", "before")
PRM_BATCH_KEYS = ("tokens", "positions", "segment_ids", "response_mask", "ref_logprobs", "labels")


@dataclasses.dataclass(frozen=True)
class PrimeConfig:
  """beta: the reward scale; lr / max_grad_norm / weight_decay: the PRM's AdamW (constant LR);
  update_order: "after" or "before"; micro_batches: of the PRM update."""

  beta: float = 0.05
  lr: float = 1e-6
  update_order: str = "after"
  max_grad_norm: float = 1.0
  weight_decay: float = 0.0
  micro_batches: int = 1

  def __post_init__(self):
    if not self.beta > 0:
      raise ConfigError(f"config.prime.beta={self.beta!r} is not allowed; allowed: a float > 0")
    if not self.lr > 0:
      raise ConfigError(f"config.prime.lr={self.lr!r} is not allowed; allowed: a float > 0")
    if self.update_order not in UPDATE_ORDERS:
      raise ConfigError(f"config.prime.update_order={self.update_order!r} is not allowed; allowed: one of "
                        f"{UPDATE_ORDERS}")

  @classmethod
  def from_config(cls, config, micro_batches: int = 1) -> "PrimeConfig":
    if "prime" not in config:
      raise ConfigError("config.rl.token_rewards.prime is on but the config has no 'prime' section; "
                        "allowed: a config with prime.beta, prime.lr, prime.update_order (configs/prime.py)")
    p = config.prime
    return cls(beta=float(p.beta), lr=float(p.lr), update_order=str(p.update_order),
               max_grad_norm=float(p.get("max_grad_norm", 1.0)),
               weight_decay=float(p.get("weight_decay", 0.0)), micro_batches=int(micro_batches))


def token_rewards(logp_BxL, ref_logp_BxL, mask_BxL, beta: float):
  """r_t = beta * (log pi_psi(y_t) - log pi_ref(y_t)) on response tokens, 0 elsewhere."""
  return jnp.where(mask_BxL > 0, beta * (logp_BxL - ref_logp_BxL), 0.0)


def prm_update_step(graphdef, optimizer: optax.GradientTransformation, beta: float, micro_batches: int,
                    state: TrainState, batch, mesh=None):
  """One PRM update on outcome labels: (state, batch) -> (state, metrics, logp_BxL). Pure.

  batch: tokens, positions, segment_ids, response_mask, ref_logprobs (log pi_ref at T = 1) and
  labels (the outcome of each token's sequence, 0/1). logp_BxL is log pi_psi under the params
  BEFORE the update (the forward of the gradient), for scoring in the "after" order.
  Metrics: prm_loss (the BCE), prm_accuracy (sign(sum_t r_t) vs the label, per sequence, before
  the update), prm_grad_norm, prm_skipped (a non-finite update is dropped).
  """
  mask_full = batch["response_mask"].astype(jnp.float32)
  batch = dict(batch, loss_weights=aggregation_weights(mask_full, batch["segment_ids"], "sequence"))

  def loss_fn(params, mb):
    logp, _, _ = policy_forward(graphdef, params, mb["tokens"], mb["positions"], mb["segment_ids"], 1.0, mesh)
    q = token_rewards(logp, mb["ref_logprobs"], mb["response_mask"], beta)
    logit = segment_sum(q, mb["response_mask"], mb["segment_ids"])  # beta sum_t log-ratio, per token
    y = mb["labels"].astype(jnp.float32)
    bce = jax.nn.softplus(logit) - y * logit  # -[y log sigmoid(s) + (1 - y) log(1 - sigmoid(s))]
    w = mb["loss_weights"]  # each sequence's tokens sum to 1 / (sequences in the full batch)
    loss = jnp.sum(w * bce)
    aux = {"prm_accuracy": jnp.sum(w * ((logit > 0) == (y > 0.5))), "prm_loss": loss}
    return loss, (aux, logp)

  (loss, (aux, logp)), grads = accumulate_gradients(loss_fn, state.params, batch, micro_batches,
                                                    has_outputs=True)
  new_state, grad_norm, ok = guarded_update(state, grads, loss, optimizer)
  return new_state, dict(aux, prm_grad_norm=grad_norm, prm_skipped=(~ok).astype(jnp.float32)), logp


@register_scorer("prime")
class ImplicitPRM:
  """The PRIME device scorer: token rewards of the implicit PRM, which learns online here.

  pi_psi starts from the policy's params at construction (the SFT policy); pi_ref is the
  trainer's frozen reference (the SFT policy; its log-probs are reused from the update batch
  when the sampler's temperature is 1, else recomputed at T = 1).
  """

  def __init__(self, config, ctx: ScorerContext):
    self.cfg = PrimeConfig.from_config(config, ctx.micro_batches)
    self.graphdef, self.mesh = ctx.graphdef, ctx.mesh
    params = jax.tree.map(jnp.copy, ctx.policy_params)
    self.ref_params = ctx.ref_params if ctx.ref_params is not None else jax.tree.map(jnp.copy, params)
    self.reuse_ref = ctx.ref_params is not None and ctx.temperature == 1.0
    self.tx = optim.make_optimizer(dict(lr=self.cfg.lr, steps=1, schedule="constant",
                                        max_grad_norm=self.cfg.max_grad_norm,
                                        weight_decay=self.cfg.weight_decay))
    self.state: TrainState = create_train_state(params, self.tx, self.mesh)
    self.logprob_fn = (ctx.logprob_fn if ctx.temperature == 1.0 else
                       make_logprob_fn(self.graphdef, 1.0, self.state.params, self.mesh, ctx.micro_batches))
    fn = functools.partial(prm_update_step, self.graphdef, self.tx, self.cfg.beta, self.cfg.micro_batches,
                           mesh=self.mesh)
    if self.mesh is None:
      self.update = jit_step(fn, self.state, None, None, num_outputs_extra=2)
    else:
      b2 = mesh_lib.batch_sharding(self.mesh, 2)
      self.update = jit_step(fn, self.state, {k: b2 for k in PRM_BATCH_KEYS}, self.mesh, num_outputs_extra=2,
                             extra_shardings=(None, b2))
    self._rewards = jax.jit(functools.partial(token_rewards, beta=self.cfg.beta))

  def _put(self, x):
    return mesh_lib.shard_batch(x, self.mesh) if self.mesh is not None else x

  def score(self, batch, scores):
    """(token rewards in the update's layout, metrics); the PRM takes one update step on the
    batch's outcome labels (before or after scoring, as prime.update_order says)."""
    d = batch.device
    args = (d["tokens"], d["positions"], d["segment_ids"], d["response_mask"])
    zeros = self._put(np.zeros(batch.packed_shape, np.float32))
    ref = d["ref_logprobs"] if self.reuse_ref else self.logprob_fn(self.ref_params, *args, zeros)[0]
    labels_BxL = np.broadcast_to(np.asarray(scores.correct_B, np.float32)[:, None], batch.rows["tokens"].shape)
    labels = self._put(batch.to_update_layout(np.ascontiguousarray(labels_BxL)))
    prm_batch = dict(tokens=d["tokens"], positions=d["positions"], segment_ids=d["segment_ids"],
                     response_mask=d["response_mask"], ref_logprobs=ref, labels=labels)
    self.state, metrics, logp = self.update(self.state, prm_batch)
    if self.cfg.update_order == "before":
      logp = self.logprob_fn(self.state.params, *args, zeros)[0]
    rewards = self._rewards(logp, ref, d["response_mask"])
    metrics = {k: float(v) for k, v in mesh_lib.to_host(metrics).items()}
    return rewards, metrics
