"""Padded batches from image-level records: the pieces every vlp pipeline shares.

`BatchSpec` fixes the static geometry; `ImageSplit` validates and reads a tfds split
through `as_data_source`; `BatchBuilder` tokenises one caption per example and pads
text and regions into the common keys of docs/design.md; `apply_kind` turns a plain
batch into an MLM, MRM or ITM batch.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow_datasets as tfds

from vlp.data import masking
from vlp.data.tokenizer import Tokenizer

try:  # the proto module tfds' own numpy example parser uses
  from tensorflow_datasets.proto import tf_example_pb2
except ImportError:  # pragma: no cover - other tfds layouts: generic decode
  tf_example_pb2 = None

NUM_CAPTIONS = 5
REQUIRED_FIELDS = ('image_id', 'features', 'img_pos', 'captions')
_ARRAY_FIELDS = ('features', 'img_pos', 'soft_labels')
_MASK_TAG, _SHUFFLE_TAG = 0x6D61736B, 0x73687566  # separate RNG streams


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Static batch geometry and task parameters (one per process).

  Attributes:
    batch_size: examples per batch on this process.
    max_text_len: T, text tokens including [CLS] and [SEP]; longer captions are
      truncated (counted in `stats['truncated']`).
    max_regions: K; an image with more regions keeps its first K (most confident).
    feature_dim: D the model expects; a dataset with another D is an error.
    num_region_classes: C of `soft_labels`; None keeps the stored C, a larger value
      pads with zero probabilities (e.g. 1601 for a detector-sized MRC head).
    max_mlm_predictions / max_mrm_predictions: prediction slots P / Pr (the caps);
      None derives a cap that is hit in well under 1% of examples.
  """
  batch_size: int
  max_text_len: int
  max_regions: int
  feature_dim: int
  num_region_classes: int | None = None
  max_mlm_predictions: int | None = None
  max_mrm_predictions: int | None = None
  mlm_prob: float = 0.15
  mrm_prob: float = 0.15
  itm_neg_prob: float = 0.5
  itm_negatives: str = 'random'  # or 'balanced' (masking.make_itm_batch)

  def __post_init__(self):
    if self.batch_size < 1 or self.max_regions < 1:
      raise ValueError(f'batch_size and max_regions must be positive: {self}')
    if self.max_text_len < 3:
      raise ValueError(f'max_text_len counts [CLS] and [SEP]; need >= 3: {self}')
    # At construction, not at the first ITM batch inside a reader thread.
    masking.check_itm_options(self.itm_negatives, self.itm_neg_prob)

  @classmethod
  def from_config(cls, config, batch_size: int) -> 'BatchSpec':
    """The spec of a pretraining or fine-tuning config, `batch_size` rows per batch."""
    return cls(
        batch_size=batch_size, max_text_len=config.max_text_len,
        max_regions=config.max_regions, feature_dim=config.feature_dim,
        num_region_classes=config.num_region_classes,
        max_mlm_predictions=config.max_mlm_predictions,
        max_mrm_predictions=config.max_mrm_predictions, mlm_prob=config.mlm_prob,
        mrm_prob=config.mrm_prob, itm_neg_prob=config.itm_neg_prob,
        itm_negatives=config.itm_negatives)

  @property
  def mlm_predictions(self) -> int:
    return self.max_mlm_predictions or _default_cap(self.max_text_len - 2, self.mlm_prob)

  @property
  def mrm_predictions(self) -> int:
    return self.max_mrm_predictions or _default_cap(self.max_regions, self.mrm_prob)


def _default_cap(n: int, p: float) -> int:
  mean, sd = n * p, math.sqrt(n * p * (1 - p))
  return int(min(n, max(1, math.ceil(mean + 3.3 * sd + 1))))


