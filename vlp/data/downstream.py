"""Downstream batches: VQA and referring expressions (RE), from either record layout.

An example is one question (VQA) or one expression (RE) with its image;
docs/design.md "Downstream batches" lists the keys. Two record layouts hold them
(`layout`):
  * 'images': image-level records that carry `questions` / `refexps` (vlp_scenes
    >= 1.1.0). VQA targets are computed from the raw human answers
    (`target_scores` 'consensus' by default, or 'official').
  * 'examples': one record per question / sentence (vqa_v2, refcoco,
    refcoco_plus, refcocog), its image at row `image_index` of the builder's
    `images` split. VQA targets are the stored `labels` / `scores` (official
    accuracy) over `answers.json`, unless `target_scores` asks to recompute them;
    RE targets the stored `target_index` (best-IoU region) and `target_box`.
Both go through the same example index (vlp.data.examples), batcher and streams
as the pair batches (vlp.data.streams).

Sharding: a training shard takes a contiguous slice of the split's images
('images' layout) or examples ('examples'); evaluation slices the examples, so
shards differ by at most one example.

Several splits and datasets (`make_task_mixture_iterator`, per-example records):
their examples are read as one list, in the order given (as the reference's
concatenated VQA training sets), each once per epoch; a shard takes its
contiguous slice of that list.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from vlp.data import examples, scenes, vqa_targets
from vlp.data.batching import Batcher, BatchSpec, classes_for, shard_range
from vlp.data.examples import ExampleIndex
from vlp.data.image_records import ConcatRecords, ImageRecords
from vlp.data.streams import EvalDataset, TrainIterator, train_iterator
from vlp.data.tokenizer import Tokenizer

__all__ = ['TASKS', 'TARGET_SCORES', 'IMAGES_SPLIT', 'layout', 'answer_vocab', 'vqa_annotations',
           'make_task_train_iterator', 'make_task_mixture_iterator', 'make_task_eval_dataset']

TASKS = ('vqa', 're')
IMAGES_SPLIT = 'images'  # the image records of the per-example builders
# 'stored': the labels / scores of per-example records; the others recompute them.
TARGET_SCORES = ('stored',) + vqa_targets.TARGET_SCORES


def _where(builder) -> str:
  return f'{builder.info.full_name} ({builder.data_dir})'


def layout(builder, task: str) -> str:
  """'images' (records with per-image `questions` / `refexps`: vlp_scenes) or
  'examples' (one record per question / expression plus an `images` split)."""
  if task not in TASKS:
    raise ValueError(f'task must be one of {TASKS}, got {task!r}')
  feats = builder.info.features
  field = examples.SCENE_FIELDS[task]
  if field in feats:
    return 'images'
  needed = examples.EXAMPLE_FIELDS[task]
  missing = [k for k in needed if k not in feats]
  if not missing and IMAGES_SPLIT in builder.info.splits:
    return 'examples'
  raise ValueError(
      f'{_where(builder)} cannot give {task} batches: its records have neither a '
      f'{field!r} field (image-level records, vlp_scenes >= 1.1.0) nor the '
      f'per-example fields {sorted(needed)} with an {IMAGES_SPLIT!r} split '
      f'(vqa_v2 / refcoco builders); missing {missing}, splits {sorted(builder.info.splits)}')


def answer_vocab(builder) -> list[str]:
  """The answer list of a VQA build (label = position), checked."""
  if layout(builder, 'vqa') == 'images':
    return scenes.answer_vocab(builder)
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


class _Reader:
  """One split of either layout: its image records and how to index its examples."""

  def __init__(self, builder, spec: BatchSpec, task: str, split: str, answers,
               target_scores: str | None):
    self.builder, self.spec, self.task, self.split = builder, spec, task, split
    self.layout = layout(builder, task)
    self.num_answers, self.targets = 0, None
    if self.layout == 'images':
      self.images = ImageRecords(builder, split, spec.feature_dim, captions=False, boxes=True)
      if task == 'vqa':
        answers = scenes.answer_vocab(builder) if answers is None else list(answers)
        self.num_answers = len(answers)
        self.targets = vqa_targets.SoftTargets(vqa_targets.answer_labels(answers),
                                               target_scores or 'consensus')
      return
    if target_scores not in (None,) + TARGET_SCORES:
      raise ValueError(f'target_scores must be one of {TARGET_SCORES}, got {target_scores!r}')
    splits = builder.info.splits
    if split not in splits or split == IMAGES_SPLIT:
      names = sorted(s for s in splits if s != IMAGES_SPLIT)
      raise ValueError(f'{_where(builder)} has no example split {split!r}; it has {names}')
    self.num_examples = int(splits[split].num_examples)
    self.images = ImageRecords(builder, IMAGES_SPLIT, spec.feature_dim, captions=False,
                               boxes=True)
    if task == 'vqa':
      stored = answer_vocab(builder)
      vocab = stored if answers is None else list(answers)
      if vocab != stored:
        # Another vocabulary (e.g. UNITER's ans2label.json): the stored labels index
        # answers.json, so the targets are recomputed from the raw human answers.
        if target_scores == 'stored':
          raise ValueError(f'{_where(builder)}: its stored targets label answers by position '
                           f'in its answers.json ({len(stored)} answers); with another '
                           f'vocabulary ({len(vocab)} answers) target_scores must recompute '
                           f'them: one of {vqa_targets.TARGET_SCORES}')
        target_scores = target_scores or 'official'  # What the builder stores.
      self.num_answers = len(vocab)
      if target_scores not in (None, 'stored'):
        self.targets = vqa_targets.SoftTargets(vqa_targets.answer_labels(vocab), target_scores)

  def index(self, lo: int, hi: int) -> ExampleIndex:
    """Examples of image records [lo, hi) ('images') or of examples [lo, hi)."""
    if self.layout == 'images':
      return examples.index_scene_examples(self.images, self.task, lo, hi,
                                           max_regions=self.spec.max_regions,
                                           targets=self.targets)
    return examples.index_example_records(
        self.builder, self.split, lo, hi, task=self.task, max_regions=self.spec.max_regions,
        num_images=len(self.images), num_answers=self.num_answers, targets=self.targets)

  def batcher(self, index: ExampleIndex, tokenizer: Tokenizer) -> Batcher:
    return Batcher(self.images, self.spec, tokenizer, index, self.num_answers)


def make_task_train_iterator(builder, spec: BatchSpec, *, task: str, tokenizer: Tokenizer,
                             seed: int, split: str = 'train', process_index: int = 0,
                             process_count: int = 1, start_index: int = 0,
                             answers: list[str] | None = None,
                             target_scores: str | None = None, worker_count: int = 0,
                             num_threads: int = 2, prefetch: int = 4) -> TrainIterator:
  """The infinite training iterator of data shard `process_index` for `task`.

  Batch i is a pure function of (seed, i, process_index, process_count); the
  iterator's `get_state()` / `set_state()` are those of the pair stream.

  Args:
    builder: a prepared tfds builder of either layout (`layout`).
    spec: batch geometry (`batch_size` per shard; RE needs `max_regions` >= the
      target region of every expression, checked when the examples are indexed).
    task: 'vqa' or 're'.
    tokenizer: the tokenizer of the backbone.
    seed: data seed (shuffling); a non-negative int.
    split, process_index, process_count, start_index, worker_count, num_threads,
    prefetch: as `vlp.data.pipeline.make_train_iterator`.
    answers: VQA answer vocabulary (label = position); None reads the one stored
      with the data. Per-example records given another one recompute their
      targets over it from the raw answers (default 'official', as stored).
    target_scores: None (each layout's default: 'consensus' for image-level
      records, the stored scores for per-example ones), 'consensus', 'official'
      (`vlp.data.vqa_targets.soft_targets`) or 'stored' (per-example records).
  """
  reader = _Reader(builder, spec, task, split, answers, target_scores)
  if reader.layout == 'images':
    lo, hi = shard_range(len(reader.images), process_index, process_count)
    index = reader.index(lo, hi)
    if not len(index):
      raise ValueError(f'split {split!r} of {reader.images.name}: images [{lo}, {hi}) of '
                       f'process {process_index}/{process_count} have no '
                       f'{examples.SCENE_FIELDS[task]}')
    return train_iterator(reader.batcher(index, tokenizer), seed=seed,
                          process_index=process_index, start_index=start_index,
                          worker_count=worker_count, num_threads=num_threads,
                          prefetch=prefetch)
  return make_task_mixture_iterator(
      [(builder, [split])], spec, task=task, tokenizer=tokenizer, seed=seed,
      process_index=process_index, process_count=process_count, start_index=start_index,
      answers=answers, target_scores=target_scores, worker_count=worker_count,
      num_threads=num_threads, prefetch=prefetch)


def make_task_mixture_iterator(parts: Sequence[tuple], spec: BatchSpec, *, task: str,
                               tokenizer: Tokenizer, seed: int, process_index: int = 0,
                               process_count: int = 1, start_index: int = 0,
                               answers: list[str] | None = None,
                               target_scores: str | None = None, worker_count: int = 0,
                               num_threads: int = 2, prefetch: int = 4,
                               name: str | None = None) -> TrainIterator:
  """The training iterator of data shard `process_index` over several splits and
  datasets of per-example records, read as one list (module doc).

  `parts` are `(builder, splits)`; a VQA answer vocabulary `answers` (None: the
  first builder's) labels every part (another build's targets are recomputed over
  it from the raw answers). One part of one split reads exactly what
  `make_task_train_iterator` reads; `name` is kept in the stream state. The other
  arguments are those of `make_task_train_iterator`.
  """
  if not parts:
    raise ValueError('make_task_mixture_iterator needs at least one (builder, splits) part')
  if task == 'vqa' and answers is None:
    answers = answer_vocab(parts[0][0])
  # Each builder's `images` once, whatever its splits, after the previous builders'.
  readers, images, first_row = [], [], {}
  for builder, splits in parts:
    if layout(builder, task) != 'examples':
      raise ValueError(f'{_where(builder)}: several splits or datasets are read from '
                       'per-example records (vqa_v2, vg_qa, refcoco builders) only')
    for split in splits:
      reader = _Reader(builder, spec, task, split, answers, target_scores)
      if id(builder) not in first_row:
        first_row[id(builder)] = sum(len(r) for r in images)
        images.append(reader.images)
      readers.append(reader)
  offsets = [first_row[id(r.builder)] for r in readers]
  sizes = np.asarray([r.num_examples for r in readers], np.int64)
  lo, hi = shard_range(int(sizes.sum()), process_index, process_count)
  if hi <= lo:
    raise ValueError(f'{"+".join(r.split for r in readers)} of {_where(parts[0][0])} has '
                     f'{int(sizes.sum())} examples: too few for {process_count} data shards')
  first = np.cumsum(sizes) - sizes  # of each split in the list
  pieces, piece_offsets = [], []
  for reader, begin, size, offset in zip(readers, first, sizes, offsets):
    a, b = max(lo - begin, 0), min(hi - begin, size)
    if a < b:
      pieces.append(reader.index(int(a), int(b)))
      piece_offsets.append(offset)
  index = examples.concat_indices(pieces, piece_offsets)
  records = images[0] if len(images) == 1 else ConcatRecords(images)
  classes = classes_for(spec, [r.num_classes for r in images])
  batcher = Batcher(records, spec, tokenizer, index, readers[0].num_answers,
                    num_classes=classes)
  return train_iterator(batcher, seed=seed, process_index=process_index,
                        start_index=start_index, worker_count=worker_count,
                        num_threads=num_threads, prefetch=prefetch, name=name)


def make_task_eval_dataset(builder, spec: BatchSpec, *, task: str, tokenizer: Tokenizer,
                           split: str = 'val', shards: Sequence[int] = (0,),
                           num_shards: int = 1, answers: list[str] | None = None,
                           target_scores: str | None = None, num_threads: int = 2,
                           prefetch: int = 4) -> EvalDataset:
  """Evaluation batches of data `shards` (of `num_shards`) for `task`; see
  `vlp.data.streams.EvalDataset`. `spec.batch_size` rows per shard.

  The whole split is indexed once (evaluation splits are small) and each shard
  keeps its contiguous slice of examples; `split_index` is that index (e.g. for
  `vqa_annotations`), a batch's `example_index` points into it. Arguments as
  `make_task_train_iterator`.
  """
  reader = _Reader(builder, spec, task, split, answers, target_scores)
  full = reader.index(0, len(reader.images) if reader.layout == 'images'
                      else reader.num_examples)
  ranges = [shard_range(len(full), s, num_shards) for s in range(num_shards)]
  if not shards or any(not 0 <= s < num_shards or ranges[s][1] <= ranges[s][0]
                       for s in shards):
    raise ValueError(f'{len(full)} examples are too few for {num_shards} data shards')
  return EvalDataset(reader.batcher(full, tokenizer), ranges, shards,
                     num_threads=num_threads, prefetch=prefetch)


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
