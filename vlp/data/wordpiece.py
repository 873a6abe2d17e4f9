"""BERT WordPiece tokenizer (`vocab.txt`) with the interface of `vlp.data.tokenizer`.

The released UNITER checkpoints use the bert-base-cased vocabulary (reference
`prepro.py`), not sentencepiece. Tokenisation follows BERT's two stages:

1. basic: drop NUL, U+FFFD and control characters, turn whitespace into spaces, put
   spaces around CJK ideographs, split on whitespace; lowercase and strip accents
   only when `lowercase` (bert-base-cased: False); split every word on punctuation.
   The special tokens ([PAD], [UNK], [CLS], [SEP], [MASK]) written as whole words
   stay one token.
2. WordPiece: greedy longest match first, continuation pieces prefixed ``##``; a
   word longer than 100 characters or with an unmatched remainder becomes [UNK].

Ids are line numbers of `vocab.txt`. `random_range` (the ids MLM draws random
replacements from) is the longest run of ids that are not bracketed tokens such as
``[unused7]``: ``[106, 28996)`` for bert-base-cased, the reference's ``v_range``.
"""

from __future__ import annotations

import os
import re
import unicodedata
from typing import Sequence

from vlp.data.tokenizer import longest_run

_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
_BRACKETED = re.compile(r'^\[[^\[\]]+\]$')
_MAX_WORD_CHARS = 100


def _is_control(ch: str) -> bool:
  if ch in '\t\n\r':
    return False
  return unicodedata.category(ch) in ('Cc', 'Cf')


def _is_whitespace(ch: str) -> bool:
  return ch in ' \t\n\r' or unicodedata.category(ch) == 'Zs'


def _is_punctuation(ch: str) -> bool:
  cp = ord(ch)
  # Every non-alphanumeric ASCII printable counts (BERT treats ^ $ ` as punctuation too).
  if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
    return True
  return unicodedata.category(ch).startswith('P')


def _is_cjk(cp: int) -> bool:
  return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF
          or 0x2A700 <= cp <= 0x2B73F or 0x2B740 <= cp <= 0x2B81F
          or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF
          or 0x2F800 <= cp <= 0x2FA1F)


def _split_punctuation(word: str) -> list[str]:
  out: list[str] = []
  start_new = True
  for ch in word:
    if _is_punctuation(ch):
      out.append(ch)
      start_new = True
    else:
      if start_new:
        out.append('')
        start_new = False
      out[-1] += ch
  return out


class WordPieceTokenizer:
  """Wraps a BERT `vocab.txt`.

  Attributes:
    path: the vocabulary file.
    lowercase: whether text is lowercased and accent-stripped (uncased vocabularies).
    vocab_size: number of ids.
    pad_id, unk_id, cls_id, sep_id, mask_id: special ids.
    random_range: `(lo, hi)`, the ids of ordinary pieces MLM may draw.
  """

  def __init__(self, path: str | os.PathLike, *, lowercase: bool = False):
    self.path = os.fspath(path)
    self.lowercase = bool(lowercase)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f'WordPiece vocabulary {self.path!r} does not exist')
    with open(self.path, encoding='utf-8') as f:
      tokens = [line.rstrip('\r\n').strip() for line in f]
    while tokens and not tokens[-1]:
      tokens.pop()
    if not tokens:
      raise ValueError(f'WordPiece vocabulary {self.path!r} is empty')
    self._tokens = tokens
    self._vocab = {t: i for i, t in enumerate(tokens)}
    missing = [t for t in _SPECIALS if t not in self._vocab]
    if missing:
      raise ValueError(f'WordPiece vocabulary {self.path!r} lacks the special token(s) '
                       f'{missing}')
    self.vocab_size = len(tokens)
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        self._vocab[t] for t in _SPECIALS)
    self.random_range = self._random_range()

  def _random_range(self) -> tuple[int, int]:
    best = longest_run(bool(t) and not _BRACKETED.match(t) for t in self._tokens)
    if best[1] <= best[0]:
      raise ValueError(f'WordPiece vocabulary {self.path!r} has no ordinary pieces')
    return best

  def _basic(self, text: str) -> list[str]:
    chars = []
    for ch in text:
      cp = ord(ch)
      if cp == 0 or cp == 0xFFFD or _is_control(ch):
        continue
      if _is_cjk(cp):
        chars.append(f' {ch} ')
      else:
        chars.append(' ' if _is_whitespace(ch) else ch)
    words = []
    for word in ''.join(chars).split():
      if word in _SPECIALS:
        words.append(word)
        continue
      if self.lowercase:
        word = ''.join(c for c in unicodedata.normalize('NFD', word.lower())
                       if unicodedata.category(c) != 'Mn')
      words.extend(w for w in _split_punctuation(word) if w)
    return words

  def _wordpiece(self, word: str) -> list[int]:
    if len(word) > _MAX_WORD_CHARS:
      return [self.unk_id]
    ids, start = [], 0
    while start < len(word):
      end = len(word)
      while end > start:
        piece = word[start:end] if start == 0 else '##' + word[start:end]
        if piece in self._vocab:
          ids.append(self._vocab[piece])
          break
        end -= 1
      if end == start:
        return [self.unk_id]
      start = end
    return ids

  def tokenize(self, text: str | bytes) -> list[str]:
    """The pieces of one text (strings), without [CLS]/[SEP]."""
    return [self._tokens[i] for i in self.encode(text)]

  def encode(self, text: str | bytes) -> list[int]:
    """Piece ids of one text, without [CLS]/[SEP]."""
    if isinstance(text, bytes):
      text = text.decode('utf-8')
    return [i for word in self._basic(text) for i in self._wordpiece(word)]

  def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
    """Piece ids of many texts."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of piece ids (``##`` pieces joined to the previous one); pad, [CLS] and
    [SEP] are dropped."""
    drop = {self.pad_id, self.cls_id, self.sep_id}
    out = ''
    for i in ids:
      i = int(i)
      if i in drop:
        continue
      token = self._tokens[i]
      if token.startswith('##'):
        out += token[2:]
      else:
        out += (' ' if out else '') + token
    return out

  def __repr__(self):
    return (f'WordPieceTokenizer({self.path!r}, vocab_size={self.vocab_size}, '
            f'lowercase={self.lowercase})')
