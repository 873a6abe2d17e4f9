"""The pretraining data a run needs, built from its config.

Opens (and for `vlp_scenes`, first builds) the tfds dataset named by
`config.data`, loads its tokenizer, and hands out the train iterator of this
process, fixed validation batches per batch kind, and the retrieval gallery.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

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


class PretrainData:
  """Train iterator, validation batches and retrieval gallery for one process."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    count = jax.process_count()
    if config.batch_size % count:
      raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                       f"{count} processes")
    self.builder = open_builder(config)
    self.tokenizer = tokenizer_for(config, self.builder)
    self.spec = BatchSpec(
        batch_size=config.batch_size // count, max_text_len=config.max_text_len,
        max_regions=config.max_regions, feature_dim=config.feature_dim,
        num_region_classes=config.num_region_classes,
        max_mlm_predictions=config.max_mlm_predictions,
        max_mrm_predictions=config.max_mrm_predictions, mlm_prob=config.mlm_prob,
        mrm_prob=config.mrm_prob, itm_neg_prob=config.itm_neg_prob)

  def train_iterator(self, kind_for_index, start_index: int = 0):
    return pipeline.make_train_iterator(
        self.builder, self.spec, tokenizer=self.tokenizer, kind_for_index=kind_for_index,
        seed=self.config.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), start_index=start_index,
        worker_count=self.config.data_workers)

  @functools.lru_cache(maxsize=None)
  def eval_batches(self, kind: str) -> list[dict]:
    """The first `config.eval_batches` validation batches of `kind` (fixed masks)."""
    ds = pipeline.make_eval_dataset(
        self.builder, self.spec, tokenizer=self.tokenizer, split="val", unit="pairs",
        kind=kind, seed=self.config.seed + 1, process_index=jax.process_index(),
        process_count=jax.process_count())
    return [ds[i] for i in range(min(len(ds), self.config.eval_batches))]

  @functools.lru_cache(maxsize=None)
  def gallery(self) -> dict:
    return pipeline.load_retrieval_gallery(
        self.builder, self.spec, tokenizer=self.tokenizer, split="test",
        max_images=self.config.eval_gallery_images)
