"""One image's detector regions -> one validated, selected, typed record.

Every reader (TSV, npz, npy) returns a :class:`Regions`; :func:`image_record`
turns it into the image-level fields shared with `vlp_scenes`, selecting regions as
the UNITER reference does (`data/data.py: compute_num_bb`; docs/reference.md, "Data
formats"):

* regions are ordered by descending `conf` (stable, so ties keep file order);
  sources without a confidence keep their file order and get conf = 1;
* the region count is K = min(max_bb, max(min_bb, #{conf > conf_th})), capped by
  the number stored; the first K regions are kept. With conf = 1 (e.g. a BUTD
  TSV without a confidence column) this keeps every stored box up to max_bb;
* `img_pos` is UNITER's 7-d box feature (`vlp.data.boxes`) from pixel boxes and
  image size;
* features (and soft labels) are cast to the storage dtype (float16 default).

Anything malformed raises :class:`BadInput` naming the source.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from vlp.data.boxes import box_features
from vlp.data.features.errors import BadInput


@dataclasses.dataclass
class Regions:
  """Regions of one image as read from a feature file (no selection yet).

  Attributes:
    image_id: integer image id.
    image_w, image_h: image size in pixels.
    features: [N, D] region features.
    boxes: [N, 4] pixel boxes (x1, y1, x2, y2).
    conf: [N] detection confidence, or None when the source has none.
    soft_labels: [N, C] class distribution, or None when the source has none.
    where: the source (file, line) for messages.
  """
  image_id: int
  image_w: float
  image_h: float
  features: np.ndarray
  boxes: np.ndarray
  conf: np.ndarray | None
  soft_labels: np.ndarray | None
  where: str


class ImageIndexed:
  """What every feature source offers over its `_index` (image id -> location)."""

  _index: dict

  def __contains__(self, image_id: int) -> bool:
    return int(image_id) in self._index

  def __len__(self) -> int:
    return len(self._index)

  def ids(self) -> list[int]:
    return list(self._index)


@dataclasses.dataclass(frozen=True)
class RecordFormat:
  """How regions are selected and stored.

  Attributes:
    feature_dim: D every image must have.
    feature_dtype: storage dtype of features and soft labels.
    soft_label_dim: C of the stored soft labels; 0 stores none (the record then
      has no `soft_labels` field; batches pad zeros, see docs).
    conf_th, min_bb, max_bb: the region-count rule above (UNITER: 0.2, 10, 100).
  """
  feature_dim: int = 2048
  feature_dtype: str = 'float16'
  soft_label_dim: int = 0
  conf_th: float = 0.2
  min_bb: int = 10
  max_bb: int = 100

  def __post_init__(self):
    if np.dtype(self.feature_dtype) not in (np.float16, np.float32):
      raise ValueError(f'feature_dtype must be float16 or float32, got {self.feature_dtype!r}')
    if self.feature_dim < 1 or self.soft_label_dim < 0:
      raise ValueError(f'bad dimensions in {self}')
    if not 1 <= self.max_bb or self.min_bb > self.max_bb or self.min_bb < 0:
      raise ValueError(f'need 0 <= min_bb <= max_bb and max_bb >= 1: {self}')

  def num_regions(self, conf: np.ndarray) -> int:
    """K of the spec rule for confidences `conf` (capped by len(conf))."""
    confident = int(np.count_nonzero(np.asarray(conf) > self.conf_th))
    return min(len(conf), self.max_bb, max(self.min_bb, confident))


def _finite(name: str, array: np.ndarray, where: str) -> None:
  bad = ~np.isfinite(array)
  if bad.any():
    row = int(np.argwhere(bad)[0][0])
    raise BadInput('non_finite', where,
                   f'{name} has {int(bad.sum())} NaN/inf values (first in region {row})')


def _shape(name: str, array: np.ndarray, shape: tuple, where: str,
           kind: str = 'wrong_shape') -> None:
  if array.ndim != len(shape) or any(e is not None and a != e
                                     for a, e in zip(array.shape, shape)):
    expected = 'x'.join('N' if e is None else str(e) for e in shape)
    raise BadInput(kind, where, f'{name} has shape {array.shape}, expected [{expected}]')


def image_record(regions: Regions, fmt: RecordFormat) -> dict:
  """The validated image-level record of `regions` (see the module docstring).

  Returns:
    dict with image_id, image_w, image_h, features [K, D] (storage dtype), boxes
    [K, 4] float32, img_pos [K, 7] float32, conf [K] float32 and, when
    `fmt.soft_label_dim > 0`, soft_labels [K, C] (storage dtype).

  Raises:
    BadInput: wrong shapes or dimensions, no regions, NaN/inf (also values that
      overflow float16), a non-positive image size, or missing soft labels.
  """
  where, dtype = regions.where, np.dtype(fmt.feature_dtype)
  feats = np.asarray(regions.features)
  if not np.issubdtype(feats.dtype, np.floating):
    raise BadInput('wrong_shape', where, f'features have dtype {feats.dtype}, expected float')
  if feats.ndim != 2 or feats.shape[1] != fmt.feature_dim:
    raise BadInput('feature_dim', where, f'features have shape {feats.shape}, expected '
                   f'[N, {fmt.feature_dim}] (feature_dim={fmt.feature_dim})')
  n = feats.shape[0]
  if n == 0:
    raise BadInput('wrong_shape', where, 'image has no regions')
  boxes = np.asarray(regions.boxes, np.float64)
  _shape('boxes', boxes, (n, 4), where)
  conf = regions.conf
  if conf is not None:
    conf = np.asarray(conf, np.float64)
    if conf.ndim == 2 and conf.shape[1] == 1:
      conf = conf[:, 0]  # UNITER npz may store [N, 1]
    _shape('conf', conf, (n,), where)
  labels = None
  if fmt.soft_label_dim:
    if regions.soft_labels is None:
      raise BadInput('missing_field', where, 'no soft labels, but soft_label_dim='
                     f'{fmt.soft_label_dim} (use soft_label_dim=0 for sources without them)')
    labels = np.asarray(regions.soft_labels)
    _shape('soft_labels', labels, (n, fmt.soft_label_dim), where)
  w, h = float(regions.image_w), float(regions.image_h)
  if not (np.isfinite(w) and np.isfinite(h) and w > 0 and h > 0):
    raise BadInput('bad_value', where, f'image size {w}x{h} is not positive')
  _finite('features', feats, where)
  _finite('boxes', boxes, where)
  if conf is not None:
    _finite('conf', conf, where)
  if labels is not None:
    _finite('soft_labels', labels, where)

  if conf is None:
    order, conf = np.arange(n), np.ones(n)
  else:
    order = np.argsort(-conf, kind='stable')
  k = fmt.num_regions(conf)
  keep = order[:k]
  with np.errstate(over='ignore'):  # overflow becomes inf, reported just below
    out_feats = feats[keep].astype(dtype)
  if dtype == np.float16:
    _finite('features (as float16)', out_feats, where)
  sel_boxes = boxes[keep]
  record = {
      'image_id': int(regions.image_id),
      'image_w': int(round(w)),
      'image_h': int(round(h)),
      'features': out_feats,
      'boxes': sel_boxes.astype(np.float32),
      'img_pos': box_features(sel_boxes, w, h),
      'conf': conf[keep].astype(np.float32),
  }
  if labels is not None:
    record['soft_labels'] = labels[keep].astype(dtype)
  return record
