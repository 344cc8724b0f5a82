"""The errors a user can fix, one class per kind of input, each printed as one line.

`python -m tlt_jax.main` (and the experiments) print `<kind>: <message>` and exit with status 2
for any `InputError`, without a traceback. Messages name what was wrong (the config key and its
value, or the file) and what is allowed.

  ConfigError      a bad config key, value or combination; found before any work starts
  CheckpointError  a missing, unreadable or corrupt checkpoint (HF weights or orbax), named by path
  DataError        a dataset or record the run cannot use, named by file (and line)
"""

from __future__ import annotations


class InputError(Exception):
  """Bad input the user can fix. `kind` prefixes the one-line message on the console."""

  kind = "error"


class ConfigError(InputError, ValueError):
  """A bad config key or value. The message names the key, the value and what is allowed."""

  kind = "config error"


class CheckpointError(InputError, ValueError):
  """A checkpoint that is missing, unreadable or corrupt; the message names the path."""

  kind = "checkpoint error"


class DataError(InputError, ValueError):
  """A dataset or record the run cannot use; the message names the file (and the record)."""

  kind = "data error"


def one_line(error: BaseException) -> str:
  """`<kind>: <message>` on one line (newlines in the message become '; ')."""
  kind = getattr(error, "kind", type(error).__name__)
  message = "; ".join(part.strip() for part in str(error).splitlines() if part.strip())
  return f"{kind}: {message}"
