"""Host batches -> global `jax.Array`s, and back.

Each process holds only its share of the global batch: the rows that its own
devices hold under the batch sharding (`process_rows`). The global array is
assembled with `jax.make_array_from_process_local_data`, which places those rows
on the process's devices, so no host ever holds the whole batch. When the batch
axis is not split across processes (e.g. tensor parallelism across hosts), several
processes hold the same rows and must feed identical data.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from vlp.parallel import sharding as sharding_lib


def _row_sharding(mesh: Mesh, rules, global_size: int) -> NamedSharding:
  """The sharding of a [global_size] batch axis, checked to split evenly."""
  pieces = sharding_lib.batch_shard_count(mesh, rules)
  if global_size % pieces:
    raise ValueError(f"global batch {global_size} does not split into the {pieces} pieces "
                     f"of the batch sharding over mesh {dict(mesh.shape)}")
  return NamedSharding(mesh, sharding_lib.batch_spec(mesh, rules, 1))


def process_rows(mesh: Mesh, rules, global_size: int) -> np.ndarray:
  """Sorted indices of the global batch rows this process must feed.

  Derived from the batch sharding itself rather than from `jax.process_index()`,
  so it stays right for any device order the mesh picks.
  """
  sharding = _row_sharding(mesh, rules, global_size)
  rows: set[int] = set()
  for index in sharding.addressable_devices_indices_map((global_size,)).values():
    rows.update(range(global_size)[index[0]])
  return np.array(sorted(rows), dtype=np.int64)


def row_owners(mesh: Mesh, rules, global_size: int) -> list[frozenset[int]]:
  """For every row of the global batch, the processes that feed it (the same on
  every host: read off the sharding of all devices)."""
  sharding = _row_sharding(mesh, rules, global_size)
  owners: list[set[int]] = [set() for _ in range(global_size)]
  for device, index in sharding.devices_indices_map((global_size,)).items():
    for r in range(global_size)[index[0]]:
      owners[r].add(device.process_index)
  return [frozenset(o) for o in owners]


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, rules,
                   global_size: int | None = None) -> dict:
  """This process's rows (in `process_rows` order) -> global arrays.

  `global_size` (the global batch) lets the layout be checked rather than
  inferred; without it each process is assumed to hold only its own rows.
  """
  shardings = sharding_lib.batch_shardings(batch, mesh, rules)
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    shape = None if global_size is None else (global_size,) + v.shape[1:]
    out[k] = jax.make_array_from_process_local_data(shardings[k], v, shape)
  return out


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) array on every host."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def gather_rows(local: np.ndarray, rows: np.ndarray, global_size: int) -> np.ndarray:
  """The global batch of a host array, in row order, on every host.

  `local` holds this process's `rows` (its `process_rows`, in that order), as fed
  to `host_to_global`. Host-only fields (ids, boxes) come back in the same order
  as a model output fetched with `to_host`, whatever the device order.
  """
  local, rows = np.asarray(local), np.asarray(rows, np.int64)
  if len(local) != len(rows):
    raise ValueError(f"{len(local)} local rows for {len(rows)} row indices")
  if jax.process_count() == 1:
    everything, where = local, rows
  else:
    everything = np.asarray(multihost_utils.process_allgather(local, tiled=True))
    where = np.asarray(multihost_utils.process_allgather(rows, tiled=True))
  # Processes that share rows (batch not split across them) hold the same data.
  if set(where.tolist()) != set(range(global_size)):
    raise ValueError(f"the processes' rows do not cover a global batch of {global_size}")
  out = np.empty((global_size,) + local.shape[1:], local.dtype)
  out[where] = everything
  return out
