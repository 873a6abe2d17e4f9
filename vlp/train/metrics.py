"""Metrics output: `WORKDIR/metrics.jsonl` (one JSON object per log step) and, with
`config.tensorboard`, TensorBoard event files beside it (`tensorboard --logdir
WORKDIR`); progress lines and a NaN guard. Only process 0 writes. What a log line
holds is `vlp.train.log_interval`'s. The workdir may be on an object store
(`vlp.storage.LocalMirror`)."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath

from vlp import storage


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

  Both files are written in a local folder (`storage.LocalMirror`: the workdir
  itself when it is local) and uploaded after each write when the workdir is on
  an object store: objects cannot be appended to, and tensorboardX's writer only
  reaches the local file system and, through its own clients, gs:// and s3://,
  not what else epath supports.
  """

  def __init__(self, workdir: str, filename: str = "metrics.jsonl", *,
               tensorboard: bool = False, tag_prefix: str = ""):
    self.enabled = jax.process_index() == 0
    self.path = storage.join(workdir, filename)
    self.tag_prefix = tag_prefix
    self._tb = None
    self._mirror = None
    if self.enabled:
      self._mirror = storage.LocalMirror(workdir)
      self._mirror.pull(filename)  # A resumed run continues the file.
      self._local = self._mirror.local(filename)
      if tensorboard:
        from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
        self._tb = SummaryWriter(self._mirror.local_dir,
                                 filename_suffix=f".{filename.split('.')[0]}")

  def write(self, record: Mapping[str, Any]) -> None:
    if not self.enabled:
      return
    with open(self._local, "a") as f:
      f.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")
    if self._tb is not None:
      step = int(record["step"])
      for tag, value in scalars({k: v for k, v in record.items() if k != "step"},
                                self.tag_prefix).items():
        self._tb.add_scalar(tag, value, step)
      self._tb.flush()
    self._mirror.push()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._mirror is not None:
      self._mirror.close()
      self._mirror = None


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` (a mapping of metrics, or any JSON-able value) from process 0."""
  if jax.process_index() != 0:
    return
  path = epath.Path(storage.absolute(path))
  path.parent.mkdir(parents=True, exist_ok=True)
  if isinstance(obj, Mapping):
    obj = {k: _plain(v) for k, v in obj.items()}
  path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  bad = {k: v for k, v in metrics.items()
         if isinstance(v, float) and not math.isfinite(v)}
  if bad:
    raise FloatingPointError(f"non-finite metrics at step {step}: {bad}")


def log(msg: str) -> None:
  """A progress line on stdout (process 0 only); absl logging keeps the details."""
  if jax.process_index() == 0:
    print(msg, flush=True)
