"""Downstream batches: VQA and referring expressions (RE) over image-level records.

Reads image-level records that carry per-image `questions` / `refexps` (vlp_scenes
>= 1.1.0, see vlp/data/builders/vlp_scenes.py). An example is one question (VQA)
or one expression (RE) with its image; docs/design.md "Downstream batches" lists
the keys. The machinery is the pretraining pipeline's (vlp/data/pipeline.py):
static padding by `BatchSpec`, grain reading, a training stream that is a pure
function of (seed, batch index) with a checkpointable position (`TrainIterator`),
and finite evaluation batches padded with `example_mask` False rows so that every
process runs the same number of batches.

Sharding: a training process reads only its contiguous slice of images (as the
pretraining stream) and shuffles their examples per epoch with a permutation
drawn from (seed, process_index, epoch). Evaluation slices the split's examples
(not images) contiguously, so process shards differ by at most one example.

The examples of a split are indexed once (one pass over the records: the text,
ids and targets stay in memory; image fields are read per batch).
"""

from __future__ import annotations

import collections
from typing import Sequence

import grain
import numpy as np
import tensorflow_datasets as tfds

from vlp.data import scenes
from vlp.data.batching import (BatchBuilder, BatchSpec, ImageSplit, shard_range,
                               tf_example_pb2)
from vlp.data.builders.vqa_answers import AnswerVocab, normalize
from vlp.data.pipeline import EpochShuffle, TrainIterator
from vlp.data.tokenizer import Tokenizer

__all__ = ['TASKS', 'TARGET_SCORES', 'TaskSplit', 'TaskIndex', 'TaskEvalDataset',
           'soft_targets', 'make_task_train_iterator', 'make_task_eval_dataset']

TASKS = ('vqa', 're')
TARGET_SCORES = ('consensus', 'official')
_FIELD = {'vqa': 'questions', 're': 'refexps'}
_TASK_TAG = {'vqa': 0x767161, 're': 0x7265}  # separate shuffle streams per task
_READ_CHUNK = 256


def soft_targets(answers, label_of: dict[str, int], mode: str = 'consensus'):
  """(labels, scores) of the vocabulary answers that the human `answers` support.

  'consensus': min(1, n / 3) for an answer given (after VQA normalisation) by n
  humans (UNITER's training data). 'official': the official VQA accuracy of
  predicting it (0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 matches, as the
  `vqa_v2` builder stores). `label_of` maps normalised answers to labels.
  """
  return _SoftTargets(label_of, mode)(answers)


class _SoftTargets:
  """`soft_targets` with the vocabulary prepared once."""

  def __init__(self, label_of: dict[str, int], mode: str):
    if mode not in TARGET_SCORES:
      raise ValueError(f'target_scores must be one of {TARGET_SCORES}, got {mode!r}')
    self.label_of, self.mode = label_of, mode
    if mode == 'official':
      self.vocab = AnswerVocab(sorted(label_of, key=label_of.get))

  def __call__(self, answers) -> tuple[np.ndarray, np.ndarray]:
    if self.mode == 'official':
      labels, scores = self.vocab.soft_scores(answers)
      return np.asarray(labels, np.int32), np.asarray(scores, np.float32)
    counts = collections.Counter(normalize(a) for a in answers)
    hits = sorted((self.label_of[a], min(1.0, n / 3)) for a, n in counts.items()
                  if a in self.label_of)
    return (np.array([h[0] for h in hits], np.int32),
            np.array([h[1] for h in hits], np.float32))


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


