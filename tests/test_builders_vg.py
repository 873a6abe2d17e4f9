"""vg_captions: grouping rules, COCO val/test exclusion, npz features with VG sizes.
vg_qa: Visual Genome QA as VQA questions (normalised answer, full credit)."""

import json
import os

import numpy as np
import pytest

from vlp.data import prepare
from vlp.data.builders import vqa_v2
from vlp.data.features import BadInput
from vlp.data.image_records import ImageRecords

from real_format_fixtures import write_vg_qa

D = 8


def write_vg(manual, rng, d=D):
  os.makedirs(os.path.join(manual, 'features'))
  # VG image id, coco_id, descriptions
  phrases = {
      1: (None, [f'a red car {i}' for i in range(12)] + ['A red car 3', '  ', 'a  red  car 0']),
      2: (501, [f'desc {i}' for i in range(7)]),  # COCO test image: excluded
      3: (502, [f'tree {i}' for i in range(5)]),  # COCO train image: kept
      4: (None, ['only', 'three', 'phrases']),
      5: (None, [f'sky {i}' for i in range(10)]),  # no features
  }
  meta = [{'image_id': i, 'width': 800, 'height': 600, 'coco_id': c, 'url': 'x'}
          for i, (c, _) in phrases.items()]
  regions = [{'id': i, 'regions': [{'region_id': 1000 * i + j, 'image_id': i, 'phrase': p,
                                    'x': 1, 'y': 2, 'width': 3, 'height': 4}
                                   for j, p in enumerate(ps)]}
             for i, (_, ps) in phrases.items()]
  coco = {'images': [{'cocoid': 501, 'split': 'test'}, {'cocoid': 502, 'split': 'train'},
                     {'cocoid': 503, 'split': 'val'}]}
  for name, data in (('image_data.json', meta), ('region_descriptions.json', regions),
                     ('dataset_coco.json', coco)):
    with open(os.path.join(manual, name), 'w') as f:
      json.dump(data, f)
  truth = {}
  for image_id in (1, 2, 3, 4):
    n = 6
    norm = np.sort(rng.uniform(0, 1, (n, 2, 2)), 1).transpose(0, 2, 1).reshape(n, 4)
    feats = rng.normal(size=(n, d)).astype(np.float16)
    conf = np.array([0.9, 0.8, 0.5, 0.4, 0.1, 0.05], np.float16)
    np.savez(os.path.join(manual, 'features', f'vg_{image_id}.npz'), features=feats,
             norm_bb=norm.astype(np.float16), conf=conf)
    truth[image_id] = (norm.astype(np.float16), feats)
  return truth


def test_vg_captions(tmp_path):
  manual = str(tmp_path / 'manual')
  truth = write_vg(manual, np.random.default_rng(0))
  builder, report = prepare.prepare('vg_captions', manual_dir=manual, data_dir=tmp_path / 'd',
                                    feature_dim=D, min_bb=2, val_every=2, spm_vocab_size=50,
                                    soft_label_dim=0, skip_bad=True)
  # Eligible images in order: 1 (index 0, train), 3 (index 1, val), 4, 5 (train).
  assert report.examples == {'train': 2, 'val': 1}
  train = builder.as_data_source('train')
  caps = [[c.decode() for c in train[i]['captions']] for i in range(2)]
  assert caps == [[f'a red car {i}' for i in range(5)], [f'a red car {i}' for i in range(5, 10)]]
  assert list(train[1]['region_ids']) == [1005, 1006, 1007, 1008, 1009]
  assert [train[i]['group'] for i in range(2)] == [0, 1]
  val = builder.as_data_source('val')
  assert val[0]['image_id'] == 3 and val[0]['captions'][4] == b'tree 4'
  rec = train[0]
  norm, feats = truth[1]
  assert rec['image_id'] == 1 and (rec['image_w'], rec['image_h']) == (800, 600)
  np.testing.assert_array_equal(rec['features'], feats[:4])  # 4 regions with conf > 0.2
  np.testing.assert_array_equal(rec['conf'], np.float16([0.9, 0.8, 0.5, 0.4]))
  np.testing.assert_allclose(rec['boxes'], norm[:4, :4].astype(np.float64)
                             * [800, 600, 800, 600], rtol=1e-6)  # sizes of image_data.json
  d = report.dropped
  assert d['images'] == {'COCO Karpathy val/test image': 1,
                         'fewer than 5 distinct descriptions': 1}
  assert d['descriptions'] == {'repeated within the image': 2, 'empty': 1,
                               'last group of fewer than 5': 2,
                               'image with fewer than 5 distinct descriptions': 3,
                               'image skipped (bad input or no features)': 10}
  assert dict(report.bad_input) == {'missing_features': 1}
  split = ImageRecords(builder, 'train', D)
  assert [r['image_id'] for r in split.read(np.array([1, 0]))] == [1, 1]


