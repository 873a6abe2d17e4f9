"""Readers of per-image feature files (`.npz`, `.npy` pairs) and of image sizes.

Both formats live in one directory, one image per file; the image id is the last
run of digits in the file name (`coco_train2014_000000000009.npz` -> 9,
`1000092795.npy` -> 1000092795). Two files with the same id are an error.

`.npz` (UNITER / BUTD-UNITER `generate_npz.py`, all arrays usually float16):
`features [N, D]`, `norm_bb [N, >=4]` (x1/W, y1/H, x2/W, y2/H, ...), optional
`conf [N]` or `[N, 1]`, optional `soft_labels [N, C]`, optional `image_w`/`image_h`
(or `width`/`height`). `.npy` pairs: `<stem>.npy` = features [N, D] and
`<stem>_boxes.npy` = pixel boxes [N, 4], optionally `<stem>_conf.npy` [N] and
`<stem>_soft_labels.npy` [N, C]. Files are read with `allow_pickle=False`.

Image size: npz boxes are normalised and npy files carry no size, yet records
store pixel boxes and image_w/h. The size comes from the npz itself when it has
it, else from a size table: :func:`load_image_sizes` reads COCO-style JSON
(`images: [{id, width, height}]`, e.g. `captions_train2014.json`,
`instances_val2014.json`, RefCOCO's `instances.json`), Visual Genome's
`image_data.json` (`[{image_id, width, height}]`) or a plain
`{"<image_id>": [width, height]}` map. Builders add the sizes their own
annotations carry (VG, RefCOCO). An image whose size is known nowhere is a
`missing_image_size` error. The 7-d box feature only depends on the normalised
boxes, so it is the same whatever the size source.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Mapping

import numpy as np

from vlp.data.features.errors import BadInput, BuildReport
from vlp.data.features.regions import ImageIndexed, Regions

_DIGITS = re.compile(r'(\d+)(?!.*\d)')
_NPY_EXTRAS = ('_boxes', '_conf', '_soft_labels')


def load_json(path) -> object:
  """A JSON file's content; a malformed file is an error naming it."""
  with open(path, 'rb') as f:
    try:
      return json.load(f)
    except ValueError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None


def load_image_sizes(paths) -> dict[int, tuple[float, float]]:
  """image id -> (width, height) from size files (formats in the module doc)."""
  sizes: dict[int, tuple[float, float]] = {}
  for path in paths:
    sizes.update(sizes_from_json(load_json(path), path))
  return sizes


def sizes_from_json(data, path: str) -> dict[int, tuple[float, float]]:
  """Sizes in one parsed size file (COCO-style, VG image_data, or id -> [w, h])."""
  if isinstance(data, dict) and 'images' in data:
    data = data['images']
  out = {}
  if isinstance(data, dict):
    for key, value in data.items():
      if isinstance(value, Mapping):
        value = (value.get('width'), value.get('height'))
      try:
        out[int(key)] = (float(value[0]), float(value[1]))
      except (TypeError, ValueError, IndexError):
        raise ValueError(f'{path}: entry {key!r} is not [width, height]') from None
    return out
  if not isinstance(data, list):
    raise ValueError(f'{path}: not a size file (expected a COCO-style "images" list, '
                     'a list of {image_id, width, height} or an {id: [w, h]} map)')
  for i, entry in enumerate(data):
    image_id = entry.get('image_id', entry.get('id')) if isinstance(entry, Mapping) else None
    if image_id is None or 'width' not in entry or 'height' not in entry:
      raise ValueError(f'{path}: entry [{i}] lacks id/image_id, width or height')
    out[int(image_id)] = (float(entry['width']), float(entry['height']))
  return out


