"""tfds builder `vg_captions`: Visual Genome region descriptions as captions.

Image-level records in the `vlp_scenes` schema (so `ImageRecords` reads them) plus
`region_ids [5]` (the VG region of each caption) and `group` (index of the
record among its image's records).

Grouping (deterministic): per image, descriptions in `region_descriptions.json`
order are stripped and whitespace-collapsed; empty ones and repeats (compared
case-insensitively) are dropped; the rest are cut into consecutive groups of 5,
one record per group (the image's regions are stored again in each record). A
final group of fewer than 5 is dropped, as is an image with fewer than 5 distinct
descriptions; `max_groups_per_image` (0 = no cap) caps the records per image.
Every dropped description is counted by reason.

Excluded: images whose `coco_id` (image_data.json) is a COCO Karpathy val or
test image (`dataset_coco.json`), so pretraining never sees evaluation images.
Splits: `train`, and `val` = every `val_every`-th remaining image in
image_data.json order (image index % val_every == val_every - 1; 0: no val).
Image sizes for npz/npy features come from image_data.json.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds

from vlp.data.builders import region_base
from vlp.data.builders.karpathy import NUM_CAPTIONS
from vlp.data.features import BadInput
from vlp.data.features.files import load_json


@dataclasses.dataclass(kw_only=True)
class VgCaptionsConfig(region_base.RegionConfig):
  spm_vocab_size: int = 16000
  val_every: int = 50
  max_groups_per_image: int = 0


def coco_eval_ids(path: str) -> set[int]:
  """cocoids of the Karpathy val and test images."""
  data = load_json(path)
  if not isinstance(data, dict) or not isinstance(data.get('images'), list):
    raise ValueError(f'{path}: expected dataset_coco.json with an "images" list')
  out = set()
  for i, img in enumerate(data['images']):
    if 'cocoid' not in img or 'split' not in img:
      raise ValueError(f'{path}: images[{i}] lacks cocoid or split')
    if img['split'] in ('val', 'test'):
      out.add(int(img['cocoid']))
  return out


def group_descriptions(regions, where: str, report, cap: int) -> list[tuple]:
  """[(captions[5], region_ids[5])] of one image (rules in the module doc)."""
  texts, ids, seen = [], [], set()
  for j, region in enumerate(regions):
    if not isinstance(region, dict) or 'phrase' not in region:
      report.bad(BadInput('missing_field', f'{where} regions[{j}]', "no field 'phrase'"))
      report.drop('descriptions', 'without phrase (skipped bad input)')
      continue
    text = ' '.join(str(region['phrase']).split())
    if not text:
      report.drop('descriptions', 'empty')
      continue
    if text.lower() in seen:
      report.drop('descriptions', 'repeated within the image')
      continue
    seen.add(text.lower())
    texts.append(text)
    ids.append(int(region.get('region_id', region.get('id', -1))))
  groups = [(texts[g:g + NUM_CAPTIONS], ids[g:g + NUM_CAPTIONS])
            for g in range(0, len(texts) - NUM_CAPTIONS + 1, NUM_CAPTIONS)]
  if not groups:
    report.drop('descriptions', 'image with fewer than 5 distinct descriptions', len(texts))
    report.drop('images', 'fewer than 5 distinct descriptions')
    return []
  report.drop('descriptions', 'last group of fewer than 5', len(texts) % NUM_CAPTIONS)
  if cap and len(groups) > cap:
    report.drop('descriptions', 'over max_groups_per_image',
                NUM_CAPTIONS * (len(groups) - cap))
    groups = groups[:cap]
  return groups


class VgCaptions(region_base.RegionBuilder):
  """Visual Genome region descriptions grouped into 5-caption image records."""

  name = 'vg_captions'
  BUILDER_CONFIGS = region_base.standard_configs(VgCaptionsConfig)
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put in <manual_dir>:\n'
      '  image_data.json           Visual Genome v1.2 image metadata (image_id, width,\n'
      '                            height, coco_id)\n'
      '  region_descriptions.json  Visual Genome v1.2 region descriptions\n'
      '  dataset_coco.json         Karpathy COCO split file (val/test images are excluded)\n'
      + region_base.FEATURES_INSTRUCTIONS)

  def _features(self) -> dict:
    fields = self.image_fields()
    fields['captions'] = tfds.features.Sequence(tfds.features.Text(), length=NUM_CAPTIONS)
    fields['region_ids'] = region_base.tensor((NUM_CAPTIONS,), np.int64)
    fields['group'] = np.int32
    return fields

  def _load_json(self, manual: str, name: str):
    path = os.path.join(manual, name)
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')
    return load_json(path)

  def _split_generators(self, dl_manager):
    manual, cfg = os.fspath(dl_manager.manual_dir), self.builder_config
    excluded = coco_eval_ids(os.path.join(manual, 'dataset_coco.json'))
    meta = self._load_json(manual, 'image_data.json')
    if not isinstance(meta, list):
      raise ValueError(f'{manual}/image_data.json: expected a list of images')
    order, sizes, known = [], {}, set()
    for i, img in enumerate(meta):
      where = f'image_data.json[{i}]'
      try:
        image_id = img.get('image_id', img.get('id')) if isinstance(img, dict) else None
        if image_id is None:
          raise BadInput('missing_field', where, 'no field image_id (or id)')
        if 'width' in img and 'height' in img:
          sizes[int(image_id)] = (float(img['width']), float(img['height']))
      except BadInput as err:
        self.bad(err)
        continue
      known.add(int(image_id))
      if img.get('coco_id') is not None and int(img['coco_id']) in excluded:
        self.report.drop('images', 'COCO Karpathy val/test image')
        continue
      order.append(int(image_id))
    del meta
    descriptions = self._descriptions(manual)
    per_split = {'train': [], 'val': []}
    for index, image_id in enumerate(order):
      regions = descriptions.pop(image_id, None)
      if regions is None:
        self.report.drop('images', 'no region descriptions')
        continue
      groups = group_descriptions(regions, f'region_descriptions.json (image {image_id})',
                                  self.report, cfg.max_groups_per_image)
      val = cfg.val_every and index % cfg.val_every == cfg.val_every - 1
      per_split['val' if val else 'train'].extend(
          (image_id, g, caps, ids) for g, (caps, ids) in enumerate(groups))
    unknown = sum(image_id not in known for image_id in descriptions)
    self.report.drop('images', 'described but not in image_data.json', unknown)
    self.write_tokenizer([c for r in per_split['train'] for c in r[2]], cfg.spm_vocab_size)
    source = self.open_features(manual, sizes)
    return {s: self._generate_examples(s, recs, source)
            for s, recs in per_split.items() if recs}

  def _descriptions(self, manual: str) -> dict[int, list]:
    data = self._load_json(manual, 'region_descriptions.json')
    if not isinstance(data, list):
      raise ValueError(f'{manual}/region_descriptions.json: expected a list of images')
    out = {}
    for i, entry in enumerate(data):
      where = f'region_descriptions.json[{i}]'
      try:
        regions = entry.get('regions') if isinstance(entry, dict) else None
        if regions is None:
          raise BadInput('missing_field', where, "no field 'regions'")
        image_id = entry.get('id', entry.get('image_id'))
        if image_id is None and regions:
          image_id = regions[0].get('image_id')
        if image_id is None:
          raise BadInput('missing_field', where, 'no image id (id / image_id)')
        if int(image_id) in out:
          raise BadInput('duplicate_image', where, f'image {image_id} listed twice')
      except BadInput as err:
        self.bad(err)
        continue
      out[int(image_id)] = regions
    return out

  def _generate_examples(self, split, records, source):
    written, last_id, last = 0, None, None
    for i, (image_id, group, captions, region_ids) in enumerate(records):
      if image_id != last_id:  # an image's groups are consecutive: read it once
        last_id, last = image_id, self.read_image(source, image_id, f'VG image {image_id}')
      if last is None:
        self.report.drop('descriptions', 'image skipped (bad input or no features)',
                         NUM_CAPTIONS)
        continue
      record = dict(last, captions=captions, region_ids=np.asarray(region_ids, np.int64),
                    group=group)
      yield region_base.ordered_key(i, len(records)), record
      written += 1
    self.finish_split(split, written)
