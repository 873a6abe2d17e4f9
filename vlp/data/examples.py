"""Example indices: which image record and which text and targets each example has.

An index lists the examples of a split, or of a slice of it, in a fixed order;
`vlp.data.batching.Batcher` turns positions in it into batches and the streams
of vlp.data.streams choose the positions. Three record layouts give indices:
  * pairs (`PairIndex`): (image, caption slot) of image records with five
    captions; the caption is read with its image, so the index is arithmetic;
  * questions / expressions of image-level records that carry `questions` /
    `refexps` (vlp_scenes >= 1.1.0; `index_scene_examples`), record then slot order;
  * per-example records (vqa_v2, refcoco*; `index_example_records`): one record
    per question / sentence, its image at row `image_index` of the `images` split.
Question and expression indices keep text, ids and targets in memory (one pass
over the records); image fields are read per batch.
"""

from __future__ import annotations

import numpy as np

from vlp.data import records
from vlp.data.image_records import NUM_CAPTIONS, ImageRecords

# Each kind of example shuffles with a stream of its own (vlp.data.batching.shuffle_rng).
SHUFFLE_TAGS = {'pairs': 0x73687566, 'vqa': 0x767161, 're': 0x7265}
# The field of image-level records that holds a task's examples (column tensors).
SCENE_FIELDS = {'vqa': 'questions', 're': 'refexps'}
# Per-example record fields read into the index: name -> kind (vlp.data.records).
EXAMPLE_FIELDS = {
    'vqa': {'question_id': int, 'image_id': int, 'image_index': int, 'question': str,
            'answers': list, 'multiple_choice_answer': str, 'answer_type': str,
            'question_type': str, 'labels': np.int32, 'scores': np.float32},
    're': {'ref_id': int, 'sent_id': int, 'image_id': int, 'image_index': int,
           'sentence': str, 'target_index': int, 'target_box': np.float32,
           'target_iou': float},
}
_SCENE_KINDS = {
    'vqa': {'question_id': np.int64, 'question': list, 'answers': list,
            'multiple_choice_answer': list, 'answer_type': list, 'question_type': list},
    're': {'ref_id': np.int64, 'sentence': list, 'target_index': np.int32,
           'target_box': np.float32},
}


class PairIndex:
  """Example p is caption slot p % per_image of image lo + p // per_image.

  per_image 5 enumerates every (image, caption) pair of images [lo, hi);
  per_image 1 takes each image once with its first caption.
  """

  task = 'pairs'

  def __init__(self, lo: int, hi: int, per_image: int = NUM_CAPTIONS):
    self.lo, self.hi, self.per_image = lo, hi, per_image

  @property
  def shuffle_tag(self) -> int:
    return SHUFFLE_TAGS[self.task]

  def __len__(self) -> int:
    return (self.hi - self.lo) * self.per_image

  def image_rows(self, positions: np.ndarray) -> np.ndarray:
    return self.lo + positions // self.per_image

  def texts_of(self, positions: np.ndarray, image_records: list[dict]) -> list:
    slots = positions % self.per_image
    return [r['captions'][s] for r, s in zip(image_records, slots)]


