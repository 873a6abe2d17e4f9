"""Entry points for the synthetic `vlp_scenes` dataset: build once, then read.

    builder = prepare_scenes(data_dir, feature_dim=64, size='demo')
    tokenizer = Tokenizer(tokenizer_path(builder))
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds

from vlp.data.builders import vlp_scenes

SIZES = tuple(vlp_scenes.SIZES)


def scenes_builder(data_dir: str | os.PathLike, *, feature_dim: int = 64,
                   size: str = 'demo') -> vlp_scenes.VlpScenes:
  """The builder for one configuration (prepared or not; nothing is written)."""
  if feature_dim not in vlp_scenes.FEATURE_DIMS:
    raise ValueError(f'vlp_scenes supports feature_dim in {vlp_scenes.FEATURE_DIMS}, '
                     f'got {feature_dim}')
  if size not in vlp_scenes.SIZES:
    raise ValueError(f'vlp_scenes size must be one of {SIZES}, got {size!r}')
  return vlp_scenes.VlpScenes(data_dir=os.fspath(data_dir),
                              config=vlp_scenes.config_name(feature_dim, size),
                              file_format='array_record')


def prepare_scenes(data_dir: str | os.PathLike, *, feature_dim: int = 64,
                   size: str = 'demo') -> vlp_scenes.VlpScenes:
  """Builds `vlp_scenes` under `data_dir` unless it is already there; returns the builder.

  Idempotent and fast when the data exist (only the metadata are read). In a
  multi-process job call it on one process (or once per host with a local disk)
  and synchronise before the others read.

  Args:
    data_dir: tfds data dir; data land in `<data_dir>/vlp_scenes/<config>/<version>/`.
    feature_dim: region feature size, 64 (tiny models) or 2048 (base models).
    size: 'demo' (6000/200/100 images) or 'small' (200/40/100, for tests).
  """
  builder = scenes_builder(data_dir, feature_dim=feature_dim, size=size)
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    try:
      builder.download_and_prepare()
    finally:
      tfds.enable_progress_bar()
  if not os.path.exists(tokenizer_path(builder)):
    raise FileNotFoundError(
        f'{builder.data_dir} holds vlp_scenes records but no {vlp_scenes.SPM_FILENAME}; '
        'delete the directory and prepare again')
  return builder


def tokenizer_path(builder: tfds.core.DatasetBuilder) -> str:
  """Path of the sentencepiece model stored with a prepared dataset."""
  return os.path.join(os.fspath(builder.data_dir), vlp_scenes.SPM_FILENAME)
