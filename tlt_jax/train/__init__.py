"""Training utilities: optimizers and learning-rate schedules."""
