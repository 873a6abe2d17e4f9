"""What every job opens from its config: the dataset, its tokenizer, the model config."""

from __future__ import annotations

import os

import jax
import ml_collections
import tensorflow_datasets as tfds
from jax.experimental import multihost_utils

from vlp.data import scenes
import vlp.data.builders  # noqa: F401  (registers the real-dataset builders)
from vlp.data import tokenizer as tokenizer_lib
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


def tokenizer_path(config: ml_collections.ConfigDict, builder, *, init_from: str) -> str:
  """The tokenizer file of a run (`resolve_tokenizer`)."""
  return resolve_tokenizer(config, builder, init_from=init_from)[0]


def resolve_tokenizer(config: ml_collections.ConfigDict, builder, *,
                      init_from: str) -> tuple[str, bool]:
  """(file, lowercase) of the run's tokenizer: a sentencepiece model or a WordPiece
  vocab.txt (`lowercase`: an uncased one).

  The tokenizer follows the checkpoint: the one `init_from` was trained with (a
  pretrained directory's tokenizer file, or the `model_info` of a training
  workdir's checkpoint) comes first, since its word embeddings index that
  vocabulary. `config.tokenizer` may name the same file (or a copy); another one is
  an error naming both. Without `init_from` (or when it names none): `config.tokenizer`,
  else the one stored with the data (vlp_scenes, Karpathy builds). The real VQA /
  RefCOCO builds store none. A vocab.txt named only by `config.tokenizer` is taken as
  cased (UNITER's bert-base-cased); an uncased one comes through `init_from`."""
  # Absolute, since checkpoints record it for later runs (vlp.jobs.base.model_info).
  requested = os.path.abspath(config.tokenizer) if config.tokenizer else ""
  if init_from:
    from vlp import pretrained  # Only when needed: it pulls in orbax.
    found = pretrained.tokenizer_of(init_from)
    if found:
      path, lowercase = found
      if not os.path.exists(path):
        if requested:  # The checkpoint's file is on another machine: trust the copy.
          return requested, lowercase
        raise FileNotFoundError(
            f"config.init_from={init_from!r} was trained with the tokenizer {path!r}, which "
            "does not exist here; set config.tokenizer to a copy of it (or export the "
            "checkpoint with python -m vlp.export, which copies it in)")
      if requested and not same_file(requested, path):
        raise ValueError(
            f"config.tokenizer={config.tokenizer!r} is not the tokenizer {path!r} that "
            f"config.init_from={init_from!r} was trained with (its word embeddings index "
            "that vocabulary); leave config.tokenizer empty to use the checkpoint's")
      return path, lowercase
  if requested:
    return requested, False
  if config.data == "vlp_scenes":
    return scenes.tokenizer_path(builder), False
  stored = os.path.join(os.fspath(builder.data_dir), "spm.model")
  if os.path.exists(stored):
    return stored, False
  raise FileNotFoundError(
      f"config.data={config.data!r} ({builder.data_dir}) stores no tokenizer (spm.model)"
      + (f" and config.init_from={init_from!r} names none"
         if init_from else " and config.init_from is empty")
      + "; set config.tokenizer to the tokenizer the backbone was pretrained "
      "with (e.g. the spm.model of the coco_karpathy build, or a BERT vocab.txt)")


def same_file(a: str, b: str) -> bool:
  """Whether two tokenizer files are one file or hold the same bytes."""
  if os.path.realpath(a) == os.path.realpath(b):
    return True
  if not (os.path.isfile(a) and os.path.isfile(b)):
    return False
  with open(a, "rb") as fa, open(b, "rb") as fb:
    return fa.read() == fb.read()


def open_tokenizer(config: ml_collections.ConfigDict, builder, *, init_from: str):
  """The run's `Tokenizer` (sentencepiece) or `WordPieceTokenizer` (`resolve_tokenizer`)."""
  path, lowercase = resolve_tokenizer(config, builder, init_from=init_from)
  return tokenizer_lib.open_tokenizer(path, lowercase=lowercase)


def model_config_for(config: ml_collections.ConfigDict, tokenizer) -> UniterConfig:
  """The model config: a named size, then `config.model` fields, then the data's
  vocabulary, feature and class sizes and the compute dtype."""
  fields = {k: v for k, v in config.model.items() if k != "size" and v is not None}
  fields.update(vocab_size=tokenizer.vocab_size, img_dim=config.feature_dim,
                num_region_classes=config.num_region_classes, dtype=config.compute_dtype)
  return model_config(config.model.size, **fields)
