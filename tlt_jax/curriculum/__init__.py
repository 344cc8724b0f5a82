"""Curricula that extend what a model can do round by round (weak-to-strong, easy-to-hard)."""
