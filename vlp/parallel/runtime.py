"""Multi-host start-up: `jax.distributed.initialize` when more than one process
is expected, before anything touches the devices.

`--distributed=auto` (the default) initialises when
  * `--num_processes` (or VLP_NUM_PROCESSES) is above 1: the coordinator then
    comes from `--coordinator_address` / VLP_COORDINATOR_ADDRESS and the index
    from `--process_id` / VLP_PROCESS_ID (what `launch/local_multiprocess.sh`
    sets);
  * an `srun` step has more than one task: JAX's own SLURM detection supplies
    the coordinator (first node of the step), the process count and index, and
    one GPU per process unless `--local_device_ids` says otherwise;
  * this is a Cloud TPU VM (libtpu and TPU device files present) or a GKE TPU
    slice with several workers: JAX reads the workers from the TPU metadata.
`--distributed=on` always initialises (JAX auto-detection or the flags);
`--distributed=off` never does.

A run that cannot assemble fails with a clear message within
`--distributed_timeout` seconds: a process that cannot reach the coordinator
raises `ConnectionError`, and a coordinator left waiting for missing processes
exits with a message naming what it waited for (JAX itself would abort the
process with a bare DEADLINE_EXCEEDED).
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import socket
import sys
import threading
import time
from typing import Mapping, Sequence

import jax
from absl import flags

_MODE = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                          "Initialise the multi-host runtime: auto-detect, always, never.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_LOCAL_DEVICES = flags.DEFINE_list(
    "local_device_ids", None, "Accelerators this process drives (default: all, or one GPU "
    "per process under SLURM). E.g. 0,1,2,3 for one process per 4-GPU node.")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300,
                                     "Seconds to wait for all processes to connect.")

# Exit status when the processes never all connected (EX_TEMPFAIL: retry may help).
EXIT_RENDEZVOUS_TIMEOUT = 75


def _env_int(env: Mapping[str, str], name: str) -> int | None:
  value = env.get(name)
  return int(value) if value not in (None, "") else None


def slurm_tasks(env: Mapping[str, str] = os.environ) -> int:
  """Tasks of the current `srun` step (0 outside one)."""
  if "SLURM_STEP_NODELIST" not in env or "SLURM_PROCID" not in env:
    return 0
  return _env_int(env, "SLURM_STEP_NUM_TASKS") or _env_int(env, "SLURM_NTASKS") or 0


def on_cloud_tpu(env: Mapping[str, str] = os.environ) -> bool:
  """A TPU VM (libtpu + TPU device files) or a multi-worker GKE TPU slice."""
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  has_libtpu = importlib.util.find_spec("libtpu") is not None
  return has_libtpu and bool(glob.glob("/dev/accel[0-9]*") or glob.glob("/dev/vfio/[0-9]*"))


def skip_absent_tpu(env: Mapping[str, str] = os.environ) -> str | None:
  """Makes the CPU JAX's platform where libtpu is installed but there is no TPU.

  Left to choose, JAX starts every backend it knows at the first device query,
  TPU included whenever libtpu is installed (the AOT check and `make test`
  install it): it loads libtpu's 700 MB library, whose failed probe prints an
  error line and warnings about TPU_ACCELERATOR_TYPE and TPU_WORKER_HOSTNAMES
  and costs about 0.1 s. On a machine without TPU or NVIDIA device files, and
  with JAX_PLATFORMS unset, this picks the CPU before that happens. A TPU VM, a
  GPU machine and an explicit JAX_PLATFORMS (even empty) are left to JAX. Must
  run before anything touches the devices; returns the platform it set, or None.
  """
  if ("JAX_PLATFORMS" in env or importlib.util.find_spec("libtpu") is None
      or on_cloud_tpu(env) or glob.glob("/dev/nvidia[0-9]*")):
    return None
  jax.config.update("jax_platforms", "cpu")
  return "cpu"


def wants_initialize(mode: str, num_processes: int | None,
                     env: Mapping[str, str] = os.environ) -> bool:
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"--distributed must be auto, on or off, got {mode!r}")
  if mode != "auto":
    return mode == "on"
  return (num_processes or 1) > 1 or slurm_tasks(env) > 1 or on_cloud_tpu(env)


def wait_for_coordinator(address: str, timeout: float, *, process_id: int | None = None,
                         num_processes: int | None = None) -> None:
  """Returns once `address` accepts TCP connections; ConnectionError after `timeout`."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"coordinator address {address!r} is not host:port")
  deadline = time.monotonic() + timeout
  last_error: Exception | None = None
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
        return
    except OSError as e:
      last_error = e
    if time.monotonic() >= deadline:
      raise ConnectionError(
          f"process {process_id} of {num_processes} could not reach the JAX coordinator at "
          f"{address} within {timeout:g} s ({last_error}). Process 0 starts the coordinator: "
          f"check that it is running, that the address and port are right and reachable "
          f"from this host, or raise --distributed_timeout.")
    time.sleep(0.25)


