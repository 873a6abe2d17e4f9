"""Multi-host start-up: `jax.distributed.initialize` when more than one process
is expected.

Cloud TPU pods and SLURM jobs are detected by JAX itself; elsewhere the
coordinator comes from `--coordinator_address`, `--num_processes` and
`--process_id` (or the VLP_COORDINATOR_ADDRESS / VLP_NUM_PROCESSES /
VLP_PROCESS_ID environment variables that `launch/local_multiprocess.sh` sets).
"""

from __future__ import annotations

import os

import jax
from absl import flags

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 for multi-process runs.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Total number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_INIT_TIMEOUT = flags.DEFINE_integer("distributed_timeout", 300,
                                     "Seconds to wait for all processes to connect.")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else None


def _expects_multiple_processes() -> bool:
  if (_NUM_PROCESSES.value or _env_int("VLP_NUM_PROCESSES") or 1) > 1:
    return True
  if (_env_int("SLURM_NTASKS") or 1) > 1:
    return True
  # A multi-host Cloud TPU slice sets the worker list for every host.
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def initialize_from_flags() -> None:
  """Initialises the distributed runtime once, if the job spans processes."""
  if not _expects_multiple_processes():
    return
  address = _COORDINATOR.value or os.environ.get("VLP_COORDINATOR_ADDRESS")
  num = _NUM_PROCESSES.value or _env_int("VLP_NUM_PROCESSES")
  pid = _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("VLP_PROCESS_ID")
  kwargs = {"initialization_timeout": _INIT_TIMEOUT.value}
  if address is not None:
    kwargs.update(coordinator_address=address, num_processes=num, process_id=pid)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