class TaskSplit(ImageSplit):
  """An `ImageSplit` whose records carry the task field; reads `boxes` too."""

  def __init__(self, builder, split: str, feature_dim: int, task: str):
    if task not in TASKS:
      raise ValueError(f'task must be one of {TASKS}, got {task!r}')
    super().__init__(builder, split, feature_dim)
    feats = builder.info.features
    if _FIELD[task] not in feats:
      raise ValueError(
          f'{builder.info.full_name} ({builder.data_dir}) has no {_FIELD[task]!r} field: '
          f'{task} batches need image records with {_FIELD[task]} (vlp_scenes >= 1.1.0)')
    self.task = task
    if self._layout is not None:
      boxes = feats['boxes']
      if getattr(boxes, '_encoding', None) == tfds.features.Encoding.BYTES:
        self._layout['boxes'] = (np.dtype(np.float32), (4,))
      else:  # generic decoding returns every field
        self._layout = None
        self.source = builder.as_data_source(split)

  def task_rows(self, lo: int, hi: int) -> list[dict]:
    """Task fields of records [lo, hi): per record the column lists of its examples."""
    out = []
    for start in range(lo, hi, _READ_CHUNK):
      ids = list(range(start, min(hi, start + _READ_CHUNK)))
      for raw in self.source.__getitems__(ids):
        out.append(self._columns(raw))
    return out

  def _columns(self, raw) -> dict:
    field = _FIELD[self.task]
    if self._layout is None:  # decoded record
      cols = {k: list(v) for k, v in raw[field].items()}
      cols['num_regions'] = len(raw['boxes'])
      cols['image_id'] = int(raw['image_id'])
      if self.task == 'vqa':
        cols['answers'] = [[_text(a) for a in row] for row in cols['answers']]
      return cols
    f = tf_example_pb2.Example.FromString(raw).features.feature
    cols = {'image_id': int(f['image_id'].int64_list.value[0]),
            'num_regions': len(f['boxes'].bytes_list.value[0]) // 16}
    if self.task == 'vqa':
      cols['question_id'] = list(f['questions/question_id'].int64_list.value)
      cols['question'] = list(f['questions/question'].bytes_list.value)
      flat = [_text(a) for a in f['questions/answers'].bytes_list.value]
      n = len(cols['question_id'])
      width = len(flat) // n if n else 0
      cols['answers'] = [flat[i * width:(i + 1) * width] for i in range(n)]
    else:
      cols['ref_id'] = list(f['refexps/ref_id'].int64_list.value)
      cols['sentence'] = list(f['refexps/sentence'].bytes_list.value)
      cols['target_index'] = list(f['refexps/target_index'].int64_list.value)
      cols['target_box'] = np.asarray(f['refexps/target_box'].float_list.value,
                                      np.float32).reshape(-1, 4)
    return cols


class TaskIndex:
  """The examples of records [lo, hi) of a split, in record then slot order.

  Attributes:
    rows: [N] int64, record (image) index of each example.
    texts: N questions / expressions.
    ids: [N] int64 question_id / ref_id.
    labels, scores (VQA): per example the int32 labels and float32 soft scores.
    target_region [N] int32, gt_box [N, 4] float32 (RE).
  """

  def __init__(self, split: TaskSplit, lo: int, hi: int, *, max_regions: int,
               label_of: dict[str, int] | None = None, target_scores: str = 'consensus'):
    rows, texts, ids, labels, scores, targets, boxes = [], [], [], [], [], [], []
    targets_of = _SoftTargets(label_of, target_scores) if split.task == 'vqa' else None
    for row, cols in zip(range(lo, hi), split.task_rows(lo, hi)):
      if split.task == 'vqa':
        n = len(cols['question_id'])
        ids += cols['question_id']
        texts += [_text(t) for t in cols['question']]
        for answers in cols['answers']:
          lab, sc = targets_of(answers)
          labels.append(lab)
          scores.append(sc)
      else:
        n = len(cols['ref_id'])
        ids += cols['ref_id']
        texts += [_text(t) for t in cols['sentence']]
        limit = min(cols['num_regions'], max_regions)
        for t in cols['target_index']:
          if not 0 <= t < limit:
            raise ValueError(
                f'split {split.split!r} of {split.name}: an expression of image '
                f'{cols["image_id"]} refers to region {t}, but the image has '
                f'{cols["num_regions"]} regions and batches keep max_regions='
                f'{max_regions}; raise max_regions (RE keeps every region)')
        targets += [int(t) for t in cols['target_index']]
        boxes.append(np.asarray(cols['target_box'], np.float32).reshape(-1, 4))
      rows += [row] * n
    self.task = split.task
    self.rows = np.asarray(rows, np.int64)
    self.texts = texts
    self.ids = np.asarray(ids, np.int64)
    self.labels, self.scores = labels, scores
    self.target_region = np.asarray(targets, np.int32)
    self.gt_box = (np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32))

  def __len__(self) -> int:
    return len(self.rows)

  def subset(self, lo: int, hi: int) -> 'TaskIndex':
    """Examples [lo, hi) of this index (a shallow copy)."""
    out = object.__new__(TaskIndex)
    out.task, out.rows, out.texts = self.task, self.rows[lo:hi], self.texts[lo:hi]
    out.ids = self.ids[lo:hi]
    out.labels, out.scores = self.labels[lo:hi], self.scores[lo:hi]
    out.target_region, out.gt_box = self.target_region[lo:hi], self.gt_box[lo:hi]
    return out


