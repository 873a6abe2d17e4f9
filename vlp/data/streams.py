"""The two ways batches leave vlp/data: an endless training stream and finite eval batches.

Both take a `vlp.data.batching.Batcher` over an example index (vlp.data.examples),
whatever the examples are (image-caption pairs, questions, expressions).

Training (`train_iterator`): the index holds the examples of one data shard;
they are shuffled with a permutation drawn from (seed, shard, epoch, the index's
shuffle tag), epochs follow each other seamlessly, forever. Batch i is built and
optionally turned into a task batch (`kind_for_index(i)`) with a masking RNG
drawn from (seed, i, shard) only, so batch i is a pure function of (seed, i):
resuming means starting at index i. With several batchers (the parts of a data
mixture, vlp.data.mixture) the shard's stream positions are dealt to the parts in
closed form, so this still holds. grain provides the parallelism: reader threads
per process and optionally worker processes.

Evaluation (`EvalDataset`): the index holds a whole split, cut into contiguous
data shards; every shard gets the same number of batches, so every process runs
the same number of eval steps.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

import grain
import numpy as np

from vlp.data.batching import Batcher, RecentCache, apply_kind, masking_rng, shuffle_rng
from vlp.data.mixture import Interleave


class EpochShuffle(RecentCache):
  """Per-epoch permutations of `num` items, a pure function of (seed, shard, epoch, tag).

  Base of the picklable batch functions that grain workers run.
  """

  def __init__(self, *, seed: int, process_index: int, num: int, tag: int):
    if int(seed) < 0:
      raise ValueError(f'the data seed must be a non-negative int, got {seed}')
    self.seed, self.process_index, self.num, self.tag = int(seed), process_index, int(num), tag
    self.stats: dict = {}
    super().__init__()

  def _permutation(self, epoch: int) -> np.ndarray:
    return self._cached(epoch, lambda e: shuffle_rng(
        self.seed, self.process_index, e, self.tag).permutation(self.num))

  def positions(self, index: int, batch_size: int) -> np.ndarray:
    """Item positions (in [0, num)) of batch `index`, epoch after epoch."""
    return self.at(np.arange(index * batch_size, (index + 1) * batch_size, dtype=np.int64))

  def at(self, ordinals: np.ndarray) -> np.ndarray:
    """Item positions of the stream's `ordinals`-th items (epoch after epoch)."""
    epochs, offsets = np.divmod(np.asarray(ordinals, np.int64), self.num)
    out = np.empty_like(offsets)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[offsets[sel]]
    return out

  def add_stats(self, stats: dict) -> None:
    with self._lock:
      for key, value in stats.items():
        self.stats[key] = self.stats.get(key, 0) + int(value)


class TrainBatchFn(EpochShuffle):
  """Batch index -> batch of one data shard; picklable so grain workers can run it.

  With several batchers (the parts of a mixture, vlp.data.mixture) the shard's
  stream positions are dealt to them by `Interleave(shares)`; part k shuffles its
  own examples per epoch with the tag of its index plus k, so part 0 (and a
  stream of one part) reads exactly what a stream over its batcher alone reads.
  """

  def __init__(self, batcher: Batcher | Sequence[Batcher], *, seed: int, process_index: int,
               kind_for_index: Callable[[int], str] | None = None,
               shares: Sequence[int] | None = None):
    self.batchers = [batcher] if isinstance(batcher, Batcher) else list(batcher)
    self.batcher, self.kind_for_index = self.batchers[0], kind_for_index
    shares = [1] * len(self.batchers) if shares is None else list(shares)
    if len(shares) != len(self.batchers):
      raise ValueError(f'{len(shares)} mixture shares for {len(self.batchers)} batchers')
    super().__init__(seed=seed, process_index=process_index, num=len(self.batcher.index),
                     tag=self.batcher.index.shuffle_tag)
    self.part_shuffles = [self] + [
        EpochShuffle(seed=seed, process_index=process_index, num=len(b.index),
                     tag=b.index.shuffle_tag + k) for k, b in enumerate(self.batchers) if k]
    self.interleave = Interleave(shares, seed=seed, shard=process_index)

  def __call__(self, index: int) -> dict:
    stats: dict = {}
    b = self.batcher.spec.batch_size
    parts, own = self.interleave.locate(np.arange(index * b, (index + 1) * b, dtype=np.int64))
    if len(self.batchers) == 1:
      batch = self.batcher(self.at(own), stats)
    else:  # pairs of every part, in row order, padded once
      records, texts = [None] * b, [None] * b
      for k in np.unique(parts):
        rows = np.flatnonzero(parts == k)
        examples = self.batchers[k].index
        positions = self.part_shuffles[k].at(own[rows])
        part_records = self.batchers[k].images.read(examples.image_rows(positions))
        for row, record, text in zip(rows, part_records,
                                     examples.texts_of(positions, part_records)):
          records[row], texts[row] = record, text
      batch = self.batcher.pairs(records, texts, b, stats)
    if self.kind_for_index is not None:
      batch = apply_kind(batch, self.kind_for_index(index),
                         masking_rng(self.seed, index, self.process_index),
                         self.batcher.spec, self.batcher.token_ids, stats, inplace=True)
    self.add_stats(stats)
    return batch


