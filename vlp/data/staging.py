"""Local copies of datasets kept on an object store.

tfds keeps a prepared dataset's metadata in JSON files, which it reads through
epath from anywhere, but the records are array_record files, and array_record
opens file names with the local file system only (`gs://...` is "not found").
So a `config.data_dir` on an object store (any `scheme://` path) is staged: each
process copies the prepared version directory of the dataset it reads to a
local folder (`stage`) and reads it there. A file already there with the same
size is not copied again, so restarts cost nothing; each file lands under a
temporary name and is renamed into place, so processes that share a disk may
stage at the same time. A bucket mounted as a file system (gcsfuse,
`/gcs/bucket/...`) is a local path and is read in place.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable, TypeVar

from etils import epath

from vlp import storage

Builder = TypeVar("Builder")


def default_cache_dir() -> str:
  return os.path.join(tempfile.gettempdir(), "vlp_data")


def cache_for(data_dir: str, cache_dir: str) -> str:
  """The local folder that stands for the object-store `data_dir`:
  `cache_dir/<scheme>/<bucket and path>`."""
  scheme, _, rest = os.fspath(data_dir).partition("://")
  return os.path.join(cache_dir or default_cache_dir(), scheme, *rest.strip("/").split("/"))


def _files(directory: epath.Path, rel: tuple[str, ...] = ()):
  """(relative parts, path) of every file under `directory`, one listing per folder
  (epath refuses recursive globs on object stores)."""
  for path in sorted(directory.iterdir()):
    if path.is_dir():
      yield from _files(path, rel + (path.name,))
    else:
      yield rel + (path.name,), path


def copy_tree(src: str, dst: str) -> int:
  """Copies every file under `src` to the same relative path under `dst` (either may
  be on an object store), skipping files of the same size there; returns the count
  copied."""
  copied = 0
  for rel, path in _files(epath.Path(src)):
    target = epath.Path(storage.join(dst, *rel))
    if target.exists() and target.stat().length == path.stat().length:
      continue
    target.parent.mkdir(parents=True, exist_ok=True)
    if storage.is_local(dst):  # Renamed into place: a reader never sees half a file.
      partial = epath.Path(f"{target}.partial.{os.getpid()}")
      storage.copy_file(path, partial)
      os.replace(partial, target)
    else:
      storage.copy_file(path, target)
    copied += 1
  return copied


def stage(open_builder: Callable[[str], Builder], data_dir: str, cache_dir: str) -> Builder:
  """The builder `open_builder(d)` opens, read from local disk.

  A local `data_dir` is used as it is. For an object store the prepared
  dataset's version directory is copied under `cache_for(data_dir, cache_dir)`
  and the builder reopened there. `open_builder` raises if the dataset is not
  prepared under `data_dir`.
  """
  if storage.is_local(data_dir):
    return open_builder(data_dir)
  remote = open_builder(data_dir)
  local_root = cache_for(data_dir, cache_dir)
  rel = epath.Path(remote.data_dir).relative_to(epath.Path(data_dir)).parts
  copy_tree(os.fspath(remote.data_dir), os.path.join(local_root, *rel))
  return open_builder(local_root)


def origin(path: str, data_dir: str, cache_dir: str) -> str:
  """Where a file of a staged dataset came from: a path under
  `cache_for(data_dir, cache_dir)` mapped back under `data_dir` (a local
  `data_dir`: `path` itself). Recorded paths (the tokenizer a run used) name the
  shared copy, not one host's cache."""
  if storage.is_local(data_dir):
    return path
  rel = os.path.relpath(path, cache_for(data_dir, cache_dir))
  if rel.startswith(os.pardir):
    return path
  return storage.join(data_dir, *rel.split(os.sep))


def check_local(builder) -> None:
  """A clear error for records that array_record cannot open (see module docstring)."""
  if not storage.is_local(os.fspath(builder.data_dir)):
    raise ValueError(
        f"{builder.data_dir}: array_record reads local files only, so the records of a "
        "dataset on an object store cannot be read in place; open it through "
        "vlp.jobs.data_setup.open_builder (which copies it to local disk, "
        "config.data_cache_dir), copy it yourself, or mount the bucket (gcsfuse)")
