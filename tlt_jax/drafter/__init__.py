"""EAGLE-1 drafter (TLT's speculative drafter) and its training on the target's features."""

from tlt_jax.drafter.eagle import EagleDrafter, check_compatible, drafter_config, init_drafter
from tlt_jax.drafter.train import (DrafterTrainState, TargetHead, collect_target_features,
                                   drafter_loss, drafter_state_shardings, drafter_steps,
                                   init_drafter_train_state, load_drafter, make_drafter_train_step,
                                   save_drafter, target_head_shardings, warmup_drafter)

__all__ = [
    "EagleDrafter", "check_compatible", "drafter_config", "init_drafter", "DrafterTrainState",
    "TargetHead", "collect_target_features", "drafter_loss", "drafter_state_shardings",
    "drafter_steps", "init_drafter_train_state", "load_drafter", "make_drafter_train_step", "save_drafter",
    "target_head_shardings", "warmup_drafter",
]
