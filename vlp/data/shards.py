"""Data shards: slices of the global batch with their own data streams.

The global batch of B rows is cut into S equal data shards. Shard s always reads
the same examples, shuffles and masks with the same seeds, and fills rows
[s*B/S, (s+1)*B/S) of every global batch. A process builds the shards whose rows
its devices hold (`vlp.parallel.global_batch.process_rows`) and feeds them
concatenated (`ShardedIterator`). With a fixed S (`config.data_shards`) the global
batches do not depend on how many processes read them, so a run can resume on a
different number of hosts with the same data order. With `data_shards=0` S is the
fewest shards each of which one process owns whole (`count_for`): one per process
where rows are contiguous, more on a TPU torus where they are not.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def count_for(owners: Sequence[frozenset[int]]) -> int:
  """The fewest equal shards of a global batch such that every shard's rows are fed
  by the same processes; `owners[r]` is the set of processes that feed row r."""
  size = len(owners)
  for count in range(1, size + 1):
    if size % count:
      continue
    per = size // count
    if all(len(set(owners[s * per:(s + 1) * per])) == 1 for s in range(count)):
      return count
  raise AssertionError("one shard per row always lines up")


def shards_for_rows(rows: np.ndarray, global_batch: int, num_shards: int) -> list[int]:
  """The data shards that exactly cover `rows` of the global batch."""
  if global_batch % num_shards:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the "
                     f"{num_shards} data shards (config.data_shards, 0 = one per process)")
  per = global_batch // num_shards
  shards = sorted({int(r) // per for r in rows})
  covered = np.concatenate([np.arange(s * per, (s + 1) * per) for s in shards])
  if not np.array_equal(covered, np.asarray(rows)):
    raise ValueError(
        f"this process feeds global batch rows {list(rows)[:8]}..., which do not line up "
        f"with {num_shards} data shards of {per} rows; set config.data_shards to 0 (shards "
        f"follow the sharding) or to a multiple of the batch pieces each process holds")
  return shards


class ShardedIterator:
  """Several data shards advanced in lockstep; batches concatenated row-wise."""

  def __init__(self, iterators):
    self._its = list(iterators)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    parts = [next(it) for it in self._its]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return self._its[0].get_state()  # Every shard is at the same batch index.

  def set_state(self, state: dict) -> None:
    for it in self._its:
      it.set_state(state)

  @property
  def stats(self) -> dict:
    out: dict = {}
    for it in self._its:
      for k, v in it.stats.items():
        out[k] = out.get(k, 0) + v
    return out

  def close(self) -> None:
    for it in self._its:
      it.close()
