"""Downstream batches over the real-dataset builders: one record per example.

`vqa_v2` stores one record per question and `refcoco` / `refcoco_plus` /
`refcocog` one record per sentence (vlp/data/builders/vqa_v2.py, refcoco.py);
the image of an example is row `image_index` of the builder's `images` split,
which holds the region fields. Batches have exactly the keys, shapes, dtypes and
padding of `vlp.data.downstream_batches` (docs/design.md "Downstream batches")
and are made by the same batcher, training function and evaluation dataset:
static padding by `BatchSpec`, a training stream that is a pure function of
(seed, batch index) with a checkpointable position (`TrainIterator`), finite
evaluation batches padded with `example_mask` False rows.

Sharding: a training process takes a contiguous slice of the split's examples
and shuffles it per epoch with a permutation drawn from (seed, process_index,
epoch); evaluation slices the examples contiguously as well (sizes differ by at
most one, every process runs the same number of batches).

VQA targets are the `labels` / `scores` the builder stored (the official accuracy
of predicting each vocabulary answer, 0.3 / 0.6 / 0.9 / 1.0) over the
vocabulary `answers.json` (`vlp.data.builders.vqa_v2.answer_vocab`);
`target_scores='consensus'` recomputes min(1, n/3) from the raw answers instead.
RE: `target_region` is the stored `target_index` (the region with the highest
IoU with the referred box), `gt_box` the referred box, `img_boxes` the regions.

`make_task_train_iterator` / `make_task_eval_dataset` pick the reader from the
builder's layout (`layout`): these per-example records, or the image-level
records with `questions` / `refexps` of `vlp_scenes` (downstream_batches.py).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow_datasets as tfds

from vlp.data import batching, downstream_batches as db
from vlp.data.batching import BatchSpec, ImageSplit, shard_range
from vlp.data.pipeline import TrainIterator
from vlp.data.tokenizer import Tokenizer

__all__ = ['IMAGES_SPLIT', 'layout', 'RegionImages', 'ExampleIndex', 'answer_vocab',
           'vqa_annotations',
           'make_task_train_iterator', 'make_task_eval_dataset']

IMAGES_SPLIT = 'images'
TARGET_SCORES = ('stored', 'consensus', 'official')
# Per-example fields read into the index: name -> kind (int | str | texts | array dtype).
_FIELDS = {
    'vqa': {'question_id': int, 'image_id': int, 'image_index': int, 'question': str,
            'answers': list, 'multiple_choice_answer': str, 'answer_type': str,
            'question_type': str, 'labels': np.int32, 'scores': np.float32},
    're': {'ref_id': int, 'sent_id': int, 'image_id': int, 'image_index': int,
           'sentence': str, 'target_index': int, 'target_box': np.float32,
           'target_iou': float},
}
_READ_CHUNK = 512


def _where(builder) -> str:
  return f'{builder.info.full_name} ({builder.data_dir})'


def _source(builder, split: str, *, raw: bool):
  """A random-access source of `split`: serialized records, or tfds-decoded ones."""
  if raw:
    return builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  return builder.as_data_source(split)


def layout(builder, task: str) -> str:
  """'images' (records with per-image `questions` / `refexps`: vlp_scenes) or
  'examples' (one record per question / expression plus an `images` split)."""
  if task not in db.TASKS:
    raise ValueError(f'task must be one of {db.TASKS}, got {task!r}')
  feats = builder.info.features
  if db._FIELD[task] in feats:
    return 'images'
  missing = [k for k in _FIELDS[task] if k not in feats]
  if not missing and IMAGES_SPLIT in builder.info.splits:
    return 'examples'
  raise ValueError(
      f'{_where(builder)} cannot give {task} batches: its records have neither a '
      f'{db._FIELD[task]!r} field (image-level records, vlp_scenes >= 1.1.0) nor the '
      f'per-example fields {sorted(_FIELDS[task])} with an {IMAGES_SPLIT!r} split '
      f'(vqa_v2 / refcoco builders); missing {missing}, splits {sorted(builder.info.splits)}')


class RegionImages(ImageSplit):
  """The `images` split of a per-example builder: region fields, no captions."""

  def __init__(self, builder, feature_dim: int):
    self.name, self.split = builder.info.name, IMAGES_SPLIT
    feats = builder.info.features
    missing = [k for k in ('image_id', 'features', 'img_pos', 'boxes') if k not in feats]
    if missing or IMAGES_SPLIT not in builder.info.splits:
      raise ValueError(f'{_where(builder)}: expected an {IMAGES_SPLIT!r} split with fields '
                       f'image_id, features, img_pos, boxes; missing fields {missing}, '
                       f'splits {sorted(builder.info.splits)}')
    dim = feats['features'].shape[-1]
    if dim != feature_dim:
      raise ValueError(f'{_where(builder)} has region features of dim {dim}, config '
                       f'expects feature_dim={feature_dim}')
    self.num_classes = feats['soft_labels'].shape[-1] if 'soft_labels' in feats else 0
    self.feature_dim = dim
    self._layout = batching._raw_layout(feats)
    boxes = feats['boxes']
    if (self._layout is not None
        and getattr(boxes, '_encoding', None) == tfds.features.Encoding.BYTES):
      self._layout['boxes'] = (np.dtype(np.float32), (4,))
    else:
      self._layout = None
    self.source = _source(builder, IMAGES_SPLIT, raw=self._layout is not None)
    if len(self.source) == 0:
      raise ValueError(f'split {IMAGES_SPLIT!r} of {_where(builder)} is empty')

  def _parse(self, raw: bytes) -> dict:
    feature = batching.tf_example_pb2.Example.FromString(raw).features.feature
    out = {'image_id': int(feature['image_id'].int64_list.value[0])}
    for name, (dtype, tail) in self._layout.items():
      out[name] = np.frombuffer(feature[name].bytes_list.value[0], dtype).reshape(
          (-1,) + tail)
    return out


def _proto_value(feature, kind):
  """One field of a serialized tf.Example, as `_FIELDS` names its kind."""
  which = feature.WhichOneof('kind')
  values = getattr(feature, which).value if which else []
  if kind in (int, float):
    return kind(values[0])
  if kind is str:
    return values[0].decode('utf-8')
  if kind is list:
    return [v.decode('utf-8') for v in values]
  if which == 'bytes_list':  # a raw-bytes tensor
    return np.frombuffer(values[0], kind).copy() if values else np.zeros(0, kind)
  return np.asarray(values, kind)


def _decoded_value(value, kind):
  """One field of a record decoded by tfds."""
  if kind in (int, float):
    return kind(value)
  if kind is str:
    return value.decode('utf-8') if isinstance(value, bytes) else str(value)
  if kind is list:
    return [v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in value]
  return np.asarray(value, kind).reshape(-1)


class ExampleIndex:
  """The examples of records [lo, hi) of a question / expression split, in order.

  The attributes `_TaskBatcher` reads (as `downstream_batches.TaskIndex`):
    rows: [N] int64 row of the example's image in the `images` split.
    texts: N questions / sentences.
    ids: [N] int64 question_id / ref_id.
    labels, scores (VQA): per example the int32 labels and float32 soft scores.
    target_region [N] int32, gt_box [N, 4] float32 (RE).
  and for evaluation: image_ids [N] int64; VQA: answers (the raw human answers,
  [] on splits without annotations), multiple_choice_answer, answer_type,
  question_type; RE: sent_ids [N] int64, target_iou [N] float32 (IoU of the
  target region with the referred box).
  """

  _ATTRS = ('rows', 'texts', 'ids', 'labels', 'scores', 'target_region', 'gt_box',
            'image_ids', 'answers', 'multiple_choice_answer', 'answer_type', 'question_type',
            'sent_ids', 'target_iou')

  def __init__(self, builder, split: str, lo: int, hi: int, *, task: str, max_regions: int,
               num_images: int, num_answers: int = 0, consensus=None):
    self.task, self.split = task, split
    fields = _FIELDS[task]
    cols: dict[str, list] = {k: [] for k in fields}
    for rec in _read_examples(builder, split, lo, hi, fields):
      for k in fields:
        cols[k].append(rec[k])
    where = f'split {split!r} of {_where(builder)}'
    n = len(cols['image_index'])
    self.rows = np.asarray(cols['image_index'], np.int64).reshape(n)
    bad = np.flatnonzero((self.rows < 0) | (self.rows >= num_images))
    if bad.size:
      raise ValueError(f'{where}: example {lo + bad[0]} has image_index {self.rows[bad[0]]}, '
                       f'outside the {num_images} records of the {IMAGES_SPLIT!r} split')
    self.image_ids = np.asarray(cols['image_id'], np.int64).reshape(n)
    self.labels, self.scores, self.answers = [], [], []
    self.multiple_choice_answer, self.answer_type, self.question_type = [], [], []
    self.target_region = np.zeros((0,), np.int32)
    self.gt_box = np.zeros((0, 4), np.float32)
    self.sent_ids = np.zeros((0,), np.int64)
    self.target_iou = np.zeros((0,), np.float32)
    if task == 'vqa':
      self.texts, self.ids = cols['question'], np.asarray(cols['question_id'], np.int64)
      self.answers = cols['answers']
      self.multiple_choice_answer = cols['multiple_choice_answer']
      self.answer_type, self.question_type = cols['answer_type'], cols['question_type']
      if consensus is None:
        self.labels, self.scores = cols['labels'], cols['scores']
      else:
        for answers in self.answers:
          lab, sc = consensus(answers)
          self.labels.append(lab)
          self.scores.append(sc)
      for i, (lab, sc) in enumerate(zip(self.labels, self.scores)):
        if lab.shape != sc.shape or (lab.size and not 0 <= lab.min() <= lab.max() < num_answers):
          raise ValueError(
              f'{where}: question {self.ids[i]} has answer labels {lab.tolist()} and scores '
              f'{sc.tolist()}; expected equally many labels in [0, {num_answers}) (the '
              'answer vocabulary answers.json of this build)')
    else:
      self.texts, self.ids = cols['sentence'], np.asarray(cols['ref_id'], np.int64)
      self.sent_ids = np.asarray(cols['sent_id'], np.int64).reshape(n)
      self.target_region = np.asarray(cols['target_index'], np.int32).reshape(n)
      self.target_iou = np.asarray(cols['target_iou'], np.float32).reshape(n)
      boxes = cols['target_box']
      if any(b.shape != (4,) for b in boxes):
        raise ValueError(f'{where}: target_box must hold 4 numbers (x1 y1 x2 y2) per record')
      self.gt_box = np.stack(boxes).astype(np.float32) if n else self.gt_box
      bad = np.flatnonzero((self.target_region < 0) | (self.target_region >= max_regions))
      if bad.size:
        i = bad[0]
        raise ValueError(
            f'{where}: sentence {self.sent_ids[i]} (ref_id {self.ids[i]}, image '
            f'{self.image_ids[i]}) refers to region {self.target_region[i]}, but batches keep '
            f'max_regions={max_regions}; raise max_regions (RE keeps every region)')

  def __len__(self) -> int:
    return len(self.rows)

  def subset(self, lo: int, hi: int) -> 'ExampleIndex':
    """Examples [lo, hi) of this index (a shallow copy)."""
    out = object.__new__(ExampleIndex)
    out.task, out.split = self.task, self.split
    for name in self._ATTRS:
      value = getattr(self, name)
      setattr(out, name, value[lo:hi] if len(value) else value)
    return out


def _read_examples(builder, split: str, lo: int, hi: int, fields: dict):
  """The `fields` of records [lo, hi) of `split`, one dict per record."""
  fast = batching.tf_example_pb2 is not None
  source = _source(builder, split, raw=fast)
  for start in range(lo, hi, _READ_CHUNK):
    for raw in source.__getitems__(list(range(start, min(hi, start + _READ_CHUNK)))):
      if fast:
        f = batching.tf_example_pb2.Example.FromString(raw).features.feature
        yield {k: _proto_value(f[k], kind) for k, kind in fields.items()}
      else:
        yield {k: _decoded_value(raw[k], kind) for k, kind in fields.items()}


def answer_vocab(builder) -> list[str]:
  """The answer list of a `vqa_v2` build (label = position), checked."""
  from vlp.data.builders import vqa_v2  # the builder module owns answers.json
  try:
    answers = vqa_v2.answer_vocab(builder)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{_where(builder)} has no answer vocabulary '
                            f'{vqa_v2.ANSWERS_FILENAME} next to its records ({e})') from e
  if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
    raise ValueError(f'{builder.data_dir}/{vqa_v2.ANSWERS_FILENAME}: expected a JSON list of '
                     'answer strings')
  return answers


def _check_split(builder, split: str) -> int:
  splits = builder.info.splits
  if split not in splits or split == IMAGES_SPLIT:
    examples = sorted(s for s in splits if s != IMAGES_SPLIT)
    raise ValueError(f'{_where(builder)} has no example split {split!r}; it has {examples}')
  return int(splits[split].num_examples)


def _setup(builder, spec, tokenizer, task, split, answers, target_scores):
  """(batcher factory, number of examples in the split) for per-example records."""
  if target_scores not in TARGET_SCORES:
    raise ValueError(f'target_scores must be one of {TARGET_SCORES}, got {target_scores!r}')
  num = _check_split(builder, split)
  images = RegionImages(builder, spec.feature_dim)
  num_answers, consensus = 0, None
  if task == 'vqa':
    stored = answer_vocab(builder)
    if answers is not None and list(answers) != stored:
      raise ValueError(f'{_where(builder)}: its records label answers by position in its '
                       f'answers.json ({len(stored)} answers); a different vocabulary '
                       f'({len(answers)} answers) was passed')
    num_answers = len(stored)
    if target_scores != 'stored':  # recomputed from the raw answers
      consensus = db._SoftTargets(db._label_of(stored), target_scores)

  def index(lo, hi):
    return ExampleIndex(builder, split, lo, hi, task=task, max_regions=spec.max_regions,
                        num_images=len(images), num_answers=num_answers, consensus=consensus)

  def batcher(idx):
    return db._TaskBatcher(images, spec, tokenizer, idx, num_answers)
  return index, batcher, num


def make_task_train_iterator(builder, spec: BatchSpec, *, task: str, tokenizer: Tokenizer,
                             seed: int, split: str = 'train', process_index: int = 0,
                             process_count: int = 1, start_index: int = 0,
                             answers: list[str] | None = None,
                             target_scores: str | None = None, worker_count: int = 0,
                             num_threads: int = 2, prefetch: int = 4) -> TrainIterator:
  """The infinite training iterator of one process, for either record layout.

  Arguments as `downstream_batches.make_task_train_iterator`; `target_scores`
  None is each layout's default ('consensus' for vlp_scenes, the stored scores
  for vqa_v2). On per-example records `answers` must be None or the stored
  vocabulary.
  """
  if layout(builder, task) == 'images':
    return db.make_task_train_iterator(
        builder, spec, task=task, tokenizer=tokenizer, seed=seed, split=split,
        process_index=process_index, process_count=process_count, start_index=start_index,
        answers=answers, target_scores=target_scores or 'consensus',
        worker_count=worker_count, num_threads=num_threads, prefetch=prefetch)
  index, batcher, num = _setup(builder, spec, tokenizer, task, split, answers,
                               target_scores or 'stored')
  lo, hi = shard_range(num, process_index, process_count)
  if hi <= lo:
    raise ValueError(f'split {split!r} of {_where(builder)} has {num} examples: too few for '
                     f'{process_count} data shards')
  fn = db._TaskTrainFn(batcher(index(lo, hi)), seed=seed, process_index=process_index,
                       task=task)
  return TrainIterator(fn, start_index=start_index, num_threads=num_threads,
                       prefetch=prefetch, worker_count=worker_count)


def make_task_eval_dataset(builder, spec: BatchSpec, *, task: str, tokenizer: Tokenizer,
                           split: str = 'val', shards: Sequence[int] = (0,),
                           num_shards: int = 1, answers: list[str] | None = None,
                           target_scores: str | None = None, num_threads: int = 2,
                           prefetch: int = 4) -> db.TaskEvalDataset:
  """Evaluation batches of data `shards` (of `num_shards`), for either record layout.

  The result is a `downstream_batches.TaskEvalDataset`; on per-example records it
  also has `split_index`, the `ExampleIndex` of the whole split (indexed once:
  evaluation splits are small), e.g. for `vqa_annotations`; a batch's
  `example_index` points into it.
  """
  if layout(builder, task) == 'images':
    return db.make_task_eval_dataset(
        builder, spec, task=task, tokenizer=tokenizer, split=split, shards=shards,
        num_shards=num_shards, answers=answers, target_scores=target_scores or 'consensus',
        num_threads=num_threads, prefetch=prefetch)
  index, batcher, num = _setup(builder, spec, tokenizer, task, split, answers,
                               target_scores or 'stored')
  full = index(0, num)
  parts = db.shard_parts(len(full), shards, num_shards)
  ds = db.TaskEvalDataset([batcher(full.subset(lo, hi)) for lo, hi in parts],
                          [lo for lo, _ in parts], num_total=len(full),
                          num_shards=num_shards, num_threads=num_threads, prefetch=prefetch)
  ds.split_index = full
  return ds


def vqa_annotations(index: ExampleIndex) -> list[dict] | None:
  """Official-format annotations ({"question_id", "image_id", "multiple_choice_answer",
  "answer_type", "question_type", "answers": [{"answer", "answer_id"}]}) of an indexed VQA split, for
  `vlp.evaluators.vqa.vqa_accuracy`; None when the split has no answers (test,
  test_dev). A split with answers for only some questions is an error."""
  if index.task != 'vqa':
    raise ValueError(f'vqa_annotations needs a VQA index, got task {index.task!r}')
  have = [bool(a) for a in index.answers]
  if not any(have):
    return None
  if not all(have):
    missing = [int(q) for q, h in zip(index.ids, have) if not h]
    raise ValueError(f'split {index.split!r}: {len(missing)} questions have no answers '
                     f'(e.g. question_id {missing[:5]}) while others have: cannot score it')
  return [{'question_id': int(q), 'image_id': int(i), 'multiple_choice_answer': mc,
           'answer_type': at, 'question_type': qt,
           'answers': [{'answer': a, 'answer_id': k + 1} for k, a in enumerate(answers)]}
          for q, i, answers, mc, at, qt in zip(
              index.ids, index.image_ids, index.answers, index.multiple_choice_answer,
              index.answer_type, index.question_type)]