class ExampleIndex:
  """The questions (task 'vqa') or referring expressions ('re') of a split, in order.

  Attributes (first axis = example):
    rows: int64 row of the example's image in its image records.
    texts: the questions / sentences.
    ids: int64 question_id / ref_id; image_ids: int64 image_id.
    VQA: labels, scores (per example the int32 labels and float32 soft scores);
      answers (raw human answers, [] on splits without), multiple_choice_answer,
      answer_type, question_type.
    RE: target_region int32, gt_box [N, 4] float32, sent_ids int64 (-1 where
      records store none), target_iou float32 (IoU of the target region with the
      referred box; NaN where records store none).
  The other task's attributes are empty.
  """

  ATTRS = ('rows', 'texts', 'ids', 'labels', 'scores', 'target_region', 'gt_box',
           'image_ids', 'answers', 'multiple_choice_answer', 'answer_type', 'question_type',
           'sent_ids', 'target_iou')

  def __init__(self, task: str, split: str, **columns):
    self.task, self.split = task, split
    n = len(columns['rows'])
    self.rows = np.asarray(columns['rows'], np.int64).reshape(n)
    self.texts = list(columns['texts'])
    self.ids = np.asarray(columns['ids'], np.int64).reshape(n)
    self.image_ids = np.asarray(columns['image_ids'], np.int64).reshape(n)
    for name in ('labels', 'scores', 'answers', 'multiple_choice_answer', 'answer_type',
                 'question_type'):
      setattr(self, name, list(columns.get(name, [])))
    self.target_region = np.asarray(columns.get('target_region', []), np.int32)
    self.gt_box = np.asarray(columns.get('gt_box', np.zeros((0, 4))), np.float32)
    self.sent_ids = np.asarray(columns.get('sent_ids', []), np.int64)
    self.target_iou = np.asarray(columns.get('target_iou', []), np.float32)

  @property
  def shuffle_tag(self) -> int:
    return SHUFFLE_TAGS[self.task]

  def __len__(self) -> int:
    return len(self.rows)

  def image_rows(self, positions: np.ndarray) -> np.ndarray:
    return self.rows[positions]

  def texts_of(self, positions: np.ndarray, image_records: list[dict]) -> list[str]:
    del image_records  # the text is the example's own
    return [self.texts[p] for p in positions]


def index_scene_examples(images: ImageRecords, task: str, lo: int, hi: int, *,
                         max_regions: int, targets=None) -> ExampleIndex:
  """The examples of image records [lo, hi) of a split with `questions` / `refexps`.

  `targets` (VQA) maps a question's human answers to (labels, scores)
  (`vlp.data.vqa_targets.SoftTargets`). RE keeps every region of an image, so a
  target beyond `max_regions` is an error.
  """
  field = SCENE_FIELDS[task]
  kinds = {'image_id': int, **{f'{field}/{k}': v for k, v in _SCENE_KINDS[task].items()}}
  if task == 're':
    kinds['boxes'] = np.float32  # only its length: the regions of the image
  cols: dict[str, list] = {k: [] for k in ExampleIndex.ATTRS}
  read = records.read_fields(images.source, lo, hi, kinds, raw=images.fast)
  for row, rec in zip(range(lo, hi), read):
    get = lambda name: rec[f'{field}/{name}']  # noqa: E731
    if task == 'vqa':
      ids = get('question_id').tolist()
      n = len(ids)
      flat = get('answers')
      width = len(flat) // n if n else 0
      answers = [flat[i * width:(i + 1) * width] for i in range(n)]
      for a in answers:
        label, score = targets(a)
        cols['labels'].append(label)
        cols['scores'].append(score)
      cols['answers'] += answers
      for name in ('multiple_choice_answer', 'answer_type', 'question_type'):
        cols[name] += get(name)
      cols['texts'] += get('question')
    else:
      ids = get('ref_id').tolist()
      n = len(ids)
      num_regions = len(rec['boxes']) // 4
      limit = min(num_regions, max_regions)
      for t in get('target_index').tolist():
        if not 0 <= t < limit:
          raise ValueError(
              f'split {images.split!r} of {images.name}: an expression of image '
              f'{rec["image_id"]} refers to region {t}, but the image has {num_regions} '
              f'regions and batches keep max_regions={max_regions}; raise max_regions '
              '(RE keeps every region)')
        cols['target_region'].append(t)
      cols['gt_box'].append(get('target_box').reshape(-1, 4))
      cols['texts'] += get('sentence')
      cols['sent_ids'] += [-1] * n  # scene expressions have no sentence ids
      cols['target_iou'] += [np.nan] * n  # nor a stored IoU
    cols['ids'] += ids
    cols['rows'] += [row] * n
    cols['image_ids'] += [rec['image_id']] * n
  if task == 're':
    cols['gt_box'] = (np.concatenate(cols['gt_box']) if cols['gt_box']
                      else np.zeros((0, 4), np.float32))
  return ExampleIndex(task, images.split, **cols)


