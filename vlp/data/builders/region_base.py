"""What the builders over public files share: configs, schema, options, output.

Configs (`RegionConfig` and subclasses) hold everything that changes the stored
data: feature dim and dtype, soft-label classes, the region-count rule, plus
builder fields (answer vocabulary size, ...). A config's name lists its storage
dtype and every field that differs from the default, e.g. `float16` (all
defaults), `float16_c1601` (with soft labels), `float32_d64_max36_spm8000`. The four
dtype x soft-label combinations are registered; any other config is read back
from its files with `tfds.builder('<name>/<config>', data_dir=...)`.

Build-time inputs that do not change the schema (the feature source, size files,
`skip_bad`, the file compression) are a `BuildOptions` passed to the builder's
constructor. Records are written uncompressed by default (see `BuildOptions`).
"""

from __future__ import annotations

import dataclasses
import os

from array_record.python import array_record_module
from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from vlp.data.builders import vlp_scenes
from vlp.data.features import (BadInput, BuildReport, RecordFormat, default_spec,
                               image_record, load_image_sizes, open_source, source_format)

SPM_FILENAME = vlp_scenes.SPM_FILENAME
REPORT_FILENAME = 'prepare_report.json'
DETECTOR_CLASSES = 1601  # BUTD: 1600 Visual Genome classes + background
_SHORT = {'feature_dim': 'd', 'soft_label_dim': 'c', 'conf_th': 'th', 'min_bb': 'min',
          'max_bb': 'max', 'spm_vocab_size': 'spm', 'test_fold_size': 'fold',
          'num_answers': 'ans', 'val_every': 'val', 'max_groups_per_image': 'groups',
          'devval_every': 'devval'}
_BASE_FIELDS = {f.name for f in dataclasses.fields(tfds.core.BuilderConfig)}
# The feature part of every builder's MANUAL_DOWNLOAD_INSTRUCTIONS.
FEATURES_INSTRUCTIONS = """
Region features, one of (or pass --features=tsv:PATH|npz:DIR|npy:DIR|lmdb:DIR):
  <manual_dir>/features/*.tsv  bottom-up-attention TSV (generate_tsv.py columns
      image_id, image_w, image_h, num_boxes, boxes, features), 36 or 10-100 boxes;
      parts *.tsv.0, *.tsv.1 (the unzipped trainval/ as published) are read too;
  <manual_dir>/features/*.npz  per-image UNITER-style npz (features, norm_bb,
      conf, soft_labels); image sizes from --image_sizes or
      <manual_dir>/image_sizes/*.json (COCO annotation JSON, VG image_data.json,
      or {"<image_id>": [w, h]});
  <manual_dir>/features/*.npy  per-image <id>.npy features + <id>_boxes.npy pixel
      boxes (sizes as for npz);
  --features=lmdb:DIR  UNITER's image DBs as downloaded (img_db/coco_train2014,
      img_db/coco_val2014, img_db/vg: feat_th0.2_max100_min10/ LMDB; sizes as
      for npz).
The image id of a feature file / TSV line is its number (last run of digits).
"""


@dataclasses.dataclass(kw_only=True)
class RegionConfig(tfds.core.BuilderConfig):
  """Storage of region features (see `vlp.data.features.RecordFormat`)."""
  feature_dim: int = 2048
  feature_dtype: str = 'float16'
  soft_label_dim: int = 0
  conf_th: float = 0.2
  min_bb: int = 10
  max_bb: int = 100

  def record_format(self) -> RecordFormat:
    return RecordFormat(feature_dim=self.feature_dim, feature_dtype=self.feature_dtype,
                        soft_label_dim=self.soft_label_dim, conf_th=self.conf_th,
                        min_bb=self.min_bb, max_bb=self.max_bb)


def config_fields(cls) -> dict:
  """The data-changing fields of config class `cls` with their defaults."""
  return {f.name: f.default for f in dataclasses.fields(cls) if f.name not in _BASE_FIELDS}


