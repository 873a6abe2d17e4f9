"""Entry points for the synthetic `vlp_scenes` dataset: build once, then read.

    builder = prepare_scenes(data_dir, feature_dim=64, size='demo')
    tokenizer = Tokenizer(tokenizer_path(builder))
    answers = answer_vocab(builder)  # VQA labels (version >= 1.1.0)
"""

from __future__ import annotations

import json
import os

import tensorflow_datasets as tfds
from etils import epath

from vlp.data.builders import vlp_scenes

SIZES = tuple(vlp_scenes.SIZES)


def scenes_builder(data_dir: str | os.PathLike, *, feature_dim: int = 64,
                   size: str = 'demo', version: str | None = None) -> vlp_scenes.VlpScenes:
  """The builder for one configuration (prepared or not; nothing is written).

  `version` None is the newest (with questions and referring expressions);
  '1.0.0' reads data of the caption-only release prepared by older code.
  """
  if feature_dim not in vlp_scenes.FEATURE_DIMS:
    raise ValueError(f'vlp_scenes supports feature_dim in {vlp_scenes.FEATURE_DIMS}, '
                     f'got {feature_dim}')
  if size not in vlp_scenes.SIZES:
    raise ValueError(f'vlp_scenes size must be one of {SIZES}, got {size!r}')
  versions = [str(vlp_scenes.VlpScenes.VERSION)] + [
      str(v) for v in vlp_scenes.VlpScenes.SUPPORTED_VERSIONS]
  if version is not None and str(version) not in versions:
    raise ValueError(f'vlp_scenes version must be one of {versions}, got {version!r}')
  return vlp_scenes.VlpScenes(data_dir=os.fspath(data_dir),
                              config=vlp_scenes.config_name(feature_dim, size),
                              version=version, file_format='array_record')


def prepare_scenes(data_dir: str | os.PathLike, *, feature_dim: int = 64,
                   size: str = 'demo', version: str | None = None) -> vlp_scenes.VlpScenes:
  """Builds `vlp_scenes` under `data_dir` unless it is already there; returns the builder.

  Idempotent and fast when the data exist (only the metadata are read). In a
  multi-process job call it on one process (or once per host with a local disk)
  and synchronise before the others read.

  Args:
    data_dir: tfds data dir; data land in `<data_dir>/vlp_scenes/<config>/<version>/`.
    feature_dim: region feature size, 64 (tiny models) or 2048 (base models).
    size: 'demo' (6000/200/300 images) or 'small' (200/40/100, for tests).
    version: None (the newest) or an older supported version ('1.0.0'), which must
      have been prepared already (only the newest version can be generated).
  """
  builder = scenes_builder(data_dir, feature_dim=feature_dim, size=size, version=version)
  if not builder.is_prepared() and builder.version != builder.canonical_version:
    raise ValueError(f'vlp_scenes {builder.version} is not prepared under {data_dir}, and only '
                     f'the newest version ({builder.canonical_version}) can be generated')
  if not builder.is_prepared():
    tfds.disable_progress_bar()
    try:
      builder.download_and_prepare()
    finally:
      tfds.enable_progress_bar()
  needed = [tokenizer_path(builder)]
  if builder.has_tasks:
    needed.append(answers_path(builder))
    needed += [p for s in vlp_scenes.VQA_JSON_SPLITS for p in vqa_json_paths(builder, s)]
  missing = [epath.Path(p).name for p in needed if not epath.Path(p).exists()]
  if missing:
    raise FileNotFoundError(
        f'{builder.data_dir} holds vlp_scenes records but not {missing}; '
        'delete the directory and prepare again')
  return builder


def tokenizer_path(builder: tfds.core.DatasetBuilder) -> str:
  """Path of the sentencepiece model stored with a prepared dataset."""
  return os.fspath(epath.Path(builder.data_dir) / vlp_scenes.SPM_FILENAME)


def answers_path(builder: tfds.core.DatasetBuilder) -> str:
  """Path of the VQA answer vocabulary (`answers.json`) stored with a prepared dataset."""
  return os.fspath(epath.Path(builder.data_dir) / vlp_scenes.ANSWERS_FILENAME)


def answer_vocab(builder: tfds.core.DatasetBuilder) -> list[str]:
  """The answer list (label = position) of a prepared dataset with questions."""
  path = answers_path(builder)
  if not epath.Path(path).exists():
    raise FileNotFoundError(f'{path} does not exist: {builder.info.full_name} has no VQA '
                            'answer vocabulary (vlp_scenes: version >= '
                            f'{vlp_scenes.TASKS_VERSION})')
  answers = json.loads(epath.Path(path).read_text())
  if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
    raise ValueError(f'{path}: expected a JSON list of answer strings')
  return answers


def vqa_json_paths(builder: tfds.core.DatasetBuilder, split: str) -> tuple[str, str]:
  """(questions, annotations) files of `split` in the official VQA v2 format."""
  if split not in vlp_scenes.VQA_JSON_SPLITS:
    raise ValueError(f'VQA JSON files exist for splits {vlp_scenes.VQA_JSON_SPLITS}, '
                     f'not {split!r}')
  return tuple(os.fspath(epath.Path(builder.data_dir) / name)
               for name in vlp_scenes.vqa_json_filenames(split))
