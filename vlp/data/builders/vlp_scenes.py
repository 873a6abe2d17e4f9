"""tfds builder `vlp_scenes`: the synthetic world as image-level array_record files.

One record per image with its region features and exactly five captions; the
schema is the image-level schema that real datasets (COCO, Flickr30K) share.
Shuffling is disabled, so record i of a split is image i of that split. A
sentencepiece model trained on the TRAIN captions only is written next to the
data (`<builder.data_dir>/spm.model`) as part of the same atomic preparation.

Build with :func:`vlp.data.scenes.prepare_scenes`; never read with `as_dataset`
(no TensorFlow here): use `builder.as_data_source(split)`.
"""

from __future__ import annotations

import dataclasses
import io
import os

from etils import epath
import numpy as np
import sentencepiece as spm
import tensorflow_datasets as tfds

from vlp.data import scenes_world

SPM_FILENAME = 'spm.model'
SPECIAL_PIECES = ('[CLS]', '[SEP]', '[MASK]')
# Image ids of different splits never collide, whatever the split sizes.
SPLIT_ID_BASE = {'train': 0, 'val': 10_000_000, 'test': 20_000_000}
SIZES = {'demo': (6000, 200, 100), 'small': (200, 40, 100)}
FEATURE_DIMS = (64, 2048)


@dataclasses.dataclass(kw_only=True)
class VlpScenesConfig(tfds.core.BuilderConfig):
  """Chooses the feature dimension and the split sizes (in images)."""
  feature_dim: int = 64
  num_train: int = 6000
  num_val: int = 200
  num_test: int = 100
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
  """Synthetic scenes with region features and templated captions."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
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

    features = tfds.features.FeaturesDict({
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
    })
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__, features=features, supervised_keys=None,
        disable_shuffling=True)

  def _world(self) -> scenes_world.SceneWorld:
    cfg = self.builder_config
    return scenes_world.SceneWorld(cfg.world_seed, cfg.feature_dim)

  def split_image_ids(self, split: str) -> np.ndarray:
    cfg = self.builder_config
    count = {'train': cfg.num_train, 'val': cfg.num_val, 'test': cfg.num_test}[split]
    return SPLIT_ID_BASE[split] + np.arange(count, dtype=np.int64)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    # self.data_dir is the temporary directory here, so the tokenizer is renamed
    # into place together with the records.
    world = self._world()
    sentences = [c for i in self.split_image_ids('train') for c in world.captions(i)]
    model = train_spm(sentences, vocab_size=self.builder_config.spm_vocab_size)
    with open(os.path.join(self.data_dir, SPM_FILENAME), 'wb') as f:
      f.write(model)
    return {split: self._generate_examples(split) for split in SPLIT_ID_BASE}

  def _generate_examples(self, split):
    world = self._world()
    for image_id in self.split_image_ids(split):
      yield int(image_id), world.record(int(image_id))
