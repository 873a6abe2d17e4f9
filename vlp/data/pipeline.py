"""Image-caption pair batches for pretraining and retrieval (image-level records, 5 captions).

Data shards (`vlp.data.shards`) split a split's images into contiguous slices;
a shard's examples are the (image, caption slot) pairs of its images
(`vlp.data.examples.PairIndex`). Training shuffles them per epoch and turns
batch i into a task batch of `kind_for_index(i)` (vlp.data.streams); evaluation
gives finite padded batches of whole images per shard; the retrieval gallery is a
whole (small) split in memory.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from vlp.data.batching import Batcher, BatchSpec, classes_for, shard_range
from vlp.data.examples import PairIndex
from vlp.data import mixture
from vlp.data.image_records import NUM_CAPTIONS, ConcatRecords, ImageRecords
from vlp.data.streams import EvalDataset, TrainIterator, train_iterator
from vlp.data.tokenizer import Tokenizer

__all__ = ['BatchSpec', 'TrainIterator', 'EvalDataset', 'make_train_iterator',
           'make_mixture_iterator', 'open_splits', 'make_eval_dataset',
           'load_retrieval_gallery']


def make_train_iterator(builder, spec: BatchSpec, *, tokenizer: Tokenizer,
                        kind_for_index: Callable[[int], str] | None, seed: int,
                        split: str = 'train', process_index: int = 0,
                        process_count: int = 1, start_index: int = 0,
                        worker_count: int = 0, num_threads: int = 2,
                        prefetch: int = 4) -> TrainIterator:
  """The infinite training iterator of data shard `process_index` of `process_count`.

  Args:
    builder: a prepared tfds builder (e.g. from `vlp.data.scenes.prepare_scenes`).
    spec: batch geometry; `spec.batch_size` rows per shard.
    tokenizer: the dataset's tokenizer.
    kind_for_index: batch index -> 'mlm' | 'mrm' | 'itm' (None: plain batches). Must
      be picklable when `worker_count > 0`.
    seed: data seed (shuffling and masking); a non-negative int.
    split: split to read (`a+b`: several, read as one list of images).
    process_index, process_count: this data shard and the number of shards.
    start_index, worker_count, num_threads, prefetch: as
      `vlp.data.streams.train_iterator`.
  """
  return make_mixture_iterator(
      [(builder, split.split('+'), 1.0)], spec, tokenizer=tokenizer,
      kind_for_index=kind_for_index, seed=seed, process_index=process_index,
      process_count=process_count, start_index=start_index, worker_count=worker_count,
      num_threads=num_threads, prefetch=prefetch)


def make_mixture_iterator(parts: Sequence[tuple], spec: BatchSpec, *, tokenizer: Tokenizer,
                          kind_for_index: Callable[[int], str] | None, seed: int,
                          process_index: int = 0, process_count: int = 1,
                          start_index: int = 0, worker_count: int = 0, num_threads: int = 2,
                          prefetch: int = 4, name: str | None = None) -> TrainIterator:
  """The training iterator of a data shard over a mixture (vlp.data.mixture).

  `parts` are `(builder, splits, weight)`: each part's splits are read as one list
  of images, of which data shard `process_index` takes a contiguous slice; the
  shard's stream deals its positions to the parts in proportion to the weights.
  One part is exactly `make_train_iterator` over it. `name` (e.g. the config's
  `config.data`) is kept in the stream state; the other arguments are those of
  `make_train_iterator`.
  """
  slices = []
  for builder, splits, _ in parts:
    images = open_splits(builder, list(splits), spec.feature_dim)
    lo, hi = shard_range(len(images), process_index, process_count)
    if hi <= lo:
      raise ValueError(f'split {images.split!r} of {images.name} has {len(images)} images: '
                       f'too few for {process_count} processes')
    slices.append((images, lo, hi))
  # One C for every part: parts without soft labels get zeros where others have some.
  classes = classes_for(spec, [images.num_classes for images, _, _ in slices])
  batchers = [Batcher(images, spec, tokenizer, PairIndex(lo, hi), num_classes=classes)
              for images, lo, hi in slices]
  return train_iterator(batchers, seed=seed, process_index=process_index,
                        kind_for_index=kind_for_index, start_index=start_index,
                        worker_count=worker_count, num_threads=num_threads,
                        prefetch=prefetch,
                        shares=mixture.integer_shares([w for _, _, w in parts]), name=name)


def open_splits(builder, splits: Sequence[str], feature_dim: int):
  """The image records of `splits` of a builder, as one list (see ConcatRecords)."""
  images = [ImageRecords(builder, s, feature_dim) for s in splits]
  return images[0] if len(images) == 1 else ConcatRecords(images)


def make_eval_dataset(builder, spec: BatchSpec, *, tokenizer: Tokenizer,
                      split: str = 'val', unit: str = 'pairs', kind: str | None = None,
                      seed: int = 0, shards: Sequence[int] = (0,), num_shards: int = 1,
                      num_threads: int = 2, prefetch: int = 4) -> EvalDataset:
  """Evaluation batches of data `shards` (of `num_shards`); see `EvalDataset`.

  A shard holds the pairs of its contiguous slice of images (`unit='pairs'`) or
  those images with caption slot 0 (`unit='images'`); `example_index` is the pair
  (image * 5 + slot) or image row in the split. `kind` ('mlm' | 'mrm' | 'itm' |
  None) builds task batches for validation losses.
  """
  if unit not in ('pairs', 'images'):
    raise ValueError(f"unit must be 'pairs' or 'images', got {unit!r}")
  images = ImageRecords(builder, split, spec.feature_dim)
  per = NUM_CAPTIONS if unit == 'pairs' else 1
  ranges = []  # a shard holds whole images, as in training
  for s in range(num_shards):
    lo, hi = shard_range(len(images), s, num_shards)
    ranges.append((lo * per, hi * per))
  batcher = Batcher(images, spec, tokenizer, PairIndex(0, len(images), per))
  return EvalDataset(batcher, ranges, shards, kind=kind, seed=seed,
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
  images = ImageRecords(builder, split, spec.feature_dim)
  n = len(images) if max_images is None else min(max_images, len(images))
  index = PairIndex(0, n)
  batcher = Batcher(images, spec, tokenizer, index)
  records = images.read(np.arange(n))
  stats: dict = {}
  pairs = np.arange(len(index))
  out = batcher.text(index.texts_of(pairs, [records[i] for i in index.image_rows(pairs)]),
                     len(index), stats)
  out.update(batcher.regions(records, n))
  out['txt2img'] = np.repeat(np.arange(n, dtype=np.int32), NUM_CAPTIONS)
  out['img2txts'] = np.arange(n * NUM_CAPTIONS, dtype=np.int32).reshape(n, NUM_CAPTIONS)
  out['num_truncated'] = stats['truncated']
  return out