def index_directory(directory: str, suffix: str, report: BuildReport,
                    skip=()) -> dict[int, str]:
  """image id -> file for the `*suffix` files of a directory (see module doc)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'feature directory {directory!r} does not exist')
  index: dict[int, str] = {}
  for name in sorted(os.listdir(directory)):
    stem = name[:-len(suffix)]
    if not name.endswith(suffix) or any(stem.endswith(s) for s in skip):
      continue
    path = os.path.join(directory, name)
    m = _DIGITS.search(stem)
    try:
      if m is None:
        raise BadInput('bad_value', path, 'no image id (digits) in the file name')
      image_id = int(m.group(1))
      if image_id in index:
        raise BadInput('duplicate_image', path,
                       f'image {image_id} also has {index[image_id]} (the first is used)')
    except BadInput as err:
      report.bad(err)
      continue
    index[image_id] = path
  return index


class _DirectoryFeatures(ImageIndexed):
  """Shared lookup of one-file-per-image directories."""

  suffix = ''
  skip: tuple = ()

  def __init__(self, directory: str, *, report: BuildReport,
               sizes: Mapping[int, tuple[float, float]] | None = None):
    self.directory, self.report = directory, report
    self.sizes: dict[int, tuple[float, float]] = dict(sizes or {})
    self._index = index_directory(directory, self.suffix, report, self.skip)

  def describe(self) -> str:
    return f'{self.suffix[1:]} ({self.directory}, {len(self._index)} images)'

  def close(self) -> None:
    pass

  def _size(self, image_id: int, where: str):
    if image_id not in self.sizes:
      raise BadInput('missing_image_size', where,
                     f'image {image_id}: width/height in neither the feature file nor a '
                     'size file (pass --image_sizes=COCO/VG annotation JSON)')
    return self.sizes[image_id]


class NpzFeatures(_DirectoryFeatures):
  """Per-image `.npz` files (UNITER keys; see module doc)."""

  suffix = '.npz'

  def get(self, image_id: int) -> Regions:
    image_id = int(image_id)
    path = self._index[image_id]
    try:
      with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
      raise BadInput('unreadable_file', path, f'cannot read npz ({e})') from None
    return uniter_regions(image_id, arrays, path, lambda: self._size(image_id, path))


def uniter_regions(image_id: int, arrays: Mapping[str, np.ndarray], where: str,
                   size) -> Regions:
  """The regions of one image stored under UNITER's npz keys (module doc), from an
  npz file or an entry of UNITER's image DB; `size()` gives (w, h) when the
  arrays carry no image size."""
  for key in ('features', 'norm_bb'):
    if key not in arrays:
      raise BadInput('missing_field', where, f'no array {key!r}; it has {sorted(arrays)}')
  norm = np.asarray(arrays['norm_bb'], np.float64)
  if norm.ndim != 2 or norm.shape[1] < 4:
    raise BadInput('wrong_shape', where, f'norm_bb has shape {norm.shape}, expected [N, >=4]')
  w = arrays.get('image_w', arrays.get('width'))
  h = arrays.get('image_h', arrays.get('height'))
  if w is None or h is None:
    w, h = size()
  w, h = float(np.asarray(w).reshape(-1)[0]), float(np.asarray(h).reshape(-1)[0])
  boxes = norm[:, :4] * np.array([w, h, w, h])
  return Regions(image_id=image_id, image_w=w, image_h=h, features=arrays['features'],
                 boxes=boxes, conf=arrays.get('conf'), soft_labels=arrays.get('soft_labels'),
                 where=where)


class NpyFeatures(_DirectoryFeatures):
  """Per-image `.npy` feature + box pairs (see module doc)."""

  suffix = '.npy'
  skip = _NPY_EXTRAS

  def _load(self, path: str, required: bool):
    if not os.path.exists(path):
      if required:
        raise BadInput('missing_field', path, 'file missing (each <stem>.npy needs '
                       '<stem>_boxes.npy with pixel boxes [N, 4])')
      return None
    try:
      return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
      raise BadInput('unreadable_file', path, f'cannot read npy ({e})') from None

  def get(self, image_id: int) -> Regions:
    image_id = int(image_id)
    path = self._index[image_id]
    stem = path[:-len(self.suffix)]
    feats = self._load(path, True)
    boxes = self._load(stem + '_boxes.npy', True)
    w, h = self._size(image_id, path)
    return Regions(image_id=image_id, image_w=w, image_h=h, features=feats, boxes=boxes,
                   conf=self._load(stem + '_conf.npy', False),
                   soft_labels=self._load(stem + '_soft_labels.npy', False), where=path)
