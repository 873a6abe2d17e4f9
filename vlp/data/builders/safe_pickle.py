"""Loads pickles that may only hold plain data (RefCOCO's `refs(*).p`).

A pickle can name any importable callable (`os.system`, ...) and have the
unpickler call it. The loader here resolves no global at all, so only what the
pickle opcodes build by themselves can appear: dict, list, tuple, set, str,
bytes, int, float, bool and None. Anything else raises `UnsafePickleError`
before it is called. Python 2 byte strings (the RefCOCO files) are decoded as
UTF-8.
"""

from __future__ import annotations

import io
import pickle


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle references code or objects other than plain containers and numbers."""


class _PlainUnpickler(pickle.Unpickler):

  def __init__(self, file, path: str):
    super().__init__(file, encoding='utf-8', errors='strict')
    self._path = path

  def find_class(self, module, name):
    raise UnsafePickleError(
        f'{self._path}: refuses to load {module}.{name}: only plain containers, strings '
        'and numbers are allowed (a tampered or unexpected pickle?)')

  def persistent_load(self, pid):
    raise UnsafePickleError(f'{self._path}: refuses persistent id {pid!r}')


def load_plain(path: str):
  """The object in pickle file `path`, if it is plain data (module doc)."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return _PlainUnpickler(io.BytesIO(data), path).load()
  except UnsafePickleError:
    raise
  except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, TypeError,
          IndexError, KeyError, AttributeError) as e:
    raise ValueError(f'{path}: not a readable plain-data pickle ({type(e).__name__}: {e})'
                     ) from None
