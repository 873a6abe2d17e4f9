"""Region-feature readers: TSV / npz / npy round trips, count rule, box features, errors."""

import base64
import json
import os

import numpy as np
import pytest

from vlp.data.features import (BadInput, BuildReport, NpyFeatures, NpzFeatures, RecordFormat,
                               Regions, TsvFeatures, image_record, load_image_sizes,
                               open_source)

D = 8


def b64(array) -> str:
  return base64.b64encode(np.asarray(array, np.float32).tobytes()).decode()


def tsv_line(image_id, boxes, feats, w=640, h=480, extra=()):
  cols = [str(image_id), str(w), str(h), str(len(boxes)), b64(boxes), b64(feats)]
  return '\t'.join(cols + list(extra))


def write(path, lines):
  with open(path, 'w', newline='') as f:
    f.write(''.join(line + '\r\n' for line in lines))  # csv.DictWriter line ends
  return str(path)


def random_image(rng, n, d=D):
  xy = rng.uniform(0, 300, (n, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(5, 100, (n, 2))], 1).astype(np.float32)
  return boxes, rng.normal(size=(n, d)).astype(np.float32)


def fp16_close(stored, original):
  """float16 rounding bound: half an ulp, 2^-11 relative (2^-25 for subnormals)."""
  original = np.asarray(original, np.float64)
  err = np.abs(stored.astype(np.float64) - original)
  return bool(np.all(err <= np.maximum(np.abs(original) * 2.0 ** -11, 2.0 ** -25)))


def test_box_feature_by_hand():
  regions = Regions(image_id=1, image_w=200, image_h=100,
                    features=np.ones((1, D), np.float32),
                    boxes=np.array([[10, 20, 110, 70]], np.float32), conf=None,
                    soft_labels=None, where='hand')
  rec = image_record(regions, RecordFormat(feature_dim=D))
  np.testing.assert_allclose(rec['img_pos'][0], [0.05, 0.2, 0.55, 0.7, 0.5, 0.5, 0.25],
                             rtol=1e-6)
  assert rec['conf'].tolist() == [1.0] and rec['image_w'] == 200


@pytest.mark.parametrize('conf, expected', [
    ([0.9, 0.1, 0.5, 0.3, 0.05, 0.25, 0.01], 4),  # 4 above 0.2, within [2, 5]
    ([0.9, 0.1, 0.05, 0.01, 0.0, 0.0, 0.0], 2),  # 1 above: raised to min_bb
    ([0.9] * 7, 5),  # 7 above: capped at max_bb
    ([0.1], 1),  # fewer stored than min_bb: all stored
])
def test_region_count_rule_and_order(conf, expected):
  n = len(conf)
  feats = np.arange(n * D, dtype=np.float32).reshape(n, D)
  boxes = np.tile([0, 0, 10, 10], (n, 1)).astype(np.float32)
  fmt = RecordFormat(feature_dim=D, conf_th=0.2, min_bb=2, max_bb=5)
  rec = image_record(Regions(7, 100, 100, feats, boxes, np.array(conf), None, 'x'), fmt)
  order = np.argsort(-np.array(conf), kind='stable')[:expected]
  assert len(rec['features']) == expected
  np.testing.assert_array_equal(rec['conf'], np.array(conf, np.float32)[order])
  np.testing.assert_array_equal(rec['features'], feats[order].astype(np.float16))


