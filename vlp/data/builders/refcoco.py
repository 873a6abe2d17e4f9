"""tfds builders `refcoco`, `refcoco_plus`, `refcocog`: referring expressions + regions.

Inputs are the files of the `refer` toolkit: `refs(unc).p` (RefCOCO, RefCOCO+)
or `refs(umd).p` (RefCOCOg, UMD split) and `instances.json` (COCO images and
boxes of the referred objects). The pickle is read with a loader that accepts
plain data only (safe_pickle.py): a pickle naming any code is an error.

One schema, two record kinds (as `vqa_v2`):

* split `images`: each COCO image with a referring expression, sorted by
  image_id: image-level region fields (as `vlp_scenes`), plus `ann_ids [A]` and
  `ann_boxes [A, 4]` (all instances.json annotations of the image, pixel x1 y1 x2
  y2) for evaluation with ground-truth boxes as candidates.
* expression splits named as in the refs file (`train`, `val`, `testA`, `testB`;
  RefCOCOg: `train`, `val`, `test`): one record per sentence with `sent_id`,
  `ref_id`, `ann_id`, `category_id`, `sentence` (the `raw` text), `image_id`,
  `image_index` (row in `images`), `target_box [4]` (the ground-truth box,
  pixel x1 y1 x2 y2 from the annotation's xywh), and `target_index` /
  `target_iou`: the stored region with the highest IoU with the ground-truth
  box (continuous IoU, area = w*h; ties go to the first region). With features
  extracted on the ground-truth boxes that region is the referred object itself.

UNITER keeps every stored region for this task (its RefCOCO configs set conf_th=-1,
num_bb=100): prepare with `--conf_th=-1` for that.
"""

from __future__ import annotations

import os
import re

import numpy as np
import tensorflow_datasets as tfds

from vlp.data.builders import region_base
from vlp.data.builders.safe_pickle import load_plain
from vlp.data.features import BadInput
from vlp.data.features.files import load_json

_SPLIT_ORDER = ('train', 'val', 'testA', 'testB', 'test')


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """IoU of one x1y1x2y2 box with each of `boxes` [K, 4] (continuous areas)."""
  x1 = np.maximum(box[0], boxes[:, 0])
  y1 = np.maximum(box[1], boxes[:, 1])
  x2 = np.minimum(box[2], boxes[:, 2])
  y2 = np.minimum(box[3], boxes[:, 3])
  inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
  area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1],
                                                                    0, None)
  union = area(box) + area(boxes) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def xywh_to_xyxy(bbox) -> np.ndarray:
  x, y, w, h = (float(v) for v in bbox)
  return np.array([x, y, x + w, y + h], np.float32)


