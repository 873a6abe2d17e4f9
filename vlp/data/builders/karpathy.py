"""tfds builders `coco_karpathy` and `flickr30k_karpathy`: Karpathy splits + regions.

Image-level records in the `vlp_scenes` schema (image_id, image_w, image_h,
features, boxes, img_pos, conf, [soft_labels], captions) plus `sent_ids [5]` and
`file_name`, so `ImageRecords` / `Batcher` read them unchanged.

* Splits as named in the Karpathy file: `train`, `restval` (COCO), `val`, `test`,
  in file order (shuffling disabled: record i is the i-th image of the split).
* Exactly 5 captions per image: the first five `raw` sentences (stripped); extra
  captions are dropped and counted; an image with fewer than 5 is bad input.
* COCO 1K test: fold f is the Karpathy test images [1000f, 1000f+1000) in file
  order; each fold is also written as split `test_fold{f}` (f = 0..4) so it can
  be evaluated directly (`test_fold_size` in the config; 0 disables).
* image_id: COCO `cocoid`; Flickr30K the number in `filename` (`1000092795.jpg`),
  which is how the public BUTD features name them.
* A sentencepiece model trained on the train (+ restval) captions is written as
  `spm.model` next to the records (`spm_vocab_size`; 0 skips it).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from vlp.data.builders import region_base
from vlp.data.features import BadInput
from vlp.data.features.files import load_json
from vlp.data.features.tsv import parse_image_id

NUM_CAPTIONS = 5
SPLITS = ('train', 'restval', 'val', 'test')


@dataclasses.dataclass(kw_only=True)
class KarpathyConfig(region_base.RegionConfig):
  """Adds the tokenizer size and the 1K-fold size of the test split."""
  spm_vocab_size: int = 16000
  test_fold_size: int = 0


@dataclasses.dataclass(kw_only=True)
class CocoKarpathyConfig(KarpathyConfig):
  test_fold_size: int = 1000


@dataclasses.dataclass
class KarpathyImage:
  image_id: int
  file_name: str
  split: str
  captions: list
  sent_ids: list
  where: str


def load_karpathy(path: str, image_id_of, report) -> dict[str, list[KarpathyImage]]:
  """Images per split of a Karpathy file (bad entries go to `report`)."""
  data = load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise ValueError(f'{path}: expected a JSON object with an "images" list '
                     '(dataset_coco.json / dataset_flickr30k.json)')
  out: dict[str, list[KarpathyImage]] = {}
  seen: dict[int, str] = {}
  name = os.path.basename(path)
  for i, img in enumerate(data['images']):
    where = f'{name}: images[{i}]'
    try:
      for key in ('split', 'sentences', 'filename'):
        if key not in img:
          raise BadInput('missing_field', where, f'no field {key!r}')
      image_id = image_id_of(img, where)
      where = f'{where} (image {image_id})'
      if img['split'] not in SPLITS:
        raise BadInput('bad_value', where, f'split {img["split"]!r} is not one of {SPLITS}')
      if image_id in seen:
        raise BadInput('duplicate_image', where, f'image {image_id} also at {seen[image_id]}')
      captions, sent_ids = [], []
      for j, sent in enumerate(img['sentences']):
        if not isinstance(sent, dict) or 'raw' not in sent:
          report.bad(BadInput('missing_field', f'{where} sentences[{j}]', "no field 'raw'"))
          report.drop('captions', 'sentence without raw text (skipped bad input)')
          continue
        text = str(sent['raw']).strip()
        if not text:
          report.drop('captions', 'empty caption')
          continue
        captions.append(text)
        sent_ids.append(int(sent.get('sentid', -1)))
      if len(captions) < NUM_CAPTIONS:
        report.drop('captions', 'image with fewer than 5 captions', len(captions))
        raise BadInput('too_few_captions', where,
                       f'{len(captions)} usable captions, expected {NUM_CAPTIONS}')
      report.drop('captions', 'beyond the first 5 of an image', len(captions) - NUM_CAPTIONS)
    except BadInput as err:
      report.bad(err)
      if err.kind != 'too_few_captions':  # those captions are counted above
        sentences = img.get('sentences') if isinstance(img, dict) else None
        report.drop('captions', 'image skipped (bad input)',
                    len(sentences) if isinstance(sentences, list) else 0)
      continue
    seen[image_id] = where
    out.setdefault(img['split'], []).append(KarpathyImage(
        image_id=image_id, file_name=str(img['filename']), split=img['split'],
        captions=captions[:NUM_CAPTIONS], sent_ids=sent_ids[:NUM_CAPTIONS], where=where))
  return out


def coco_image_id(img: dict, where: str) -> int:
  if 'cocoid' not in img:
    raise BadInput('missing_field', where, "no field 'cocoid'")
  return int(img['cocoid'])


def flickr_image_id(img: dict, where: str) -> int:
  stem = os.path.splitext(os.path.basename(str(img['filename'])))[0]
  try:
    return parse_image_id(stem)
  except ValueError:
    raise BadInput('bad_value', where, f'no image number in filename {img["filename"]!r}') from None


class _KarpathyBuilder(region_base.RegionBuilder, skip_registration=True):
  """Shared code of the two Karpathy builders."""

  ANNOTATION_FILE = ''

  def _features(self) -> dict:
    fields = self.image_fields()
    fields['captions'] = tfds.features.Sequence(tfds.features.Text(), length=NUM_CAPTIONS)
    fields['sent_ids'] = region_base.tensor((NUM_CAPTIONS,), np.int64)
    fields['file_name'] = tfds.features.Text()
    return fields

  @staticmethod
  def image_id_of(img: dict, where: str) -> int:
    raise NotImplementedError

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    path = os.path.join(manual, self.ANNOTATION_FILE)
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    per_split = load_karpathy(path, self.image_id_of, self.report)
    cfg = self.builder_config
    train_caps = [c for s in ('train', 'restval') for im in per_split.get(s, [])
                  for c in im.captions]
    self.write_tokenizer(train_caps, cfg.spm_vocab_size)
    source = self.open_features(manual)
    self._skipped: set[int] = set()
    gens = {s: self._generate_examples(s, per_split[s], source)
            for s in SPLITS if s in per_split}
    test = per_split.get('test', [])
    if cfg.test_fold_size and test:
      size = cfg.test_fold_size
      for f in range(-(-len(test) // size)):
        gens[f'test_fold{f}'] = self._generate_examples(
            f'test_fold{f}', test[f * size:(f + 1) * size], source)
      self.report.notes['test folds'] = (f'test_fold{{f}} = Karpathy test images '
                                         f'[{size}f, {size}f+{size}) in file order')
    return gens

  def _generate_examples(self, split, images, source):
    written = 0
    for i, img in enumerate(images):
      if img.image_id in self._skipped:
        continue  # already counted when an earlier split skipped it
      record = self.read_image(source, img.image_id, img.where)
      if record is None:
        self._skipped.add(img.image_id)
        self.report.drop('images', f'{img.split}: bad input or no features')
        self.report.drop('captions', 'image skipped (bad input or no features)', NUM_CAPTIONS)
        continue
      record.update(captions=img.captions, file_name=img.file_name,
                    sent_ids=np.asarray(img.sent_ids, np.int64))
      yield region_base.ordered_key(i, len(images)), record
      written += 1
    self.finish_split(split, written)



class CocoKarpathy(_KarpathyBuilder):
  """COCO 2014 with Karpathy's splits (113K train+restval, 5K val, 5K test) and regions."""

  name = 'coco_karpathy'
  ANNOTATION_FILE = 'dataset_coco.json'
  BUILDER_CONFIGS = region_base.standard_configs(CocoKarpathyConfig)
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put in <manual_dir>:\n  dataset_coco.json  Karpathy split file (from '
      "Karpathy's caption_datasets.zip: images with cocoid, split, filename, "
      'sentences[].raw)\n' + region_base.FEATURES_INSTRUCTIONS)
  image_id_of = staticmethod(coco_image_id)


class Flickr30kKarpathy(_KarpathyBuilder):
  """Flickr30K with Karpathy's splits (29K train, 1K val, 1K test) and regions."""

  name = 'flickr30k_karpathy'
  ANNOTATION_FILE = 'dataset_flickr30k.json'
  BUILDER_CONFIGS = region_base.standard_configs(KarpathyConfig)
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put in <manual_dir>:\n  dataset_flickr30k.json  Karpathy split file (from '
      "Karpathy's caption_datasets.zip: images with filename, split, "
      'sentences[].raw)\n' + region_base.FEATURES_INSTRUCTIONS)
  image_id_of = staticmethod(flickr_image_id)
