"""The life of a run across hosts: start, stop at an agreed step on preemption, notice a lost
host, and end on every host together.

- `initialize(timeouts)`: `jax.distributed.initialize` with timeouts from the config
  (`config.distributed`) and, in a multi-process run, a `HostWatch` thread.
- `PreemptionWatch`: SIGTERM (what Cloud TPU VMs and GKE send before a maintenance event or a
  spot preemption) asks every process to stop at the same step boundary. In one process a
  signal handler sets a flag; across processes JAX's preemption sync manager (installed by
  `jax.distributed.initialize`, which catches SIGTERM itself) agrees on the step: the first
  boundary every host reaches after the notice. Each stage asks `reached()` once per step.
- `HostWatch`: every process bumps a counter in the coordination service's key-value store; a
  process whose counter stops for `lost_host_timeout_s` is lost, and the others exit with status
  `EXIT_LOST_HOST` and one line naming it, instead of blocking in a collective until JAX's own
  heartbeat check aborts them with a C++ stack trace. A lost coordinator (process 0) shows as a
  failing key-value store.
- `finish()`: a barrier of the program's own (every host has flushed its outputs), then
  `jax.distributed.shutdown()`, whose own barrier every host then reaches at once: a slow host
  cannot turn a finished run into a crash.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time

import jax

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: saved; rerun the same command
EXIT_LOST_HOST = 76
_KEY = "tlt_jax/alive/{}"
_DONE = "tlt_jax/done/{}"


@dataclasses.dataclass(frozen=True)
class Timeouts:
  """`config.distributed`: how long a silent host may stay silent before the others stop, and
  how long `jax.distributed.shutdown` waits for every host at its barrier."""
  lost_host_timeout_s: int = 120
  shutdown_timeout_s: int = 600

  @classmethod
  def from_config(cls, config) -> "Timeouts":
    d = config.distributed
    return cls(int(d.lost_host_timeout_s), int(d.shutdown_timeout_s))


class HostWatch:
  """A daemon thread that keeps this process's counter moving and watches the others'."""

  def __init__(self, client, process_id: int, num_processes: int, timeout_s: float):
    self.client, self.me, self.n, self.timeout_s = client, process_id, num_processes, timeout_s
    self.period = max(0.5, min(5.0, timeout_s / 10))
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._loop, name="tlt-host-watch", daemon=True)

  def start(self) -> "HostWatch":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._stop.set()

  def _lost(self, who: int, why: str) -> None:
    if self._stop.is_set():
      return
    print(f"\ndistributed error: lost process {who} of {self.n} ({why}); outputs up to the last "
          "checkpoint are kept. Rerun the same command on every host to resume.",
          file=sys.stderr, flush=True)
    os._exit(EXIT_LOST_HOST)

  def _loop(self) -> None:
    beat = 0
    seen = {p: (None, time.monotonic()) for p in range(self.n) if p != self.me}
    while not self._stop.wait(self.period):
      beat += 1
      try:
        self.client.key_value_set(_KEY.format(self.me), str(beat), allow_overwrite=True)
      except Exception as e:  # noqa: BLE001 - the store lives in process 0
        if self.me != 0:
          self._lost(0, f"the coordinator stopped answering: {type(e).__name__}")
        return
      now = time.monotonic()
      for p, (value, since) in list(seen.items()):
        try:
          if self.client.key_value_try_get(_DONE.format(p)):
            del seen[p]
            continue
        except Exception:  # noqa: BLE001 - not done yet
          pass
        try:
          current = self.client.key_value_try_get(_KEY.format(p))
        except Exception:  # noqa: BLE001 - no beat yet
          current = None
        if current != value:
          seen[p] = (current, now)
        elif now - since > self.timeout_s:
          self._lost(p, f"no sign of life for {now - since:.0f} s, "
                        f"config.distributed.lost_host_timeout_s={self.timeout_s:g}")


_watch: HostWatch | None = None


def initialize(timeouts: Timeouts = Timeouts(), coordinator: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> bool:
  """`jax.distributed.initialize` for a multi-host run (see `mesh.maybe_initialize_distributed`
  for how the arguments are found) with these timeouts, and a `HostWatch`. JAX's own heartbeat
  timeout is set well above `lost_host_timeout_s` so that the watch speaks first."""
  global _watch
  from tlt_jax.parallel.mesh import maybe_initialize_distributed
  started = maybe_initialize_distributed(
      coordinator, num_processes, process_id,
      heartbeat_timeout_seconds=2 * timeouts.lost_host_timeout_s + 30,
      shutdown_timeout_seconds=timeouts.shutdown_timeout_s)
  if started and jax.process_count() > 1:
    from jax._src import distributed
    _watch = HostWatch(distributed.global_state.client, jax.process_index(), jax.process_count(),
                       timeouts.lost_host_timeout_s).start()
  return started


def on_failure() -> None:
  """Called with an exception in flight: in a multi-process run a failed collective usually means
  a lost host, so give the watch time to name it (it exits the process) before the exception is
  reported."""
  if _watch is not None:
    _watch._stop.wait(_watch.timeout_s + 3 * _watch.period)


def finish() -> None:
  """Ends a multi-process run on every host together (no-op in one process)."""
  global _watch
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  from jax.experimental import multihost_utils
  multihost_utils.sync_global_devices("tlt_jax: every host is done")
  if _watch is not None:
    try:
      distributed.global_state.client.key_value_set(_DONE.format(jax.process_index()), "1",
                                                    allow_overwrite=True)
    except Exception:  # noqa: BLE001 - shutdown reports it
      pass
    _watch.stop()
    _watch = None
  jax.distributed.shutdown()


class PreemptionWatch:
  """Asked once per step boundary by every process, in the same order: True at the boundary where
  all of them stop after a SIGTERM reached any of them."""

  def __init__(self):
    self._calls = 0
    self._requested = False
    self._multi = jax.process_count() > 1
    self._previous = None
    if not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    del signum, frame
    self._requested = True
    log.warning("SIGTERM: saving at the next step boundary, then exiting (status %d)", EXIT_PREEMPTED)

  def reached(self) -> bool:
    self._calls += 1
    if self._multi:
      from jax.experimental import multihost_utils
      return bool(multihost_utils.reached_preemption_sync_point(self._calls))
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


class Preempted(Exception):
  """Raised by a stage after it saved at the agreed step boundary."""

  def __init__(self, stage: str, step: int, workdir: str):
    self.stage, self.step, self.workdir = stage, step, workdir
    what = (f"saved step {step} of the {stage} stage" if stage != "drafter"
            else "the drafter warm-up restarts on resume")
    super().__init__(f"{what} in {workdir}; rerun the same command to resume")
