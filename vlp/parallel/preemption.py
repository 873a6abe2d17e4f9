"""SIGTERM -> every process stops after the same step.

Cluster schedulers announce a pre-emption (or `scancel`, or a TPU maintenance
event) with SIGTERM, possibly to one host only. Stopping must be collective: a
checkpoint save is a collective operation, so every process has to decide to
save at the same step.

* One process: a Python SIGTERM handler sets a flag; the loop checks it
  between steps.
* Several processes: JAX's preemption sync manager (started by
  `jax.distributed.initialize`) catches SIGTERM on any host, tells the others
  through the coordination service, and `reached_preemption_sync_point(step)`
  returns True on every host at the same step. No Python handler is installed
  then, since it would replace JAX's.
* If that service is unavailable, processes agree with an all-gather of their
  flags every `agree_every` steps.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionWatch:
  """Answers "stop after this step?" identically on every process."""

  def __init__(self, *, agree_every: int = 10):
    self.requested = False
    self._agree_every = max(1, int(agree_every))
    self._previous = None
    self._use_jax = jax.process_count() > 1 and _jax_sync_available()
    if not self._use_jax and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    """Must be called after every step, by every process, from the same step on."""
    if self._use_jax:
      return multihost_utils.reached_preemption_sync_point(step)
    if jax.process_count() == 1:
      return self.requested
    if step % self._agree_every:
      return False
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

  def close(self) -> None:
    """Restores the SIGTERM handler that was there before."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _jax_sync_available() -> bool:
  # The manager exists once `jax.distributed.initialize` ran with the service on.
  return bool(jax.config.jax_enable_preemption_service)
