"""Host batches -> global `jax.Array`s, and back.

Each process holds only its share of the global batch (its own rows). The global
array is assembled with `jax.make_array_from_process_local_data`, which places
the rows on the process's devices according to the batch sharding, so no host
ever holds the whole batch.
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from vlp.dist import sharding as sharding_lib


def host_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh, rules) -> dict:
  shardings = sharding_lib.batch_shardings(batch, mesh, rules)
  return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v))
          for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
  """The full value of a (possibly multi-host) array on every host."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def split_for_process(n: int) -> slice:
  """This process's contiguous share of `n` global rows (n divisible by count)."""
  count, index = jax.process_count(), jax.process_index()
  if n % count:
    raise ValueError(f"global batch {n} is not divisible by the {count} processes")
  per = n // count
  return slice(index * per, (index + 1) * per)
