"""Data mixtures: several datasets and splits read as one training stream, by weight.

`config.data` names one dataset or a mixture, as comma-separated parts

    NAME[/CONFIG][:SPLIT[+SPLIT...]][=WEIGHT]

e.g. `coco_karpathy:train+restval=1,vg_captions:train=1`. A part's splits are
read as one list of images (concatenated); the split defaults to the job's
training split and the weight to 1; CONFIG is the builder config (empty: the one
prepared under `config.data_dir`, vlp.data.prepared).

Each data shard interleaves its parts by `Interleave`: the stream's positions are
cut into blocks in which part s takes exactly `shares[s]` positions (the weights
as integers), in an order shuffled per block from (seed, shard, block). Where
each part takes its next example is counted in closed form, so the example at
any stream position, and thus batch i, is a pure function of (seed, i): resuming
restarts at a batch index, and a data shard reads the same examples whatever
the number of processes.
"""

from __future__ import annotations

import dataclasses
import fractions
import math
import re
from typing import Sequence

import numpy as np

from vlp.data.batching import RecentCache

_MIX_TAG = 0x6D6978  # the block shuffles draw from a stream of their own
_MAX_PERIOD = 4096  # weights finer than 1/4096 of the total are rounded
_MIN_BLOCK = 1024  # short periods are repeated up to this many positions per block
_NAME = re.compile(r'^[a-z0-9_]+(/[A-Za-z0-9_.\-]+)?$')
_SPLIT = re.compile(r'^[A-Za-z0-9_\-]+$')


@dataclasses.dataclass(frozen=True)
class Part:
  """One dataset of a mixture: `dataset` (tfds name), builder `config` ('' =
  the prepared one), `splits` read as one list of images, and its `weight`."""
  dataset: str
  config: str
  splits: tuple[str, ...]
  weight: float

  @property
  def name(self) -> str:
    """The dataset (with its config when one was given) and splits, as written."""
    config = f'/{self.config}' if self.config else ''
    return f'{self.dataset}{config}:{"+".join(self.splits)}'


def parse(text: str, *, default_split: str = 'train') -> list[Part]:
  """The parts of a `config.data` value (grammar in the module doc)."""
  parts = []
  for item in [p.strip() for p in str(text).split(',')]:
    where = f'config.data={text!r}: part {item!r}'
    if not item:
      raise ValueError(f'config.data={text!r} has an empty part; expected '
                       'NAME[/CONFIG][:SPLIT[+SPLIT...]][=WEIGHT] parts separated by commas')
    body, has_weight, weight_text = item.partition('=')
    weight = 1.0
    if has_weight:
      try:
        weight = float(weight_text)
      except ValueError:
        raise ValueError(f'{where}: weight {weight_text!r} is not a number') from None
      if not (math.isfinite(weight) and weight > 0):
        raise ValueError(f'{where}: weight must be a positive number, got {weight_text!r}')
    name, has_splits, split_text = body.partition(':')
    if not _NAME.match(name):
      raise ValueError(f'{where}: {name!r} is not a dataset name (NAME or NAME/CONFIG)')
    splits = tuple(split_text.split('+')) if has_splits else (default_split,)
    if not all(_SPLIT.match(s) for s in splits) or len(set(splits)) != len(splits):
      raise ValueError(f'{where}: splits {split_text!r} must be distinct names joined by +')
    dataset, _, config = name.partition('/')
    parts.append(Part(dataset, config, splits, weight))
  names = [p.name for p in parts]
  if len(set(names)) != len(names):
    raise ValueError(f'config.data={text!r} names a dataset and splits twice')
  return parts


def integer_shares(weights: Sequence[float]) -> list[int]:
  """Weights as the smallest integers in the same ratio (e.g. 0.5, 1 -> 1, 2).

  Ratios that need a period over 4096 positions are rounded to a period of 4096
  (largest remainders, every part at least 1).
  """
  fracs = [fractions.Fraction(str(float(w))) for w in weights]
  scale = math.lcm(*[f.denominator for f in fracs])
  ints = [int(f * scale) for f in fracs]
  common = math.gcd(*ints)
  ints = [i // common for i in ints]
  if sum(ints) <= _MAX_PERIOD:
    return ints
  total = float(sum(weights))
  exact = [w / total * _MAX_PERIOD for w in weights]
  out = [max(1, int(x)) for x in exact]
  by_remainder = sorted(range(len(out)), key=lambda i: out[i] - exact[i])
  for i in by_remainder[:max(0, _MAX_PERIOD - sum(out))]:
    out[i] += 1
  return out


class Interleave(RecentCache):
  """Stream position -> (part, that part's own position), per block (module doc).

  `shares[s]` positions of every `sum(shares)` go to part s (a short period is
  repeated up to 1024 positions per block, so each block holds a shuffled mix of
  many examples of every part). Picklable (grain workers); thread-safe.
  """

  def __init__(self, shares: Sequence[int], *, seed: int, shard: int):
    shares = np.asarray(shares, np.int64)
    if shares.ndim != 1 or not len(shares) or (shares < 1).any():
      raise ValueError(f'mixture shares must be positive integers, got {list(shares)}')
    reps = 1 if len(shares) == 1 else -(-_MIN_BLOCK // int(shares.sum()))
    self.counts = shares * reps
    self.block = int(self.counts.sum())
    self.seed, self.shard = int(seed), int(shard)
    self._starts = np.cumsum(self.counts) - self.counts
    self._base = np.repeat(np.arange(len(shares)), self.counts)
    super().__init__()

  def _layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(part, rank among that part's positions) of each position of a block."""
    return self._cached(block, self._make_layout)

  def _make_layout(self, block: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, self.shard, block, _MIX_TAG])
    part = rng.permutation(self._base)
    order = np.argsort(part, kind='stable')
    rank = np.empty(self.block, np.int64)
    rank[order] = np.arange(self.block) - self._starts[part[order]]
    return part, rank

  def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(part, position in that part's own stream) of each stream position."""
    positions = np.asarray(positions, np.int64)
    if len(self.counts) == 1:
      return np.zeros_like(positions), positions
    blocks, offsets = np.divmod(positions, self.block)
    part = np.empty_like(positions)
    own = np.empty_like(positions)
    for b in np.unique(blocks):
      sel = blocks == b
      layout_part, layout_rank = self._layout(int(b))
      part[sel] = layout_part[offsets[sel]]
      own[sel] = b * self.counts[part[sel]] + layout_rank[offsets[sel]]
    return part, own
