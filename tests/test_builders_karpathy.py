"""coco_karpathy / flickr30k_karpathy from hand-written Karpathy JSON + BUTD TSV files."""

import base64
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

import vlp.data.builders  # noqa: F401  (registers the builders)
from vlp.data import batching, pipeline, prepare
from vlp.data.image_records import ImageRecords
from vlp.data.features import BadInput
from vlp.data.tokenizer import Tokenizer

D = 16
# cocoid, split, captions, boxes
COCO = [(11, 'train', 5, 12), (22, 'train', 7, 3), (33, 'restval', 5, 20), (44, 'val', 5, 10),
        (55, 'test', 5, 15), (66, 'test', 6, 11), (77, 'test', 5, 10)]


def b64(a):
  return base64.b64encode(np.asarray(a, np.float32).tobytes()).decode()


def write_images(manual, images, d, rng, *, flickr=False, w=640, h=480):
  """Karpathy JSON and one TSV; returns {image_id: (boxes, feats, raw captions)}."""
  os.makedirs(os.path.join(manual, 'features'), exist_ok=True)
  entries, lines, truth = [], [], {}
  for image_id, split, n_caps, n_boxes in images:
    caps = [f'  Caption {j} of image {image_id} with a dog. ' for j in range(n_caps)]
    entry = {'split': split, 'filename': f'{image_id}.jpg' if flickr else f'COCO_{image_id}.jpg',
             'imgid': len(entries),
             'sentences': [{'raw': c, 'tokens': c.split(), 'sentid': 100 * image_id + j}
                           for j, c in enumerate(caps)]}
    if not flickr:
      entry['cocoid'] = image_id
    entries.append(entry)
    xy = rng.uniform(0, 200, (n_boxes, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 200, (n_boxes, 2))], 1).astype(np.float32)
    feats = rng.gamma(2.0, 1.0, (n_boxes, d)).astype(np.float32)
    truth[image_id] = (boxes, feats, caps)
    lines.append('\t'.join([str(image_id), str(w), str(h), str(n_boxes), b64(boxes), b64(feats)]))
  name = 'dataset_flickr30k.json' if flickr else 'dataset_coco.json'
  with open(os.path.join(manual, name), 'w') as f:
    json.dump({'images': entries, 'dataset': 'flickr30k' if flickr else 'coco'}, f)
  tsv = os.path.join(manual, 'features', 'trainval.tsv')
  with open(tsv, 'w', newline='') as f:
    f.write(''.join(line + '\r\n' for line in lines))
  return truth


def fp16_close(stored, original):
  original = np.asarray(original, np.float64)
  err = np.abs(stored.astype(np.float64) - original)
  return bool(np.all(err <= np.maximum(np.abs(original) * 2.0 ** -11, 2.0 ** -25)))


@pytest.fixture(scope='module')
def coco(tmp_path_factory):
  root = tmp_path_factory.mktemp('coco')
  truth = write_images(str(root / 'manual'), COCO, D, np.random.default_rng(0))
  builder, report = prepare.prepare(
      'coco_karpathy', manual_dir=root / 'manual', data_dir=root / 'data', feature_dim=D,
      min_bb=5, max_bb=16, test_fold_size=2, spm_vocab_size=80)
  return builder, report, truth, root


def test_splits_counts_and_report(coco):
  builder, report, _, _ = coco
  assert report.examples == {'train': 2, 'restval': 1, 'val': 1, 'test': 3, 'test_fold0': 2,
                             'test_fold1': 1}
  assert report.dropped['captions'] == {'beyond the first 5 of an image': 3}
  assert not report.bad_input
  assert builder.builder_config.name == 'float16_d16_min5_max16_spm80_fold2'
  assert os.path.exists(os.path.join(builder.data_dir, 'spm.model'))
  assert 'examples per split' in report.summary()


def test_records_round_trip_in_karpathy_order(coco):
  builder, _, truth, root = coco
  reread = tfds.builder(f'coco_karpathy/{builder.builder_config.name}', data_dir=root / 'data')
  for split in ('train', 'restval', 'val', 'test'):
    ids = [i for i, s, _, _ in COCO if s == split]
    src = reread.as_data_source(split)
    assert [int(src[i]['image_id']) for i in range(len(src))] == ids
    for r in (src[i] for i in range(len(src))):
      boxes, feats, caps = truth[int(r['image_id'])]
      k = min(len(boxes), 16)  # no conf in the TSV: every stored box up to max_bb
      assert r['features'].shape == (k, D) and r['features'].dtype == np.float16
      assert fp16_close(r['features'], feats[:k])
      np.testing.assert_array_equal(r['boxes'], boxes[:k])
      np.testing.assert_array_equal(r['conf'], np.ones(k, np.float32))
      b = boxes[:k].astype(np.float64) / [640, 480, 640, 480]
      wh = b[:, 2:] - b[:, :2]
      np.testing.assert_allclose(r['img_pos'], np.concatenate(
          [b, wh, wh[:, :1] * wh[:, 1:]], 1), rtol=1e-6, atol=1e-8)
      assert [c.decode() for c in r['captions']] == [c.strip() for c in caps[:5]]
      assert list(r['sent_ids']) == [100 * int(r['image_id']) + j for j in range(5)]
      assert (r['image_w'], r['image_h']) == (640, 480)


