"""Metrics output: `WORKDIR/metrics.jsonl` (one JSON object per log step) and, with
`config.tensorboard`, TensorBoard event files beside it (`tensorboard --logdir
WORKDIR`); progress lines with throughput and ETA, and a NaN guard. Only process 0
writes."""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np


def _plain(v: Any) -> Any:
  if isinstance(v, (np.generic, np.ndarray)) or hasattr(v, "__array__"):
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()
  return v


def scalars(record: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
  """The numeric leaves of a (nested) record, keyed by their '/'-joined path."""
  out: dict[str, float] = {}
  for k, v in record.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(scalars(v, key + "/"))
    elif isinstance(v, (bool, np.bool_)) or v is None:
      continue
    elif isinstance(v, (int, float, np.integer, np.floating)) and math.isfinite(float(v)):
      out[key] = float(v)
  return out


class MetricWriter:
  """Appends JSON lines; a resumed run continues the same file.

  With `tensorboard`, every numeric value also goes to an event file in the same
  folder (tag = key, nested keys joined by '/', under `tag_prefix`), at `step`.
  """

  def __init__(self, workdir: str, filename: str = "metrics.jsonl", *,
               tensorboard: bool = False, tag_prefix: str = ""):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, filename)
    self.tag_prefix = tag_prefix
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
        self._tb = SummaryWriter(workdir, filename_suffix=f".{filename.split('.')[0]}")

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
    if self._tb is not None:
      step = int(record["step"])
      for tag, value in scalars({k: v for k, v in record.items() if k != "step"},
                                self.tag_prefix).items():
        self._tb.add_scalar(tag, value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` (a mapping of metrics, or any JSON-able value) from process 0."""
  if jax.process_index() != 0:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if isinstance(obj, Mapping):
    obj = {k: _plain(v) for k, v in obj.items()}
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  bad = {k: v for k, v in metrics.items()
         if isinstance(v, float) and not math.isfinite(v)}
  if bad:
    raise FloatingPointError(f"non-finite metrics at step {step}: {bad}")


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """Throughput since the last report, and an ETA from the steady-state rate.

  The first report after (re)start includes compilation, so the ETA uses the
  rate measured from the first report on.
  """

  def __init__(self, total_steps: int, start_step: int, batch_size: int):
    self.total = total_steps
    self.batch_size = batch_size
    self.last_step, self.last_time = start_step, time.perf_counter()
    self.first_step, self.first_time = None, None

  def update(self, step: int) -> dict:
    now = time.perf_counter()
    steps = max(step - self.last_step, 1)
    dt = max(now - self.last_time, 1e-9)
    if self.first_step is None:
      self.first_step, self.first_time = step, now
      rate = steps / dt
    else:
      rate = (step - self.first_step) / max(now - self.first_time, 1e-9) or steps / dt
    self.last_step, self.last_time = step, now
    return {"examples_per_sec": steps * self.batch_size / dt,
            "steps_per_sec": steps / dt,
            "eta_seconds": (self.total - step) / max(rate, 1e-9)}

  @staticmethod
  def line(step: int, total: int, task: str, metrics: Mapping[str, Any], perf: Mapping) -> str:
    loss = metrics.get(f"loss/{task}", metrics.get("loss"))
    return (f"step {step}/{total} [{task}] loss={loss:.4f} lr={metrics.get('lr', 0):.2e} "
            f"{perf['examples_per_sec']:.0f} ex/s ETA {_fmt_duration(perf['eta_seconds'])}")


def log(msg: str) -> None:
  """A progress line on stdout (process 0 only); absl logging keeps the details."""
  if jax.process_index() == 0:
    print(msg, flush=True)
