"""TLT: speculative rollouts with an adaptive drafter; the BEG-MAB strategy bandit."""