def make_config(cls, **fields) -> RegionConfig:
  """A config of class `cls` named after its non-default fields (module doc)."""
  defaults = config_fields(cls)
  unknown = sorted(set(fields) - set(defaults))
  if unknown:
    raise ValueError(f'{cls.__name__} has no fields {unknown}; it has {sorted(defaults)}')
  values = {**defaults, **fields}
  values['feature_dtype'] = np.dtype(values['feature_dtype']).name
  values = {k: type(defaults[k])(v) for k, v in values.items()}  # e.g. conf_th=-1 -> -1.0
  parts = [values['feature_dtype']]
  for name, default in defaults.items():
    value = values[name]
    if name != 'feature_dtype' and value != default:
      text = f'{value:g}' if isinstance(value, float) else str(int(value))
      parts.append(f'{_SHORT.get(name, name)}{text}')
  cfg = cls(name='_'.join(parts), description=f'{values}', **values)
  cfg.record_format()  # validates
  return cfg


def standard_configs(cls) -> list[RegionConfig]:
  return [make_config(cls, feature_dtype=dtype, soft_label_dim=c)
          for dtype in ('float16', 'float32') for c in (0, DETECTOR_CLASSES)]


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """Build-time inputs that do not change the schema.

  Attributes:
    features: `tsv:PATH`, `npz:DIR`, `npy:DIR` or `lmdb:DIR`; None: `<manual_dir>/features/`.
    image_sizes: size files for npz/npy sources (`vlp.data.features.files`); empty:
      `<manual_dir>/image_sizes/*.json` if present.
    tsv_fields: TSV column names (None: the generate_tsv.py columns).
    skip_bad: count bad input instead of stopping.
    progress: show progress bars while indexing features.
    compression: array_record compression of the records: 'uncompressed' (the
      default: float16 region features barely compress (~10%), and decompressing
      them roughly doubled the read time of a batch), 'snappy', 'zstd:3',
      'brotli:6'; '' is array_record's default (what tfds itself writes).
      Readers detect it from the files.
  """
  features: str | None = None
  image_sizes: tuple[str, ...] = ()
  tsv_fields: tuple[str, ...] | None = None
  skip_bad: bool = False
  progress: bool = False
  compression: str = 'uncompressed'


class _ArrayRecordWriter(tfds.core.ExampleWriter):
  """tfds' example writer with a chosen array_record compression."""

  def __init__(self, file_format, compression: str):
    super().__init__(file_format)
    self.compression = compression

  def write(self, path, examples):
    if self.file_format != tfds.core.FileFormat.ARRAY_RECORD:
      return super().write(path, examples)
    options = 'group_size:1' + (f',{self.compression}' if self.compression else '')
    writer = array_record_module.ArrayRecordWriter(os.fspath(path), options)
    for _, serialized in examples:
      writer.write(serialized)
    writer.close()
    return None


