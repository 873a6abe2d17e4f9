"""Features as published: UNITER's image DBs (LMDB) and the multi-part BUTD TSV folder."""

import io
import json
import os

import msgpack
import numpy as np
import pytest

from vlp.data import pipeline, prepare, prepared
from vlp.data.batching import BatchSpec
from vlp.data.features import (BadInput, BuildReport, LmdbFeatures, RecordFormat,
                               TsvFeatures, image_record, open_source)
from vlp.data.features.tsv import expand_paths
from vlp.data.image_records import ImageRecords
from vlp.data.tokenizer import Tokenizer

from real_format_fixtures import (UNITER_ENV, msgpack_numpy, uniter_image, write_uniter_db)
from test_builders_karpathy import write_images
from test_features import tsv_line, write

D, C = 8, 5
SIZES = {9: (640, 480), 25: (500, 375), 42: (800, 600)}


def _img_db(root, rng):
  """coco_train2014 (msgpack entries: images 9, 25) and coco_val2014 (compressed
  npz entries: image 42), 12 regions each, 4 of them with conf > 0.2."""
  truth = {i: uniter_image(rng, 12, D, C) for i in SIZES}
  img_db = os.path.join(root, 'img_db')
  write_uniter_db(img_db, 'coco_train2014',
                  {f'coco_train2014_{i:012d}.npz': truth[i] for i in (9, 25)})
  write_uniter_db(img_db, 'coco_val2014', {'coco_val2014_000000000042.npz': truth[42]},
                  compressed=True)
  return img_db, truth


def test_image_dbs_round_trip_with_the_region_rule(tmp_path):
  img_db, truth = _img_db(tmp_path, np.random.default_rng(0))
  for spec in (img_db, f'{img_db}/coco_train2014,{img_db}/coco_val2014',
               f'{img_db}/coco_train2014/{UNITER_ENV},{img_db}/coco_val2014'):
    source = LmdbFeatures(spec, report=BuildReport(), sizes=SIZES)
    assert sorted(source.ids()) == [9, 25, 42] and source.soft_label_dim() == C
    source.close()
  source = open_source(f'lmdb:{img_db}', report=BuildReport(), sizes=SIZES)
  for image_id, (w, h) in SIZES.items():
    arrays = truth[image_id]
    for min_bb, k in ((2, 4), (10, 10)):  # K = min(100, max(min_bb, #{conf > 0.2}))
      rec = image_record(source.get(image_id),
                         RecordFormat(feature_dim=D, soft_label_dim=C, min_bb=min_bb))
      np.testing.assert_array_equal(rec['features'], arrays['features'][:k])
      np.testing.assert_array_equal(rec['soft_labels'], arrays['soft_labels'][:k])
      np.testing.assert_array_equal(rec['conf'], arrays['conf'][:k].astype(np.float32))
      want = arrays['norm_bb'][:k, :4].astype(np.float64) * [w, h, w, h]
      np.testing.assert_allclose(rec['boxes'], want, rtol=1e-6)
      assert (rec['image_w'], rec['image_h']) == (w, h)
  with pytest.raises(BadInput, match=r"coco_val2014/feat_th0.2_max100_min10_compressed key "
                     r"'coco_val2014_000000000042.npz': image 42: the DB stores normalised "
                     r'boxes only.*\[missing_image_size\]'):
    LmdbFeatures(img_db, report=BuildReport()).get(42)
  with pytest.raises(FileNotFoundError, match='no LMDB feature DB'):
    LmdbFeatures(str(tmp_path), report=BuildReport())


def _pickled_entries():
  """Values that would need unpickling (or are not plain numeric arrays)."""
  plain = {k: msgpack_numpy(v) for k, v in uniter_image(np.random.default_rng(1), 6).items()}
  objects = dict(plain, conf=msgpack_numpy(np.array([{'x': 1}, None], dtype=object)))
  structured = dict(plain, features={b'nd': True, b'type': [['a', '<f4']], b'kind': b'V',
                                     b'shape': [1], b'data': b'\0' * 4})
  ext = dict(plain, features=msgpack.ExtType(42, b'payload'))
  npz = io.BytesIO()
  np.savez(npz, features=np.array([object()], dtype=object), norm_bb=np.zeros((1, 4)))
  return {
      'coco_train2014_000000000001.npz': (msgpack.packb(objects, use_bin_type=True),
                                          'an object array'),
      'coco_train2014_000000000002.npz': (msgpack.packb(structured, use_bin_type=True),
                                          'a structured array'),
      'coco_train2014_000000000003.npz': (msgpack.packb(ext, use_bin_type=True),
                                          'a msgpack extension type 42'),
      'coco_train2014_000000000004.npz': (npz.getvalue(), 'an npz object array'),
  }


def test_entries_that_need_unpickling_are_refused(tmp_path, monkeypatch):
  import pickle
  monkeypatch.setattr(pickle, 'loads', lambda *a, **k: pytest.fail('pickle.loads called'))
  entries = _pickled_entries()
  env = write_uniter_db(str(tmp_path), 'coco_train2014', {},
                        raw={k: v for k, (v, _) in entries.items()})
  source = LmdbFeatures(str(tmp_path), report=BuildReport(), sizes={i: (10, 10)
                                                                     for i in range(5)})
  assert sorted(source.ids()) == [1, 2, 3, 4]
  for key, (_, what) in entries.items():
    image_id = int(key[-8:-4])
    with pytest.raises(BadInput, match=rf"{env} key '{key}': the entry holds {what}") as err:
      source.get(image_id)
    assert err.value.kind == 'pickled'
  with pytest.raises(BadInput, match=r"key '__bad__': no image id"):
    write_uniter_db(str(tmp_path / 'other'), 'vg', {}, raw={'__bad__': b''})
    LmdbFeatures(str(tmp_path / 'other'), report=BuildReport())


