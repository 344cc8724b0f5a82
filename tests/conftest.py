"""Test-wide setup: 8 fake CPU devices (set before jax is imported) and shared tiny fixtures."""

import os

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
  """Under xdist, schedule by group (`pytest.mark.xdist_group`): the multi-process tests then run
  one after another on one worker instead of side by side."""
  if getattr(config.option, "dist", "no") == "load":
    config.option.dist = "loadgroup"
