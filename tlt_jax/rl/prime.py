"""PRIME: implicit process rewards from a PRM trained online on outcome labels only.

Cui et al. (2025), "Process Reinforcement through Implicit Rewards". The implicit PRM is a
language model pi_psi (started from the SFT policy) beside a frozen reference pi_ref (the SFT
policy). Its token reward is the scaled log-ratio

    q_t = beta * (log pi_psi(y_t | y_<t) - log pi_ref(y_t | y_<t))

and it learns from the verifier's outcome labels alone, with the cross-entropy

    L(psi) = mean_i BCE( sigmoid(sum_t q_{i,t}), correct_i )

(the sum of its token rewards is an outcome-reward model's logit), on its own optimizer
(`prime.lr`). Order (`prime.update_order`): "after" scores the batch with the current PRM, then
updates it (the paper's); "before" updates first and scores with the updated PRM.

`prime.process_norm` scales the token rewards before they reach the advantage estimator:
  "batch_norm"  q_t / (max over the batch's responses and tokens of |sum_{s >= t} q_s| + 1e-6),
                the official code's default: the largest process return of the batch is 1, the
                size of a 0/1 outcome, whatever beta is
  "none"        q_t as is (beta = 0.05 gives process returns ~10x smaller than the outcome's)
The advantage estimator then weighs the two sources by rl.advantage_kwargs.process_coef and
outcome_coef (rl/advantages.py: rloo_returns, grpo_returns, reinforce_returns).

The PRM's params and optimizer state are a `TrainState` checkpointed with the run
(`scorers/prime` in the RL checkpoint). Metrics of each step:
  prm_pairwise_acc_before / _after  within-group ranking accuracy (`pairwise_accuracy`) of the
                scores sum_t q_t under the PRM before and after its update on this batch (the
                official `compute_dpo_accuracy`); chance is 0.5
  prm_sign_accuracy  sign(sum_t q_t) against the label, before the update (a global offset of
                the scores moves it; the official `compute_dpo_abs_accuracy`)
  prm_loss, prm_grad_norm, prm_skipped
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
PROCESS_NORMS = ("batch_norm", "none")
PRM_BATCH_KEYS = ("tokens", "positions", "segment_ids", "response_mask", "ref_logprobs", "labels")


@dataclasses.dataclass(frozen=True)
class PrimeConfig:
  """beta: the reward scale; lr / max_grad_norm / weight_decay: the PRM's AdamW (constant LR);
  update_order: "after" or "before"; process_norm: "batch_norm" or "none"; group_size: responses
  per prompt (for the pairwise accuracy); micro_batches: of the PRM update."""

  beta: float = 0.05
  lr: float = 1e-6
  update_order: str = "after"
  max_grad_norm: float = 1.0
  weight_decay: float = 0.0
  process_norm: str = "batch_norm"
  group_size: int = 0
  micro_batches: int = 1

  def __post_init__(self):
    if not self.beta > 0:
      raise ConfigError(f"config.prime.beta={self.beta!r} is not allowed; allowed: a float > 0")
    if not self.lr > 0:
      raise ConfigError(f"config.prime.lr={self.lr!r} is not allowed; allowed: a float > 0")
    if self.update_order not in UPDATE_ORDERS:
      raise ConfigError(f"config.prime.update_order={self.update_order!r} is not allowed; allowed: one of "
                        f"{UPDATE_ORDERS}")
    if self.process_norm not in PROCESS_NORMS:
      raise ConfigError(f"config.prime.process_norm={self.process_norm!r} is not allowed; allowed: one of "
                        f"{PROCESS_NORMS}")

  @classmethod
  def from_config(cls, config, micro_batches: int = 1) -> "PrimeConfig":
    if "prime" not in config:
      raise ConfigError("config.rl.token_rewards.prime is on but the config has no 'prime' section; "
                        "allowed: a config with prime.beta, prime.lr, prime.update_order (configs/prime.py)")
    p = config.prime
    return cls(beta=float(p.beta), lr=float(p.lr), update_order=str(p.update_order),
               max_grad_norm=float(p.max_grad_norm), weight_decay=float(p.weight_decay),
               process_norm=str(p.process_norm), group_size=int(config.rl.group_size),
               micro_batches=int(micro_batches))


def token_rewards(logp_BxL, ref_logp_BxL, mask_BxL, beta: float):
  """r_t = beta * (log pi_psi(y_t) - log pi_ref(y_t)) on response tokens, 0 elsewhere."""
  return jnp.where(mask_BxL > 0, beta * (logp_BxL - ref_logp_BxL), 0.0)


def batch_norm_process_rewards(q_BxL: np.ndarray, mask_BxL: np.ndarray, eps: float = 1e-6) -> np.ndarray:
  """q / (max_{i,t} |sum_{s >= t} m_{i,s} q_{i,s}| + eps), rows one response each (host).

  PRIME's `prime_norm: batch_norm`: one positive scale for the whole batch, so that the largest
  process return-to-go is 1 (the ranking of responses and the sign of each token are kept).
  """
  q = np.where(mask_BxL > 0, np.asarray(q_BxL, np.float32), 0.0)
  returns = np.flip(np.cumsum(np.flip(q, -1), -1), -1)
  return (q / (np.max(np.abs(returns), initial=0.0) + eps)).astype(np.float32)


def pairwise_accuracy(scores_PxG: np.ndarray, correct_PxG: np.ndarray) -> float:
  """Within-group ranking accuracy of sequence scores against the verifier's labels.

  For each prompt, over the pairs (i, j) with correct_i = 1 and correct_j = 0: the fraction
  where s_i > s_j (a tie counts one half); averaged over the prompts that have such pairs (NaN
  when none has). The metric of PRIME's code (`compute_dpo_accuracy`): it ignores an offset or a
  positive scale of the scores shared by a group, so 0.5 is chance. (That code scores a group
  without such pairs as 0.5 and a tie as the pair's order decides; with PRIME's accuracy filter
  every kept group has both outcomes.)
  """
  s = np.asarray(scores_PxG, np.float64)
  y = np.asarray(correct_PxG) > 0.5
  diff_PxGxG = s[:, :, None] - s[:, None, :]  # s_i - s_j
  pairs_PxGxG = y[:, :, None] & ~y[:, None, :]  # i right, j wrong
  wins_PxGxG = np.where(diff_PxGxG > 0, 1.0, np.where(diff_PxGxG == 0, 0.5, 0.0))
  n_P = pairs_PxGxG.sum((1, 2))
  mixed = n_P > 0
  if not mixed.any():
    return float("nan")
  return float(np.mean((wins_PxGxG * pairs_PxGxG).sum((1, 2))[mixed] / n_P[mixed]))


def prm_update_step(graphdef, optimizer: optax.GradientTransformation, beta: float, micro_batches: int,
                    state: TrainState, batch, mesh=None):
  """One PRM update on outcome labels: (state, batch) -> (state, metrics, logp_BxL). Pure.

  batch: tokens, positions, segment_ids, response_mask, ref_logprobs (log pi_ref at T = 1) and
  labels (the outcome of each token's sequence, 0/1). logp_BxL is log pi_psi under the params
  BEFORE the update (the forward of the gradient), for scoring in the "after" order.
  Metrics: prm_loss (the BCE), prm_sign_accuracy (sign(sum_t r_t) vs the label, per sequence,
  before the update), prm_grad_norm, prm_skipped (a non-finite update is dropped).
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
    aux = {"prm_sign_accuracy": jnp.sum(w * ((logit > 0) == (y > 0.5))), "prm_loss": loss}
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
    """(token rewards in the update's layout (host), metrics); the PRM takes one update step on
    the batch's outcome labels (before or after scoring, as prime.update_order says). The
    rewards are normalised as prime.process_norm says; the metrics compare the PRM's sequence
    scores with the labels before and after the update."""
    d = batch.device
    args = (d["tokens"], d["positions"], d["segment_ids"], d["response_mask"])
    zeros = self._put(np.zeros(batch.packed_shape, np.float32))
    ref = d["ref_logprobs"] if self.reuse_ref else self.logprob_fn(self.ref_params, *args, zeros)[0]
    labels_BxL = np.broadcast_to(np.asarray(scores.correct_B, np.float32)[:, None], batch.rows["tokens"].shape)
    labels = self._put(batch.to_update_layout(np.ascontiguousarray(labels_BxL)))
    prm_batch = dict(tokens=d["tokens"], positions=d["positions"], segment_ids=d["segment_ids"],
                     response_mask=d["response_mask"], ref_logprobs=ref, labels=labels)
    self.state, metrics, logp_before = self.update(self.state, prm_batch)
    logp_after = self.logprob_fn(self.state.params, *args, zeros)[0]
    metrics = {k: float(v) for k, v in mesh_lib.to_host(metrics).items()}
    mask_BxL = batch.rows["response_mask"]
    g = self.cfg.group_size or np.asarray(scores.rewards_PxG).shape[1]
    correct_PxG = np.asarray(scores.correct_B, np.float32).reshape(-1, g)
    q_rows = {}
    for when, logp in (("before", logp_before), ("after", logp_after)):
      q_rows[when] = np.where(mask_BxL > 0, batch.to_rows(self._rewards(logp, ref, d["response_mask"])), 0.0)
      acc = pairwise_accuracy(q_rows[when].sum(-1).reshape(-1, g), correct_PxG)
      if np.isfinite(acc):  # absent when no group has both outcomes
        metrics[f"prm_pairwise_acc_{when}"] = acc
    q_BxL = q_rows["after" if self.cfg.update_order == "before" else "before"].astype(np.float32)
    metrics["prm_score_mean"] = float(q_BxL.sum(-1).mean())
    if self.cfg.process_norm == "batch_norm":
      q_BxL = batch_norm_process_rewards(q_BxL, mask_BxL)
    return batch.to_update_layout(q_BxL), metrics
