"""What the loop reports every `config.log_every` steps: per-task means of the step
metrics over the interval, throughput, MFU, and where the time went.

Steps run asynchronously: a step returns device arrays before the device has
finished it. `add_step` only keeps each step's (scalar) metric arrays; nothing
is read until `report`, whose one `device_get` of the whole interval's metrics
both reads them and waits for the device: the interval's only host sync. The
means are then taken on the host, so a logged `loss/<task>` is the mean over the
interval's steps of that task (not one sampled step).

Time split of the interval (eval time is left out of it and of throughput):
  data        host time in `next(batches)` and the host-to-device hand-off;
  checkpoint  host time in checkpoint saves (async: mostly the device-to-host copy);
  compute     the rest of the wall time, up to the device finishing the log step.
The first interval after a (re)start includes compilation in `compute`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Mapping

import jax
import numpy as np

PHASES = ("data", "checkpoint", "eval")


class LogInterval:
  """Collects the steps between two log lines and reports them.

  Args:
    batch_size: global examples per step.
    total_steps, start_step: for the ETA.
    flops_per_example: task -> model FLOPs of one training example
      (`vlp.train.flops`); a task missing here leaves MFU out of the intervals
      that ran it.
    peak_flops: the peak FLOP/s of all devices together; None (CPU, an unknown
      device kind) leaves MFU out.
  """

  def __init__(self, *, batch_size: int, total_steps: int, start_step: int,
               flops_per_example: Mapping[str, float], peak_flops: float | None):
    self.batch_size, self.total = batch_size, total_steps
    self.flops_per_example, self.peak = dict(flops_per_example), peak_flops
    self._steps: list[tuple[str, Any]] = []
    self._spent = dict.fromkeys(PHASES, 0.0)
    self._start = time.perf_counter()
    self._first: tuple[int, float] | None = None  # (step, time) of the first report.

  @contextlib.contextmanager
  def timed(self, phase: str):
    """Counts the time of the `with` body as `phase` (one of PHASES)."""
    t0 = time.perf_counter()
    try:
      yield
    finally:
      self._spent[phase] += time.perf_counter() - t0

  def add_step(self, task: str, metrics: Mapping[str, Any]) -> None:
    """The metrics of one step (device arrays: not read here)."""
    self._steps.append((task, metrics))

  def report(self, step: int) -> dict[str, Any]:
    """The record of the interval ending at `step` (blocks on the device once);
    starts the next interval."""
    tasks = [t for t, _ in self._steps]
    values = jax.device_get([m for _, m in self._steps])
    now = time.perf_counter()
    wall = max(now - self._start - self._spent["eval"], 1e-9)
    n = max(len(tasks), 1)
    record: dict[str, Any] = {"step": step, "task": tasks[-1] if tasks else None,
                              "lr": float(values[-1]["lr"]) if values else None}
    record.update(interval_means(values))
    record["examples_per_sec"] = n * self.batch_size / wall
    flops = [self.flops_per_example.get(t) for t in tasks]
    if self.peak and tasks and None not in flops:
      record["mfu"] = sum(flops) * self.batch_size / wall / self.peak
    compute = wall - self._spent["data"] - self._spent["checkpoint"]
    record.update({"step_time/data_ms": 1e3 * self._spent["data"] / n,
                   "step_time/compute_ms": 1e3 * max(compute, 0.0) / n,
                   "step_time/checkpoint_ms": 1e3 * self._spent["checkpoint"] / n})
    if self._first is None:
      self._first, rate = (step, now), n / wall  # Includes compilation.
    else:
      rate = (step - self._first[0]) / max(now - self._first[1], 1e-9)
    record["eta_seconds"] = (self.total - step) / max(rate, 1e-9)
    self._steps, self._spent, self._start = [], dict.fromkeys(PHASES, 0.0), now
    return record


def interval_means(step_metrics: list[Mapping[str, Any]]) -> dict[str, float]:
  """Each metric's mean over the steps that reported it (task metrics such as
  `loss/mlm` only come from that task's steps). The step's total weighted loss
  (`loss`) and `lr` are left out: the per-task losses and the last lr say more."""
  sums: dict[str, float] = {}
  counts: dict[str, int] = {}
  for m in step_metrics:
    for k, v in m.items():
      if k in ("loss", "lr"):
        continue
      sums[k] = sums.get(k, 0.0) + float(np.asarray(v))
      counts[k] = counts.get(k, 0) + 1
  return {k: sums[k] / counts[k] for k in sums}


def progress_line(record: Mapping[str, Any], total: int) -> str:
  """`step 300/1000 [mlm] loss=2.1034 lr=1.0e-04 812 ex/s MFU 38.1% | per step:
  data 3ms compute 152ms ckpt 0ms | ETA 2m10s`."""
  task = record["task"]
  mfu = f" MFU {100 * record['mfu']:.1f}%" if "mfu" in record else ""
  return (f"step {record['step']}/{total} [{task}] loss={record.get(f'loss/{task}', float('nan')):.4f} "
          f"lr={record['lr']:.2e} {record['examples_per_sec']:.0f} ex/s{mfu} | per step: "
          f"data {record['step_time/data_ms']:.0f}ms compute {record['step_time/compute_ms']:.0f}ms "
          f"ckpt {record['step_time/checkpoint_ms']:.0f}ms | ETA {_duration(record['eta_seconds'])}")


def _duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