def test_prepare_coco_from_the_image_dbs(tmp_path):
  img_db, truth = _img_db(tmp_path, np.random.default_rng(2))
  manual, data = tmp_path / 'manual', tmp_path / 'data'
  write_images(str(manual), [(9, 'train', 5, 3), (25, 'restval', 5, 3), (42, 'val', 5, 3)],
               D, np.random.default_rng(3))
  sizes = tmp_path / 'sizes.json'
  sizes.write_text(json.dumps({str(i): list(wh) for i, wh in SIZES.items()}))
  prepare.prepare('coco_karpathy', manual_dir=manual, data_dir=data,
                  features=f'lmdb:{img_db}', image_sizes=[str(sizes)], feature_dim=D,
                  test_fold_size=0, spm_vocab_size=60)
  # Soft labels found in the DB: the build stores them and is named for them.
  assert prepared.prepared_configs('coco_karpathy', data) == ['float16_d8_c5_spm60_fold0']
  builder = prepared.open_prepared('coco_karpathy', '', data)
  records = ImageRecords(builder, 'restval', D)
  assert records.num_classes == C
  rec = records.read([0])[0]
  assert rec['image_id'] == 25
  np.testing.assert_array_equal(rec['features'], truth[25]['features'][:10])
  np.testing.assert_array_equal(rec['soft_labels'], truth[25]['soft_labels'][:10])
  # Mixed with a build of the same images without soft labels (the TSV next to the
  # Karpathy file): those rows get zeros; a build without any gives C = 0.
  plain, _ = prepare.prepare('coco_karpathy', manual_dir=manual, data_dir=tmp_path / 'tsv',
                             feature_dim=D, test_fold_size=0, spm_vocab_size=60)
  tok = Tokenizer(os.path.join(os.fspath(builder.data_dir), 'spm.model'))
  spec = BatchSpec(batch_size=16, max_text_len=12, max_regions=10, feature_dim=D,
                   num_region_classes=7)
  mixed = next(pipeline.make_mixture_iterator(
      [(builder, ['train', 'restval'], 1), (plain, ['train'], 1)], spec, tokenizer=tok,
      kind_for_index=None, seed=0))
  labelled = mixed['soft_labels'].any((1, 2))
  assert mixed['soft_labels'].shape == (16, 10, 7) and 0 < labelled.sum() < 16
  for row in np.flatnonzero(labelled):
    want = truth[int(mixed['image_id'][row])]['soft_labels'][:10]
    np.testing.assert_array_equal(mixed['soft_labels'][row, :, :C], want)
  assert not mixed['soft_labels'][:, :, C:].any()
  alone = next(pipeline.make_train_iterator(plain, spec, tokenizer=tok,
                                            kind_for_index=lambda i: 'mrm', seed=0))
  assert alone['soft_labels'].shape == (16, 10, 0) and alone['mrc_target'].shape[-1] == 0


def test_tsv_folder_with_train_in_parts(tmp_path):
  """The unzipped adaptive `trainval/`: val and test TSVs, train in parts .tsv.0, .tsv.1."""
  rng = np.random.default_rng(4)
  folder = tmp_path / 'trainval'
  folder.mkdir()
  stem = 'karpathy_{}_resnet101_faster_rcnn_genome.tsv'
  lines = {}
  for image_id in range(1, 13):
    n = int(rng.integers(10, 20))
    xy = rng.uniform(0, 300, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(5, 100, (n, 2))], 1)
    lines[image_id] = tsv_line(image_id, boxes, rng.normal(size=(n, D)))
  files = {stem.format('train') + '.0': [1, 2, 3], stem.format('train') + '.1': [4, 5, 6],
           stem.format('train') + '.10': [7], stem.format('val'): [8, 9, 10],
           stem.format('test'): [11, 12]}
  for name, ids in files.items():
    write(folder / name, [lines[i] for i in ids])
  (folder / 'README.txt').write_text('not a TSV')
  paths = [os.path.basename(p) for p in expand_paths(str(folder))]
  assert paths == [stem.format('test'), stem.format('train') + '.0',
                   stem.format('train') + '.1', stem.format('train') + '.10',
                   stem.format('val')]
  source = TsvFeatures(expand_paths(str(folder)), report=BuildReport())
  assert sorted(source.ids()) == list(range(1, 13))
  assert source.get(7).where.endswith('.tsv.10:1 (image 7)')
  # Through the builder: every split finds its images.
  manual = tmp_path / 'manual'
  split = {i: 'train' for i in range(1, 8)} | {8: 'val', 9: 'val', 10: 'restval',
                                               11: 'test', 12: 'test'}
  write_images(str(manual), [(i, s, 5, 3) for i, s in split.items()], D, rng)
  builder, report = prepare.prepare('coco_karpathy', manual_dir=manual,
                                    data_dir=tmp_path / 'data', features=f'tsv:{folder}',
                                    feature_dim=D, test_fold_size=0, spm_vocab_size=60)
  assert report.examples == {'train': 7, 'restval': 1, 'val': 2, 'test': 2}
