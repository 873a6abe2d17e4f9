"""grain input pipelines over tfds data sources (image-level records, 5 captions each).

Training stream (per process): the split's images are cut into `process_count`
contiguous slices, each process reads only its own. Its (image, caption slot) pairs
(pair p -> image p // 5, caption p % 5) are shuffled with a permutation drawn from
(seed, process_index, epoch), epochs follow each other seamlessly, forever.
Batch i is built, tokenised, padded to static shapes and turned into a task batch
(`kind_for_index(i)`) with a masking RNG drawn from (seed, i, process_index) only,
so batch i is a pure function of (seed, i): resuming means starting at index i.

Work is vectorised per batch (one batched read, one sentencepiece call, numpy
masking). grain provides the parallelism: `num_threads` reader threads per
process and optionally `worker_count` worker processes.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable

import grain
import numpy as np

from vlp.data.batching import (NUM_CAPTIONS, BatchBuilder, BatchSpec, ImageSplit,
                               apply_kind, masking_rng, shard_range, shuffle_rng)
from vlp.data.tokenizer import Tokenizer

__all__ = ['BatchSpec', 'TrainIterator', 'EvalDataset', 'make_train_iterator',
           'make_eval_dataset', 'load_retrieval_gallery']


class EpochShuffle:
  """Per-epoch permutations of `num` items, a pure function of (seed, process, epoch).

  Base of the picklable batch functions that grain workers run: the lock and the
  permutation cache are rebuilt after unpickling. Subclasses may override `_rng`
  to give their stream its own seed sequence.
  """

  def __init__(self, *, seed: int, process_index: int, num: int):
    if int(seed) < 0:
      raise ValueError(f'the data seed must be a non-negative int, got {seed}')
    self.seed, self.process_index, self.num = int(seed), process_index, int(num)
    self.stats: dict = {}
    self._init_runtime()

  def _init_runtime(self):
    self._lock, self._perms = threading.Lock(), {}

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_lock'], state['_perms']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_runtime()

  def _rng(self, epoch: int) -> np.random.Generator:
    return shuffle_rng(self.seed, self.process_index, epoch)

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._perms.get(epoch)
      if perm is None:
        perm = self._rng(epoch).permutation(self.num)
        self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
        self._perms[epoch] = perm
      return perm

  def positions(self, index: int, batch_size: int) -> np.ndarray:
    """Item positions (in [0, num)) of batch `index`, epoch after epoch."""
    pos = np.arange(index * batch_size, (index + 1) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(pos, self.num)
    out = np.empty_like(pos)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[offsets[sel]]
    return out

  def add_stats(self, stats: dict) -> None:
    with self._lock:
      for key, value in stats.items():
        self.stats[key] = self.stats.get(key, 0) + int(value)


class _TrainBatchFn(EpochShuffle):
  """Batch index -> task batch; picklable so grain workers can run it."""

  def __init__(self, builder: BatchBuilder, *, seed: int, process_index: int,
               process_count: int, kind_for_index: Callable[[int], str] | None):
    self.builder, self.kind_for_index = builder, kind_for_index
    self.lo, self.hi = shard_range(len(builder.split), process_index, process_count)
    if self.hi <= self.lo:
      raise ValueError(f'split {builder.split.split!r} of {builder.split.name} has '
                       f'{len(builder.split)} images: too few for {process_count} processes')
    self.num_pairs = (self.hi - self.lo) * NUM_CAPTIONS
    super().__init__(seed=seed, process_index=process_index, num=self.num_pairs)

  def pairs(self, index: int) -> np.ndarray:
    """Pair ids (into the whole split) of batch `index` on this process."""
    return self.lo * NUM_CAPTIONS + self.positions(index, self.builder.spec.batch_size)

  def __call__(self, index: int) -> dict:
    pairs = self.pairs(index)
    stats: dict = {}
    batch = self.builder(pairs // NUM_CAPTIONS, pairs % NUM_CAPTIONS, stats)
    kind = self.kind_for_index(index) if self.kind_for_index else None
    batch = apply_kind(batch, kind, masking_rng(self.seed, index, self.process_index),
                       self.builder.spec, self.builder.ids, stats)
    self.add_stats(stats)
    return batch


class TrainIterator:
  """Infinite iterator of task batches with a checkpointable position.

  `get_state()` is `{'next_index': i}` (JSON-able): the stream is a pure function of
  (seed, batch index), so restoring rebuilds the grain iterator at batch i.
  `stats` counts truncated captions and capped or impossible maskings (exact with
  `worker_count=0`; worker processes keep their own counts).
  """

  def __init__(self, fn: _TrainBatchFn, *, start_index: int, num_threads: int,
               prefetch: int, worker_count: int):
    self._fn, self._threads, self._prefetch = fn, num_threads, prefetch
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
  def stats(self) -> dict:
    return dict(self._fn.stats)

  def get_state(self) -> dict:
    return {'next_index': self._next}

  def set_state(self, state: dict) -> None:
    self._next = int(state['next_index'])
    self._restart()

  def close(self):
    if self._it is not None and hasattr(self._it, 'close'):
      self._it.close()
    self._it = None


def make_train_iterator(builder, spec: BatchSpec, *, tokenizer: Tokenizer,
                        kind_for_index: Callable[[int], str] | None, seed: int,
                        split: str = 'train', process_index: int = 0,
                        process_count: int = 1, start_index: int = 0,
                        worker_count: int = 0, num_threads: int = 2,
                        prefetch: int = 4) -> TrainIterator:
  """The infinite training iterator of one process.

  Args:
    builder: a prepared tfds builder (e.g. from `vlp.data.scenes.prepare_scenes`).
    spec: batch geometry; `spec.batch_size` is the per-process batch.
    tokenizer: the dataset's tokenizer.
    kind_for_index: batch index -> 'mlm' | 'mrm' | 'itm' (None: plain batches). Must
      be picklable when `worker_count > 0`.
    seed: data seed (shuffling and masking); a non-negative int.
    split: split to read.
    process_index, process_count: this process and the number of processes.
    start_index: first batch index (resume without a stored state).
    worker_count: grain worker processes (0: threads in this process only).
    num_threads: grain reader threads per process.
    prefetch: batches buffered per process.
  """
  fn = _TrainBatchFn(BatchBuilder(ImageSplit(builder, split, spec.feature_dim), spec,
                                   tokenizer),
                     seed=seed, process_index=process_index, process_count=process_count,
                     kind_for_index=kind_for_index)
  return TrainIterator(fn, start_index=start_index, num_threads=num_threads,
                       prefetch=prefetch, worker_count=worker_count)


class EvalDataset:
  """Finite padded batches of a split, the same number on every process.

  Elements are this process's (image, caption) pairs in order (`unit='pairs'`) or
  its images with caption slot 0 (`unit='images'`). The last batches are padded with
  all-zero rows whose `example_mask` is False; processes with fewer elements get
  more padding, never fewer batches. `len()` is the number of batches; iterate it
  (any number of times) or index it.
  """

  def __init__(self, builder: BatchBuilder, *, unit: str, kind: str | None, seed: int,
               process_index: int, process_count: int, num_threads: int, prefetch: int):
    if unit not in ('pairs', 'images'):
      raise ValueError(f"unit must be 'pairs' or 'images', got {unit!r}")
    self.builder, self.unit, self.kind, self.seed = builder, unit, kind, int(seed)
    self.process_index, self._threads, self._prefetch = process_index, num_threads, prefetch
    n_img = len(builder.split)
    per = NUM_CAPTIONS if unit == 'pairs' else 1
    lo, hi = shard_range(n_img, process_index, process_count)
    self.elements = np.arange(lo * per, hi * per, dtype=np.int64)
    largest = -(-n_img // process_count) * per
    self.num_batches = -(-largest // builder.spec.batch_size)
    self.num_examples = len(self.elements)

  def __len__(self) -> int:
    return self.num_batches

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_batches:
      raise IndexError(f'batch {index} of {self.num_batches}')
    b = self.builder.spec.batch_size
    chunk = self.elements[index * b:(index + 1) * b]
    if self.unit == 'pairs':
      images, slots = chunk // NUM_CAPTIONS, chunk % NUM_CAPTIONS
    else:
      images, slots = chunk, np.zeros_like(chunk)
    batch = self.builder(images, slots, {})
    return apply_kind(batch, self.kind, masking_rng(self.seed, index, self.process_index),
                      self.builder.spec, self.builder.ids)

  def __iter__(self):
    ds = grain.MapDataset.range(self.num_batches).map(self.__getitem__)
    return iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self._threads, prefetch_buffer_size=self._prefetch)))


def make_eval_dataset(builder, spec: BatchSpec, *, tokenizer: Tokenizer,
                      split: str = 'val', unit: str = 'pairs', kind: str | None = None,
                      seed: int = 0, process_index: int = 0, process_count: int = 1,
                      num_threads: int = 2, prefetch: int = 4) -> EvalDataset:
  """Evaluation batches of one process (see `EvalDataset`).

  `kind` ('mlm' | 'mrm' | 'itm' | None) builds task batches for validation losses;
  their masking is drawn from (seed, batch index, process_index), so every
  evaluation of the same split sees the same masks.
  """
  builder_ = BatchBuilder(ImageSplit(builder, split, spec.feature_dim), spec, tokenizer)
  return EvalDataset(builder_, unit=unit, kind=kind, seed=seed,
                     process_index=process_index, process_count=process_count,
                     num_threads=num_threads, prefetch=prefetch)


def load_retrieval_gallery(builder, spec: BatchSpec, *, tokenizer: Tokenizer,
                           split: str = 'test', max_images: int | None = None) -> dict:
  """Loads a whole (small) split into numpy arrays for retrieval evaluation.

  `spec.batch_size` is ignored. Every process gets the full gallery; the
  evaluator chunks the N_txt x N_img score matrix itself.

  Returns:
    dict with image arrays `img_feat [N_img,K,D]`, `img_pos [N_img,K,7]`,
    `img_mask [N_img,K]`, `soft_labels [N_img,K,C]`, `image_id [N_img]`; caption
    arrays `input_ids [N_txt,T]`, `txt_mask [N_txt,T]`; `txt2img [N_txt]` (row of
    the caption's image) and `img2txts [N_img,5]` (rows of its captions), int32,
    with N_txt = 5 N_img; `num_truncated` (captions cut to T).
  """
  image_split = ImageSplit(builder, split, spec.feature_dim)
  n = len(image_split) if max_images is None else min(max_images, len(image_split))
  bb = BatchBuilder(image_split, spec, tokenizer)
  records = image_split.read(np.arange(n))
  stats: dict = {}
  out = bb.text([c for r in records for c in r['captions'][:NUM_CAPTIONS]],
                n * NUM_CAPTIONS, stats)
  out.update(bb.images(records, n))
  out['txt2img'] = np.repeat(np.arange(n, dtype=np.int32), NUM_CAPTIONS)
  out['img2txts'] = np.arange(n * NUM_CAPTIONS, dtype=np.int32).reshape(n, NUM_CAPTIONS)
  out['num_truncated'] = stats['truncated']
  return out