class TrainIterator:
  """Infinite iterator of batches with a checkpointable position.

  `get_state()` is `{'next_index': i}` (JSON-able): the stream is a pure function of
  (seed, batch index), so restoring rebuilds the grain iterator at batch i. A
  stream given a `name` (a mixture's `config.data`) adds `'data': name`, and
  refuses a state saved from another mixture.
  `stats` counts truncated texts and capped or impossible maskings (exact with
  `worker_count=0`; worker processes keep their own counts).
  """

  def __init__(self, fn: TrainBatchFn, *, start_index: int, num_threads: int,
               prefetch: int, worker_count: int, name: str | None = None):
    self._fn, self._threads, self._prefetch, self.name = fn, num_threads, prefetch, name
    self._workers = worker_count
    self._it, self._next = None, int(start_index)
    self._restart()

  def _restart(self):
    self.close()
    ds = grain.MapDataset.range(self._next, sys.maxsize).map(self._fn)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=self._threads,
                                                 prefetch_buffer_size=self._prefetch))
    if self._workers > 0:
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._workers))
    self._it = iter(it_ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self._it)
    self._next += 1
    return batch

  @property
  def next_index(self) -> int:
    return self._next

  @property
  def examples(self):
    """The example index (vlp.data.examples) this stream shuffles: its shard's examples."""
    return self._fn.batcher.index

  @property
  def stats(self) -> dict:
    return dict(self._fn.stats)

  def get_state(self) -> dict:
    state = {'next_index': self._next}
    if self.name is not None:
      state['data'] = self.name
    return state

  def set_state(self, state: dict) -> None:
    saved = state.get('data')
    if saved is not None and self.name is not None and saved != self.name:
      raise ValueError(f'the checkpoint\'s data stream reads {saved!r}, this run '
                       f'config.data={self.name!r}; resume with the same data (or start a '
                       'new workdir)')
    self._next = int(state['next_index'])
    self._restart()

  def close(self):
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None


class StepStamped:
  """A training stream whose batches carry their batch index, as `key` [B] int32.

  Batch i of the stream is the batch of training step i (the loop starts the
  stream at its resume step), so a loss whose form depends on the step can read
  it from its batch and stay a pure `loss_fn(model, batch, rng)`. One value per
  row, so that the column shards and splits into micro-batches like the rest.
  Wraps a `TrainIterator` (or a `vlp.data.shards.ShardedIterator` of them).
  """

  def __init__(self, iterator, key: str):
    self._it, self.key = iterator, key

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    index = self._it.get_state()['next_index']
    batch = next(self._it)
    rows = len(next(iter(batch.values())))
    return dict(batch, **{self.key: np.full((rows,), index, np.int32)})

  @property
  def stats(self) -> dict:
    return self._it.stats

  def get_state(self) -> dict:
    return self._it.get_state()

  def set_state(self, state: dict) -> None:
    self._it.set_state(state)

  def close(self) -> None:
    self._it.close()


