"""refcoco / refcoco_plus / refcocog: refs pickle + instances.json, IoU targets, safe pickle."""

import json
import os
import pickle

import numpy as np
import pytest

from vlp.data import prepare
from vlp.data.builders import safe_pickle

D = 8
W, H = 640, 480
# ann_id -> (image_id, xywh); 102 is never referred to.
ANNS = {100: (1, [10, 10, 100, 100]), 101: (1, [200, 100, 100, 150]), 102: (1, [5, 300, 40, 40]),
        200: (2, [50, 60, 70, 80]), 300: (3, [0, 0, 640, 480]), 400: (4, [100, 100, 10, 10])}
# Detected regions per image (pixel x1 y1 x2 y2), stored in conf order.
REGIONS = {1: [[0, 0, 50, 50], [20, 20, 120, 120], [200, 100, 300, 250]],
           2: [[50, 60, 120, 140], [0, 0, 10, 10]],
           3: [[0, 0, 320, 480], [0, 0, 640, 240]],
           4: [[300, 300, 400, 400], [0, 0, 5, 5]]}


def refs(splits=('train', 'train', 'val', 'testA', 'testB')):
  out = []
  for ref_id, (ann_id, split) in enumerate(zip((100, 101, 200, 300, 400), splits)):
    sents = [{'sent_id': 10 * ref_id + j, 'raw': f'Thing {ann_id} number {j}',
              'sent': f'thing {ann_id} number {j}', 'tokens': ['thing']}
             for j in range(2 if ref_id == 0 else 1)]
    out.append({'ref_id': ref_id, 'ann_id': ann_id, 'image_id': ANNS[ann_id][0],
                'split': split, 'category_id': 1, 'sentences': sents,
                'sent_ids': [s['sent_id'] for s in sents], 'file_name': 'x.jpg'})
  return out


def write_manual(root, subdir, refs_file, ref_list, protocol=2):
  d = os.path.join(root, subdir)
  os.makedirs(os.path.join(root, 'features'), exist_ok=True)
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, refs_file), 'wb') as f:
    pickle.dump(ref_list, f, protocol=protocol)
  instances = {
      'images': [{'id': i, 'width': W, 'height': H, 'file_name': f'{i}.jpg'} for i in REGIONS],
      'annotations': [{'id': a, 'image_id': i, 'bbox': b, 'category_id': 1, 'area': 1,
                       'iscrowd': 0, 'segmentation': [[0, 0, 1, 1]]}
                      for a, (i, b) in ANNS.items()],
      'categories': [{'id': 1, 'name': 'person'}]}
  with open(os.path.join(d, 'instances.json'), 'w') as f:
    json.dump(instances, f)
  for image_id, boxes in REGIONS.items():
    boxes = np.asarray(boxes, np.float64)
    n = len(boxes)
    np.savez(os.path.join(root, 'features', f'coco_train2014_{image_id:012d}.npz'),
             features=np.full((n, D), image_id, np.float16), norm_bb=boxes / [W, H, W, H],
             conf=np.linspace(0.9, 0.5, n))


def iou(a, b):
  inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
  area = lambda x: (x[2] - x[0]) * (x[3] - x[1])
  return inter / (area(a) + area(b) - inter)


def test_refcoco_records_and_targets(tmp_path):
  write_manual(str(tmp_path / 'm'), 'refcoco', 'refs(unc).p', refs())
  builder, report = prepare.prepare('refcoco', manual_dir=tmp_path / 'm',
                                    data_dir=tmp_path / 'd', feature_dim=D, conf_th=-1,
                                    min_bb=1)
  assert report.examples == {'images': 4, 'train': 3, 'val': 1, 'testA': 1, 'testB': 1}
  images = builder.as_data_source('images')
  first = images[0]
  assert first['image_id'] == 1 and list(first['ann_ids']) == [100, 101, 102]
  np.testing.assert_allclose(first['ann_boxes'][1], [200, 100, 300, 250])
  np.testing.assert_allclose(first['boxes'], REGIONS[1], rtol=1e-6)  # sizes: instances.json
  train = builder.as_data_source('train')
  r = train[0]
  assert (r['sent_id'], r['ref_id'], r['ann_id'], r['image_index']) == (0, 0, 100, 0)
  assert r['sentence'] == b'Thing 100 number 0'
  np.testing.assert_allclose(r['target_box'], [10, 10, 110, 110])
  # Hand: IoUs 1600/10900, 8100/11900, 0 -> region 1.
  assert r['target_index'] == 1 and r['target_iou'] == pytest.approx(8100 / 11900, rel=1e-5)
  assert train[2]['target_index'] == 2 and train[2]['target_iou'] == pytest.approx(1.0)
  for split, image_id, ann_id in (('val', 2, 200), ('testA', 3, 300), ('testB', 4, 400)):
    rec = builder.as_data_source(split)[0]
    x, y, w, h = ANNS[ann_id][1]
    ious = [iou([x, y, x + w, y + h], b) for b in REGIONS[image_id]]
    assert rec['target_index'] == int(np.argmax(ious))
    assert rec['target_iou'] == pytest.approx(max(ious), rel=1e-5, abs=1e-7)
    assert images[int(rec['image_index'])]['image_id'] == image_id
  assert report.notes['testB: sentences whose best region has IoU < 0.5'] == 1


def test_refcocog_umd_layout_and_missing_ann(tmp_path):
  ref_list = refs(('train', 'train', 'val', 'test', 'test'))
  ref_list[4]['ann_id'] = 999  # not in instances.json
  write_manual(str(tmp_path / 'm'), 'refcocog', 'refs(umd).p', ref_list, protocol=0)
  kw = dict(manual_dir=tmp_path / 'm', feature_dim=D, conf_th=-1, min_bb=1)
  with pytest.raises(Exception, match=r'refs\(umd\).p: refs\[4\] \(ref_id 4\).*ann_id 999'):
    prepare.prepare('refcocog', data_dir=tmp_path / 'a', **kw)
  _, report = prepare.prepare('refcocog', data_dir=tmp_path / 'b', skip_bad=True, **kw)
  assert report.examples == {'images': 3, 'train': 3, 'val': 1, 'test': 1}
  assert dict(report.bad_input) == {'missing_field': 1}


class _Evil:
  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.system, (f'touch {self.path}',)


def test_tampered_pickle_never_executes(tmp_path):
  marker = tmp_path / 'pwned'
  ref_list = refs()
  ref_list[1]['sentences'][0]['raw'] = _Evil(marker)
  write_manual(str(tmp_path / 'm'), 'refcoco+', 'refs(unc).p', ref_list)
  path = str(tmp_path / 'm' / 'refcoco+' / 'refs(unc).p')
  with pytest.raises(safe_pickle.UnsafePickleError, match=r'refs\(unc\).p.*system'):
    safe_pickle.load_plain(path)
  with pytest.raises(safe_pickle.UnsafePickleError):
    prepare.prepare('refcoco_plus', manual_dir=tmp_path / 'm', data_dir=tmp_path / 'd',
                    feature_dim=D)
  assert not marker.exists()


def test_python2_pickle_strings(tmp_path):
  path = tmp_path / 'py2.p'
  path.write_bytes(b"(lp0\n(dp1\nS'raw'\np2\nS'caf\\xc3\\xa9'\np3\nsS'n'\nI7\nsa.")
  assert safe_pickle.load_plain(str(path)) == [{'raw': 'caf\u00e9', 'n': 7}]
  path.write_bytes(b'\x80\x02]q\x00')  # truncated
  with pytest.raises(ValueError, match='not a readable plain-data pickle'):
    safe_pickle.load_plain(str(path))
