"""tfds builder `vqa_v2`: VQA v2 questions with soft answer targets, plus regions.

One schema, two record kinds (tfds gives a builder one feature set):

* split `images`: one record per COCO image that a built question split uses,
  sorted by image_id, with the image-level region fields of `vlp_scenes`
  (image_id, image_w, image_h, features, boxes, img_pos, conf[, soft_labels]);
  its question fields are empty.
* question splits `train`, `val` (with annotations), `devval` and `restval` (val
  cut in two, below) and `test`, `test_dev` (questions only; built when their
  files are present): one record per question
  with `question_id`, `image_id`, `image_index` (row of the image in `images`),
  `question`, the raw `answers` (10), `multiple_choice_answer`, `answer_type`,
  `question_type` and the soft target `labels [n] int32` / `scores [n] float32`
  (the vocabulary answers with a positive score). Their region fields are empty.

Held-out validation (UNITER trains on train + most of val and selects its step on
the rest, its `devval`; its question-id list ships only inside its preprocessed
databases): `devval` holds the questions of every `devval_every`-th val image in
ascending image_id order (image rank % devval_every == devval_every - 1, over the
images of the val questions file), `restval` the other val questions; so
`train+restval` is the training data and `devval` the validation split. 0 (or
val questions on fewer than `devval_every` images): no `devval` / `restval`.

Answer vocabulary: the `num_answers` (3129) most frequent normalised
`multiple_choice_answer`s of train (ties alphabetical), written as `answers.json`
(a list; label = position) next to the records. A target score is the official
VQA accuracy of predicting that answer (vqa_answers.py): 0.3/0.6/0.9/1.0 for
1/2/3/>=4 matching ground-truth answers. Questions whose image has no features
are bad input (with skip_bad: dropped and counted).
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from vlp.data.builders import region_base
from vlp.data.builders.vqa_answers import AnswerVocab, build_vocab
from vlp.data.features import BadInput
from vlp.data.features.files import load_json

ANSWERS_FILENAME = 'answers.json'
# split -> (questions file, annotations file or None); train and val are required.
FILES = {
    'train': ('v2_OpenEnded_mscoco_train2014_questions.json',
              'v2_mscoco_train2014_annotations.json'),
    'val': ('v2_OpenEnded_mscoco_val2014_questions.json', 'v2_mscoco_val2014_annotations.json'),
    'test': ('v2_OpenEnded_mscoco_test2015_questions.json', None),
    'test_dev': ('v2_OpenEnded_mscoco_test-dev2015_questions.json', None),
}
_OPTIONAL = ('test', 'test_dev')


@dataclasses.dataclass(kw_only=True)
class VqaV2Config(region_base.RegionConfig):
  num_answers: int = 3129
  devval_every: int = 10


def split_devval(questions: list[dict], every: int) -> tuple[list[dict], list[dict]]:
  """(devval, restval) of the val questions (rule in the module doc), each in the
  order of `questions`."""
  if every < 0:
    raise ValueError(f'devval_every must be >= 0, got {every}')
  if not every:
    return [], list(questions)
  images = sorted({q['image_id'] for q in questions})
  held = {image_id for rank, image_id in enumerate(images) if rank % every == every - 1}
  return ([q for q in questions if q['image_id'] in held],
          [q for q in questions if q['image_id'] not in held])


def answer_vocab(builder) -> list[str]:
  """The answer list of a prepared `vqa_v2` dataset (label = position)."""
  return json.loads((epath.Path(builder.data_dir) / ANSWERS_FILENAME).read_text())


def require_fields(record, keys, where: str) -> None:
  """BadInput('missing_field') naming the first of `keys` that `record` lacks."""
  if not isinstance(record, dict):
    raise BadInput('missing_field', where, f'expected an object with fields {list(keys)}')
  for key in keys:
    if key not in record:
      raise BadInput('missing_field', where, f'no field {key!r}')


def _load_list(path: str, key: str) -> list:
  data = load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get(key), list):
    raise ValueError(f'{path}: expected a JSON object with a "{key}" list')
  return data[key]


class VqaV2(region_base.RegionBuilder):
  """VQA v2 (COCO images): question records with soft targets + an image split."""

  name = 'vqa_v2'
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.',
                   '1.1.0': 'Splits devval and restval (val cut in two).'}
  SUPPORTED_VERSIONS = [tfds.core.Version('1.0.0')]  # older builds stay readable
  BUILDER_CONFIGS = region_base.standard_configs(VqaV2Config)
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  IMAGES = 'COCO'  # whose images the `images` split holds (in messages)
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put in <manual_dir> the official VQA v2 files (visualqa.org):\n' + ''.join(
          f'  {q}\n' + (f'  {a}\n' if a else '') for q, a in FILES.values())
      + '(test2015 and test-dev2015 are optional.) Region features must cover the COCO\n'
      'images of the splits built (train2014, val2014, test2015).\n'
      + region_base.FEATURES_INSTRUCTIONS)

  def _features(self) -> dict:
    fields = self.image_fields()
    fields.update({
        'question_id': np.int64,
        'image_index': np.int64,
        'question': tfds.features.Text(),
        'answers': tfds.features.Sequence(tfds.features.Text()),
        'multiple_choice_answer': tfds.features.Text(),
        'answer_type': tfds.features.Text(),
        'question_type': tfds.features.Text(),
        'labels': region_base.tensor((None,), np.int32),
        'scores': region_base.tensor((None,), np.float32),
    })
    return fields

  def _questions(self, manual: str, split: str) -> list[dict]:
    """Question dicts of a split, joined with their annotation."""
    q_name, a_name = FILES[split]
    questions = _load_list(os.path.join(manual, q_name), 'questions')
    annotations = {}
    if a_name:
      for i, ann in enumerate(_load_list(os.path.join(manual, a_name), 'annotations')):
        try:
          require_fields(ann, ('question_id', 'answers', 'multiple_choice_answer'),
                         f'{a_name}: annotations[{i}]')
        except BadInput as err:
          self.bad(err)
          continue
        annotations[int(ann['question_id'])] = ann
    out = []
    for i, q in enumerate(questions):
      where = f'{q_name}: questions[{i}]'
      try:
        require_fields(q, ('question_id', 'image_id', 'question'), where)
        entry = {'question_id': int(q['question_id']), 'image_id': int(q['image_id']),
                 'question': str(q['question']), 'where': where}
        if a_name:
          ann = annotations.get(entry['question_id'])
          if ann is None:
            raise BadInput('missing_field', where, f'question {entry["question_id"]} has no '
                           f'annotation in {a_name}')
          answers = [a.get('answer') if isinstance(a, dict) else None for a in ann['answers']]
          if not answers or any(a is None for a in answers):
            raise BadInput('missing_field', where, f'annotation of question '
                           f'{entry["question_id"]} lacks answers[].answer')
          if int(ann.get('image_id', entry['image_id'])) != entry['image_id']:
            raise BadInput('bad_value', where, 'annotation image_id differs from the question')
          entry.update(answers=[str(a) for a in answers],
                       multiple_choice_answer=str(ann['multiple_choice_answer']),
                       answer_type=str(ann.get('answer_type', '')),
                       question_type=str(ann.get('question_type', '')))
      except BadInput as err:
        self.bad(err)
        self.report.drop('questions', f'{split}: skipped bad input')
        continue
      out.append(entry)
    return out

  def _split_generators(self, dl_manager):
    manual, cfg = os.fspath(dl_manager.manual_dir), self.builder_config
    splits = {}
    for split, (q_name, _) in FILES.items():
      if not os.path.exists(os.path.join(manual, q_name)):
        if split in _OPTIONAL:
          self.report.notes[f'split {split}'] = f'not built ({q_name} absent)'
          continue
        raise FileNotFoundError(f'{manual}/{q_name} not found.\n'
                                f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
      splits[split] = self._questions(manual, split)
    devval, restval = split_devval(splits['val'], cfg.devval_every)
    if devval and restval:
      splits.update(devval=devval, restval=restval)
    elif cfg.devval_every:  # tiny data: tfds writes no empty split
      self.report.notes['split devval'] = (f'not built (the val questions cover fewer than '
                                           f'{cfg.devval_every} images)')
    vocab = build_vocab([q['multiple_choice_answer'] for q in splits['train']],
                        cfg.num_answers)
    self.write_file(ANSWERS_FILENAME, json.dumps(vocab))
    self.report.notes['answer vocabulary'] = f'{len(vocab)} answers ({ANSWERS_FILENAME})'
    self._vocab = AnswerVocab(vocab)
    image_ids = sorted({q['image_id'] for qs in splits.values() for q in qs})
    self._image_index: dict[int, int] = {}
    source = self.open_features(manual)
    gens = {'images': self._generate_images(image_ids, source)}
    gens.update({s: self._generate_examples(s, qs) for s, qs in splits.items()})
    return gens

  def _generate_images(self, image_ids, source):
    for image_id in image_ids:
      record = self.read_image(source, image_id, f'{self.IMAGES} image {image_id}')
      if record is None:
        self.report.drop('images', 'bad input or no features')
        continue
      row = len(self._image_index)
      self._image_index[image_id] = row
      record.update(self._empty_question())
      yield region_base.ordered_key(row, len(image_ids)), record
    self.finish_split('images', len(self._image_index))

  @staticmethod
  def _empty_question() -> dict:
    return {'question_id': -1, 'image_index': -1, 'question': '', 'answers': [],
            'multiple_choice_answer': '', 'answer_type': '', 'question_type': '',
            'labels': np.zeros((0,), np.int32), 'scores': np.zeros((0,), np.float32)}

  def _generate_examples(self, split, questions):
    written, no_target = 0, 0
    for i, q in enumerate(questions):
      row = self._image_index.get(q['image_id'])
      if row is None:  # its image was skipped (and counted) while writing `images`
        self.report.drop('questions', f'{split}: image skipped (bad input or no features)')
        continue
      labels, scores = self._vocab.soft_scores(q.get('answers', []))
      no_target += bool(q.get('answers')) and not labels
      record = self.empty_image_fields(q['image_id'])
      record.update(self._empty_question())
      record.update(question_id=q['question_id'], image_index=row, question=q['question'],
                    labels=np.asarray(labels, np.int32),
                    scores=np.asarray(scores, np.float32))
      for key in ('answers', 'multiple_choice_answer', 'answer_type', 'question_type'):
        if key in q:
          record[key] = q[key]
      yield region_base.ordered_key(i, len(questions)), record
      written += 1
    if no_target:
      self.report.notes[f'{split} questions without an in-vocabulary answer'] = no_target
    self.finish_split(split, written)
