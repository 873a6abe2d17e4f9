"""The pretraining data a run needs, built from its config.

Opens (and for `vlp_scenes`, first builds) the tfds dataset named by
`config.data`, loads its tokenizer, and hands out the train iterator of this
process, fixed validation batches per batch kind, and the retrieval gallery.

Data shards. The global batch is cut into `config.data_shards` equal slices
(0: one per process). Shard s always reads the same images, shuffles and masks
with the same seeds, and fills rows [s*B/S, (s+1)*B/S) of every global batch;
a process builds only the shards whose rows its devices hold (see
`vlp.parallel.global_batch.process_rows`). With a fixed number of shards the global
batches do not depend on how many processes read them, so 2 processes x 2
devices train exactly like 1 process x 4 devices, and a run can resume on a
different number of hosts with the same data order.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

import vlp.data.builders  # noqa: F401  (registers the real-dataset builders)
from vlp.data import pipeline, scenes
from vlp.data.batching import BatchSpec
from vlp.data.tokenizer import Tokenizer
from vlp.models.uniter_config import UniterConfig, model_config


def open_builder(config: ml_collections.ConfigDict):
  """The prepared tfds builder for `config.data` (vlp_scenes is built on demand)."""
  if config.data == "vlp_scenes":
    if jax.process_index() == 0:
      builder = scenes.prepare_scenes(config.data_dir, feature_dim=config.feature_dim,
                                      size=config.data_size)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("vlp_scenes prepared")
    if jax.process_index() != 0:
      builder = scenes.prepare_scenes(config.data_dir, feature_dim=config.feature_dim,
                                      size=config.data_size)
    return builder
  try:
    builder = tfds.builder(config.data, data_dir=config.data_dir)
  except Exception as e:  # tfds raises several types for unknown names.
    raise ValueError(f"config.data={config.data!r}: no such dataset under "
                     f"config.data_dir={config.data_dir!r} ({e})") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"dataset {config.data!r} is not prepared under {config.data_dir!r}; "
        f"run `python -m vlp.data.prepare --dataset={config.data} ...` first")
  return builder


def tokenizer_for(config: ml_collections.ConfigDict, builder) -> Tokenizer:
  path = config.tokenizer or os.path.join(os.fspath(builder.data_dir), "spm.model")
  if config.data == "vlp_scenes" and not config.tokenizer:
    path = scenes.tokenizer_path(builder)
  return Tokenizer(path)


def model_config_for(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> UniterConfig:
  """The model config: a named size, then `config.model` fields, then the data's
  vocabulary, feature and class sizes and the compute dtype."""
  fields = {k: v for k, v in config.model.items() if k != "size" and v is not None}
  fields.update(vocab_size=tokenizer.vocab_size, img_dim=config.feature_dim,
                num_region_classes=config.num_region_classes, dtype=config.compute_dtype)
  return model_config(config.model.size, **fields)


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
        f"with {num_shards} data shards of {per} rows; set config.data_shards to the "
        f"number of pieces the batch is split into across processes")
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


class PretrainData:
  """Train iterator, validation batches and retrieval gallery for one process.

  `rows` are the global batch rows this process feeds (default: its contiguous
  1/process_count share); they decide which data shards it builds.
  """

  def __init__(self, config: ml_collections.ConfigDict, rows: np.ndarray | None = None):
    self.config = config
    count = jax.process_count()
    self.num_shards = int(config.get("data_shards") or count)
    if config.batch_size % count:
      raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                       f"{count} processes")
    if rows is None:
      per = config.batch_size // count
      rows = np.arange(jax.process_index() * per, (jax.process_index() + 1) * per)
    self.shards = shards_for_rows(rows, config.batch_size, self.num_shards)
    self.builder = open_builder(config)
    self.tokenizer = tokenizer_for(config, self.builder)
    self.spec = BatchSpec.from_config(config, config.batch_size // self.num_shards)

  def train_iterator(self, kind_for_index, start_index: int = 0):
    its = [pipeline.make_train_iterator(
        self.builder, self.spec, tokenizer=self.tokenizer, kind_for_index=kind_for_index,
        seed=self.config.seed, process_index=shard, process_count=self.num_shards,
        start_index=start_index, worker_count=self.config.data_workers)
           for shard in self.shards]
    return its[0] if len(its) == 1 else ShardedIterator(its)

  @functools.lru_cache(maxsize=None)
  def eval_batches(self, kind: str) -> list[dict]:
    """The first `config.eval_batches` validation batches of `kind` (fixed masks).

    Every shard has the same number of batches (short ones are padded with
    `example_mask` False), so every process runs the same number of eval steps.
    """
    per_shard = []
    for shard in self.shards:
      ds = pipeline.make_eval_dataset(
          self.builder, self.spec, tokenizer=self.tokenizer, split="val", unit="pairs",
          kind=kind, seed=self.config.seed + 1, process_index=shard,
          process_count=self.num_shards)
      per_shard.append([ds[i] for i in range(min(len(ds), self.config.eval_batches))])
    return [{k: np.concatenate([b[k] for b in parts]) for k in parts[0]}
            for parts in zip(*per_shard)]

  @functools.lru_cache(maxsize=None)
  def gallery(self) -> dict:
    # Fine-tuning configs name the split; pretraining always uses "test".
    return pipeline.load_retrieval_gallery(
        self.builder, self.spec, tokenizer=self.tokenizer,
        split=self.config.get("eval_split", "test"),
        max_images=self.config.eval_gallery_images or None)
