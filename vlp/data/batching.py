"""Padded batches: the pieces every vlp input pipeline shares.

`BatchSpec` fixes the static geometry; `Batcher` turns example positions of an
index (vlp.data.examples) into a padded batch with the keys of docs/design.md
(text, regions, and the targets and ids of VQA / RE examples); `apply_kind` turns
a plain pair batch into an MLM, MRM or ITM batch. The RNGs of shuffling and
masking are pure functions of (seed, position) so batches can be rebuilt anywhere.
"""

from __future__ import annotations

import dataclasses
import math
import threading

import numpy as np

from vlp.data import masking
from vlp.data.image_records import ImageRecords
from vlp.data.tokenizer import Tokenizer

_MASK_TAG = 0x6D61736B  # a stream of its own, apart from the shuffles (examples.py)


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Static batch geometry and task parameters (one per process).

  Attributes:
    batch_size: examples per batch on this process.
    max_text_len: T, text tokens including [CLS] and [SEP]; longer captions are
      truncated (counted in `stats['truncated']`).
    max_regions: K; an image with more regions keeps its first K (most confident).
    feature_dim: D the model expects; a dataset with another D is an error.
    num_region_classes: C of `soft_labels`; None keeps the stored C, a larger value
      pads with zero probabilities (e.g. 1601 for a detector-sized MRC head). Records
      without soft labels give C = 0 whatever this says: zeros would be MRC targets
      that teach nothing (the tasks that read them refuse such data at start-up),
      and a [B, K, 1601] array of them costs as much to build and send as the
      features.
    max_mlm_predictions / max_mrm_predictions: prediction slots P / Pr (the caps);
      None derives a cap that is hit in well under 1% of examples.
  """
  batch_size: int
  max_text_len: int
  max_regions: int
  feature_dim: int
  num_region_classes: int | None = None
  max_mlm_predictions: int | None = None
  max_mrm_predictions: int | None = None
  mlm_prob: float = 0.15
  mrm_prob: float = 0.15
  itm_neg_prob: float = 0.5
  itm_negatives: str = 'random'  # or 'balanced' (masking.make_itm_batch)

  def __post_init__(self):
    if self.batch_size < 1 or self.max_regions < 1:
      raise ValueError(f'batch_size and max_regions must be positive: {self}')
    if self.max_text_len < 3:
      raise ValueError(f'max_text_len counts [CLS] and [SEP]; need >= 3: {self}')
    # At construction, not at the first ITM batch inside a reader thread.
    masking.check_itm_options(self.itm_negatives, self.itm_neg_prob)

  @classmethod
  def from_config(cls, config, batch_size: int, *, masked: bool = False) -> 'BatchSpec':
    """The spec of a config, `batch_size` rows per batch.

    `masked`: the batches get the pretraining objectives' masking, whose settings
    only a pretraining config has (`config.mlm`, `config.mrm`, `config.itm`);
    fine-tuning batches are never masked and keep the defaults.
    """
    geometry = dict(batch_size=batch_size, max_text_len=config.max_text_len,
                    max_regions=config.max_regions, feature_dim=config.feature_dim,
                    num_region_classes=config.num_region_classes)
    if not masked:
      return cls(**geometry)
    return cls(**geometry, max_mlm_predictions=config.mlm.max_predictions,
               max_mrm_predictions=config.mrm.max_predictions, mlm_prob=config.mlm.prob,
               mrm_prob=config.mrm.prob, itm_neg_prob=config.itm.neg_prob,
               itm_negatives=config.itm.negatives)

  @property
  def mlm_predictions(self) -> int:
    return self.max_mlm_predictions or _default_cap(self.max_text_len - 2, self.mlm_prob)

  @property
  def mrm_predictions(self) -> int:
    return self.max_mrm_predictions or _default_cap(self.max_regions, self.mrm_prob)


def _default_cap(n: int, p: float) -> int:
  mean, sd = n * p, math.sqrt(n * p * (1 - p))
  return int(min(n, max(1, math.ceil(mean + 3.3 * sd + 1))))


def classes_for(spec: BatchSpec, stored: list[int]) -> int:
  """C of `soft_labels` for records storing `stored` classes (one per split or part):
  0 when none stores soft labels, else `spec.num_region_classes` (None: the most
  stored)."""
  if not max(stored, default=0):
    return 0
  return max(stored) if spec.num_region_classes is None else spec.num_region_classes


def shard_range(num: int, process_index: int, process_count: int):
  """Contiguous slice [lo, hi) of `num` images or examples that data shard
  `process_index` of `process_count` takes (sizes differ by at most 1)."""
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return (num * process_index // process_count, num * (process_index + 1) // process_count)


class Batcher:
  """Example positions of an index -> one padded batch of `spec.batch_size` rows.

  `index` (vlp.data.examples) says which image record and text each example has
  (`image_rows`, `texts_of`) and, by its `task`, which targets a row carries:
  'pairs' none (the kinds of `apply_kind` add theirs), 'vqa' `vqa_targets` over
  `num_answers` labels and `question_id`, 're' `img_boxes`, `target_region`,
  `gt_box` and `ref_id`. Rows past the examples are padding: `example_mask`
  False, all zero, ids -1. `num_classes` (C of `soft_labels`) defaults to
  `classes_for(spec, [images.num_classes])`.
  """

  def __init__(self, images: ImageRecords, spec: BatchSpec, tokenizer: Tokenizer, index,
               num_answers: int = 0, num_classes: int | None = None):
    if num_classes is None:
      num_classes = classes_for(spec, [images.num_classes])
    if num_classes < images.num_classes:
      raise ValueError(f'split {images.split!r} of {images.name} has {images.num_classes} '
                       f'region classes, config asks for {num_classes}')
    self.images, self.spec, self.tok, self.num_classes = images, spec, tokenizer, num_classes
    self.index, self.num_answers = index, num_answers
    self.token_ids = masking.TokenIds.from_tokenizer(tokenizer)

  def text(self, texts, rows: int, stats: dict) -> dict:
    """`[CLS] pieces [SEP]` then padding, for `rows` rows (texts fill the first ones)."""
    t = self.spec.max_text_len
    input_ids = np.zeros((rows, t), np.int32)
    pieces = self.tok.encode_batch(list(texts))
    lengths = np.array([min(len(p), t - 2) for p in pieces], np.int64)
    stats['truncated'] = stats.get('truncated', 0) + int(
        sum(len(p) > t - 2 for p in pieces))
    for i, p in enumerate(pieces):
      input_ids[i, 1:lengths[i] + 1] = p[:t - 2]
    n = len(pieces)
    input_ids[:n, 0] = self.token_ids.cls_id
    input_ids[np.arange(n), lengths + 1] = self.token_ids.sep_id
    txt_mask = np.zeros((rows, t), bool)
    txt_mask[:n] = np.arange(t)[None, :] < (lengths + 2)[:, None]
    return {'input_ids': input_ids, 'txt_mask': txt_mask}

  def regions(self, records, rows: int) -> dict:
    """Image fields padded to K regions, for `rows` rows (records fill the first ones;
    they may come from several splits or datasets of the same feature size)."""
    spec, images = self.spec, self.images
    k = spec.max_regions
    out = {
        'img_feat': np.zeros((rows, k, spec.feature_dim), np.float16),
        'img_pos': np.zeros((rows, k, 7), np.float32),
        'img_mask': np.zeros((rows, k), bool),
        'soft_labels': np.zeros((rows, k, self.num_classes), np.float16),
        'image_id': np.zeros((rows,), np.int64),
    }
    for i, r in enumerate(records):
      feats = r['features']
      if feats.ndim != 2 or feats.shape[1] != spec.feature_dim:
        raise ValueError(f'split {images.split!r} of {images.name}: record of image '
                         f'{r["image_id"]} has features of shape {feats.shape}, config '
                         f'expects [N, {spec.feature_dim}]')
      m = min(len(feats), k)  # stored most-confident first
      out['img_feat'][i, :m] = feats[:m]
      out['img_pos'][i, :m] = r['img_pos'][:m]
      out['img_mask'][i, :m] = True
      labels = r.get('soft_labels')
      if labels is not None:
        out['soft_labels'][i, :m, :labels.shape[-1]] = labels[:m]
      out['image_id'][i] = r['image_id']
    return out

  def __call__(self, positions: np.ndarray, stats: dict) -> dict:
    b, n, index = self.spec.batch_size, len(positions), self.index
    if n > b:
      raise ValueError(f'{n} examples do not fit a batch of {b}')
    records = self.images.read(index.image_rows(positions))
    out = self.pairs(records, index.texts_of(positions, records), b, stats)
    if index.task == 'vqa':
      out.update(self._vqa_targets(positions, b))
    elif index.task == 're':
      out.update(self._re_targets(positions, records, b))
    return out

  def pairs(self, records: list[dict], texts: list, rows: int, stats: dict) -> dict:
    """Text and image fields of (record, text) pairs, padded to `rows` rows."""
    out = self.text(texts, rows, stats)
    out.update(self.regions(records, rows))
    out['example_mask'] = np.arange(rows) < len(records)
    return out

  def _ids(self, positions, b: int) -> np.ndarray:
    ids = np.full((b,), -1, np.int64)
    ids[:len(positions)] = self.index.ids[positions]
    return ids

  def _vqa_targets(self, positions, b: int) -> dict:
    targets = np.zeros((b, self.num_answers), np.float32)
    for i, p in enumerate(positions):
      targets[i, self.index.labels[p]] = self.index.scores[p]
    return {'vqa_targets': targets, 'question_id': self._ids(positions, b)}

  def _re_targets(self, positions, records, b: int) -> dict:
    k, n = self.spec.max_regions, len(positions)
    img_boxes = np.zeros((b, k, 4), np.float32)
    for i, r in enumerate(records):
      m = min(len(r['boxes']), k)
      img_boxes[i, :m] = r['boxes'][:m]
    target = np.zeros((b,), np.int32)
    target[:n] = self.index.target_region[positions]
    gt_box = np.zeros((b, 4), np.float32)
    gt_box[:n] = self.index.gt_box[positions]
    return {'img_boxes': img_boxes, 'target_region': target, 'gt_box': gt_box,
            'ref_id': self._ids(positions, b)}


def apply_kind(batch: dict, kind: str | None, rng: np.random.Generator, spec: BatchSpec,
               ids: masking.TokenIds, stats: dict | None = None, *,
               inplace: bool = False) -> dict:
  """Builds the task batch of `kind` ('mlm' | 'mrm' | 'itm'; None = plain batch).

  `inplace`: `batch` was built for this call, so MRM and ITM may change its arrays
  instead of copying them (the largest costs of a 100-region batch otherwise).
  """
  if kind is None:
    return batch
  if kind == 'mlm':
    return masking.make_mlm_batch(batch, rng, ids=ids, prob=spec.mlm_prob,
                                  max_predictions=spec.mlm_predictions, stats=stats)
  if kind == 'mrm':
    return masking.make_mrm_batch(batch, rng, prob=spec.mrm_prob,
                                  max_predictions=spec.mrm_predictions, stats=stats,
                                  inplace=inplace)
  if kind == 'itm':
    return masking.make_itm_batch(batch, rng, neg_prob=spec.itm_neg_prob,
                                  negatives=spec.itm_negatives, stats=stats, inplace=inplace)
  raise ValueError(f'unknown batch kind {kind!r}; expected one of {masking.BATCH_KINDS}')


class RecentCache:
  """A thread-safe cache of values keyed by a growing int (an epoch, a block) that
  keeps the last two keys; picklable (grain workers): the lock and the cache are
  rebuilt after unpickling. Base of the per-epoch shuffles and the mixture blocks."""

  def __init__(self):
    self._init_runtime()

  def _init_runtime(self):
    self._lock, self._recent = threading.Lock(), {}

  def __getstate__(self):
    state = dict(self.__dict__)
    del state['_lock'], state['_recent']
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._init_runtime()

  def _cached(self, key: int, make):
    """`make(key)`, computed once while `key` is one of the two latest."""
    with self._lock:
      value = self._recent.get(key)
      if value is None:
        value = make(key)
        self._recent = {k: v for k, v in self._recent.items() if k >= key - 1}
        self._recent[key] = value
      return value


def masking_rng(seed: int, index: int, process_index: int) -> np.random.Generator:
  """The masking RNG of batch `index` on a process: depends on nothing else."""
  return np.random.default_rng([seed, index, process_index, _MASK_TAG])


def shuffle_rng(seed: int, process_index: int, epoch: int, tag: int) -> np.random.Generator:
  """The RNG of one epoch's example permutation on a process; `tag` names the stream
  (`vlp.data.examples.SHUFFLE_TAGS`: pairs, VQA and RE shuffle apart)."""
  return np.random.default_rng([seed, process_index, epoch, tag])
