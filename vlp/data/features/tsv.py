"""Reader of bottom-up-attention TSV files (`tools/generate_tsv.py` output).

One line per image, tab-separated, no header. The default columns are those of
generate_tsv.py: `image_id, image_w, image_h, num_boxes, boxes, features`, with
`boxes` ([N, 4] pixel x1 y1 x2 y2) and `features` ([N, D]) base64 of raw
float32. Fixed-36 and adaptive 10-100 files only differ in num_boxes.

Other column orders are named with `fields` (e.g. LXMERT's
`img_id,img_h,img_w,objects_id,objects_conf,attrs_id,attrs_conf,num_boxes,boxes,features`;
`img_id`, `img_h`, `img_w` are aliases). Optional columns understood:
`objects_conf` ([N] float32) becomes `conf`; `cls_prob` ([N, C] float32, the full
class distribution) becomes the soft labels and conf = max over the non-background
classes (1..C-1). Without either, the TSV has no confidence: regions keep file
order and conf = 1, so the count rule keeps every stored box up to max_bb.

The image id is the integer in the id column; for string ids (e.g.
`COCO_val2014_000000000042`) it is the last run of digits.

Files are indexed once (image id -> byte offset, one pass reading only the line
structure); `get` then seeks to one line and decodes it. Malformed lines raise
:class:`BadInput` naming `file:line`.
"""

from __future__ import annotations

import base64
import binascii
import glob
import os
import re

import numpy as np

from vlp.data.features.errors import BadInput, BuildReport
from vlp.data.features.regions import ImageIndexed, Regions

BUTD_FIELDS = ('image_id', 'image_w', 'image_h', 'num_boxes', 'boxes', 'features')
_ALIASES = {'img_id': 'image_id', 'img_w': 'image_w', 'img_h': 'image_h'}
_REQUIRED = ('image_id', 'image_w', 'image_h', 'num_boxes', 'boxes', 'features')
_DIGITS = re.compile(r'(\d+)(?!.*\d)')
_PART = re.compile(r'^(.*\.tsv)(?:\.(\d+))?$')


def parse_image_id(text: str) -> int:
  """Integer id of an image: the number itself, or the last run of digits."""
  text = text.strip()
  if text.isdigit():
    return int(text)
  m = _DIGITS.search(text)
  if m is None:
    raise ValueError(f'no digits in image id {text!r}')
  return int(m.group(1))


def _part_order(path: str):
  """Sort key: `x.tsv`, `x.tsv.0`, `x.tsv.1`, ..., `x.tsv.10` (numbers, not text)."""
  m = _PART.match(path)
  return (m.group(1), -1) if m.group(2) is None else (m.group(1), int(m.group(2)))


def expand_paths(spec: str) -> list[str]:
  """Files named by a comma list of files, directories or globs. A directory gives
  its `*.tsv` files and the parts `*.tsv.0`, `*.tsv.1`, ... that generate_tsv.py
  writes with several GPUs (the public adaptive `trainval/` ships its train split
  so); each part is a TSV of its own images."""
  paths = []
  for part in [p for p in spec.split(',') if p]:
    if os.path.isdir(part):
      found = sorted((p for p in glob.glob(os.path.join(part, '*.tsv*'))
                      if _PART.match(p) and os.path.isfile(p)), key=_part_order)
    elif any(c in part for c in '*?['):
      found = sorted(glob.glob(part))
    else:
      found = [part] if os.path.exists(part) else []
    if not found:
      raise FileNotFoundError(f'feature TSV {part!r}: no such file (or no *.tsv, *.tsv.N in it)')
    paths.extend(found)
  return paths


