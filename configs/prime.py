"""PRIME: RLOO with implicit process rewards from an online PRM, on the default task, from the
default SFT policy (Cui et al., 2025, "Process Reinforcement through Implicit Rewards").

  python -m tlt_jax.main --config=configs/prime.py --workdir=runs/prime

The default job (configs/default.py: SFT, drafter warm-up, RL) with the RL stage changed to:
  - advantages: rloo_returns, RLOO on each source (outcome at the last token; the PRM's token
    rewards against the other responses' mean), returns with gamma = 1, summed, whitened;
  - rl.token_rewards.prime: the implicit PRM r_t = beta * log pi_psi / pi_ref, pi_psi started
    from the SFT policy and trained online on the verifier's labels (prime.*), pi_ref = SFT;
  - the online prompt filter: groups with accuracy in rl.accuracy_band = [0.2, 0.8], refilled
    from fresh prompts for up to rl.dynamic_sampling_rounds extra rounds;
  - PPO-clip, the verifier as the outcome reward (no format bonus), no KL penalty.
`configs/prime.py:tiny` is the seconds-scale variant of configs/default.py:tiny;
`configs/prime.py:small` the scale of experiments/prime.py (a 4-layer d=64 policy, up to
4-digit sums, 8 prompts x 8 responses per step).
"""

import importlib.util
import os

import ml_collections

SIZES = ("", "tiny", "small")


def _default_config(arg: str) -> ml_collections.ConfigDict:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default.py")
  spec = importlib.util.spec_from_file_location("tlt_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  if arg not in SIZES:
    raise ValueError(f"configs/prime.py:{arg}: unknown argument {arg!r}; allowed: {SIZES[1:]} "
                     "(or none, for the default)")
  c = _default_config("" if arg == "small" else arg)
  c.rl.update(advantage="rloo_returns", accuracy_band=(0.2, 0.8), dynamic_sampling_rounds=3)
  c.rl.rewards.update(verifier=1.0, format=0.0, length_penalty=0.0)
  c.rl.advantage_kwargs = ml_collections.ConfigDict(dict(outcome_coef=1.0, process_coef=1.0, whiten=True))
  c.rl.token_rewards.prime = 1.0
  # The implicit PRM. beta as in the paper (0.05); its LR is far above the paper's 1e-6 for a
  # 7B model: this policy is ~1.6M parameters. "after": score, then update (the paper's order).
  c.prime = ml_collections.ConfigDict(dict(beta=0.05, lr=1e-4, update_order="after",
                                           max_grad_norm=1.0, weight_decay=0.0))
  if arg == "small":  # experiments/prime.py's scale on a shared 2-core CPU (a 4-layer d=64 policy)
    c.model.update(num_layers=4, hidden_size=64, intermediate_size=192, max_position_embeddings=128)
    c.task.max_digits = 4
    c.sft.update(steps=200, batch_size=16, max_len=128, warmup_steps=20, eval_every=200, eval_size=128,
                 log_every=50)
    c.eval.max_new_tokens = 64
    c.rollout.update(max_new_tokens=64, buckets=(4, 8, 16, 32))
    # RL prompts of every difficulty (1-4 digits): on >= 2 digits this policy's sampled accuracy
    # is ~0.03 (greedy 0.52 over all), and groups in the filter's band [0.2, 0.8] are rare.
    # rl.lr 1.5e-4: at the default 5e-5 this policy barely moves in 20 steps, at 5e-4 outcome-only
    # RLOO collapsed it (held-out 0.39 -> 0.25, shorter responses). The PRM's LR twice the
    # policy's, as in the paper (5e-7 / 1e-6).
    c.rl.update(prompts_per_step=8, group_size=8, sample_eval_size=256, dynamic_sampling_rounds=2,
                min_difficulty=1, lr=1.5e-4)
    c.prime.lr = 3e-4
  return c