def index_example_records(builder, split: str, lo: int, hi: int, *, task: str,
                          max_regions: int, num_images: int, num_answers: int = 0,
                          targets=None) -> ExampleIndex:
  """The examples of per-example records [lo, hi) of `split`.

  VQA labels / scores are the stored ones, or recomputed from the raw answers by
  `targets`; either must be labels in [0, num_answers). Images are rows of the
  `images` split (`num_images` records); RE targets must be < `max_regions`.
  """
  fields = EXAMPLE_FIELDS[task]
  cols: dict[str, list] = {k: [] for k in fields}
  source = records.open_source(builder, split, raw=records.available())
  for rec in records.read_fields(source, lo, hi, fields, raw=records.available()):
    for k in fields:
      cols[k].append(rec[k])
  where = f'split {split!r} of {builder.info.full_name} ({builder.data_dir})'
  n = len(cols['image_index'])
  rows = np.asarray(cols['image_index'], np.int64).reshape(n)
  bad = np.flatnonzero((rows < 0) | (rows >= num_images))
  if bad.size:
    raise ValueError(f'{where}: example {lo + bad[0]} has image_index {rows[bad[0]]}, '
                     f"outside the {num_images} records of the 'images' split")
  common = dict(rows=rows, image_ids=cols['image_id'])
  if task == 'vqa':
    labels, scores = cols['labels'], cols['scores']
    if targets is not None:  # recomputed from the raw answers
      pairs = [targets(a) for a in cols['answers']]
      labels, scores = [p[0] for p in pairs], [p[1] for p in pairs]
    ids = np.asarray(cols['question_id'], np.int64)
    for i, (lab, sc) in enumerate(zip(labels, scores)):
      if lab.shape != sc.shape or (lab.size and not 0 <= lab.min() <= lab.max() < num_answers):
        raise ValueError(
            f'{where}: question {ids[i]} has answer labels {lab.tolist()} and scores '
            f'{sc.tolist()}; expected equally many labels in [0, {num_answers}) (the '
            'answer vocabulary answers.json of this build)')
    return ExampleIndex(
        task, split, texts=cols['question'], ids=ids, labels=labels, scores=scores,
        answers=cols['answers'], multiple_choice_answer=cols['multiple_choice_answer'],
        answer_type=cols['answer_type'], question_type=cols['question_type'], **common)
  ids = np.asarray(cols['ref_id'], np.int64)
  sent_ids = np.asarray(cols['sent_id'], np.int64).reshape(n)
  target = np.asarray(cols['target_index'], np.int32).reshape(n)
  boxes = cols['target_box']
  if any(b.shape != (4,) for b in boxes):
    raise ValueError(f'{where}: target_box must hold 4 numbers (x1 y1 x2 y2) per record')
  bad = np.flatnonzero((target < 0) | (target >= max_regions))
  if bad.size:
    i = bad[0]
    raise ValueError(
        f'{where}: sentence {sent_ids[i]} (ref_id {ids[i]}, image {cols["image_id"][i]}) '
        f'refers to region {target[i]}, but batches keep max_regions={max_regions}; raise '
        'max_regions (RE keeps every region)')
  return ExampleIndex(
      task, split, texts=cols['sentence'], ids=ids, target_region=target,
      gt_box=np.stack(boxes).astype(np.float32) if n else np.zeros((0, 4), np.float32),
      sent_ids=sent_ids, target_iou=np.asarray(cols['target_iou'], np.float32).reshape(n),
      **common)


def concat_indices(indices: list[ExampleIndex], row_offsets) -> ExampleIndex:
  """Indices of one task as one, in order; index k's image rows shifted by
  `row_offsets[k]` (its first row in the image records the batches read, e.g. a
  `ConcatRecords` of several datasets' images)."""
  if not indices or len(row_offsets) != len(indices):
    raise ValueError(f'concat_indices: {len(indices)} indices, {len(row_offsets)} offsets')
  tasks = {ix.task for ix in indices}
  if len(tasks) != 1:
    raise ValueError(f'concat_indices: indices of several tasks {sorted(tasks)}')
  if len(indices) == 1 and not row_offsets[0]:
    return indices[0]
  cols = {}
  for name in ExampleIndex.ATTRS:
    values = [getattr(ix, name) for ix in indices]
    if name == 'rows':
      cols[name] = np.concatenate([v + int(o) for v, o in zip(values, row_offsets)])
    elif isinstance(values[0], list):
      cols[name] = [x for v in values for x in v]
    else:
      cols[name] = np.concatenate(values)
  return ExampleIndex(indices[0].task, '+'.join(ix.split for ix in indices), **cols)