class TsvFeatures(ImageIndexed):
  """Random access by image id to the images of one or more TSV files."""

  def __init__(self, paths: list[str], *, report: BuildReport,
               fields: tuple[str, ...] | None = None, progress: bool = False):
    fields = tuple(_ALIASES.get(f, f) for f in (fields or BUTD_FIELDS))
    missing = [f for f in _REQUIRED if f not in fields]
    if missing or len(set(fields)) != len(fields):
      raise ValueError(f'TSV fields {fields} must name each of {_REQUIRED} once')
    self.paths, self.fields, self.report = list(paths), fields, report
    self._col = {f: i for i, f in enumerate(fields)}
    self.has_soft_labels = 'cls_prob' in self._col
    self._index: dict[int, tuple[int, int, int]] = {}  # id -> (file, offset, line)
    self._files: dict[int, object] = {}
    for file_no, path in enumerate(self.paths):
      self._index_file(file_no, path, progress)

  def describe(self) -> str:
    return f'tsv ({len(self.paths)} files, {len(self._index)} images)'

  def _index_file(self, file_no: int, path: str, progress: bool) -> None:
    id_col, ncols = self._col['image_id'], len(self.fields)
    bar = None
    if progress:
      from tqdm import auto as tqdm  # tfds' own progress bar library
      bar = tqdm.tqdm(total=os.path.getsize(path), unit='B', unit_scale=True,
                      desc=f'indexing {os.path.basename(path)}')
    try:
      offset = 0
      with open(path, 'rb') as f:
        for line_no, line in enumerate(f, start=1):
          start, offset = offset, offset + len(line)
          if bar is not None:
            bar.update(len(line))
          if not line.strip():
            continue  # blank lines carry nothing (csv readers skip them too)
          where = f'{path}:{line_no}'
          try:
            cols = line.count(b'\t') + 1
            if cols != ncols:
              raise BadInput('corrupt_line', where, f'{cols} tab-separated fields, expected '
                             f'{ncols} ({",".join(self.fields)}); truncated line?')
            raw_id = line.split(b'\t', id_col + 1)[id_col].decode('utf-8', 'replace')
            try:
              image_id = parse_image_id(raw_id)
            except ValueError as e:
              raise BadInput('corrupt_line', where, str(e)) from None
            if image_id in self._index:
              f_no, _, l_no = self._index[image_id]
              raise BadInput('duplicate_image', where, f'image {image_id} is also at '
                             f'{self.paths[f_no]}:{l_no} (the first one is used)')
          except BadInput as err:
            self.report.bad(err)
            continue
          self._index[image_id] = (file_no, start, line_no)
    finally:
      if bar is not None:
        bar.close()

  def _line(self, file_no: int, offset: int) -> bytes:
    f = self._files.get(file_no)
    if f is None:
      f = self._files[file_no] = open(self.paths[file_no], 'rb')
    f.seek(offset)
    return f.readline()

  def close(self) -> None:
    files = getattr(self, '_files', {})  # absent if __init__ failed
    for f in files.values():
      f.close()
    files.clear()

  def __del__(self):
    self.close()

  def get(self, image_id: int) -> Regions:
    """Decodes the line of `image_id` (KeyError if the TSV lacks it)."""
    file_no, offset, line_no = self._index[int(image_id)]
    where = f'{self.paths[file_no]}:{line_no} (image {image_id})'
    cols = self._line(file_no, offset).rstrip(b'\r\n').split(b'\t')
    if len(cols) != len(self.fields):
      raise BadInput('corrupt_line', where, f'{len(cols)} fields, expected {len(self.fields)}')
    col = dict(zip(self.fields, cols))
    try:
      w, h, n = (float(col['image_w']), float(col['image_h']), int(col['num_boxes']))
    except ValueError:
      raise BadInput('corrupt_line', where, 'image_w, image_h, num_boxes must be numbers, '
                     f'got {col["image_w"][:20]!r}, {col["image_h"][:20]!r}, '
                     f'{col["num_boxes"][:20]!r}') from None
    if n <= 0:
      raise BadInput('wrong_shape', where, f'num_boxes is {n}; expected at least 1')
    boxes = self._array(col, 'boxes', n, where, width=4)
    feats = self._array(col, 'features', n, where, width=None)
    conf = labels = None
    if 'objects_conf' in col:
      conf = self._array(col, 'objects_conf', n, where, width=1)[:, 0]
    if 'cls_prob' in col:
      labels = self._array(col, 'cls_prob', n, where, width=None)
      if labels.shape[1] < 2:
        raise BadInput('wrong_shape', where, f'cls_prob has {labels.shape[1]} classes')
      if conf is None:
        conf = labels[:, 1:].max(axis=1)  # class 0 is background
    return Regions(image_id=int(image_id), image_w=w, image_h=h, features=feats,
                   boxes=boxes, conf=conf, soft_labels=labels, where=where)

  @staticmethod
  def _array(col: dict, name: str, n: int, where: str, width: int | None) -> np.ndarray:
    """Decodes base64 float32 [n, width] (width None: inferred from the length)."""
    try:
      raw = base64.b64decode(col[name], validate=True)
    except (binascii.Error, ValueError) as e:
      raise BadInput('bad_base64', where, f'field {name!r} is not valid base64 ({e})') from None
    if width is not None:
      if len(raw) != n * width * 4:
        raise BadInput('wrong_length', where, f'field {name!r} decodes to {len(raw)} bytes, '
                       f'expected num_boxes*{width}*4 = {n * width * 4} (float32)')
    elif len(raw) % (n * 4) or not raw:
      raise BadInput('wrong_length', where, f'field {name!r} decodes to {len(raw)} bytes, '
                     f'not a multiple of num_boxes*4 = {n * 4} (float32 [{n}, D])')
    return np.frombuffer(raw, np.float32).reshape(n, -1)
