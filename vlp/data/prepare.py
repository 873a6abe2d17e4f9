r"""Builds a dataset from public files: `python -m vlp.data.prepare`.

  python -m vlp.data.prepare --dataset=coco_karpathy --manual_dir=/data/manual/coco \
      --data_dir=/data/tfds --features=tsv:/data/butd/trainval_36 [--skip_bad]
  python -m vlp.data.prepare --dataset=vg_captions --manual_dir=/data/manual/vg \
      --data_dir=/data/tfds --features=lmdb:/data/uniter/img_db/vg

Datasets: coco_karpathy, flickr30k_karpathy, vg_captions, vqa_v2, vg_qa, refcoco,
refcoco_plus, refcocog (each builder's MANUAL_DOWNLOAD_INSTRUCTIONS say which
files go where; `--help_dataset=NAME` prints them). Records are array_record
under `<data_dir>/<dataset>/<config>/<version>/`; the config name lists the storage
choices (`float16`, `float16_c1601`, ...) and the command prints how to read it.

Bad input stops the build with an error naming the file and line/record;
`--skip_bad` skips each such item and counts it by kind in the summary.
"""

from __future__ import annotations

import os
import pickle
import sys

from absl import app, flags
import numpy as np
import tensorflow_datasets as tfds

from vlp import storage
from vlp.data import builders
from vlp.data.builders import region_base
from vlp.data.features import BadInput, BuildReport, LmdbFeatures, default_spec, source_format


def define_flags() -> None:
  """The command-line flags (defined only when run as a program: importing this
  module for `prepare()` must not claim flag names)."""
  flags.DEFINE_enum('dataset', None, sorted(builders.BUILDERS), 'Dataset to build.')
  flags.DEFINE_string('manual_dir', None, 'Directory with the public files.')
  flags.DEFINE_string('data_dir', None, 'tfds data directory to write.')
  flags.DEFINE_string('features', None, 'tsv:PATH | npz:DIR | npy:DIR | lmdb:DIR '
                      '(default: <manual_dir>/features/).')
  flags.DEFINE_enum('feature_dtype', 'float16', ['float16', 'float32'],
                    'Storage dtype of features and soft labels.')
  flags.DEFINE_integer('feature_dim', 2048, 'Region feature dimension.')
  flags.DEFINE_integer('soft_label_dim', -1, 'Soft-label classes to store; 0: none; -1: '
                       'what the source has (first npz/npy file; 1601 for a TSV with '
                       'cls_prob).')
  flags.DEFINE_float('conf_th', 0.2, 'Region count rule: confidence threshold '
                     '(-1 keeps every stored box up to max_bb).')
  flags.DEFINE_integer('min_bb', 10, 'Region count rule: minimum regions.')
  flags.DEFINE_integer('max_bb', 100, 'Region count rule: maximum regions.')
  flags.DEFINE_list('image_sizes', [], 'Image size files for npz/npy features '
                    '(COCO annotation JSON, VG image_data.json, {id: [w, h]}).')
  flags.DEFINE_list('tsv_fields', None, 'TSV column names (default: generate_tsv.py '
                    'columns).')
  flags.DEFINE_bool('skip_bad', False, 'Skip and count bad input instead of stopping.')
  flags.DEFINE_string('compression', 'uncompressed', 'array_record compression of the '
                      "records ('uncompressed', 'snappy', 'zstd:3', 'brotli:6').")
  flags.DEFINE_multi_string('option', [], 'Builder config field, key=value (e.g. '
                            'num_answers=3129, spm_vocab_size=16000, test_fold_size=1000, '
                            'val_every=50, devval_every=10).')
  flags.DEFINE_string('help_dataset', None, 'Print the manual download instructions of a '
                      'dataset and exit.')


def _parse_option(text: str, defaults: dict):
  key, sep, value = text.partition('=')
  if not sep or key not in defaults:
    raise ValueError(f'--option {text!r}: expected key=value with key in {sorted(defaults)}')
  kind = type(defaults[key])
  if kind is bool:
    return key, value.lower() in ('1', 'true', 'yes')
  return key, kind(value)


def _stored_soft_label_dim(feature_spec: str | None, tsv_fields) -> int:
  """Soft-label classes the source has: npz/npy from the first file that has
  them, an image DB from its first entry, a TSV 1601 if it names a `cls_prob`
  column; else 0."""
  if not feature_spec:
    return 0
  fmt, path = source_format(feature_spec), feature_spec.partition(':')[2]
  if fmt == 'tsv':
    return region_base.DETECTOR_CLASSES if 'cls_prob' in (tsv_fields or ()) else 0
  if fmt == 'lmdb':
    source = LmdbFeatures(path, report=BuildReport())
    try:
      return source.soft_label_dim()
    finally:
      source.close()
  names = sorted(os.listdir(path)) if os.path.isdir(path) else []
  if fmt == 'npz':
    first = next((n for n in names if n.endswith('.npz')), None)
    if first:
      with np.load(os.path.join(path, first), allow_pickle=False) as z:
        if 'soft_labels' in z.files:
          return int(z['soft_labels'].shape[-1])
    return 0
  first = next((n for n in names if n.endswith('_soft_labels.npy')), None)
  return int(np.load(os.path.join(path, first), mmap_mode='r').shape[-1]) if first else 0