def _watchdog(timeout: float, what: str) -> threading.Timer:
  def fire():
    sys.stderr.write(f"vlp: the distributed runtime did not start within {timeout:g} s: "
                     f"{what}. Check that every process was started (TPU: --worker=all; "
                     f"SLURM: one task per process) with the same process count and "
                     f"coordinator, or raise --distributed_timeout.\n")
    sys.stderr.flush()
    os._exit(EXIT_RENDEZVOUS_TIMEOUT)  # The main thread is blocked inside JAX.
  timer = threading.Timer(timeout, fire)
  timer.daemon = True
  timer.start()
  return timer


def initialize(*, mode: str = "auto", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None,
               local_device_ids: Sequence[int] | None = None, timeout: int = 300,
               env: Mapping[str, str] = os.environ) -> bool:
  """Initialises the distributed runtime if the job spans processes.

  Returns whether `jax.distributed.initialize` was called.
  """
  if not wants_initialize(mode, num_processes, env):
    return False
  kwargs: dict = {}
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    if process_id != 0:
      wait_for_coordinator(coordinator_address, timeout, process_id=process_id,
                           num_processes=num_processes)
  elif num_processes is not None and num_processes > 1 and not (
      slurm_tasks(env) > 1 or on_cloud_tpu(env)):
    raise ValueError(f"--num_processes={num_processes} but no --coordinator_address, and "
                     f"no SLURM step or Cloud TPU to detect it from")
  if local_device_ids is not None:
    kwargs["local_device_ids"] = [int(i) for i in local_device_ids]
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  what = (f"process {process_id} of {num_processes} waited for all processes to connect "
          f"to the coordinator at {coordinator_address}" if coordinator_address else
          "waited for the processes found by cluster auto-detection to connect")
  # Our watchdog fires first, with a message; JAX's own deadline is a backstop.
  timer = _watchdog(timeout, what)
  try:
    jax.distributed.initialize(initialization_timeout=int(timeout) + 30, **kwargs)
  finally:
    timer.cancel()
  logging.info("distributed: process %d of %d, %d local / %d global devices",
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return True


def split_host_cpu(num_devices: int, env: Mapping[str, str] = os.environ) -> int | None:
  """Makes JAX's CPU platform `num_devices` devices (config key `cpu_devices`).

  On a few cores, a small model runs faster data-parallel over one device per
  core than on one device whose ops XLA threads internally (the tiny config on 2
  cores: about 1,300 examples/s against 880). It only shapes the CPU platform; a
  GPU or TPU run is unaffected. An explicit choice in the environment wins
  (`--xla_force_host_platform_device_count` in XLA_FLAGS, or JAX_NUM_CPU_DEVICES),
  and 0 leaves JAX's default (one device). Must run before anything touches the
  devices. Returns the count it set, or None.
  """
  if num_devices <= 0 or "JAX_NUM_CPU_DEVICES" in env or (
      "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "")):
    return None
  jax.config.update("jax_num_cpu_devices", int(num_devices))
  return int(num_devices)


def initialize_from_flags(*, cpu_devices: int = 0) -> bool:
  """`initialize` from the command-line flags and VLP_* environment variables,
  after `split_host_cpu(cpu_devices)`."""
  split_host_cpu(cpu_devices)
  env = os.environ
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int(env, "VLP_PROCESS_ID")
  return initialize(
      mode=_MODE.value,
      coordinator_address=_COORDINATOR.value or env.get("VLP_COORDINATOR_ADDRESS") or None,
      num_processes=_NUM_PROCESSES.value or _env_int(env, "VLP_NUM_PROCESSES"),
      process_id=pid, local_device_ids=_LOCAL_DEVICES.value, timeout=_INIT_TIMEOUT.value)
