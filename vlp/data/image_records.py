"""The image-level records of a tfds split: validated once, read per batch.

Every input pipeline reads its regions here: the pair splits (records with five
captions), the `vlp_scenes` splits whose records also carry questions /
expressions, and the `images` split of the per-example builders (vqa_v2,
refcoco*). Reading goes through the fast parser of vlp.data.records where every
array field is stored as raw bytes, else through tfds' decoder.
"""

from __future__ import annotations

import numpy as np

from vlp.data import records

NUM_CAPTIONS = 5
REGION_FIELDS = ('features', 'img_pos', 'soft_labels')  # soft_labels is optional


class ImageRecords:
  """A validated split of image-level records.

  Args:
    builder: a prepared tfds builder.
    split: the split to read.
    feature_dim: D the model expects; records with another D are an error.
    captions: require exactly `NUM_CAPTIONS` captions per image and read them.
    boxes: require and read `boxes` (pixel x1 y1 x2 y2 per region).

  Attributes: name, split, feature_dim, num_classes (stored C of `soft_labels`,
  0 without), layout ({field: (dtype, tail)} of the fast path; None when tfds
  decodes the records), source.
  """

  def __init__(self, builder, split: str, feature_dim: int, *, captions: bool = True,
               boxes: bool = False):
    self.name, self.split = builder.info.name, split
    where = f'split {split!r} of {self.name}'
    splits = builder.info.splits
    if split not in splits:
      raise ValueError(f'{self.name} at {builder.data_dir} has no split {split!r}; '
                       f'it has {sorted(splits)}')
    feats = builder.info.features
    required = (('image_id', 'features', 'img_pos') + ('captions',) * captions
                + ('boxes',) * boxes)
    missing = [k for k in required if k not in feats]
    if missing:
      raise KeyError(f'{where} ({builder.data_dir}) lacks fields {missing}; records have '
                     f'{sorted(feats)}')
    dim = feats['features'].shape[-1]
    if dim != feature_dim:
      raise ValueError(f'{where} has region features of dim {dim}, config expects '
                       f'feature_dim={feature_dim}')
    if captions:
      shape = getattr(feats['captions'], 'shape', (None,))
      if tuple(shape) != (NUM_CAPTIONS,):
        raise ValueError(f'{where} stores captions of shape {shape}; pairs need exactly '
                         f'{NUM_CAPTIONS} per image')
    self.num_classes = (feats['soft_labels'].shape[-1] if 'soft_labels' in feats else 0)
    self.feature_dim, self.captions = dim, captions
    self.layout = None
    if records.is_int_scalar(feats['image_id']):
      self.layout = records.bytes_layout(feats, REGION_FIELDS + ('boxes',) * boxes)
    self.source = records.open_source(builder, split, raw=self.fast)
    self._fields = {'image_id', *(('captions',) * captions), *(self.layout or ())}
    if len(self.source) == 0:
      raise ValueError(f'{where} ({builder.data_dir}) is empty')

  @property
  def fast(self) -> bool:
    """Whether records are parsed here (else tfds decodes every field)."""
    return self.layout is not None

  def __len__(self):
    return len(self.source)

  def read(self, indices) -> list[dict]:
    """Records at `indices` (one batched read; repeated indices read once).

    On the fast path a record holds only the fields batches use: image_id, the
    region arrays and, if asked for, captions and boxes.
    """
    unique, inverse = np.unique(np.asarray(indices, np.int64), return_inverse=True)
    if self.fast:
      # One record per read: the batched read runs a thread pool per call, which
      # costs ~3x the CPU per 100-region record (the batch functions already run
      # on several grain threads).
      out = [self._parse(self.source[int(i)]) for i in unique]
    else:
      out = self.source.__getitems__([int(i) for i in unique])
    return [out[j] for j in inverse]

  def _parse(self, raw: bytes) -> dict:
    # Views into the record's own buffer: one scan of its wire format, no copy
    # (a full proto parse copies each 100-region record twice).
    spans = records.scan(raw, self._fields)
    out = {'image_id': records.span_int(raw, spans['image_id'])}
    if self.captions:
      out['captions'] = [raw[s:e] for s, e in records.span_bytes(raw, spans['captions'])]
    for name, (dtype, tail) in self.layout.items():
      out[name] = records.span_array(raw, spans[name], dtype, tail)
    return out


class ConcatRecords:
  """Several splits of one dataset read as one list of image records (e.g. COCO's
  `train+restval`): rows of the first split, then of the next, and so on.

  Offers what batches read of `ImageRecords`: name, split (the splits joined by
  '+'), feature_dim, num_classes, len() and read().
  """

  def __init__(self, parts: list[ImageRecords]):
    if not parts:
      raise ValueError('ConcatRecords needs at least one split')
    self.parts = list(parts)
    first = self.parts[0]
    self.name, self.feature_dim = first.name, first.feature_dim
    self.num_classes = first.num_classes
    self.split = '+'.join(p.split for p in self.parts)
    self._starts = np.cumsum([0] + [len(p) for p in self.parts])

  def __len__(self):
    return int(self._starts[-1])

  def read(self, indices) -> list[dict]:
    indices = np.asarray(indices, np.int64)
    which = np.searchsorted(self._starts, indices, side='right') - 1
    out: list = [None] * len(indices)
    for j in np.unique(which):
      sel = np.flatnonzero(which == j)
      for i, record in zip(sel, self.parts[j].read(indices[sel] - self._starts[j])):
        out[i] = record
    return out
