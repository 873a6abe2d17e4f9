"""tfds builder `vlp_scenes`: the synthetic world as image-level array_record files.

One record per image with its region features and exactly five captions; the
schema is the image-level schema that real datasets (COCO, Flickr30K) share.
Shuffling is disabled, so record i of a split is image i of that split.

Version 1.1.0 adds, per image, VQA `questions` and referring expressions
`refexps` (:mod:`vlp.data.scenes_tasks`; field names as in the `vqa_v2` and
`refcoco` builders). Captions, features and every other 1.0.0 field are
byte-identical. Files written next to the records (`<builder.data_dir>/`), all in
the same atomic preparation:

* `spm.model`: sentencepiece model trained on the TRAIN split's text: captions
  only in 1.0.0; captions, questions and expressions in 1.1.0 (so caption token
  ids differ between the two versions).
* `answers.json` (1.1.0): the answer vocabulary, a JSON list (label = position):
  the closed set of every answer the world can have, normalised.
* `vqa_<split>_questions.json`, `vqa_<split>_annotations.json` (1.1.0, val and
  test): the questions in the official VQA v2 file format, for the official-style
  evaluator.

Version 1.2.0 grows the demo configs' test split from 100 to 300 images; the
first 100 test images, the train and val splits and `spm.model` are unchanged.

Only the newest version can be generated (tfds' rule); data of 1.0.0 prepared
by older code stay readable (`SUPPORTED_VERSIONS`).

Build with :func:`vlp.data.scenes.prepare_scenes`; never read with `as_dataset`
(no TensorFlow here): use `builder.as_data_source(split)`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

from etils import epath
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from vlp.data import scenes_tasks, scenes_world
from vlp.data.builders.vqa_answers import normalize

SPM_FILENAME = 'spm.model'
ANSWERS_FILENAME = 'answers.json'
VQA_JSON_SPLITS = ('val', 'test')
TASKS_VERSION = '1.1.0'  # first version with questions and refexps
CURRENT_VERSION = '1.2.0'
SPECIAL_PIECES = ('[CLS]', '[SEP]', '[MASK]')
# Image ids of different splits never collide, whatever the split sizes.
SPLIT_ID_BASE = {'train': 0, 'val': 10_000_000, 'test': 20_000_000}
# 1.2.0: the demo test split grew from 100 to 300 images (ids 100..299 are new) so
# that two-stage retrieval at k = 20 can score <= 10 % of the pairs (docs/experiments.md,
# "Two-stage retrieval").
SIZES = {'demo': (6000, 200, 300), 'small': (200, 40, 100)}
FEATURE_DIMS = (64, 2048)


@dataclasses.dataclass(kw_only=True)
class VlpScenesConfig(tfds.core.BuilderConfig):
  """Chooses the feature dimension and the split sizes (in images)."""
  feature_dim: int = 64
  num_train: int = 6000
  num_val: int = 200
  num_test: int = 300
  world_seed: int = 0
  spm_vocab_size: int = 1000


def config_name(feature_dim: int, size: str) -> str:
  return f'd{feature_dim}' + ('' if size == 'demo' else f'_{size}')


def _make_configs():
  configs = []
  for dim in FEATURE_DIMS:
    for size, (n_train, n_val, n_test) in SIZES.items():
      configs.append(VlpScenesConfig(
          name=config_name(dim, size),
          description=f'{dim}-d region features, {n_train}/{n_val}/{n_test} images',
          feature_dim=dim, num_train=n_train, num_val=n_val, num_test=n_test))
  return configs


def train_spm(sentences, *, vocab_size: int = 1000) -> bytes:
  """Trains the sentencepiece model (pad 0, unk 1, [CLS] 2, [SEP] 3, [MASK] 4).

  BPE, not unigram: on this closed ~60-word vocabulary sentencepiece 0.2.3's unigram
  trainer collapses to ~85 mostly sub-word pieces ('large' -> 'l ar ge', ~18 pieces
  per caption), while BPE keeps whole words (~365 pieces, at most 17 per caption).
  `hard_vocab_limit=False` lets the vocabulary stop below `vocab_size`.
  """
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=buf, vocab_size=vocab_size,
      model_type='bpe', character_coverage=1.0, pad_id=0, unk_id=1, bos_id=-1,
      eos_id=-1, user_defined_symbols=list(SPECIAL_PIECES), hard_vocab_limit=False,
      num_threads=2, minloglevel=2)
  return buf.getvalue()


class VlpScenes(tfds.core.GeneratorBasedBuilder):
  """Synthetic scenes: region features, templated captions, questions, expressions."""

  VERSION = tfds.core.Version(CURRENT_VERSION)
  SUPPORTED_VERSIONS = [tfds.core.Version(TASKS_VERSION), tfds.core.Version('1.0.0')]
  RELEASE_NOTES = {
      '1.0.0': 'Initial release.',
      '1.1.0': 'VQA questions and referring expressions per image; answers.json and '
               'VQA-format JSON for val/test; spm trained on captions + questions + '
               'expressions. Captions and image fields unchanged.',
      '1.2.0': 'demo configs: the test split has 300 images (was 100); the first 100 '
               'and every other split are byte-identical to 1.1.0.',
  }
  BUILDER_CONFIGS = _make_configs()
  DEFAULT_CONFIG_NAME = 'd64'

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' default probes `importlib_resources`, which this environment lacks.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # Built directly (not via dataset_info_from_configs): works in any package.
    dim, c = self.builder_config.feature_dim, scenes_world.NUM_CLASSES
    # Raw bytes, not proto float lists: 2 bytes per fp16 value on disk and a
    # memcpy-speed encode/decode instead of a Python loop over every value.
    def tensor(shape, dtype):
      return tfds.features.Tensor(shape=shape, dtype=dtype,
                                  encoding=tfds.features.Encoding.BYTES)

    features = {
        'image_id': np.int64,
        'image_w': np.int32,
        'image_h': np.int32,
        'features': tensor(shape=(None, dim), dtype=np.float16),
        'boxes': tensor(shape=(None, 4), dtype=np.float32),
        'img_pos': tensor(shape=(None, 7), dtype=np.float32),
        'conf': tensor(shape=(None,), dtype=np.float32),
        'soft_labels': tensor(shape=(None, c), dtype=np.float16),
        'captions': tfds.features.Sequence(
            tfds.features.Text(), length=scenes_world.NUM_CAPTIONS),
        'obj_shape': tensor(shape=(None,), dtype=np.int32),
        'obj_color': tensor(shape=(None,), dtype=np.int32),
        'obj_size': tensor(shape=(None,), dtype=np.int32),
    }
    if self.has_tasks:
      # Column tensors (first axis = question / expression), not a Sequence of
      # dicts: the same tf.Example keys, one vectorised encode per column.
      column = lambda dtype, *tail: tfds.features.Tensor(shape=(None, *tail), dtype=dtype)
      features['questions'] = tfds.features.FeaturesDict({
          'question_id': column(np.int64),
          'question': column(np.object_),
          'answers': column(np.object_, scenes_tasks.NUM_HUMAN_ANSWERS),
          'multiple_choice_answer': column(np.object_),
          'answer_type': column(np.object_),
          'question_type': column(np.object_),
      })
      features['refexps'] = tfds.features.FeaturesDict({
          'ref_id': column(np.int64),
          'sentence': column(np.object_),
          'target_index': column(np.int32),
          'target_box': column(np.float32, 4),
      })
    features = tfds.features.FeaturesDict(features)
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=features, supervised_keys=None,
        disable_shuffling=True)

  @property
  def has_tasks(self) -> bool:
    """Whether this version stores questions and referring expressions (1.0.0 data,
    prepared by older code, are read with the 1.0.0 schema)."""
    return self.version >= TASKS_VERSION

  def _world(self) -> scenes_world.SceneWorld:
    cfg = self.builder_config
    return scenes_world.SceneWorld(cfg.world_seed, cfg.feature_dim)

  def split_image_ids(self, split: str) -> np.ndarray:
    cfg = self.builder_config
    count = {'train': cfg.num_train, 'val': cfg.num_val, 'test': cfg.num_test}[split]
    return SPLIT_ID_BASE[split] + np.arange(count, dtype=np.int64)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    # self.data_dir is the temporary directory here, so the side files are renamed
    # into place together with the records. The tokenizer needs the train
    # questions: the train generator writes it when it ends (as the val/test
    # generators write their VQA JSON files).
    self._write(ANSWERS_FILENAME, json.dumps(list(scenes_tasks.ANSWER_VOCAB)))
    return {split: self._generate_examples(split) for split in SPLIT_ID_BASE}

  def _write(self, name: str, data: bytes | str) -> None:
    with (epath.Path(self.data_dir) / name).open('wb' if isinstance(data, bytes) else 'w') as f:
      f.write(data)

  def _generate_examples(self, split):
    world, seed = self._world(), self.builder_config.world_seed
    sentences, all_questions = [], []
    for image_id in self.split_image_ids(split):
      record = world.record(int(image_id))
      questions, refexps = scenes_tasks.make_tasks(scenes_world.scene_from_record(record),
                                                   seed)
      record['questions'] = questions_feature(questions)
      record['refexps'] = refexps_feature(refexps)
      if split == 'train':
        sentences += record['captions'] + [q.question for q in questions]
        sentences += [r.sentence for r in refexps]
      all_questions += [(int(image_id), q) for q in questions]
      yield int(image_id), record
    if split == 'train':
      self._write(SPM_FILENAME, train_spm(sentences,
                                          vocab_size=self.builder_config.spm_vocab_size))
    if split in VQA_JSON_SPLITS:
      questions_json, annotations_json = vqa_json(all_questions, split)
      self._write(vqa_json_filenames(split)[0], json.dumps(questions_json))
      self._write(vqa_json_filenames(split)[1], json.dumps(annotations_json))


def _strings(values) -> np.ndarray:
  return np.array(list(values), dtype=object)


def questions_feature(questions) -> dict:
  """The `questions` field of a record: one column array per field."""
  return {
      'question_id': np.array([q.question_id for q in questions], np.int64),
      'question': _strings(q.question for q in questions),
      'answers': _strings(list(q.answers) for q in questions).reshape(
          -1, scenes_tasks.NUM_HUMAN_ANSWERS),
      'multiple_choice_answer': _strings(q.answer for q in questions),
      'answer_type': _strings(q.answer_type for q in questions),
      'question_type': _strings(q.question_type for q in questions),
  }


def refexps_feature(refexps) -> dict:
  """The `refexps` field of a record."""
  return {
      'ref_id': np.array([r.ref_id for r in refexps], np.int64),
      'sentence': _strings(r.sentence for r in refexps),
      'target_index': np.array([r.target_index for r in refexps], np.int32),
      'target_box': np.array([r.target_box for r in refexps], np.float32).reshape(-1, 4),
  }


def vqa_json_filenames(split: str) -> tuple[str, str]:
  return f'vqa_{split}_questions.json', f'vqa_{split}_annotations.json'


def vqa_json(questions, split: str) -> tuple[dict, dict]:
  """(questions, annotations) dicts in the official VQA v2 layout.

  Args:
    questions: (image_id, scenes_tasks.Question) pairs.
    split: the split name (the `data_subtype`).
  """
  head = {'info': {'description': 'vlp_scenes synthetic VQA'}, 'license': {},
          'data_type': 'vlp_scenes', 'data_subtype': split}
  qs = [{'question_id': q.question_id, 'image_id': image_id, 'question': q.question}
        for image_id, q in questions]
  anns = []
  for image_id, q in questions:
    anns.append({
        'question_id': q.question_id, 'image_id': image_id, 'answer_type': q.answer_type,
        'question_type': q.question_type, 'multiple_choice_answer': q.answer,
        'answers': [{'answer': a, 'answer_id': k + 1,
                     'answer_confidence': 'yes' if normalize(a) == q.answer else 'maybe'}
                    for k, a in enumerate(q.answers)]})
  return ({**head, 'task_type': 'Open-Ended', 'questions': qs},
          {**head, 'annotations': anns})