def test_vg_qa(tmp_path):
  manual = tmp_path / 'vgqa'
  vocab = ['yes', '2', 'dog', 'red']
  qs, feats = write_vg_qa(str(manual), vocab)
  builder, report = prepare.prepare('vg_qa', manual_dir=manual, data_dir=tmp_path / 'd',
                                    feature_dim=D)
  assert vqa_v2.answer_vocab(builder) == vocab  # from the {answer: label} file
  # 'On a very tall chair.' is not an answer of the vocabulary; image 14 asks nothing.
  assert report.examples == {'images': 3, 'train': 4}
  assert report.dropped['questions'] == {'answer not in the VQA vocabulary': 1}
  images = builder.as_data_source('images')
  assert [images[i]['image_id'] for i in range(3)] == [11, 12, 13]
  np.testing.assert_array_equal(images[1]['features'], feats[12].astype(np.float16))
  train = builder.as_data_source('train')
  by_hand = {901: 'yes', 902: '2', 904: 'dog', 905: 'yes'}
  assert [train[i]['question_id'] for i in range(4)] == [901, 902, 904, 905]
  for i in range(4):
    r = train[i]
    q = qs[int(r['question_id'])]
    assert q['answer'] == by_hand[q['question_id']]
    assert [a.decode() for a in r['answers']] == [q['answer']] * 10
    assert list(r['labels']) == [vocab.index(q['answer'])]
    np.testing.assert_allclose(r['scores'], [1.0])  # all 10 "humans" agree
    assert r['question'].decode() == q['question']
    assert images[int(r['image_index'])]['image_id'] == q['image_id']
  assert train[0]['question'] == b'What is this?' and train[1]['question'] == b'Is it red?'


def test_vg_qa_needs_its_vocabulary_and_features(tmp_path):
  manual = tmp_path / 'vgqa'
  write_vg_qa(str(manual), ['yes', '2', 'dog'])
  os.remove(manual / 'vqa_answers.json')
  with pytest.raises(FileNotFoundError, match='vqa_answers.json'):
    prepare.prepare('vg_qa', manual_dir=manual, data_dir=tmp_path / 'a', feature_dim=D)
  write_vg_qa(str(manual), ['yes', '2', 'dog'])
  lines = (manual / 'features' / 'vg.tsv').read_text().splitlines()
  (manual / 'features' / 'vg.tsv').write_text('\n'.join(lines[:2]) + '\n')  # no image 13
  with pytest.raises(BadInput, match='VG image 13'):
    prepare.prepare('vg_qa', manual_dir=manual, data_dir=tmp_path / 'b', feature_dim=D)
  _, report = prepare.prepare('vg_qa', manual_dir=manual, data_dir=tmp_path / 'c',
                              feature_dim=D, skip_bad=True)
  assert report.examples == {'images': 2, 'train': 3}
  assert report.dropped['questions']['train: image skipped (bad input or no features)'] == 1


def test_vg_qa_bad_question(tmp_path):
  manual = tmp_path / 'vgqa'
  write_vg_qa(str(manual), ['yes', '2', 'dog'])
  data = json.loads((manual / 'question_answers.json').read_text())
  del data[1]['qas'][0]['answer']
  (manual / 'question_answers.json').write_text(json.dumps(data))
  with pytest.raises(BadInput, match=r"question_answers.json\[1\].qas\[0\].*no field 'answer'"):
    prepare.prepare('vg_qa', manual_dir=manual, data_dir=tmp_path / 'a', feature_dim=D)
  _, report = prepare.prepare('vg_qa', manual_dir=manual, data_dir=tmp_path / 'b',
                              feature_dim=D, skip_bad=True)
  # The broken question was the one outside the vocabulary: the same 4 remain.
  assert report.examples == {'images': 3, 'train': 4}
  assert report.dropped['questions'] == {'train: skipped bad input': 1}
  assert dict(report.bad_input) == {'missing_field': 1}