def test_tsv_round_trip_base_dim(tmp_path):
  rng = np.random.default_rng(0)
  images = {i: random_image(rng, n, 2048) for i, n in ((9, 36), (25, 12), (1000092795, 3))}
  path = write(tmp_path / 'f.tsv', [tsv_line(i, *v) for i, v in images.items()])
  src = open_source(f'tsv:{path}', report=BuildReport())
  assert sorted(src.ids()) == sorted(images)
  fmt = RecordFormat(feature_dim=2048)
  for image_id, (boxes, feats) in images.items():
    regions = src.get(image_id)
    np.testing.assert_array_equal(regions.features, feats)
    rec = image_record(regions, fmt)
    k = min(len(boxes), 100)  # no conf column: conf = 1, every stored box kept
    assert rec['features'].dtype == np.float16 and rec['features'].shape == (k, 2048)
    assert fp16_close(rec['features'], feats[:k])
    np.testing.assert_array_equal(rec['boxes'], boxes[:k])
    np.testing.assert_array_equal(rec['conf'], np.ones(k, np.float32))
    w, h = 640.0, 480.0
    expected = np.stack([boxes[:, 0] / w, boxes[:, 1] / h, boxes[:, 2] / w, boxes[:, 3] / h,
                         (boxes[:, 2] - boxes[:, 0]) / w, (boxes[:, 3] - boxes[:, 1]) / h,
                         (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (w * h)],
                        1)
    np.testing.assert_allclose(rec['img_pos'], expected, rtol=1e-6, atol=1e-7)
    assert 'soft_labels' not in rec


def test_tsv_lxmert_columns_and_cls_prob(tmp_path):
  rng = np.random.default_rng(1)
  boxes, feats = random_image(rng, 4)
  conf = np.array([0.3, 0.9, 0.1, 0.6], np.float32)
  fields = ('img_id', 'img_h', 'img_w', 'objects_conf', 'num_boxes', 'boxes', 'features')
  line = '\t'.join(['COCO_val2014_000000000042', '480', '640', b64(conf), '4', b64(boxes),
                    b64(feats)])
  src = TsvFeatures([write(tmp_path / 'l.tsv', [line])], report=BuildReport(), fields=fields)
  regions = src.get(42)
  assert (regions.image_w, regions.image_h) == (640, 480)
  rec = image_record(regions, RecordFormat(feature_dim=D, min_bb=1))
  np.testing.assert_array_equal(rec['conf'], conf[[1, 3, 0]])  # sorted, > 0.2 kept
  np.testing.assert_array_equal(rec['boxes'], boxes[[1, 3, 0]])

  probs = rng.dirichlet(np.ones(5), 4).astype(np.float32)
  line = '\t'.join([tsv_line(5, boxes, feats), b64(probs)])
  src = TsvFeatures([write(tmp_path / 'c.tsv', [line])], report=BuildReport(),
                    fields=('image_id', 'image_w', 'image_h', 'num_boxes', 'boxes',
                            'features', 'cls_prob'))
  regions = src.get(5)
  np.testing.assert_array_equal(regions.conf, probs[:, 1:].max(1))  # class 0 = background
  rec = image_record(regions, RecordFormat(feature_dim=D, soft_label_dim=5, min_bb=4))
  order = np.argsort(-probs[:, 1:].max(1), kind='stable')
  assert rec['soft_labels'].dtype == np.float16
  assert fp16_close(rec['soft_labels'], probs[order])


def _bad_lines(rng):
  boxes, feats = random_image(rng, 3)
  good = tsv_line(1, boxes, feats)
  cols = good.split('\t')
  nan = feats.copy()
  nan[1, 2] = np.nan
  return {
      'corrupt_line': '\t'.join(cols[:5]),  # truncated: features column lost
      'bad_base64': '\t'.join(cols[:4] + ['!!notbase64!!', cols[5]]),
      'wrong_length': '\t'.join(cols[:4] + [b64(boxes[:2]), cols[5]]),
      'feature_dim': tsv_line(1, boxes, feats[:, :D - 2]),
      'non_finite': tsv_line(1, boxes, nan),
  }


@pytest.mark.parametrize('kind', ['corrupt_line', 'bad_base64', 'wrong_length', 'feature_dim',
                                  'non_finite'])
def test_tsv_bad_input_errors_and_counts(tmp_path, kind):
  rng = np.random.default_rng(2)
  boxes, feats = random_image(rng, 3)
  path = write(tmp_path / 'bad.tsv', [tsv_line(7, boxes, feats), _bad_lines(rng)[kind]])
  fmt = RecordFormat(feature_dim=D, min_bb=1)

  def read_all(report):
    src = open_source(f'tsv:{path}', report=report)
    out = []
    for image_id in sorted(src.ids()):
      try:
        out.append(image_record(src.get(image_id), fmt))
      except BadInput as err:
        report.bad(err)
    return out

  with pytest.raises(BadInput) as info:
    read_all(BuildReport())
  assert info.value.kind == kind and f'{path}:2' in str(info.value)
  report = BuildReport(skip_bad=True)
  assert len(read_all(report)) == 1  # the good line survives
  assert dict(report.bad_input) == {kind: 1}


def test_tsv_float16_overflow_and_duplicates(tmp_path):
  boxes = np.array([[0, 0, 5, 5]], np.float32)
  path = write(tmp_path / 'o.tsv', [tsv_line(3, boxes, np.full((1, D), 1e6)),
                                    tsv_line(3, boxes, np.ones((1, D)))])
  report = BuildReport(skip_bad=True)
  src = open_source(f'tsv:{path}', report=report)
  assert report.bad_input['duplicate_image'] == 1
  with pytest.raises(BadInput, match='float16') as info:
    image_record(src.get(3), RecordFormat(feature_dim=D))
  assert info.value.kind == 'non_finite'
  rec = image_record(src.get(3), RecordFormat(feature_dim=D, feature_dtype='float32'))
  assert rec['features'].dtype == np.float32 and rec['features'][0, 0] == 1e6
  with pytest.raises(BadInput, match='also at') as info:
    open_source(f'tsv:{path}', report=BuildReport())
  assert info.value.kind == 'duplicate_image'


def test_npz_round_trip_with_side_sizes(tmp_path):
  rng = np.random.default_rng(3)
  n, c = 12, 6
  norm = np.sort(rng.uniform(0, 1, (n, 2, 2)), axis=1).transpose(0, 2, 1).reshape(n, 4)
  norm = np.concatenate([norm, norm[:, 2:] - norm[:, :2]], 1).astype(np.float16)  # 6-d
  feats = rng.normal(size=(n, D)).astype(np.float16)
  conf = np.sort(rng.uniform(0, 1, n))[::-1].astype(np.float16)[:, None]  # [N, 1]
  labels = rng.dirichlet(np.ones(c), n).astype(np.float16)
  os.makedirs(tmp_path / 'npz')
  np.savez(tmp_path / 'npz' / 'coco_train2014_000000000077.npz', features=feats,
           norm_bb=norm, conf=conf, soft_labels=labels)
  np.savez(tmp_path / 'npz' / 'coco_train2014_000000000078.npz', features=feats, norm_bb=norm,
           image_w=np.int32(50), image_h=np.int32(40))
  with open(tmp_path / 'sizes.json', 'w') as f:
    json.dump({'images': [{'id': 77, 'width': 320, 'height': 200, 'file_name': 'x'}]}, f)
  sizes = load_image_sizes([tmp_path / 'sizes.json'])
  src = NpzFeatures(str(tmp_path / 'npz'), report=BuildReport(), sizes=sizes)
  fmt = RecordFormat(feature_dim=D, soft_label_dim=c, conf_th=0.5, min_bb=2, max_bb=100)
  rec = image_record(src.get(77), fmt)
  k = max(2, int((conf[:, 0].astype(np.float64) > 0.5).sum()))
  assert len(rec['conf']) == k
  np.testing.assert_array_equal(rec['features'], feats[:k])  # float16 in, float16 out
  np.testing.assert_array_equal(rec['soft_labels'], labels[:k])
  np.testing.assert_allclose(rec['boxes'], norm[:k, :4].astype(np.float64) * [320, 200, 320, 200],
                             rtol=1e-6)
  np.testing.assert_allclose(rec['img_pos'][:, :4], norm[:k, :4], rtol=1e-6)
  np.testing.assert_allclose(rec['img_pos'][:, 4:6], norm[:k, 4:6], rtol=2e-3, atol=1e-3)
  assert (rec['image_w'], rec['image_h']) == (320, 200)
  own = src.get(78)  # the npz's own size wins
  assert (own.image_w, own.image_h) == (50, 40) and own.conf is None

  with pytest.raises(BadInput) as info:  # soft labels configured, file has none
    image_record(own, fmt)
  assert info.value.kind == 'missing_field'
  no_size = NpzFeatures(str(tmp_path / 'npz'), report=BuildReport())
  with pytest.raises(BadInput) as info:
    no_size.get(77)
  assert info.value.kind == 'missing_image_size' and '000000000077.npz' in str(info.value)


def test_npz_unreadable_and_missing_key(tmp_path):
  os.makedirs(tmp_path / 'd')
  (tmp_path / 'd' / '5.npz').write_bytes(b'this is not a zip file')
  np.savez(tmp_path / 'd' / '6.npz', features=np.ones((2, D), np.float16))
  src = NpzFeatures(str(tmp_path / 'd'), report=BuildReport(), sizes={5: (1, 1), 6: (1, 1)})
  with pytest.raises(BadInput) as info:
    src.get(5)
  assert info.value.kind == 'unreadable_file'
  with pytest.raises(BadInput, match="norm_bb") as info:
    src.get(6)
  assert info.value.kind == 'missing_field'


def test_npy_pairs(tmp_path):
  rng = np.random.default_rng(4)
  boxes, feats = random_image(rng, 5)
  os.makedirs(tmp_path / 'n')
  np.save(tmp_path / 'n' / '123.npy', feats)
  np.save(tmp_path / 'n' / '123_boxes.npy', boxes)
  np.save(tmp_path / 'n' / '124.npy', feats)  # no boxes file
  src = NpyFeatures(str(tmp_path / 'n'), report=BuildReport(),
                    sizes={123: (640, 480), 124: (640, 480)})
  assert sorted(src.ids()) == [123, 124]
  rec = image_record(src.get(123), RecordFormat(feature_dim=D, feature_dtype='float32'))
  np.testing.assert_array_equal(rec['features'], feats)
  np.testing.assert_array_equal(rec['boxes'], boxes)
  with pytest.raises(BadInput, match='_boxes.npy') as info:
    src.get(124)
  assert info.value.kind == 'missing_field'


def test_other_kinds_by_hand():
  fmt = RecordFormat(feature_dim=D)
  feats = np.ones((2, D), np.float32)
  cases = {
      'wrong_shape': Regions(1, 10, 10, feats, np.ones((2, 3)), None, None, 'a'),
      'feature_dim': Regions(1, 10, 10, feats[:, :3], np.ones((2, 4)), None, None, 'b'),
      'bad_value': Regions(1, 0, 10, feats, np.ones((2, 4)), None, None, 'c'),
  }
  for kind, regions in cases.items():
    with pytest.raises(BadInput) as info:
      image_record(regions, fmt)
    assert info.value.kind == kind and str(info.value).startswith(regions.where)
  with pytest.raises(BadInput, match='no regions'):
    image_record(Regions(1, 10, 10, feats[:0], np.ones((0, 4)), None, None, 'd'), fmt)