def train_iterator(batcher: Batcher | Sequence[Batcher], *, seed: int, process_index: int,
                   kind_for_index: Callable[[int], str] | None = None, start_index: int = 0,
                   worker_count: int = 0, num_threads: int = 2, prefetch: int = 4,
                   shares: Sequence[int] | None = None,
                   name: str | None = None) -> TrainIterator:
  """The infinite stream of data shard `process_index` over `batcher.index`.

  Args:
    batcher: batches of the shard's examples (`spec.batch_size` rows), or one
      batcher per part of a mixture (the same spec and tokenizer).
    seed: data seed (shuffling and masking); a non-negative int.
    process_index: the data shard (seeds its shuffle and masking).
    kind_for_index: batch index -> 'mlm' | 'mrm' | 'itm' (None: plain batches). Must
      be picklable when `worker_count > 0`.
    start_index: first batch index (resume without a stored state).
    worker_count: grain worker processes (0: threads in this process only).
    num_threads: grain reader threads per process.
    prefetch: batches buffered per process.
    shares: a mixture's parts' positions per period (`vlp.data.mixture`); None:
      equal.
    name: the data the stream reads, kept in its state (see `TrainIterator`).
  """
  fn = TrainBatchFn(batcher, seed=seed, process_index=process_index,
                    kind_for_index=kind_for_index, shares=shares)
  return TrainIterator(fn, start_index=start_index, num_threads=num_threads,
                       prefetch=prefetch, worker_count=worker_count, name=name)


class EvalDataset:
  """Finite padded batches of a split's examples, the same number on every data shard.

  The examples (positions of `batcher.index`, the whole split) are cut into
  contiguous data shards, `ranges[s] = (lo, hi)` for every shard s. The dataset
  feeds the shards `shards`, their rows of each batch concatenated in that order
  (a process feeds the shards whose rows of the global batch its devices hold).
  Every shard has ceil(largest shard / B) batches; the last ones are padded with
  rows whose `example_mask` is False (all zero, ids -1). Every batch has
  `example_index`, each row's example in the split (-1 on padding). With `kind`
  each shard's rows become that task batch, masked from (seed, batch index,
  shard), so every evaluation of the split sees the same masks.
  `len()` is the number of batches; iterate it (any number of times) or index it.

  Attributes: split_index (`batcher.index`), num_examples (this dataset's real
  rows), ids (question_ids / ref_ids of its examples, in feed order; None for
  pairs).
  """

  def __init__(self, batcher: Batcher, ranges: Sequence[tuple[int, int]],
               shards: Sequence[int], *, kind: str | None = None, seed: int = 0,
               num_threads: int = 2, prefetch: int = 4):
    self.batcher, self.kind, self.seed = batcher, kind, int(seed)
    self.shards = [int(s) for s in shards]
    if not self.shards or not all(0 <= s < len(ranges) for s in self.shards):
      raise ValueError(f'data shards {list(shards)} not in [0, {len(ranges)})')
    self.parts = [ranges[s] for s in self.shards]
    self._threads, self._prefetch = num_threads, prefetch
    self.split_index = batcher.index
    self.num_examples = sum(hi - lo for lo, hi in self.parts)
    ids = getattr(batcher.index, 'ids', None)
    self.ids = (None if ids is None else
                np.concatenate([ids[lo:hi] for lo, hi in self.parts]))
    largest = max(hi - lo for lo, hi in ranges)
    self.num_batches = -(-largest // batcher.spec.batch_size)

  def __len__(self) -> int:
    return self.num_batches

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_batches:
      raise IndexError(f'batch {index} of {self.num_batches}')
    b, spec = self.batcher.spec.batch_size, self.batcher.spec
    parts = []
    for shard, (lo, hi) in zip(self.shards, self.parts):
      positions = np.arange(lo + index * b, min(lo + (index + 1) * b, hi), dtype=np.int64)
      batch = self.batcher(positions, {})
      example = np.full((b,), -1, np.int64)
      example[:len(positions)] = positions
      batch['example_index'] = example  # before masking: ITM moves it with its text
      parts.append(apply_kind(batch, self.kind, masking_rng(self.seed, index, shard), spec,
                              self.batcher.token_ids, inplace=True))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def __iter__(self):
    ds = grain.MapDataset.range(self.num_batches).map(self.__getitem__)
    return iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self._threads, prefetch_buffer_size=self._prefetch)))
