"""The two tokenizers a backbone can have, with the BERT-style special ids UNITER needs.

* `Tokenizer`: a sentencepiece model (``*.model``). It must define pad and unk ids
  and the pieces `[CLS]`, `[SEP]` and `[MASK]` (as user-defined symbols); the
  data builders train such a model on their train captions.
* `WordPieceTokenizer`: a BERT ``vocab.txt`` (the released UNITER checkpoints and
  BERT use bert-base-cased's), run by HuggingFace `tokenizers` with BERT's
  normaliser, pre-tokeniser and WordPiece model.

Both turn raw text into ids (`encode`, `encode_batch`), so the records store text
and any pipeline can run either. `open_tokenizer(path, lowercase=...)` picks the
class from the file name.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import sentencepiece as spm
from etils import epath
from tokenizers import Tokenizer as HfTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers

_SPECIALS = ('[CLS]', '[SEP]', '[MASK]')
_BERT_SPECIALS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')
# Longer words become [UNK] (BERT's limit).
_MAX_WORD_CHARS = 100


def tokenizer_type(path: str | os.PathLike) -> str:
  """'wordpiece' for a BERT ``*.txt`` vocabulary, else 'sentencepiece'."""
  return 'wordpiece' if os.fspath(path).endswith('.txt') else 'sentencepiece'


def open_tokenizer(path: str | os.PathLike, *, lowercase: bool = False):
  """`WordPieceTokenizer` for a ``*.txt`` vocabulary, else `Tokenizer`.

  `lowercase` (WordPiece only) says the vocabulary is uncased."""
  if tokenizer_type(path) == 'wordpiece':
    return WordPieceTokenizer(path, lowercase=lowercase)
  return Tokenizer(path)


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
  """Wraps a sentencepiece model file (local or on an object store: it is read as
  bytes, since sentencepiece opens file names with the local file system only).

  Attributes:
    path: the model file.
    vocab_size: number of ids (the model's embedding table size).
    pad_id, unk_id, cls_id, sep_id, mask_id: special ids.
    random_range: `(lo, hi)`: ids in `[lo, hi)` are real pieces (no pad, unk,
      control or special piece); MLM draws its random replacements from it.
    lowercase: False (the model's own normalisation applies; a WordPiece flag).
  """

  lowercase = False

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not epath.Path(self.path).exists():
      raise FileNotFoundError(f'sentencepiece model {self.path!r} does not exist')
    self._sp = spm.SentencePieceProcessor(model_proto=epath.Path(self.path).read_bytes())
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
    return self._sp.encode(_texts(texts))

  def decode(self, ids: Sequence[int]) -> str:
    """Text of piece ids; pad, [CLS] and [SEP] are dropped."""
    drop = {self.pad_id, self.cls_id, self.sep_id}
    return self._sp.decode([int(i) for i in ids if int(i) not in drop])

  def __repr__(self):
    return f'Tokenizer({self.path!r}, vocab_size={self.vocab_size})'


def _texts(texts: Sequence[str | bytes]) -> list[str]:
  return [t.decode('utf-8') if isinstance(t, bytes) else t for t in texts]


class WordPieceTokenizer:
  """Wraps a BERT `vocab.txt` (one token a line; the id is the line number).

  Tokenisation is BERT's: the normaliser drops control characters, turns
  whitespace into spaces, puts spaces around CJK ideographs and, only when
  `lowercase` (uncased vocabularies; bert-base-cased: False), lowercases and
  strips accents; words are split on whitespace and punctuation; WordPiece takes
  the longest matching piece first (continuations prefixed ``##``), and a word
  with an unmatched rest or over 100 characters becomes [UNK]. The special tokens
  written out in a text ([MASK], ...) stay one token.

  Attributes:
    path: the vocabulary file.
    lowercase: whether text is lowercased and accent-stripped.
    vocab_size, pad_id, unk_id, cls_id, sep_id, mask_id: as `Tokenizer`.
    random_range: the longest run of ids that are not bracketed tokens such as
      ``[unused7]``: ``[106, 28996)`` for bert-base-cased, the reference's range.
  """

  def __init__(self, path: str | os.PathLike, *, lowercase: bool = False):
    self.path = os.fspath(path)
    self.lowercase = bool(lowercase)
    if not epath.Path(self.path).exists():
      raise FileNotFoundError(f'WordPiece vocabulary {self.path!r} does not exist')
    text = epath.Path(self.path).read_text(encoding='utf-8')  # Universal newlines.
    tokens = [line.rstrip('\r\n').strip() for line in text.split('\n')]
    while tokens and not tokens[-1]:
      tokens.pop()
    if not tokens:
      raise ValueError(f'WordPiece vocabulary {self.path!r} is empty')
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
      vocab.setdefault(t, i)  # A repeated line keeps its first id, as BERT's loader.
    missing = [t for t in _BERT_SPECIALS if t not in vocab]
    if missing:
      raise ValueError(f'WordPiece vocabulary {self.path!r} lacks the special token(s) '
                       f'{missing}')
    self._tokens = tokens
    self.vocab_size = len(tokens)
    self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
        vocab[t] for t in _BERT_SPECIALS)
    tok = HfTokenizer(models.WordPiece(vocab, unk_token='[UNK]',
                                       max_input_chars_per_word=_MAX_WORD_CHARS))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=self.lowercase,
        lowercase=self.lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.add_special_tokens(list(_BERT_SPECIALS))
    self._hf = tok
    bracketed = [t.startswith('[') and t.endswith(']') and len(t) > 2 for t in tokens]
    self.random_range = longest_run(bool(t) and not b for t, b in zip(tokens, bracketed))
    if self.random_range[1] <= self.random_range[0]:
      raise ValueError(f'WordPiece vocabulary {self.path!r} has no ordinary pieces')

  def tokenize(self, text: str | bytes) -> list[str]:
    """The pieces of one text (strings), without [CLS]/[SEP]."""
    return [self._tokens[i] for i in self.encode(text)]

  def encode(self, text: str | bytes) -> list[int]:
    """Piece ids of one text, without [CLS]/[SEP]."""
    return self._hf.encode(_texts([text])[0], add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str | bytes]) -> list[list[int]]:
    """Piece ids of many texts (one call into `tokenizers`)."""
    return [e.ids for e in self._hf.encode_batch(_texts(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of piece ids (``##`` pieces joined to the previous one); pad, [CLS] and
    [SEP] are dropped."""
    drop = {self.pad_id, self.cls_id, self.sep_id}
    return self._hf.decode([int(i) for i in ids if int(i) not in drop],
                           skip_special_tokens=False)

  def __repr__(self):
    return (f'WordPieceTokenizer({self.path!r}, vocab_size={self.vocab_size}, '
            f'lowercase={self.lowercase})')
