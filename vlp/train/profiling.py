"""Traces of chosen train steps (`config.profile_steps`, e.g. "100:105").

The JAX profiler records steps [start, stop) to WORKDIR/profile, readable by
TensorBoard's profile plugin (`tensorboard --logdir WORKDIR`) and, through the
`*.trace.json.gz` it also writes, by Perfetto (ui.perfetto.dev). Every process
traces its own devices; the trace stops after the last traced step has finished
on the device, so it holds whole steps. With the workdir on an object store the
trace is written to a local folder and uploaded when it stops
(`storage.LocalMirror`), so that it does not depend on which stores the
profiler's own file system reaches.
"""

from __future__ import annotations

import jax

from vlp import storage


def parse_steps(spec: str) -> tuple[int, int] | None:
  """'' -> None; 'N:M' -> (N, M), the steps (1-based, as logged) N..M-1."""
  if not spec:
    return None
  try:
    start, stop = (int(x) for x in spec.split(":"))
  except ValueError:
    raise ValueError(f"config.profile_steps={spec!r}: expected 'START:STOP', e.g. '100:105'")
  if not 0 < start < stop:
    raise ValueError(f"config.profile_steps={spec!r}: need 0 < START < STOP")
  return start, stop


class StepProfiler:
  """Call `before(step)` ahead of running step `step` and `after(step, state)` after."""

  def __init__(self, spec: str, workdir: str):
    self.steps = parse_steps(spec)
    self.logdir = storage.join(workdir, "profile")
    self.active = False
    self._mirror = None

  def before(self, step: int) -> None:
    if self.steps and step == self.steps[0] and not self.active:
      self._mirror = storage.LocalMirror(self.logdir)
      jax.profiler.start_trace(self._mirror.local_dir, create_perfetto_trace=True)
      self.active = True

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._mirror.close()
    self.active = False

  def after(self, step: int, state) -> None:
    if self.active and step >= self.steps[1] - 1:
      jax.block_until_ready(state)
      self._stop()

  def close(self) -> None:
    if self.active:
      self._stop()