def make_config(dataset: str, *, feature_spec: str | None = None,
                soft_label_dim: int | None = None, tsv_fields=None, **fields):
  """The config of `dataset` for these fields (soft_label_dim None: auto, see flags)."""
  cls = builders.BUILDERS[dataset]
  if soft_label_dim is None or soft_label_dim < 0:
    soft_label_dim = _stored_soft_label_dim(feature_spec, tsv_fields)
  cfg = region_base.make_config(type(cls.BUILDER_CONFIGS[0]), soft_label_dim=soft_label_dim,
                                **fields)
  # tfds wants the registered object itself for a registered name.
  return next((c for c in cls.BUILDER_CONFIGS if c.name == cfg.name), cfg)


def prepare(dataset: str, *, manual_dir: str, data_dir: str, features: str | None = None,
            soft_label_dim: int | None = None, image_sizes=(), tsv_fields=None,
            skip_bad: bool = False, progress: bool = False,
            compression: str = 'uncompressed', **fields):
  """Builds `dataset` (unless already there); returns (builder, report).

  Args:
    dataset: a name of `vlp.data.builders.BUILDERS`.
    manual_dir: directory with the public files (see MANUAL_DOWNLOAD_INSTRUCTIONS).
    data_dir: tfds data directory.
    features: `tsv:PATH`, `npz:DIR`, `npy:DIR` or `lmdb:DIR` (None:
      `<manual_dir>/features/`).
    soft_label_dim: stored soft-label classes (None: what the source has: the
      first npz/npy file's, 1601 for a TSV with cls_prob, else 0).
    image_sizes, tsv_fields, skip_bad, compression: see `region_base.BuildOptions`.
    progress: tfds and indexing progress bars.
    **fields: config fields (feature_dtype, feature_dim, conf_th, min_bb, max_bb,
      and builder fields such as num_answers).
  """
  manual_dir = os.fspath(manual_dir)
  inputs = [('manual_dir', manual_dir), ('data_dir', data_dir)]
  inputs += [('features', p) for p in (features or '').partition(':')[2].split(',') if p]
  for name, path in inputs:
    if not storage.is_local(path):
      raise ValueError(
          f'--{name}={path}: preparing reads and writes local files only (array_record '
          'writes local files); prepare into a local --data_dir, copy its '
          f'{dataset}/ folder to the object store (e.g. gcloud storage cp -r), and '
          'train with config.data_dir on the object store: vlp stages it to local disk')
  spec = features or default_spec(manual_dir)
  cfg = make_config(dataset, feature_spec=spec, soft_label_dim=soft_label_dim,
                    tsv_fields=tsv_fields, **fields)
  options = region_base.BuildOptions(
      features=spec, image_sizes=tuple(image_sizes),
      tsv_fields=tuple(tsv_fields) if tsv_fields else None, skip_bad=skip_bad,
      progress=progress, compression=compression)
  builder = builders.BUILDERS[dataset](data_dir=os.fspath(data_dir), config=cfg,
                                       file_format='array_record', build=options)
  if builder.is_prepared():
    builder.report.examples = {s: i.num_examples for s, i in builder.info.splits.items()}
    builder.report.notes['already prepared'] = (f'{builder.data_dir} (nothing rebuilt; '
                                                'delete it to build again)')
    return builder, builder.report
  if not progress:
    tfds.disable_progress_bar()
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  finally:
    if not progress:
      tfds.enable_progress_bar()
  return builder, builder.report


def main(argv) -> int:
  del argv
  f = flags.FLAGS
  if f.help_dataset:
    print(builders.BUILDERS[f.help_dataset].MANUAL_DOWNLOAD_INSTRUCTIONS)
    return 0
  for name in ('dataset', 'manual_dir', 'data_dir'):
    if f[name].value is None:
      raise app.UsageError(f'--{name} is required')
  cls = builders.BUILDERS[f.dataset]
  defaults = region_base.config_fields(type(cls.BUILDER_CONFIGS[0]))
  try:
    fields = dict(_parse_option(o, defaults) for o in f.option)
    fields.update(feature_dtype=f.feature_dtype, feature_dim=f.feature_dim,
                  conf_th=f.conf_th, min_bb=f.min_bb, max_bb=f.max_bb)
    builder, report = prepare(
        f.dataset, manual_dir=f.manual_dir, data_dir=f.data_dir, features=f.features,
        soft_label_dim=f.soft_label_dim, image_sizes=f.image_sizes,
        tsv_fields=f.tsv_fields, skip_bad=f.skip_bad, progress=True,
        compression=f.compression, **fields)
  except BadInput as err:
    print(f'\nerror: {err}\n(--skip_bad skips and counts such input)', file=sys.stderr)
    return 1
  except (OSError, ValueError, pickle.UnpicklingError) as err:  # missing files, bad JSON...
    print(f'\nerror: {err}', file=sys.stderr)
    return 1
  cfg = builder.builder_config
  print(f'\n{f.dataset}/{cfg.name} in {builder.data_dir}')
  print(report.summary())
  registered = cfg.name in {c.name for c in cls.BUILDER_CONFIGS}
  print(f'\nread: import vlp.data.builders; tfds.builder('
        f'"{f.dataset}/{cfg.name}", data_dir="{f.data_dir}")'
        + ('' if registered else '  (a custom config: read back from its files)'))
  return 0


if __name__ == '__main__':
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
