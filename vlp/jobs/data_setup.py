"""What every job opens from its config: the dataset, its tokenizer, the model config.

`config.data_dir` may be on an object store: the records are then read from a
local copy (`vlp.data.staging`)."""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
from etils import epath
from jax.experimental import multihost_utils

from vlp import storage
from vlp.data import mixture, prepared, scenes, staging
from vlp.data import tokenizer as tokenizer_lib
from vlp.models.uniter_config import UniterConfig, model_config


def open_builder(config: ml_collections.ConfigDict):
  """The prepared tfds builder of `config.data`, one dataset (`NAME` or `NAME/BUILD`;
  vlp_scenes is built on demand), on local disk (a `config.data_dir` on an object
  store is staged). Mixtures are for `open_mixture`."""
  return _open_part(config, single_part(config))


def single_part(config: ml_collections.ConfigDict) -> mixture.Part:
  """The one dataset `config.data` names (an error for a mixture or splits)."""
  parts = mixture.parse(config.data)
  if len(parts) > 1 or ":" in config.data:
    raise ValueError(f"config.data={config.data!r} is a mixture or names splits; this job "
                     "reads one dataset (NAME or NAME/BUILD) and chooses its splits itself")
  return parts[0]


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
    return staging.stage(lambda d: prepared_builder(config, d, "data_dir", part),
                         config.data_dir, config.data_cache_dir)
  if part.config:
    raise ValueError(f"config.data={config.data!r}: vlp_scenes takes no build name; its "
                     "build follows config.feature_dim and config.data_size")
  if jax.process_index() == 0:
    _prepare_scenes(config)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("vlp_scenes prepared")
  return staging.stage(lambda d: _scenes_in(config, d), config.data_dir,
                       config.data_cache_dir)


def _scenes_in(config: ml_collections.ConfigDict, data_dir: str):
  """The vlp_scenes build the config asks for under `data_dir` (built if missing)."""
  return scenes.prepare_scenes(data_dir, feature_dim=config.feature_dim,
                               size=config.data_size)


def _prepare_scenes(config: ml_collections.ConfigDict) -> None:
  """Builds vlp_scenes under `config.data_dir` unless it is there. tfds writes
  array_record files locally only, so for an object store it is built in the
  local cache and uploaded."""
  prepare = functools.partial(_scenes_in, config)
  if storage.is_local(config.data_dir):
    prepare(config.data_dir)
    return
  remote = scenes.scenes_builder(config.data_dir, feature_dim=config.feature_dim,
                                 size=config.data_size)
  if not remote.is_prepared():
    local = prepare(staging.cache_for(config.data_dir, config.data_cache_dir))
    staging.copy_tree(os.fspath(local.data_dir), os.fspath(remote.data_dir))


def prepared_builder(config: ml_collections.ConfigDict, data_dir: str, key: str,
                     part: mixture.Part | None = None, *, any_build: bool = False):
  """The prepared build of `part` (default: the dataset `config.data` names) under
  `data_dir` (named `config.<key>` in errors): `NAME/BUILD` that build, `NAME` (or
  `any_build`) the one build there (`vlp.data.prepared.open_prepared`)."""
  part = part or single_part(config)
  return prepared.open_prepared(part.dataset, "" if any_build else part.config, data_dir,
                                key=key)


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
  requested = storage.absolute(config.tokenizer) if config.tokenizer else ""
  if init_from:
    from vlp import pretrained  # Only when needed: it pulls in orbax.
    found = pretrained.tokenizer_of(init_from)
    if found:
      path, lowercase = found
      if not epath.Path(path).exists():
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
  # Named by the data_dir itself, also where the records were staged (recorded
  # paths must name the shared copy, not one host's cache).
  # Absolute too: a relative config.data_dir (as `make demo` passes) would record a
  # path that breaks for a later run started elsewhere.
  stored = epath.Path(storage.absolute(staging.origin(
      os.fspath(epath.Path(builder.data_dir) / "spm.model"), config.data_dir,
      config.data_cache_dir)))
  if config.data == "vlp_scenes" or stored.exists():
    return os.fspath(stored), False
  raise FileNotFoundError(
      f"config.data={config.data!r} ({builder.data_dir}) stores no tokenizer (spm.model)"
      + (f" and config.init_from={init_from!r} names none"
         if init_from else " and config.init_from is empty")
      + "; set config.tokenizer to the tokenizer the backbone was pretrained "
      "with (e.g. the spm.model of the coco_karpathy build, or a BERT vocab.txt)")


def same_file(a: str, b: str) -> bool:
  """Whether two tokenizer files (local or on an object store) are one file or hold
  the same bytes."""
  if storage.is_local(a) and storage.is_local(b) and os.path.realpath(a) == os.path.realpath(b):
    return True
  a, b = epath.Path(a), epath.Path(b)
  if not (a.is_file() and b.is_file()):
    return False
  return a.read_bytes() == b.read_bytes()


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
