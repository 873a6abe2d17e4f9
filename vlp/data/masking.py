"""Host-side task construction (numpy): MLM, MRM and ITM batches
(UNITER reference `data/mlm.py`, `data/mrm.py`, `data/itm.py`; docs/reference.md).

Each `make_*_batch` takes a padded batch with the common keys of docs/design.md
and a `np.random.Generator`, and returns a new dict (inputs are never modified)
with exactly the extra keys of its kind. Masking is conditional: an MLM batch masks
only text, an MRM batch only regions, an ITM batch nothing. Everything is
vectorised over the batch; the result is a pure function of (batch, rng state).

Caps: like BERT's `max_predictions_per_seq`, at most `max_predictions` positions
per example are masked. When more were selected, a uniformly random subset of
`max_predictions` is kept and the rest are left untouched (not masked, not
labelled). Pass a `stats` dict to count such events (`mlm_capped`, `mrm_capped`;
the train streams sum them). `prediction_slots` sizes a cap so that this is rare.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, MutableMapping

import numpy as np

# Image-side fields an ITM negative takes from its partner example.
ITM_IMAGE_KEYS = ('img_feat', 'img_pos', 'img_mask', 'soft_labels', 'image_id')


@dataclasses.dataclass(frozen=True)
class TokenIds:
  """The ids MLM needs (a :class:`vlp.data.tokenizer.Tokenizer` has the same fields)."""
  pad_id: int
  cls_id: int
  sep_id: int
  mask_id: int
  random_range: tuple[int, int]

  @classmethod
  def from_tokenizer(cls, tok: Any) -> 'TokenIds':
    return cls(int(tok.pad_id), int(tok.cls_id), int(tok.sep_id), int(tok.mask_id),
               tuple(int(i) for i in tok.random_range))


def prediction_slots(length: int, prob: float, max_drop: float = 1e-4) -> int:
  """The smallest cap P with P(Binomial(length, prob) > P) <= max_drop.

  Each of `length` positions is selected with probability `prob`, so with P slots
  a full-length example loses part of its selection with at most that
  probability (shorter ones less). E.g. 100 regions at 0.15: 30 slots (tail 4e-5).
  """
  if length < 1 or not 0 <= prob <= 1 or not 0 < max_drop < 1:
    raise ValueError(f'prediction_slots needs length >= 1, prob in [0, 1] and max_drop in '
                     f'(0, 1); got {length}, {prob}, {max_drop}')
  tail = 1.0
  for cap in range(length + 1):
    tail -= math.comb(length, cap) * prob ** cap * (1 - prob) ** (length - cap)
    if tail <= max_drop:
      return max(cap, 1)
  return length


def _require(batch: Mapping[str, np.ndarray], keys, kind: str):
  missing = [k for k in keys if k not in batch]
  if missing:
    raise KeyError(f'{kind} batch construction needs keys {missing}; '
                   f'the batch has {sorted(batch)}')


def _bump(stats: MutableMapping[str, int] | None, key: str, value) -> None:
  if stats is not None:
    stats[key] = stats.get(key, 0) + int(value)


def _keep_capped(selected: np.ndarray, score: np.ndarray, cap: int):
  """Keeps per row at most `cap` selected entries (lowest score first).

  Returns:
    kept: [B, L] bool; positions: [B, cap] int32 ascending, 0 on unused slots;
    weights: [B, cap] float32, 1 on used slots.
  """
  b, length = selected.shape
  if cap <= 0:
    raise ValueError(f'max_predictions must be positive, got {cap}')
  kept = selected
  if cap < length:
    key = np.where(selected, score, np.inf)
    order = np.argsort(key, axis=1, kind='stable')[:, :cap]
    kept = np.zeros_like(selected)
    np.put_along_axis(kept, order, np.isfinite(np.take_along_axis(key, order, 1)), 1)
  width = min(cap, length)
  pos = np.argsort(~kept, axis=1, kind='stable')[:, :width]
  used = np.take_along_axis(kept, pos, 1)
  positions = np.zeros((b, cap), np.int32)
  weights = np.zeros((b, cap), np.float32)
  positions[:, :width] = np.where(used, pos, 0)
  weights[:, :width] = used
  return kept, positions, weights


def make_mlm_batch(batch: Mapping[str, np.ndarray], rng: np.random.Generator, *,
                   ids: Any, max_predictions: int, prob: float = 0.15,
                   stats: MutableMapping[str, int] | None = None) -> dict:
  """Masked language modelling: masks text pieces only.

  Every real piece (never [CLS], [SEP] or padding) is selected with `prob`; a
  selected piece becomes [MASK] (80%), a random piece from `ids.random_range` (10%)
  or stays (10%). A text with no selection gets its first piece forced to [MASK].

  Args:
    batch: common keys (needs `input_ids`, `txt_mask`).
    rng: numpy generator; the only source of randomness.
    ids: a `TokenIds` or a `Tokenizer` (pad_id, cls_id, sep_id, mask_id, random_range).
    max_predictions: P, the number of prediction slots per example (the cap).
    prob: selection probability.
    stats: optional counters; adds `mlm_capped` (selections dropped by the cap).

  Returns:
    New batch with masked `input_ids` plus `mlm_positions [B,P] int32`,
    `mlm_labels [B,P] int32` and `mlm_weights [B,P] float32`.
  """
  _require(batch, ('input_ids', 'txt_mask'), 'mlm')
  input_ids = np.asarray(batch['input_ids'])
  b, t = input_ids.shape
  u = rng.random((b, t))
  action = rng.random((b, t))
  lo, hi = ids.random_range
  random_ids = rng.integers(lo, hi, (b, t), dtype=np.int32)

  candidate = (np.asarray(batch['txt_mask'], bool)
               & ~np.isin(input_ids, (ids.pad_id, ids.cls_id, ids.sep_id)))
  selected = candidate & (u < prob)
  rows = np.flatnonzero(~selected.any(1) & candidate.any(1))
  forced = np.zeros_like(selected)
  forced[rows, np.argmax(candidate[rows], axis=1)] = True  # first real piece
  selected |= forced
  kept, positions, weights = _keep_capped(selected, u, max_predictions)
  _bump(stats, 'mlm_capped', selected.sum() - kept.sum())

  to_mask = kept & (forced | (action < 0.8))
  to_random = kept & ~forced & (action >= 0.8) & (action < 0.9)
  masked = input_ids.astype(np.int32, copy=True)
  masked[to_mask] = ids.mask_id
  masked[to_random] = random_ids[to_random]

  out = dict(batch)
  out['input_ids'] = masked
  out['mlm_positions'] = positions
  out['mlm_labels'] = (np.take_along_axis(input_ids, positions, 1) * (weights > 0)
                       ).astype(np.int32)
  out['mlm_weights'] = weights
  return out


def make_mrm_batch(batch: Mapping[str, np.ndarray], rng: np.random.Generator, *,
                   max_predictions: int, prob: float = 0.15,
                   stats: MutableMapping[str, int] | None = None,
                   inplace: bool = False) -> dict:
  """Masked region modelling: masks region features only.

  Every real region is selected with `prob` (no 80/10/10); an image with no
  selection gets one uniformly random real region. Masked features are zeroed;
  `img_pos` (box features) is never touched.

  Args:
    batch: common keys (needs `img_feat`, `img_mask`, `soft_labels`).
    rng: numpy generator.
    max_predictions: Pr, prediction slots per example (the cap).
    prob: selection probability.
    stats: optional counters; adds `mrm_capped`.
    inplace: zero the masked regions in `batch['img_feat']` itself instead of a
      copy (a batch built for this call: saves copying the largest array).

  Returns:
    New batch with zeroed `img_feat` plus `img_masked [B,K] bool`,
    `mrm_positions [B,Pr] int32`, `mrm_weights [B,Pr] float32`,
    `mrfr_target [B,Pr,D] float32` and `mrc_target [B,Pr,C] float32`.
  """
  _require(batch, ('img_feat', 'img_mask', 'soft_labels'), 'mrm')
  feat = np.asarray(batch['img_feat'])
  img_mask = np.asarray(batch['img_mask'], bool)
  b, k = img_mask.shape
  u = rng.random((b, k))
  fallback_key = np.where(img_mask, rng.random((b, k)), -1.0)

  selected = img_mask & (u < prob)
  rows = np.flatnonzero(~selected.any(1) & img_mask.any(1))
  selected[rows, np.argmax(fallback_key[rows], axis=1)] = True
  kept, positions, weights = _keep_capped(selected, u, max_predictions)
  _bump(stats, 'mrm_capped', selected.sum() - kept.sum())

  # Targets of the used slots only (about 40% of them): numpy's float16 -> float32
  # cast costs ~4 ns per value, the largest cost of an MRM batch otherwise.
  used = weights > 0
  used_rows, used_pos = np.broadcast_to(np.arange(b)[:, None], used.shape)[used], positions[used]
  mrfr_target = np.zeros(positions.shape + feat.shape[2:], np.float32)
  mrfr_target[used] = feat[used_rows, used_pos]
  labels = np.asarray(batch['soft_labels'])
  mrc_target = np.zeros(positions.shape + labels.shape[2:], np.float32)
  mrc_target[used] = labels[used_rows, used_pos]
  masked_feat = feat if inplace else feat.copy()  # after the targets: they read it
  masked_feat[kept] = 0
  out = dict(batch)
  out['img_feat'] = masked_feat
  out['img_masked'] = kept
  out['mrm_positions'] = positions
  out['mrm_weights'] = weights
  out['mrfr_target'] = mrfr_target
  out['mrc_target'] = mrc_target
  return out


def _draw_partners(image_id: np.ndarray, usable: np.ndarray, rng: np.random.Generator):
  """A uniformly random partner per row among usable rows with another image_id.

  Returns (partner [B] int, found [B] bool). One O(B) rejection round, then an
  exact draw for the few rows it left, so large batches never need a BxB matrix.
  """
  b = image_id.shape[0]
  partner = rng.integers(0, max(b - 1, 1), b)
  partner += partner >= np.arange(b)  # never oneself
  partner = np.minimum(partner, b - 1)
  ok = usable[partner] & (image_id[partner] != image_id)
  rest = np.flatnonzero(~ok)
  if rest.size:
    valid = usable[None, :] & (image_id[None, :] != image_id[rest, None])
    key = np.where(valid, rng.random((rest.size, b)), -1.0)
    partner[rest] = np.argmax(key, axis=1)
    ok[rest] = valid.any(1)
  return partner, ok


ITM_NEGATIVES = ('random', 'balanced', 'hardest')


def check_itm_options(negatives: str, neg_prob: float) -> None:
  """Raises ValueError for an unknown sampler or a ratio that `balanced` cannot give."""
  if negatives not in ITM_NEGATIVES:
    raise ValueError(f'unknown ITM negatives {negatives!r}; expected one of {ITM_NEGATIVES}')
  if negatives in ('balanced', 'hardest') and neg_prob != 0.5:
    raise ValueError(f'{negatives} ITM negatives pair every caption once with its image '
                     f'and once without: itm_neg_prob must be 0.5, got {neg_prob}')


def make_itm_batch(batch: Mapping[str, np.ndarray], rng: np.random.Generator, *,
                   neg_prob: float = 0.5, negatives: str = 'random',
                   stats: MutableMapping[str, int] | None = None,
                   inplace: bool = False) -> dict:
  """Image-text matching: pairs captions with images that do not match them.

  `negatives='random'` (the reference's sampler): each real example independently
  becomes a negative with probability `neg_prob` and takes all image fields
  (img_feat, img_pos, img_mask, soft_labels, image_id) of another real example of
  the batch whose image_id differs.

  `negatives='balanced'` (a vlp option; `neg_prob` must be 0.5): the first half of
  the real rows stay positive and the second half is overwritten with their
  captions, each paired with the image of another first-half row (a random cyclic
  derangement). Every caption and every image of the batch then occurs once matched
  and once mismatched, so the caption-only and image-only parts of the ITM gradient
  cancel inside the batch and only the interaction is left. This is the lever that
  makes a from-scratch model leave ITM's chance plateau in a few hundred CPU steps
  (docs/experiments.md, "The tiny demo: getting ITM off its plateau on a CPU"); the
  price is B/2 distinct pairs per batch. An odd last real row stays positive.

  `negatives='hardest'` (a vlp option after MVPTR; `neg_prob` must be 0.5): the
  batch leaves here all matched (`itm_target` 1) and the `itm` task replaces the
  second half of the rows on the device with the hardest in-batch negatives of the
  first half, as the current model ranks them (`vlp.tasks.itm.hardest_itm_pairs`).

  Either way nothing is masked, padding rows (example_mask False) are never
  negatives nor partners, and a negative without any partner of another image_id
  stays positive and is counted in `stats['itm_no_negative']`.

  `inplace`: overwrite only the changed rows of `batch`'s own arrays (a batch built
  for this call) instead of gathering new ones; the result is the same.

  Returns:
    New batch with swapped image fields and `itm_target [B] int32` (1 = match).
  """
  _require(batch, ITM_IMAGE_KEYS, 'itm')
  check_itm_options(negatives, neg_prob)
  image_id = np.asarray(batch['image_id'])
  b = image_id.shape[0]
  usable = np.asarray(batch.get('example_mask', np.ones(b, bool)), bool)
  if negatives == 'balanced':
    return _balanced_itm_batch(batch, rng, image_id, usable, stats, inplace)
  if negatives == 'hardest':
    return dict(batch, itm_target=np.ones(b, np.int32))
  negative = (rng.random(b) < neg_prob) & usable
  partner, found = _draw_partners(image_id, usable, rng)
  _bump(stats, 'itm_no_negative', np.sum(negative & ~found))
  negative &= found
  source = np.where(negative, partner, np.arange(b))
  out = dict(batch)
  for key in ITM_IMAGE_KEYS:
    out[key] = _take_rows(np.asarray(batch[key]), source, np.flatnonzero(negative), inplace)
  out['itm_target'] = (~negative).astype(np.int32)
  return out


def _take_rows(array: np.ndarray, source: np.ndarray, changed: np.ndarray,
               inplace: bool) -> np.ndarray:
  """`array[source]`; in place, only the `changed` rows are gathered and written (the
  right-hand side is read before any row is overwritten)."""
  if not inplace:
    return array[source]
  array[changed] = array[source[changed]]
  return array


def _balanced_itm_batch(batch, rng, image_id, usable, stats, inplace) -> dict:
  b = image_id.shape[0]
  real = np.flatnonzero(usable)
  half = len(real) // 2
  anchors, copies = real[:half], real[half:2 * half]
  # A single random cycle over the anchors never maps a row to itself; rows whose
  # cycle neighbour shows the same image (two captions of one image in the batch)
  # draw another anchor of a different image instead.
  order = rng.permutation(half)
  partner = np.empty(half, np.int64)
  partner[order] = order[(np.arange(half) + 1) % max(half, 1)]
  found = image_id[anchors[partner]] != image_id[anchors]
  if not found.all():
    redraw, ok = _draw_partners(image_id[anchors], np.ones(half, bool), rng)
    fix = ~found
    partner[fix], found[fix] = redraw[fix], ok[fix]
  _bump(stats, 'itm_no_negative', np.sum(~found))
  text_source = np.arange(b)
  text_source[copies] = anchors
  image_source = text_source.copy()
  image_source[copies] = np.where(found, anchors[partner], anchors)
  # One gather per field: image fields (img_feat is the largest) by image_source.
  out = {k: _take_rows(np.asarray(v), image_source if k in ITM_IMAGE_KEYS else text_source,
                       copies, inplace)
         for k, v in batch.items()}
  target = np.ones(b, np.int32)
  target[copies] = (~found).astype(np.int32)
  out['itm_target'] = target
  return out


BATCH_KINDS = ('mlm', 'mrm', 'itm')
