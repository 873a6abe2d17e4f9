"""Reader of UNITER's released image feature DBs (`img_db/`), as downloaded.

Layout: `img_db/<name>/` (e.g. `coco_train2014`, `coco_val2014`, `vg`) holds one
LMDB environment per region rule, `feat_th0.2_max100_min10/` (or its
`_compressed` variant; `feat_numbb100` for RefCOCO's fixed boxes), plus a JSON of
region counts that is not needed here. `lmdb:PATH` takes such an environment, an
image DB holding one, a folder of image DBs (all of them), or a comma list.

Each key is an image file name (`coco_train2014_000000000009.npz`; the image id
is its last run of digits); the key `__keys__` lists them and is skipped. A
value holds the image's arrays under the npz keys of vlp.data.features.files
(`features`, `norm_bb`, `conf`, `soft_labels`), either as a msgpack map whose
arrays use msgpack-numpy's encoding (`{nd, type, kind, shape, data}`), or, in
the compressed DBs, as the bytes of an `np.savez_compressed` archive. Both are
decoded here without pickle: an entry that would need unpickling (an object or
structured dtype, a msgpack extension type, an npz object array) is refused
with an error naming the database and the key. Image sizes come from size files
as for npz (the entries store normalised boxes only).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from typing import Mapping

import lmdb
import msgpack
import numpy as np

from vlp.data.features.errors import BadInput, BuildReport
from vlp.data.features.files import uniter_regions
from vlp.data.features.regions import ImageIndexed, Regions

KEYS_ENTRY = b'__keys__'
_DIGITS = re.compile(r'(\d+)(?!.*\d)')
_ENV_NAME = re.compile(r'^(feat_.+|all|all_compressed)$')
_NUMERIC_KINDS = 'biuf'  # bool, signed, unsigned, float: plain bytes, no pickle
_ZIP_MAGIC = b'PK\x03\x04'


class Refused(ValueError):
  """An entry that would need unpickling (or is not msgpack-numpy's plain encoding)."""


def is_env(path: str) -> bool:
  return os.path.isfile(os.path.join(path, 'data.mdb'))


def _env_of_image_db(path: str) -> str | None:
  """The one LMDB environment of an image DB directory (None: not an image DB)."""
  envs = sorted(n for n in os.listdir(path)
                if _ENV_NAME.match(n) and is_env(os.path.join(path, n)))
  if len(envs) > 1:
    raise ValueError(f'image DB {path} holds several feature DBs {envs}; name one, e.g. '
                     f'lmdb:{os.path.join(path, envs[0])}')
  return os.path.join(path, envs[0]) if envs else None


def expand_envs(spec: str) -> list[str]:
  """The LMDB environments named by `spec` (see the module doc)."""
  envs = []
  for part in [p for p in spec.split(',') if p]:
    if not os.path.isdir(part):
      raise FileNotFoundError(f'image DB {part!r}: no such directory')
    if is_env(part):
      envs.append(part)
      continue
    env = _env_of_image_db(part)
    if env is None:  # a folder of image DBs
      subdirs = [os.path.join(part, n) for n in sorted(os.listdir(part))
                 if os.path.isdir(os.path.join(part, n))]
      found = [e for e in map(_env_of_image_db, subdirs) if e]
      if not found:
        raise FileNotFoundError(
            f'image DB {part!r}: no LMDB feature DB (a feat_*/ directory with data.mdb) in '
            'it or in its subdirectories')
      envs.extend(found)
    else:
      envs.append(env)
  return envs


def _text(value) -> str:
  return value.decode('utf-8', 'replace') if isinstance(value, bytes) else str(value)


def _array(obj: dict):
  """msgpack-numpy's encoding of an ndarray (`nd` True) or numpy scalar (`nd` False)."""
  type_field = obj['type']
  if _text(obj.get('kind', b'')) == 'V' or not isinstance(type_field, (str, bytes)):
    raise Refused(f'a structured array (dtype {type_field!r}); only numeric arrays are read')
  try:
    dtype = np.dtype(_text(type_field))
  except TypeError:
    raise Refused(f'an array of unknown dtype {type_field!r}') from None
  if dtype.kind == 'O':
    raise Refused('an object array (dtype O), stored pickled: refused, unpickling can run '
                  'code')
  if dtype.kind not in _NUMERIC_KINDS:
    raise Refused(f'an array of dtype {dtype}; only numeric arrays are read')
  data = obj['data']
  if not isinstance(data, bytes):
    raise Refused(f'array data of type {type(data).__name__}, expected bytes')
  if obj['nd'] is False:
    if len(data) != dtype.itemsize:
      raise Refused(f'a {dtype} scalar of {len(data)} bytes')
    return np.frombuffer(data, dtype)[0]
  shape = tuple(int(s) for s in obj.get('shape', ()))
  if len(data) != int(np.prod(shape)) * dtype.itemsize:
    raise Refused(f'array data of {len(data)} bytes for shape {shape} of {dtype}')
  return np.frombuffer(data, dtype).reshape(shape)


def _object_hook(obj: dict):
  obj = {_text(k): v for k, v in obj.items()}
  if 'nd' in obj and 'type' in obj and 'data' in obj:
    return _array(obj)
  return obj


def _ext_hook(code: int, data: bytes):
  raise Refused(f'a msgpack extension type {code}; only msgpack-numpy arrays are read')


def decode_entry(raw: bytes) -> dict[str, np.ndarray]:
  """The arrays of one DB value (msgpack map or npz archive; see the module doc).

  Raises:
    Refused: the value would need unpickling or is not plain numeric arrays.
    ValueError: the value is neither msgpack nor npz.
  """
  if raw[:4] == _ZIP_MAGIC:
    try:
      with np.load(io.BytesIO(raw), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except ValueError as e:
      if 'allow_pickle' in str(e):
        raise Refused('an npz object array, stored pickled: refused, unpickling can run '
                      'code') from None
      raise
    except (zipfile.BadZipFile, OSError, EOFError) as e:
      raise ValueError(f'not a readable npz archive ({e})') from None
  try:
    value = msgpack.unpackb(raw, raw=False, object_hook=_object_hook, ext_hook=_ext_hook,
                            strict_map_key=False)
  except Refused:
    raise
  except (ValueError, TypeError, msgpack.UnpackException) as e:
    raise ValueError(f'not a msgpack map nor an npz archive ({e})') from None
  if not isinstance(value, dict):
    raise ValueError(f'a msgpack {type(value).__name__}, expected a map of arrays')
  return value


class LmdbFeatures(ImageIndexed):
  """Random access by image id to the images of UNITER image DBs (module doc)."""

  def __init__(self, spec: str, *, report: BuildReport,
               sizes: Mapping[int, tuple[float, float]] | None = None):
    self.report, self.sizes = report, dict(sizes or {})
    self.paths = expand_envs(spec)
    self._envs = [_open_env(p) for p in self.paths]
    self._txns = [env.begin(buffers=False) for env in self._envs]
    self._index: dict[int, tuple[int, bytes]] = {}  # id -> (DB, key)
    for db, txn in enumerate(self._txns):
      with txn.cursor() as cursor:
        for key in cursor.iternext(keys=True, values=False):
          if key != KEYS_ENTRY:
            self._add(db, bytes(key))

  def _add(self, db: int, key: bytes) -> None:
    name = key.decode('utf-8', 'replace')
    where = f'{self.paths[db]} key {name!r}'
    try:
      m = _DIGITS.search(os.path.splitext(name)[0])
      if m is None:
        raise BadInput('bad_value', where, 'no image id (digits) in the key')
      image_id = int(m.group(1))
      if image_id in self._index:
        other_db, other = self._index[image_id]
        raise BadInput('duplicate_image', where, f'image {image_id} is also '
                       f'{self.paths[other_db]} key {other.decode()!r} (the first is used)')
    except BadInput as err:
      self.report.bad(err)
      return
    self._index[image_id] = (db, key)

  def describe(self) -> str:
    return f'lmdb ({len(self.paths)} DBs, {len(self._index)} images)'

  def arrays(self, image_id: int) -> tuple[dict, str]:
    """The decoded arrays of `image_id` and where they come from (DB and key)."""
    db, key = self._index[int(image_id)]
    where = f'{self.paths[db]} key {key.decode("utf-8", "replace")!r}'
    raw = self._txns[db].get(key)
    if raw is None:
      raise BadInput('unreadable_file', where, 'the key has no value')
    try:
      return decode_entry(raw), where
    except Refused as e:
      raise BadInput('pickled', where, f'the entry holds {e}') from None
    except ValueError as e:
      raise BadInput('unreadable_file', where, str(e)) from None

  def get(self, image_id: int) -> Regions:
    image_id = int(image_id)
    arrays, where = self.arrays(image_id)

    def size():
      if image_id not in self.sizes:
        raise BadInput('missing_image_size', where,
                       f'image {image_id}: the DB stores normalised boxes only; pass its '
                       'width/height in a size file (--image_sizes=COCO/VG annotation JSON)')
      return self.sizes[image_id]
    return uniter_regions(image_id, arrays, where, size)

  def soft_label_dim(self) -> int:
    """Soft-label classes of the first image (0 without soft labels or images)."""
    if not self._index:
      return 0
    labels = self.arrays(next(iter(self._index)))[0].get('soft_labels')
    return int(np.shape(labels)[-1]) if labels is not None else 0

  def close(self) -> None:
    for txn in getattr(self, '_txns', []):
      txn.abort()
    for path in getattr(self, 'paths', [])[:len(getattr(self, '_envs', []))]:
      _close_env(path)
    self._txns, self._envs = [], []


# lmdb allows one open handle per environment and process: readers share it.
_OPEN: dict[str, list] = {}  # real path -> [environment, users]


def _open_env(path: str):
  key = os.path.realpath(path)
  if key not in _OPEN:
    _OPEN[key] = [lmdb.open(path, readonly=True, lock=False, readahead=False, subdir=True), 0]
  _OPEN[key][1] += 1
  return _OPEN[key][0]


def _close_env(path: str) -> None:
  entry = _OPEN.get(os.path.realpath(path))
  if entry is not None:
    entry[1] -= 1
    if entry[1] <= 0:
      entry[0].close()
      del _OPEN[os.path.realpath(path)]

  def __del__(self):
    self.close()