def shard_range(num_images: int, process_index: int, process_count: int):
  """Contiguous image slice [lo, hi) of one process (sizes differ by at most 1)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return (num_images * process_index // process_count,
          num_images * (process_index + 1) // process_count)


class ImageSplit:
  """A validated tfds split of image-level records, read through `as_data_source`."""

  def __init__(self, builder, split: str, feature_dim: int):
    self.name, self.split = builder.info.name, split
    splits = builder.info.splits
    if split not in splits:
      raise ValueError(f'{self.name} at {builder.data_dir} has no split {split!r}; '
                       f'it has {sorted(splits)}')
    feats = builder.info.features
    missing = [k for k in REQUIRED_FIELDS if k not in feats]
    if missing:
      raise KeyError(f'split {split!r} of {self.name} ({builder.data_dir}) lacks fields '
                     f'{missing}; records have {sorted(feats)}')
    dim = feats['features'].shape[-1]
    if dim != feature_dim:
      raise ValueError(f'split {split!r} of {self.name} has features of dim {dim}, '
                       f'config expects {feature_dim}')
    captions = getattr(feats['captions'], 'shape', (None,))
    if tuple(captions) != (NUM_CAPTIONS,):
      raise ValueError(f'split {split!r} of {self.name} stores captions of shape '
                       f'{captions}; pairs need exactly {NUM_CAPTIONS} per image')
    self.num_classes = (feats['soft_labels'].shape[-1] if 'soft_labels' in feats else 0)
    self.feature_dim = dim
    self._layout = _raw_layout(feats)
    if self._layout is None:
      self.source = builder.as_data_source(split)
    else:
      self.source = builder.as_data_source(
          split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    if len(self.source) == 0:
      raise ValueError(f'split {split!r} of {self.name} ({builder.data_dir}) is empty')

  def __len__(self):
    return len(self.source)

  def read(self, indices: np.ndarray) -> list[dict]:
    """Records at `indices` (one batched read; repeated indices read once).

    On the fast path a record holds only the fields batches use (image_id,
    captions, features, img_pos, soft_labels).
    """
    unique, inverse = np.unique(np.asarray(indices, np.int64), return_inverse=True)
    records = self.source.__getitems__([int(i) for i in unique])
    if self._layout is not None:
      records = [self._parse(r) for r in records]
    return [records[j] for j in inverse]

  def _parse(self, raw: bytes) -> dict:
    feature = tf_example_pb2.Example.FromString(raw).features.feature
    out = {'image_id': int(feature['image_id'].int64_list.value[0]),
           'captions': list(feature['captions'].bytes_list.value)}
    for name, (dtype, tail) in self._layout.items():
      out[name] = np.frombuffer(feature[name].bytes_list.value[0], dtype).reshape(
          (-1,) + tail)
    return out


def _raw_layout(feats) -> dict | None:
  """{field: (dtype, tail shape)} if records can skip tfds' generic decoding.

  tfds decodes every field of a record in Python (~0.8 ms for a 2048-d record);
  fields stored as raw bytes (`Encoding.BYTES`) are parsed here with one proto
  parse and `np.frombuffer` instead (~0.03 ms). Anything else uses tfds' decoder.
  """
  image_id = feats['image_id']
  if (tf_example_pb2 is None or not isinstance(image_id, tfds.features.Tensor)
      or image_id.shape != () or not np.issubdtype(image_id.np_dtype, np.integer)):
    return None
  layout = {}
  for name in _ARRAY_FIELDS:
    if name not in feats:
      continue
    feat = feats[name]
    if (not isinstance(feat, tfds.features.Tensor)
        or getattr(feat, '_encoding', None) != tfds.features.Encoding.BYTES
        or feat.shape[0] is not None or None in feat.shape[1:]):
      return None
    layout[name] = (np.dtype(feat.np_dtype), tuple(feat.shape[1:]))
  return layout


class BatchBuilder:
  """Turns (records, caption slots) into a padded batch with the common keys."""

  def __init__(self, split: ImageSplit, spec: BatchSpec, tokenizer: Tokenizer):
    num_classes = spec.num_region_classes
    if num_classes is None:
      num_classes = split.num_classes
    if num_classes < split.num_classes:
      raise ValueError(f'split {split.split!r} of {split.name} has {split.num_classes} '
                       f'region classes, config asks for {num_classes}')
    self.split, self.spec, self.tok, self.num_classes = split, spec, tokenizer, num_classes
    self.ids = masking.TokenIds.from_tokenizer(tokenizer)

  def text(self, texts, rows: int, stats: dict) -> dict:
    """`[CLS] pieces [SEP]` then padding, for `rows` rows (texts fill the first ones)."""
    t = self.spec.max_text_len
    input_ids = np.zeros((rows, t), np.int32)
    pieces = self.tok.encode_batch(list(texts))
    lengths = np.array([min(len(p), t - 2) for p in pieces], np.int64)
    stats['truncated'] = stats.get('truncated', 0) + int(
        sum(len(p) > t - 2 for p in pieces))
    for i, p in enumerate(pieces):
      input_ids[i, 1:lengths[i] + 1] = p[:t - 2]
    n = len(pieces)
    input_ids[:n, 0] = self.ids.cls_id
    input_ids[np.arange(n), lengths + 1] = self.ids.sep_id
    txt_mask = np.zeros((rows, t), bool)
    txt_mask[:n] = np.arange(t)[None, :] < (lengths + 2)[:, None]
    return {'input_ids': input_ids, 'txt_mask': txt_mask}

  def images(self, records, rows: int) -> dict:
    """Image fields padded to K regions, for `rows` rows (records fill the first ones)."""
    spec, split = self.spec, self.split
    k, c_stored = spec.max_regions, split.num_classes
    out = {
        'img_feat': np.zeros((rows, k, spec.feature_dim), np.float16),
        'img_pos': np.zeros((rows, k, 7), np.float32),
        'img_mask': np.zeros((rows, k), bool),
        'soft_labels': np.zeros((rows, k, self.num_classes), np.float16),
        'image_id': np.zeros((rows,), np.int64),
    }
    for i, r in enumerate(records):
      feats = r['features']
      if feats.ndim != 2 or feats.shape[1] != spec.feature_dim:
        raise ValueError(f'split {split.split!r} of {split.name}: record of image '
                         f'{r["image_id"]} has features of shape {feats.shape}, config '
                         f'expects [N, {spec.feature_dim}]')
      m = min(len(feats), k)  # stored most-confident first
      out['img_feat'][i, :m] = feats[:m]
      out['img_pos'][i, :m] = r['img_pos'][:m]
      out['img_mask'][i, :m] = True
      if c_stored:
        out['soft_labels'][i, :m, :c_stored] = r['soft_labels'][:m]
      out['image_id'][i] = r['image_id']
    return out

  def __call__(self, images: np.ndarray, slots: np.ndarray, stats: dict) -> dict:
    """Padded batch of `spec.batch_size` rows: caption `slots[i]` of image `images[i]`."""
    b, n = self.spec.batch_size, len(images)
    if n > b:
      raise ValueError(f'{n} examples do not fit a batch of {b}')
    records = self.split.read(images)
    out = self.text([r['captions'][s] for r, s in zip(records, slots)], b, stats)
    out.update(self.images(records, b))
    out['example_mask'] = np.arange(b) < n
    return out


def apply_kind(batch: dict, kind: str | None, rng: np.random.Generator, spec: BatchSpec,
               ids: masking.TokenIds, stats: dict | None = None) -> dict:
  """Builds the task batch of `kind` ('mlm' | 'mrm' | 'itm'; None = plain batch)."""
  if kind is None:
    return batch
  if kind == 'mlm':
    return masking.make_mlm_batch(batch, rng, ids=ids, prob=spec.mlm_prob,
                                  max_predictions=spec.mlm_predictions, stats=stats)
  if kind == 'mrm':
    return masking.make_mrm_batch(batch, rng, prob=spec.mrm_prob,
                                  max_predictions=spec.mrm_predictions, stats=stats)
  if kind == 'itm':
    return masking.make_itm_batch(batch, rng, neg_prob=spec.itm_neg_prob,
                                  negatives=spec.itm_negatives, stats=stats)
  raise ValueError(f'unknown batch kind {kind!r}; expected one of {masking.BATCH_KINDS}')


def masking_rng(seed: int, index: int, process_index: int) -> np.random.Generator:
  """The masking RNG of batch `index` on a process: depends on nothing else."""
  return np.random.default_rng([seed, index, process_index, _MASK_TAG])


def shuffle_rng(seed: int, process_index: int, epoch: int) -> np.random.Generator:
  """The RNG of one epoch's pair permutation on a process."""
  return np.random.default_rng([seed, process_index, epoch, _SHUFFLE_TAG])
