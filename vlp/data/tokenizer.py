"""Sentencepiece tokenizer with the BERT-style special ids UNITER needs.

The model must define pad and unk ids and the pieces `[CLS]`, `[SEP]` and `[MASK]`
(as user-defined symbols); `vlp_scenes` trains such a model on its train captions.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import sentencepiece as spm

_SPECIALS = ('[CLS]', '[SEP]', '[MASK]')


def longest_run(flags) -> tuple[int, int]:
  """[start, end) of the longest run of True in `flags` ((0, 0) if none).

  The ids a tokenizer may draw as MLM's random replacements: its ordinary pieces,
  which sit in one block (specials normally come first).
  """
  best, start = (0, 0), None
  for i, ok in enumerate(list(flags) + [False]):
    if ok and start is None:
      start = i
    elif not ok and start is not None:
      if i - start > best[1] - best[0]:
        best = (start, i)
      start = None
  return best


class Tokenizer:
  """Wraps a sentencepiece model file.

  Attributes:
    path: the model file.
    vocab_size: number of ids (the model's embedding table size).
    pad_id, unk_id, cls_id, sep_id, mask_id: special ids.
    random_range: `(lo, hi)`: ids in `[lo, hi)` are real pieces (no pad, unk,
      control or special piece); MLM draws its random replacements from it.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f'sentencepiece model {self.path!r} does not exist')
    self._sp = spm.SentencePieceProcessor(model_file=self.path)
    sp = self._sp
    self.vocab_size = int(sp.get_piece_size())
    self.pad_id = int(sp.pad_id())
    self.unk_id = int(sp.unk_id())
    if self.pad_id < 0:
      raise ValueError(f'sentencepiece model {self.path!r} has no pad id')
    ids = {}
    for piece in _SPECIALS:
      i = int(sp.piece_to_id(piece))
      if i == self.unk_id or sp.id_to_piece(i) != piece:
        raise ValueError(f'sentencepiece model {self.path!r} lacks the piece {piece!r} '
                         '(train it with user_defined_symbols=[CLS],[SEP],[MASK])')
      ids[piece] = i
    self.cls_id, self.sep_id, self.mask_id = ids['[CLS]'], ids['[SEP]'], ids['[MASK]']
    self.random_range = self._random_range()

  def _random_range(self) -> tuple[int, int]:
    sp = self._sp
    special = {self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id}
    normal = np.array([i not in special and not sp.is_control(i) and not sp.is_unknown(i)
                       and not sp.is_unused(i) for i in range(self.vocab_size)])
    best = longest_run(normal)
    if best[1] <= best[0]:
      raise ValueError(f'sentencepiece model {self.path!r} has no ordinary pieces')
    return best

  def encode(self, text: str | bytes) -> list[int]:
    """Piece ids of one text, without [CLS]/[SEP]."""
    if isinstance(text, bytes):
      text = text.decode('utf-8')
    return self._sp.encode(text)

  def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
    """Piece ids of many texts (one call into sentencepiece)."""
    texts = [t.decode('utf-8') if isinstance(t, bytes) else t for t in texts]
    return self._sp.encode(texts)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of piece ids; pad, [CLS] and [SEP] are dropped."""
    drop = {self.pad_id, self.cls_id, self.sep_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in drop])

  def __repr__(self):
    return f'Tokenizer({self.path!r}, vocab_size={self.vocab_size})'
