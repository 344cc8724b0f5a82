"""RL: the trainer, the update, the losses and the token-reward scorers. Importing the package
registers the PRIME scorer (rl/prime.py) in the scorer registry (rl/scorers.py), so that the
registry never imports its plugin."""

from tlt_jax.rl import prime  # noqa: F401  (registers the "prime" scorer)