class _TaskBatcher:
  """Example positions (into a `TaskIndex`) -> one padded batch."""

  def __init__(self, split: TaskSplit, spec: BatchSpec, tokenizer: Tokenizer,
               index: TaskIndex, num_answers: int):
    self.builder = BatchBuilder(split, spec, tokenizer)
    self.spec, self.index, self.num_answers = spec, index, num_answers

  def __call__(self, positions: np.ndarray, stats: dict) -> dict:
    b, n, idx = self.spec.batch_size, len(positions), self.index
    if n > b:
      raise ValueError(f'{n} examples do not fit a batch of {b}')
    records = self.builder.split.read(idx.rows[positions])
    out = self.builder.text([idx.texts[p] for p in positions], b, stats)
    out.update(self.builder.images(records, b))
    out['example_mask'] = np.arange(b) < n
    ids = np.full((b,), -1, np.int64)
    ids[:n] = idx.ids[positions]
    if idx.task == 'vqa':
      targets = np.zeros((b, self.num_answers), np.float32)
      for i, p in enumerate(positions):
        targets[i, idx.labels[p]] = idx.scores[p]
      out['vqa_targets'], out['question_id'] = targets, ids
      return out
    k = self.spec.max_regions
    img_boxes = np.zeros((b, k, 4), np.float32)
    for i, r in enumerate(records):
      m = min(len(r['boxes']), k)
      img_boxes[i, :m] = r['boxes'][:m]
    target = np.zeros((b,), np.int32)
    target[:n] = idx.target_region[positions]
    gt_box = np.zeros((b, 4), np.float32)
    gt_box[:n] = idx.gt_box[positions]
    out.update(img_boxes=img_boxes, target_region=target, gt_box=gt_box, ref_id=ids)
    return out


def _label_of(answers: list[str]) -> dict[str, int]:
  label_of = {}
  for i, a in enumerate(answers):
    key = normalize(a)
    if key in label_of:
      raise ValueError(f'answers {answers[label_of[key]]!r} and {a!r} normalise to the '
                       f'same {key!r}; an answer vocabulary must be normalised and unique')
    label_of[key] = i
  return label_of


def _setup(builder, spec, tokenizer, task, split, answers, target_scores):
  task_split = TaskSplit(builder, split, spec.feature_dim, task)
  label_of = None
  if task == 'vqa':
    if answers is None:  # the vocabulary stored with the data
      answers = scenes.answer_vocab(builder)
    label_of = _label_of(list(answers))
    _SoftTargets(label_of, target_scores)  # checks the mode before any reading
  return task_split, label_of, (len(answers) if answers is not None else 0)


class _TaskTrainFn(EpochShuffle):
  """Batch index -> task batch; picklable for grain workers."""

  def __init__(self, batcher: _TaskBatcher, *, seed: int, process_index: int, task: str):
    self.batcher, self.tag = batcher, _TASK_TAG[task]
    super().__init__(seed=seed, process_index=process_index, num=len(batcher.index))

  def _rng(self, epoch: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, self.process_index, epoch, self.tag])

  def __call__(self, index: int) -> dict:
    stats: dict = {}
    batch = self.batcher(self.positions(index, self.batcher.spec.batch_size), stats)
    self.add_stats(stats)
    return batch


def make_task_train_iterator(builder, spec: BatchSpec, *, task: str, tokenizer: Tokenizer,
                             seed: int, split: str = 'train', process_index: int = 0,
                             process_count: int = 1, start_index: int = 0,
                             answers: list[str] | None = None,
                             target_scores: str = 'consensus', worker_count: int = 0,
                             num_threads: int = 2, prefetch: int = 4) -> TrainIterator:
  """The infinite training iterator of one process for `task` ('vqa' | 're').

  Batch i is a pure function of (seed, i, process_index, process_count); the
  iterator's `get_state()` / `set_state()` are those of the pretraining stream.

  Args:
    builder: a prepared tfds builder whose records carry questions / refexps.
    spec: batch geometry (`batch_size` per process; RE needs `max_regions` >= the
      regions of every image, checked when the examples are indexed).
    task: 'vqa' or 're'.
    tokenizer: the dataset's tokenizer.
    seed: data seed (shuffling); a non-negative int.
    split, process_index, process_count, start_index, worker_count, num_threads,
    prefetch: as `vlp.data.pipeline.make_train_iterator`.
    answers: VQA answer vocabulary (label = position); None reads the one stored
      with the data (`vlp.data.scenes.answer_vocab`).
    target_scores: 'consensus' (min(1, n/3)) or 'official' (see `soft_targets`).
  """
  task_split, label_of, num_answers = _setup(builder, spec, tokenizer, task, split,
                                             answers, target_scores)
  lo, hi = shard_range(len(task_split), process_index, process_count)
  index = TaskIndex(task_split, lo, hi, max_regions=spec.max_regions, label_of=label_of,
                    target_scores=target_scores)
  if not len(index):
    raise ValueError(f'split {split!r} of {task_split.name}: images [{lo}, {hi}) of process '
                     f'{process_index}/{process_count} have no {_FIELD[task]}')
  batcher = _TaskBatcher(task_split, spec, tokenizer, index, num_answers)
  fn = _TaskTrainFn(batcher, seed=seed, process_index=process_index, task=task)
  return TrainIterator(fn, start_index=start_index, num_threads=num_threads,
                       prefetch=prefetch, worker_count=worker_count)


