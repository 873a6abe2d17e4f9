"""Paths that may live on an object store (`gs://bucket/...`) as well as on disk.

Every user-supplied location (`--workdir`, `config.data_dir`, `config.tokenizer`,
`config.init_from`, `vlp.export --out`) goes through `etils.epath`, which reaches
`gs://`, `s3://` and the other stores it knows through fsspec (`gcsfs`, `s3fs`)
and local paths through `os`. Object stores differ from a POSIX disk in what
matters here: a path string must not pass through `os.path.abspath` (it would
turn `gs://b/x` into `$PWD/gs:/b/x`), objects cannot be appended to, and
libraries that take a file name (tensorboardX, array_record, safetensors) open it
with the local file system. `LocalMirror` covers the append-only files those
libraries and the metric writers produce.
"""

from __future__ import annotations

import os
import shutil
import tempfile

from etils import epath

PathLike = str | os.PathLike


def is_local(path: PathLike) -> bool:
  """Whether `path` is a local file system path (no `scheme://` prefix)."""
  return "://" not in os.fspath(path)


def absolute(path: PathLike) -> str:
  """`path` made absolute if local; an object-store URI is already absolute."""
  path = os.fspath(path)
  return os.path.abspath(path) if is_local(path) else path


def join(path: PathLike, *names: str) -> str:
  """`path/name/...` as a string, for local paths and URIs alike."""
  return os.fspath(epath.Path(path).joinpath(*names))


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies one file between any two locations (local or object store); epath's own
  `copy` uses the source's file system for both ends."""
  with epath.Path(src).open("rb") as fin, epath.Path(dst).open("wb") as fout:
    shutil.copyfileobj(fin, fout, 1 << 20)


class LocalMirror:
  """A local folder whose files are copied to `directory` on `push()`.

  For a local `directory` the folder is `directory` itself and `push` does
  nothing. For an object store it is a temporary folder: files that are appended
  to (metrics.jsonl, TensorBoard event files, profiler traces) are written there
  and each `push` uploads the whole of every file that changed since the last
  one. An object cannot be appended to, so re-uploading the file is what an
  append costs; the files are small (one line or event per log step), and the
  upload happens at log steps only. `pull(name)` first copies an existing file
  down, so that a resumed run continues it.
  """

  def __init__(self, directory: PathLike):
    self.directory = os.fspath(directory)
    self.remote = not is_local(self.directory)
    if self.remote:
      self.local_dir = tempfile.mkdtemp(prefix="vlp_mirror_")
    else:
      self.local_dir = self.directory
      os.makedirs(self.local_dir, exist_ok=True)
    self._pushed: dict[str, tuple[int, int]] = {}  # relative path -> (size, mtime_ns)

  def local(self, name: str) -> str:
    return os.path.join(self.local_dir, name)

  def pull(self, name: str) -> None:
    src = epath.Path(self.directory) / name
    if self.remote and src.exists():
      copy_file(src, self.local(name))
      self._pushed[name] = self._stamp(name)

  def _stamp(self, rel: str) -> tuple[int, int]:
    st = os.stat(self.local(rel))
    return st.st_size, st.st_mtime_ns

  def push(self) -> None:
    if not self.remote:
      return
    for root, _, files in os.walk(self.local_dir):
      for name in files:
        rel = os.path.relpath(os.path.join(root, name), self.local_dir)
        stamp = self._stamp(rel)
        if self._pushed.get(rel) != stamp:
          copy_file(self.local(rel), join(self.directory, *rel.split(os.sep)))
          self._pushed[rel] = stamp

  def close(self) -> None:
    """Pushes what is left and removes the temporary folder."""
    if self.remote:
      self.push()
      shutil.rmtree(self.local_dir, ignore_errors=True)
