"""SIGTERM -> every process stops at the same point, with a checkpoint.

Cluster schedulers announce a pre-emption (or `scancel`, a SLURM time limit, a
TPU maintenance event) with SIGTERM, possibly to one host only. Stopping must be
collective: a checkpoint save is a collective operation, so every process has
to decide to save at the same point.

`should_stop()` is asked after every train step and before every evaluation
batch, by every process in the same order, so a SIGTERM during a long
evaluation is noticed within one eval batch.

* One process: a Python SIGTERM handler sets a flag; `should_stop` reads it.
* Several processes: JAX's preemption sync manager (started by
  `jax.distributed.initialize`) catches SIGTERM on any host, tells the others
  through the coordination service, and `reached_preemption_sync_point(n)`
  returns True on every host at the same call n. No Python handler is installed
  then, since it would replace JAX's.
* If that service is unavailable, processes agree with an all-gather of their
  flags every `agree_every` calls.

Exit status of the entry points (`vlp.entry`), which the launchers act on:
  0                   finished;
  EXIT_PREEMPTED (42) pre-empted, checkpoint written: requeue / restart with the
                      same workdir and it resumes there;
  75                  the processes never all connected
                      (`runtime.EXIT_RENDEZVOUS_TIMEOUT`): a retry may help;
  anything else       a real failure: do not requeue blindly.
"""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

# "Pre-empted, checkpoint saved, requeue me" (distinct from 1, Python's error status,
# and from 128 + signal, a process killed before it could save).
EXIT_PREEMPTED = 42


class Preempted(Exception):
  """Raised by the training loop once the pre-emption checkpoint is written."""

  def __init__(self, step: int, where: str):
    super().__init__(f"pre-emption (SIGTERM) during {where}: checkpoint written at step {step}")
    self.step = step
    self.where = where


class PreemptionWatch:
  """Answers "stop now?" identically on every process."""

  def __init__(self, *, agree_every: int = 10):
    self.requested = False
    self._agree_every = max(1, int(agree_every))
    self._calls = 0  # Same count on every process: the sync points' step ids.
    self._previous = None
    self._use_jax = jax.process_count() > 1 and _jax_sync_available()
    if not self._use_jax and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self) -> bool:
    """Every process must call this at the same points (after each train step,
    before each eval batch); the answer is then the same on all of them."""
    self._calls += 1
    if self._use_jax:
      return multihost_utils.reached_preemption_sync_point(self._calls)
    if jax.process_count() == 1:
      return self.requested
    if self._calls % self._agree_every:
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
