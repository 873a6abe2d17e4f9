"""tfds builder `vg_qa`: Visual Genome question answers as VQA training questions.

The records are those of `vqa_v2` (same schema, same two kinds: an `images` split
of VG images with their regions, and a question split `train` pointing into it),
so the VQA job reads them next to VQA v2 (`config.data=vqa_v2:train+restval,vg_qa`),
as the reference adds Visual Genome QA to its VQA training data.

A VG question has one answer. It is normalised as the official VQA evaluation
normalises disagreeing answers (lowercase, punctuation, number words, articles:
"Two dogs." -> "2 dogs") and stored 10 times as the question's `answers`, so its
soft target is 1.0 for that answer (the official score of an answer all 10
humans gave) whichever way targets are computed. The reference ships its VG
questions only as a preprocessed database; full credit to the one answer is the
usual reading of a single-answer QA set.

Answer vocabulary: the VQA one, given as `<manual_dir>/vqa_answers.json` (a
`vqa_v2` build's answers.json, or the reference's ans2label.json); it is copied
as `answers.json` next to the records. Questions whose normalised answer is not
in it are dropped and counted (they would train towards an all-zero target), as
are questions whose image has no features (with skip_bad). Image sizes for
npz/npy features come from image_data.json.
"""

from __future__ import annotations

import dataclasses
import json
import os

from vlp.data import vqa_targets
from vlp.data.builders import region_base, vqa_v2
from vlp.data.builders.vqa_answers import AnswerVocab, normalize
from vlp.data.features import BadInput
from vlp.data.features.files import load_json

VOCAB_FILENAME = 'vqa_answers.json'
NUM_REPEATS = 10  # VQA questions have 10 human answers


@dataclasses.dataclass(kw_only=True)
class VgQaConfig(region_base.RegionConfig):
  pass


class VgQa(vqa_v2.VqaV2):
  """Visual Genome QA in the `vqa_v2` record format (module doc)."""

  name = 'vg_qa'
  VERSION = region_base.RegionBuilder.VERSION
  RELEASE_NOTES = region_base.RegionBuilder.RELEASE_NOTES
  SUPPORTED_VERSIONS = []
  IMAGES = 'VG'
  BUILDER_CONFIGS = region_base.standard_configs(VgQaConfig)
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put in <manual_dir>:\n'
      '  question_answers.json  Visual Genome v1.2 question answers\n'
      '  image_data.json        Visual Genome v1.2 image metadata (image_id, width, height)\n'
      f'  {VOCAB_FILENAME}       the VQA answer vocabulary: a vqa_v2 build\'s answers.json\n'
      '                         or UNITER\'s ans2label.json\n'
      + region_base.FEATURES_INSTRUCTIONS)

  def _manual_json(self, manual: str, name: str):
    path = os.path.join(manual, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return load_json(path)

  def _vg_questions(self, manual: str, vocab: AnswerVocab) -> list[dict]:
    data = self._manual_json(manual, 'question_answers.json')
    if not isinstance(data, list):
      raise ValueError(f'{manual}/question_answers.json: expected a list of images with "qas"')
    out = []
    for i, entry in enumerate(data):
      qas = entry.get('qas') if isinstance(entry, dict) else None
      if not isinstance(qas, list):
        self.bad(BadInput('missing_field', f'question_answers.json[{i}]', "no 'qas' list"))
        continue
      for j, qa in enumerate(qas):
        where = f'question_answers.json[{i}].qas[{j}]'
        try:
          vqa_v2.require_fields(qa, ('qa_id', 'question', 'answer'), where)
          image_id = qa.get('image_id', entry.get('id'))
          if image_id is None:
            raise BadInput('missing_field', where, 'no image_id (nor an id of its image)')
        except BadInput as err:
          self.bad(err)
          self.report.drop('questions', 'train: skipped bad input')
          continue
        answer = normalize(str(qa['answer']))
        if answer not in vocab.index:
          self.report.drop('questions', 'answer not in the VQA vocabulary')
          continue
        out.append({'question_id': int(qa['qa_id']), 'image_id': int(image_id),
                    'question': ' '.join(str(qa['question']).split()),
                    'answers': [answer] * NUM_REPEATS, 'multiple_choice_answer': answer,
                    'answer_type': '', 'question_type': ''})
    return out

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    vocab_path = os.path.join(manual, VOCAB_FILENAME)
    if not os.path.exists(vocab_path):
      raise FileNotFoundError(f'{vocab_path} not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    answers = vqa_targets.read_answer_vocab(vocab_path)
    self.write_file(vqa_v2.ANSWERS_FILENAME, json.dumps(answers))
    self.report.notes['answer vocabulary'] = f'{len(answers)} answers ({VOCAB_FILENAME})'
    self._vocab = AnswerVocab(answers)
    meta = self._manual_json(manual, 'image_data.json')
    if not isinstance(meta, list):
      raise ValueError(f'{manual}/image_data.json: expected a list of images')
    sizes = {int(m.get('image_id', m.get('id'))): (float(m['width']), float(m['height']))
             for m in meta if isinstance(m, dict) and 'width' in m and 'height' in m
             and m.get('image_id', m.get('id')) is not None}
    questions = self._vg_questions(manual, self._vocab)
    if not questions:
      raise ValueError(f'{manual}/question_answers.json: no question has an answer in '
                       f'{VOCAB_FILENAME}')
    self._image_index: dict[int, int] = {}
    source = self.open_features(manual, sizes)
    image_ids = sorted({q['image_id'] for q in questions})
    return {'images': self._generate_images(image_ids, source),
            'train': self._generate_examples('train', questions)}
