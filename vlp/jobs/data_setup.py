"""What every job opens from its config: the dataset, its tokenizer, the model config."""

from __future__ import annotations

import os

import jax
import ml_collections
from jax.experimental import multihost_utils

from vlp.data import mixture, prepared, scenes
from vlp.data.tokenizer import Tokenizer
from vlp.models.uniter_config import UniterConfig, model_config


def open_builder(config: ml_collections.ConfigDict):
  """The prepared tfds builder of `config.data`, one dataset (`NAME` or
  `NAME/CONFIG`; vlp_scenes is built on demand). Mixtures are for `open_mixture`."""
  parts = mixture.parse(config.data)
  if len(parts) > 1 or ":" in config.data:
    raise ValueError(f"config.data={config.data!r} is a mixture or names splits; this job "
                     "reads one dataset (NAME or NAME/CONFIG) and chooses its splits itself")
  return _open_part(config, parts[0])


def open_mixture(config: ml_collections.ConfigDict, *, default_split: str = "train"):
  """`[(part, builder)]` of the datasets and splits `config.data` mixes
  (`vlp.data.mixture`; one dataset is a mixture of one part)."""
  parts = mixture.parse(config.data, default_split=default_split)
  builders = {}
  for part in parts:  # each dataset once, however many parts read it
    key = (part.dataset, part.config)
    if key not in builders:
      builders[key] = _open_part(config, part)
  return [(part, builders[(part.dataset, part.config)]) for part in parts]


def _open_part(config: ml_collections.ConfigDict, part: mixture.Part):
  if part.dataset != "vlp_scenes":
    return prepared.open_prepared(part.dataset, part.config, config.data_dir)
  if part.config:
    raise ValueError(f"config.data={config.data!r}: vlp_scenes takes no build name; its "
                     "build follows config.feature_dim and config.data_size")
  if jax.process_index() == 0:
    builder = scenes.prepare_scenes(config.data_dir, feature_dim=config.feature_dim,
                                    size=config.data_size)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("vlp_scenes prepared")
  if jax.process_index() != 0:
    builder = scenes.prepare_scenes(config.data_dir, feature_dim=config.feature_dim,
                                    size=config.data_size)
  return builder


def tokenizer_path(config: ml_collections.ConfigDict, builder, *, init_from: str) -> str:
  """The sentencepiece model of a run: `config.tokenizer`, else the one stored with
  the data (vlp_scenes, Karpathy builds), else the one the `init_from` model (a
  fine-tuning job's `config.init_from`; "" for pretraining, which has none) was
  trained with (a pretrained directory's tokenizer file, or the `model_info` of a
  training workdir's checkpoint). The real VQA / RefCOCO builds store none."""
  if config.tokenizer:
    return config.tokenizer
  if config.data == "vlp_scenes":
    return scenes.tokenizer_path(builder)
  stored = os.path.join(os.fspath(builder.data_dir), "spm.model")
  if os.path.exists(stored):
    return stored
  if init_from:
    from vlp import pretrained  # Only when needed: it pulls in orbax.
    from_init = pretrained.tokenizer_of(init_from)
    if from_init:
      return from_init
  raise FileNotFoundError(
      f"config.data={config.data!r} ({builder.data_dir}) stores no tokenizer (spm.model)"
      + (f" and config.init_from={init_from!r} names none"
         if init_from else " and config.init_from is empty")
      + "; set config.tokenizer to the sentencepiece model the backbone was pretrained "
      "with (e.g. the spm.model of the coco_karpathy build)")


def open_tokenizer(config: ml_collections.ConfigDict, builder, *, init_from: str) -> Tokenizer:
  return Tokenizer(tokenizer_path(config, builder, init_from=init_from))


def model_config_for(config: ml_collections.ConfigDict, tokenizer: Tokenizer) -> UniterConfig:
  """The model config: a named size, then `config.model` fields, then the data's
  vocabulary, feature and class sizes and the compute dtype."""
  fields = {k: v for k, v in config.model.items() if k != "size" and v is not None}
  fields.update(vocab_size=tokenizer.vocab_size, img_dim=config.feature_dim,
                num_region_classes=config.num_region_classes, dtype=config.compute_dtype)
  return model_config(config.model.size, **fields)