def test_test_folds_are_slices_of_test(coco):
  builder, _, _, _ = coco
  test = builder.as_data_source('test')
  ids = [int(test[i]['image_id']) for i in range(len(test))]
  for f in range(2):
    fold = builder.as_data_source(f'test_fold{f}')
    assert [int(fold[i]['image_id']) for i in range(len(fold))] == ids[2 * f:2 * f + 2]
    np.testing.assert_array_equal(fold[0]['features'], test[2 * f]['features'])


def test_image_split_and_gallery_read_unchanged(coco):
  builder, _, truth, _ = coco
  split = ImageRecords(builder, 'test', D)
  assert split.layout is not None  # the raw-bytes fast path applies
  tok = Tokenizer(os.path.join(builder.data_dir, 'spm.model'))
  spec = batching.BatchSpec(batch_size=4, max_text_len=24, max_regions=12, feature_dim=D)
  gallery = pipeline.load_retrieval_gallery(builder, spec, tokenizer=tok, split='test')
  assert gallery['img_feat'].shape == (3, 12, D) and gallery['input_ids'].shape == (15, 24)
  np.testing.assert_array_equal(gallery['img_mask'].sum(1), [12, 11, 10])
  np.testing.assert_array_equal(gallery['image_id'], [55, 66, 77])
  assert fp16_close(gallery['img_feat'][1, :11], truth[66][1][:11])


def test_bad_inputs_stop_the_build_or_are_counted(tmp_path):
  rng = np.random.default_rng(1)
  manual = str(tmp_path / 'manual')
  write_images(manual, COCO[:4], D, rng)
  path = os.path.join(manual, 'dataset_coco.json')
  with open(path) as f:
    data = json.load(f)
  data['images'].append({'cocoid': 88, 'split': 'train', 'filename': 'x.jpg',  # no features
                         'sentences': [{'raw': f'c{j}', 'sentid': j} for j in range(5)]})
  data['images'].append({'cocoid': 99, 'split': 'val', 'filename': 'y.jpg',  # 4 captions
                         'sentences': [{'raw': f'c{j}', 'sentid': j} for j in range(4)]})
  data['images'].append({'cocoid': 98, 'split': 'extra', 'filename': 'z.jpg',  # bad split
                         'sentences': [{'raw': f'c{j}', 'sentid': j} for j in range(5)]})
  del data['images'][0]['sentences'][1]['raw']  # image 11 keeps 4 usable captions
  with open(path, 'w') as f:
    json.dump(data, f)
  kw = dict(manual_dir=manual, feature_dim=D, spm_vocab_size=40, test_fold_size=0)
  with pytest.raises(BadInput) as info:
    prepare.prepare('coco_karpathy', data_dir=tmp_path / 'a', **kw)
  assert info.value.kind == 'missing_field' and 'images[0] (image 11) sentences[1]' in str(
      info.value)
  builder, report = prepare.prepare('coco_karpathy', data_dir=tmp_path / 'b', skip_bad=True,
                                    **kw)
  assert dict(report.bad_input) == {'missing_field': 1, 'too_few_captions': 2,
                                    'missing_features': 1, 'bad_value': 1}
  assert report.examples == {'train': 1, 'restval': 1, 'val': 1}
  assert report.dropped['captions']['image with fewer than 5 captions'] == 8
  assert report.dropped['captions']['image skipped (bad input or no features)'] == 5
  assert report.dropped['captions']['image skipped (bad input)'] == 5
  assert report.dropped['captions']['sentence without raw text (skipped bad input)'] == 1
  assert 'images without features: 1' in report.summary()
  # Without skip_bad the image without features names itself.
  del data['images'][0], data['images'][-2:]
  with open(path, 'w') as f:
    json.dump(data, f)
  with pytest.raises(BadInput, match=r'images\[3\] \(image 88\).*no region features'):
    prepare.prepare('coco_karpathy', data_dir=tmp_path / 'c', **kw)


def test_flickr_default_config_trains_with_masking(tmp_path):
  rng = np.random.default_rng(2)
  images = [(1000092795, 'train', 5, 40), (10002456, 'train', 6, 36), (1000268201, 'val', 5, 9),
            (1000344755, 'test', 5, 36)]
  write_images(str(tmp_path / 'manual'), images, 2048, rng, flickr=True)
  prepare.prepare('flickr30k_karpathy', manual_dir=tmp_path / 'manual',
                  data_dir=tmp_path / 'data')
  builder = tfds.builder('flickr30k_karpathy', data_dir=tmp_path / 'data')  # default config
  assert builder.builder_config.name == 'float16' and builder.info.splits['train'].num_examples == 2
  spec = batching.BatchSpec(batch_size=4, max_text_len=20, max_regions=36, feature_dim=2048,
                            num_region_classes=1601)
  tok = Tokenizer(os.path.join(builder.data_dir, 'spm.model'))
  kinds = ('mlm', 'mrm', 'itm')
  it = pipeline.make_train_iterator(builder, spec, tokenizer=tok, seed=0,
                                    kind_for_index=kinds.__getitem__)
  for kind in kinds:
    batch = next(it)
    assert batch['img_feat'].shape == (4, 36, 2048)
    # No soft labels in this build: a zero-width array, not 1601 zeros per region.
    assert batch['soft_labels'].shape == (4, 36, 0)
    assert set(batch['image_id']) <= {1000092795, 10002456}
    assert {'mlm': 'mlm_labels', 'mrm': 'mrfr_target', 'itm': 'itm_target'}[kind] in batch
  it.close()