class TaskEvalDataset:
  """Finite padded batches of a split's examples, the same number on every shard.

  Data shard s of S takes examples [lo, hi) of the split (sizes differ by at most
  one), in record then slot order; a process feeds the shards whose rows of the
  global batch its devices hold, concatenated row-wise. The last batches are
  padded with rows whose `example_mask` is False (ids -1, targets zero). Every
  batch has `example_index`, the row's example in the split (-1 on padding).
  `len()` is the number of batches; iterate it (any number of times) or index it.
  `ids` are the question_ids / ref_ids of the first shard's examples.
  """

  def __init__(self, batchers: Sequence['_TaskBatcher'], firsts: Sequence[int], *,
               num_total: int, num_shards: int, num_threads: int, prefetch: int):
    self.batchers, self.firsts = list(batchers), list(firsts)
    self._threads, self._prefetch = num_threads, prefetch
    self.num_examples = sum(len(b.index) for b in self.batchers)
    self.ids = np.concatenate([b.index.ids for b in self.batchers])
    largest = -(-num_total // num_shards)
    self.num_batches = -(-largest // self.batchers[0].spec.batch_size)

  def __len__(self) -> int:
    return self.num_batches

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < self.num_batches:
      raise IndexError(f'batch {index} of {self.num_batches}')
    parts = []
    for batcher, first in zip(self.batchers, self.firsts):
      b = batcher.spec.batch_size
      positions = np.arange(index * b, min((index + 1) * b, len(batcher.index)),
                            dtype=np.int64)
      batch = batcher(positions, {})
      example = np.full((b,), -1, np.int64)
      example[:len(positions)] = first + positions
      parts.append(dict(batch, example_index=example))
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def __iter__(self):
    ds = grain.MapDataset.range(self.num_batches).map(self.__getitem__)
    return iter(ds.to_iter_dataset(grain.ReadOptions(
        num_threads=self._threads, prefetch_buffer_size=self._prefetch)))


def shard_parts(num: int, shards: Sequence[int], num_shards: int) -> list[tuple[int, int]]:
  """[lo, hi) example ranges of the given data shards of a split of `num` examples."""
  parts = [shard_range(num, s, num_shards) for s in shards]
  if not parts or any(hi <= lo for lo, hi in parts):
    raise ValueError(f'{num} examples are too few for {num_shards} data shards')
  return parts


def make_task_eval_dataset(builder, spec: BatchSpec, *, task: str, tokenizer: Tokenizer,
                           split: str = 'val', shards: Sequence[int] = (0,),
                           num_shards: int = 1, answers: list[str] | None = None,
                           target_scores: str = 'consensus', num_threads: int = 2,
                           prefetch: int = 4) -> TaskEvalDataset:
  """Evaluation batches of data `shards` (of `num_shards`) for `task` (see
  `TaskEvalDataset`); `spec.batch_size` rows per shard.

  The whole split is indexed once (evaluation splits are small) and each shard
  keeps its contiguous slice of examples.
  """
  task_split, label_of, num_answers = _setup(builder, spec, tokenizer, task, split,
                                             answers, target_scores)
  full = TaskIndex(task_split, 0, len(task_split), max_regions=spec.max_regions,
                   label_of=label_of, target_scores=target_scores)
  parts = shard_parts(len(full), shards, num_shards)
  batchers = [_TaskBatcher(task_split, spec, tokenizer, full.subset(lo, hi), num_answers)
              for lo, hi in parts]
  return TaskEvalDataset(batchers, [lo for lo, _ in parts], num_total=len(full),
                         num_shards=num_shards, num_threads=num_threads, prefetch=prefetch)
