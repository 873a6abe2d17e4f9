"""Opens a region-feature source from a spec string: `tsv:PATH`, `npz:DIR`, `npy:DIR`,
`lmdb:DIR`.

`tsv:PATH` takes a file, a directory (all `*.tsv` in it, and the parts
`*.tsv.0`, `*.tsv.1`, ... of files written in pieces), a glob or a comma list
of these. `lmdb:DIR` takes UNITER's image DBs (vlp.data.features.imgdb). Without
a spec, builders look in `<manual_dir>/features/`: `*.tsv` files make it a TSV
source, otherwise `*.npz`, otherwise `*.npy`.

Every source offers `image_id in source`, `source.get(image_id) -> Regions`
(raising `BadInput` for malformed data), `ids()`, `describe()` and `close()`.
"""

from __future__ import annotations

import glob
import os
from typing import Mapping

from vlp.data.features import files, imgdb, tsv
from vlp.data.features.errors import BuildReport

FORMATS = ('tsv', 'npz', 'npy', 'lmdb')


def default_spec(manual_dir: str) -> str:
  """The spec of `<manual_dir>/features/` (see the module doc)."""
  directory = os.path.join(manual_dir, 'features')
  for fmt in FORMATS[:3]:
    if glob.glob(os.path.join(directory, f'*.{fmt}')):
      return f'{fmt}:{directory}'
  raise FileNotFoundError(
      f'no region features: pass --features=tsv:PATH|npz:DIR|npy:DIR|lmdb:DIR or put *.tsv, '
      f'*.npz or *.npy files in {directory}')


def source_format(spec: str) -> str:
  fmt, sep, path = spec.partition(':')
  if not sep or fmt not in FORMATS or not path:
    raise ValueError(f'feature source {spec!r} must be tsv:PATH, npz:DIR, npy:DIR or '
                     'lmdb:DIR')
  return fmt


def open_source(spec: str, *, report: BuildReport,
                sizes: Mapping[int, tuple[float, float]] | None = None,
                tsv_fields: tuple[str, ...] | None = None, progress: bool = False):
  """The feature source named by `spec` (sizes are used by npz/npy/lmdb only)."""
  fmt = source_format(spec)
  path = spec.partition(':')[2]
  if fmt == 'tsv':
    return tsv.TsvFeatures(tsv.expand_paths(path), report=report, fields=tsv_fields,
                           progress=progress)
  if fmt == 'lmdb':
    return imgdb.LmdbFeatures(path, report=report, sizes=sizes)
  cls = files.NpzFeatures if fmt == 'npz' else files.NpyFeatures
  return cls(path, report=report, sizes=sizes)