class _RefBuilder(region_base.RegionBuilder, skip_registration=True):
  """Shared code of the three referring-expression builders."""

  SUBDIR = ''
  REFS_FILE = ''

  def _features(self) -> dict:
    fields = self.image_fields()
    fields.update({
        'ann_ids': region_base.tensor((None,), np.int64),
        'ann_boxes': region_base.tensor((None, 4), np.float32),
        'sent_id': np.int64,
        'ref_id': np.int64,
        'ann_id': np.int64,
        'category_id': np.int32,
        'sentence': tfds.features.Text(),
        'image_index': np.int64,
        'target_box': region_base.tensor((4,), np.float32),
        'target_index': np.int32,
        'target_iou': np.float32,
    })
    return fields

  def _find(self, manual: str, name: str) -> str:
    for path in (os.path.join(manual, self.SUBDIR, name), os.path.join(manual, name)):
      if os.path.exists(path):
        return path
    raise FileNotFoundError(f'{name} in neither {manual}/{self.SUBDIR}/ nor {manual}/.\n'
                            f'{self.MANUAL_DOWNLOAD_INSTRUCTIONS}')

  def _load_instances(self, path: str):
    data = load_json(path)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                             for k in ('images', 'annotations')):
      raise ValueError(f'{path}: expected COCO instances JSON with "images" and "annotations"')
    sizes, anns, per_image = {}, {}, {}
    for i, img in enumerate(data['images']):
      try:
        if not all(k in img for k in ('id', 'width', 'height')):
          raise BadInput('missing_field', f'{path}: images[{i}]', 'needs id, width, height')
      except BadInput as err:
        self.bad(err)
        continue
      sizes[int(img['id'])] = (float(img['width']), float(img['height']))
    for i, ann in enumerate(data['annotations']):
      try:
        if not all(k in ann for k in ('id', 'image_id', 'bbox')) or len(ann['bbox']) != 4:
          raise BadInput('missing_field', f'{path}: annotations[{i}]',
                         'needs id, image_id and bbox [x, y, w, h]')
      except BadInput as err:
        self.bad(err)
        continue
      box = xywh_to_xyxy(ann['bbox'])
      anns[int(ann['id'])] = box
      per_image.setdefault(int(ann['image_id']), []).append((int(ann['id']), box))
    return sizes, anns, per_image

  def _load_refs(self, path: str, anns: dict) -> dict[str, list[dict]]:
    refs = load_plain(path)
    if not isinstance(refs, list):
      raise ValueError(f'{path}: expected a list of refs, got {type(refs).__name__}')
    per_split: dict[str, list[dict]] = {}
    name = os.path.basename(path)
    for i, ref in enumerate(refs):
      where = f'{name}: refs[{i}]'
      try:
        if not isinstance(ref, dict):
          raise BadInput('missing_field', where, 'not a dict')
        for key in ('ref_id', 'ann_id', 'image_id', 'split', 'sentences'):
          if key not in ref:
            raise BadInput('missing_field', where, f'no field {key!r}')
        where = f'{where} (ref_id {ref["ref_id"]})'
        split = str(ref['split'])
        if not re.fullmatch(r'[A-Za-z]\w*', split) or split.lower() == 'all':
          raise BadInput('bad_value', where, f'split {split!r} is not a usable split name')
        if int(ref['ann_id']) not in anns:
          raise BadInput('missing_field', where, f'ann_id {ref["ann_id"]} is not in '
                         'instances.json')
      except BadInput as err:
        self.bad(err)
        self.report.drop('refs', 'skipped bad input')
        continue
      for j, sent in enumerate(ref['sentences']):
        if not isinstance(sent, dict) or 'raw' not in sent or 'sent_id' not in sent:
          self.bad(BadInput('missing_field', f'{where} sentences[{j}]', 'needs raw, sent_id'))
          self.report.drop('sentences', 'skipped bad input')
          continue
        per_split.setdefault(split, []).append({
            'sent_id': int(sent['sent_id']), 'ref_id': int(ref['ref_id']),
            'ann_id': int(ref['ann_id']), 'image_id': int(ref['image_id']),
            'category_id': int(ref.get('category_id', -1)),
            'sentence': str(sent['raw']).strip()})
    return per_split

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    sizes, anns, self._per_image = self._load_instances(self._find(manual, 'instances.json'))
    per_split = self._load_refs(self._find(manual, self.REFS_FILE), anns)
    self._anns = anns
    order = [s for s in _SPLIT_ORDER if s in per_split]
    order += sorted(s for s in per_split if s not in _SPLIT_ORDER)
    image_ids = sorted({r['image_id'] for rs in per_split.values() for r in rs})
    self._image_rows: dict[int, tuple[int, np.ndarray]] = {}
    source = self.open_features(manual, sizes)
    gens = {'images': self._generate_images(image_ids, source)}
    gens.update({s: self._generate_examples(s, per_split[s]) for s in order})
    return gens

  def _empty_sentence(self) -> dict:
    return {'sent_id': -1, 'ref_id': -1, 'ann_id': -1, 'category_id': -1, 'sentence': '',
            'image_index': -1, 'target_box': np.zeros(4, np.float32), 'target_index': -1,
            'target_iou': 0.0}

  def _generate_images(self, image_ids, source):
    for image_id in image_ids:
      record = self.read_image(source, image_id, f'COCO image {image_id}')
      if record is None:
        self.report.drop('images', 'bad input or no features')
        continue
      row = len(self._image_rows)
      self._image_rows[image_id] = (row, record['boxes'])
      gt = self._per_image.get(image_id, [])
      record['ann_ids'] = np.array([a for a, _ in gt], np.int64)
      record['ann_boxes'] = np.array([b for _, b in gt], np.float32).reshape(-1, 4)
      record.update(self._empty_sentence())
      yield region_base.ordered_key(row, len(image_ids)), record
    self.finish_split('images', len(self._image_rows))

  def _generate_examples(self, split, sentences):
    written, weak = 0, 0
    for i, s in enumerate(sentences):
      image = self._image_rows.get(s['image_id'])
      if image is None:
        self.report.drop('sentences', f'{split}: image skipped (bad input or no features)')
        continue
      row, boxes = image
      target_box = self._anns[s['ann_id']]
      overlaps = iou(target_box, boxes.astype(np.float64))
      best = int(np.argmax(overlaps))
      weak += overlaps[best] < 0.5
      record = self.empty_image_fields(s['image_id'])
      record.update(ann_ids=np.zeros(0, np.int64), ann_boxes=np.zeros((0, 4), np.float32))
      record.update({k: v for k, v in s.items() if k != 'image_id'})
      record.update(image_index=row, target_box=target_box, target_index=best,
                    target_iou=float(overlaps[best]))
      yield region_base.ordered_key(i, len(sentences)), record
      written += 1
    if weak:
      self.report.notes[f'{split}: sentences whose best region has IoU < 0.5'] = weak
    self.finish_split(split, written)


def _instructions(subdir: str, refs_file: str, title: str) -> str:
  return (f'Put in <manual_dir>/{subdir}/ (or <manual_dir>/) the {title} files of the '
          f'refer toolkit (data/{subdir}/ of lichengunc/refer):\n'
          f'  {refs_file}      referring expressions with splits\n'
          '  instances.json  COCO train2014 images and boxes of the referred objects\n'
          + region_base.FEATURES_INSTRUCTIONS)


class Refcoco(_RefBuilder):
  """RefCOCO (UNC splits: train, val, testA, testB)."""
  name = 'refcoco'
  SUBDIR, REFS_FILE = 'refcoco', 'refs(unc).p'
  BUILDER_CONFIGS = region_base.standard_configs(region_base.RegionConfig)
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(SUBDIR, REFS_FILE, 'RefCOCO')


class RefcocoPlus(_RefBuilder):
  """RefCOCO+ (UNC splits: train, val, testA, testB)."""
  name = 'refcoco_plus'
  SUBDIR, REFS_FILE = 'refcoco+', 'refs(unc).p'
  BUILDER_CONFIGS = region_base.standard_configs(region_base.RegionConfig)
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(SUBDIR, REFS_FILE, 'RefCOCO+')


class Refcocog(_RefBuilder):
  """RefCOCOg (UMD splits: train, val, test)."""
  name = 'refcocog'
  SUBDIR, REFS_FILE = 'refcocog', 'refs(umd).p'
  BUILDER_CONFIGS = region_base.standard_configs(region_base.RegionConfig)
  DEFAULT_CONFIG_NAME = BUILDER_CONFIGS[0].name
  MANUAL_DOWNLOAD_INSTRUCTIONS = _instructions(SUBDIR, REFS_FILE, 'RefCOCOg (UMD)')