def ordered_key(index: int, count: int) -> int:
  """Generation key of example `index` of `count`.

  With `disable_shuffling` tfds sorts by the raw key; keys spread over the
  128-bit range keep that order while filling all of tfds' 1000 temporary
  buckets (consecutive small ints would put a whole split in one bucket, which
  tfds then sorts in memory).
  """
  return index * ((1 << 127) // max(count, 1))


def tensor(shape, dtype) -> tfds.features.Tensor:
  """A raw-bytes tensor (the encoding `vlp.data.records` parses fast)."""
  return tfds.features.Tensor(shape=shape, dtype=dtype,
                              encoding=tfds.features.Encoding.BYTES)


class RegionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the builders that join annotation files with region features."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  CONFIG_CLASS = RegionConfig

  def __init__(self, *, build: BuildOptions | None = None, **kwargs):
    self.build_options = build or BuildOptions()
    self.report = BuildReport(skip_bad=self.build_options.skip_bad)
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default probes `importlib_resources`, which this environment lacks.
    return epath.Path(__file__)

  def _example_writer(self) -> tfds.core.ExampleWriter:
    # tfds' documented hook for custom writers (its own uses brotli).
    return _ArrayRecordWriter(self.info.file_format, self.build_options.compression)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.__doc__,
        features=tfds.features.FeaturesDict(self._features()), supervised_keys=None,
        disable_shuffling=True)

  def _features(self) -> dict:
    raise NotImplementedError

  def image_fields(self) -> dict:
    """The image-level fields, named and typed as in `vlp_scenes`."""
    cfg = self.builder_config
    dtype = np.dtype(cfg.feature_dtype)
    fields = {
        'image_id': np.int64,
        'image_w': np.int32,
        'image_h': np.int32,
        'features': tensor((None, cfg.feature_dim), dtype),
        'boxes': tensor((None, 4), np.float32),
        'img_pos': tensor((None, 7), np.float32),
        'conf': tensor((None,), np.float32),
    }
    if cfg.soft_label_dim:  # tfds cannot decode [K, 0] tensors: no field instead
      fields['soft_labels'] = tensor((None, cfg.soft_label_dim), dtype)
    return fields

  def empty_image_fields(self, image_id: int = -1) -> dict:
    """Image fields of a record of the other kind (union schemas: VQA, RefCOCO)."""
    cfg = self.builder_config
    dtype = np.dtype(cfg.feature_dtype)
    out = {'image_id': int(image_id), 'image_w': 0, 'image_h': 0,
           'features': np.zeros((0, cfg.feature_dim), dtype),
           'boxes': np.zeros((0, 4), np.float32), 'img_pos': np.zeros((0, 7), np.float32),
           'conf': np.zeros((0,), np.float32)}
    if cfg.soft_label_dim:
      out['soft_labels'] = np.zeros((0, cfg.soft_label_dim), dtype)
    return out

  # ------------------------------------------------------------------ building
  def open_features(self, manual_dir, sizes: dict | None = None):
    """The feature source (options or `<manual_dir>/features/`)."""
    opts, manual_dir = self.build_options, os.fspath(manual_dir)
    spec = opts.features or default_spec(manual_dir)
    all_sizes = dict(sizes or {})
    if source_format(spec) != 'tsv':  # TSV lines carry their own size
      size_files = list(opts.image_sizes)
      size_dir = os.path.join(manual_dir, 'image_sizes')
      if not size_files and os.path.isdir(size_dir):
        size_files = sorted(os.path.join(size_dir, n) for n in os.listdir(size_dir)
                            if n.endswith('.json'))
      all_sizes.update(load_image_sizes(size_files))
    source = open_source(spec, report=self.report, sizes=all_sizes,
                         tsv_fields=opts.tsv_fields, progress=opts.progress)
    self.report.notes['features'] = source.describe()
    return source

  def read_image(self, source, image_id: int, where: str) -> dict | None:
    """The image-level record of `image_id`, or None if it was bad and skipped."""
    try:
      if image_id not in source:
        raise BadInput('missing_features', where,
                       f'no region features for image {image_id} in {source.describe()}')
      return image_record(source.get(image_id), self.builder_config.record_format())
    except BadInput as err:
      self.report.bad(err)
      return None

  def bad(self, err: BadInput) -> None:
    self.report.bad(err)

  def write_file(self, name: str, data: bytes | str) -> None:
    """Writes a side file next to the records (inside tfds' temporary dir)."""
    mode = 'wb' if isinstance(data, bytes) else 'w'
    with (epath.Path(self.data_dir) / name).open(mode) as f:
      f.write(data)

  def write_tokenizer(self, sentences, vocab_size: int) -> None:
    """Trains the sentencepiece model of `vlp_scenes` on `sentences`; writes spm.model."""
    if vocab_size > 0 and sentences:
      self.write_file(SPM_FILENAME, vlp_scenes.train_spm(sentences, vocab_size=vocab_size))
      self.report.notes['tokenizer'] = f'{SPM_FILENAME} (vocab <= {vocab_size})'

  def finish_split(self, split: str, count: int) -> None:
    if not count:  # tfds cannot write an empty split; say why instead
      raise ValueError(f'{self.name}: split {split!r} has no examples left; skipped: '
                       f'{dict(self.report.bad_input)}, dropped: '
                       f'{ {k: dict(v) for k, v in self.report.dropped.items()} }')
    self.report.examples[split] = count
    self.write_file(REPORT_FILENAME, self.report.to_json())
