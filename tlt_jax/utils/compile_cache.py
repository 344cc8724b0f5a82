"""JAX's persistent compilation cache, opt-in: a re-run (a Colab restart, a benchmark, a resumed
job) loads its XLA executables from disk instead of compiling them again.

The main job enables it when the environment sets `TLT_COMPILE_CACHE=<dir>`; the experiments
always do (default `~/.cache/tlt_jax_xla`).
"""

from __future__ import annotations

import os

ENV_VAR = "TLT_COMPILE_CACHE"
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "tlt_jax_xla")


def enable_compile_cache(path: str | None = None, min_compile_time_s: float = 0.5) -> str:
  """Persists compilations that took >= `min_compile_time_s` under `path` (default: $TLT_COMPILE_CACHE,
  else ~/.cache/tlt_jax_xla). Returns the directory."""
  import jax
  path = path or os.environ.get(ENV_VAR) or DEFAULT_DIR
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
  return path
