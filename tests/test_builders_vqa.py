"""vqa_v2: official answer normalisation, soft scores, vocabulary, question records."""

import base64
import json
import os

import numpy as np
import pytest

from vlp.data import prepare
from vlp.data.builders import vqa_answers, vqa_v2
from vlp.data.features import BadInput

D = 8


@pytest.mark.parametrize('raw, expected', [
    ('yes!', 'yes'), ('Two dogs.', '2 dogs'), ('the cat', 'cat'), ('a tree', 'tree'),
    ('dont know', "don't know"), ('3,000', '3000'), ('2.5', '2.5'), ('red, white', 'red white'),
    ('left-hand', 'left hand'), ('none', '0'), ('  Ten\n', '10'), ('an apple', 'apple'),
])
def test_normalize_by_hand(raw, expected):
  assert vqa_answers.normalize(raw) == expected


@pytest.mark.parametrize('answers, expected', [
    (['yes'] * 10, {'yes': 1.0}),
    (['two'] * 3 + ['2'] * 2 + ['three'] * 5, {'2': 1.0, '3': 1.0}),  # normalised: 5 + 5
    (['red'] + ['blue'] * 9, {'red': 0.3, 'blue': 1.0}),
    (['dog'] * 2 + ['cat'] * 3 + ['bird'] * 5, {'dog': 0.6, 'cat': 0.9, 'bird': 1.0}),
    (['Yes'] * 10, {}),  # all agree: compared raw, so 'yes' does not match
])
def test_soft_scores_by_hand(answers, expected):
  vocab = vqa_answers.AnswerVocab(['yes', '2', '3', 'red', 'blue', 'dog', 'cat', 'bird'])
  labels, scores = vocab.soft_scores(answers)
  got = {vocab.answers[l]: s for l, s in zip(labels, scores)}
  assert got.keys() == expected.keys()
  for key, value in expected.items():
    assert got[key] == pytest.approx(value)


def test_soft_scores_equal_official_accuracy():
  rng = np.random.default_rng(0)
  pool = ['yes', 'Yes', 'no', 'two', '2', 'the dog', 'dog', 'red,', 'red', 'left-hand']
  vocab = vqa_answers.AnswerVocab(vqa_answers.build_vocab(pool, 20))
  for _ in range(200):
    answers = list(rng.choice(pool, size=10))
    labels, scores = vocab.soft_scores(answers)
    got = dict(zip(labels, scores))
    for label, answer in enumerate(vocab.answers):
      assert got.get(label, 0.0) == pytest.approx(vqa_answers.official_accuracy(answer, answers))


def test_build_vocab_ranks_by_count_then_name():
  assert vqa_answers.build_vocab(['Yes', 'yes', 'two', '2', 'b', 'a', 'c', 'c'], 3) == [
      '2', 'c', 'yes']


def _write(manual, features_for=(1, 2, 3, 4)):
  os.makedirs(os.path.join(manual, 'features'), exist_ok=True)
  qs = {'train': [(1, 1, ['yes'] * 10, 'yes'),
                  (2, 1, ['two'] * 3 + ['2'] * 2 + ['three'] * 5, 'Two'),
                  (3, 2, ['red'] + ['blue'] * 9, 'blue'),
                  (4, 2, ['dog'] * 2 + ['cat'] * 3 + ['bird'] * 5, 'bird'),
                  (5, 1, ['yes'] * 7 + ['no'] * 3, 'yes')],
        'val': [(6, 4, ['yes'] * 2 + ['no'] * 8, 'no'),
                (7, 2, ['two', 'bird'] + ['x'] * 8, 'x')],
        'test_dev': [(8, 3, None, None), (9, 1, None, None)]}
  for split, rows in qs.items():
    q_name, a_name = vqa_v2.FILES[split]
    with open(os.path.join(manual, q_name), 'w') as f:
      json.dump({'questions': [{'question_id': q, 'image_id': i, 'question': f'q{q}?'}
                               for q, i, _, _ in rows]}, f)
    if a_name:
      with open(os.path.join(manual, a_name), 'w') as f:
        json.dump({'annotations': [
            {'question_id': q, 'image_id': i, 'multiple_choice_answer': mc,
             'answer_type': 'other', 'question_type': 'what',
             'answers': [{'answer': a, 'answer_confidence': 'yes', 'answer_id': k + 1}
                         for k, a in enumerate(ans)]} for q, i, ans, mc in rows]}, f)
  lines = []
  for image_id in features_for:
    boxes = np.tile(np.float32([0, 0, 10, 10]), (3, 1))
    feats = np.full((3, D), image_id, np.float32)
    lines.append('\t'.join([str(image_id), '100', '50', '3',
                            base64.b64encode(boxes.tobytes()).decode(),
                            base64.b64encode(feats.tobytes()).decode()]))
  with open(os.path.join(manual, 'features', 'f.tsv'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def test_vqa_records(tmp_path):
  _write(str(tmp_path / 'm'))
  builder, report = prepare.prepare('vqa_v2', manual_dir=tmp_path / 'm', data_dir=tmp_path / 'd',
                                    feature_dim=D, num_answers=3)
  assert vqa_v2.answer_vocab(builder) == ['yes', '2', 'bird']
  assert report.examples == {'images': 4, 'train': 5, 'val': 2, 'test_dev': 2}
  assert 'not built' in report.notes['split test']
  assert 'fewer than 10 images' in report.notes['split devval']  # 2 val images
  images = builder.as_data_source('images')
  assert [images[i]['image_id'] for i in range(4)] == [1, 2, 3, 4]
  assert images[1]['features'].shape == (3, D) and images[1]['features'][0, 0] == 2
  assert images[0]['question_id'] == -1
  train = builder.as_data_source('train')
  expected = {1: ([0], [1.0]), 2: ([1], [1.0]), 3: ([], []), 4: ([2], [1.0]), 5: ([0], [1.0])}
  for i in range(5):
    r = train[i]
    labels, scores = expected[r['question_id']]
    assert list(r['labels']) == labels
    np.testing.assert_allclose(r['scores'], scores)
    assert images[int(r['image_index'])]['image_id'] == r['image_id']
    assert len(r['answers']) == 10 and r['features'].shape == (0, D)
  assert report.notes['train questions without an in-vocabulary answer'] == 1
  val = builder.as_data_source('val')
  assert list(val[0]['labels']) == [0] and val[0]['scores'][0] == pytest.approx(0.6)
  assert list(val[1]['labels']) == [1, 2]
  np.testing.assert_allclose(val[1]['scores'], [0.3, 0.3])
  test = builder.as_data_source('test_dev')
  assert test[0]['image_index'] == 2 and len(test[0]['labels']) == 0
  assert test[0]['question'] == b'q8?'


def test_vqa_missing_image_features(tmp_path):
  _write(str(tmp_path / 'm'), features_for=(1, 2, 4))
  with pytest.raises(BadInput, match='COCO image 3') as info:
    prepare.prepare('vqa_v2', manual_dir=tmp_path / 'm', data_dir=tmp_path / 'a', feature_dim=D,
                    num_answers=3)
  assert info.value.kind == 'missing_features'
  _, report = prepare.prepare('vqa_v2', manual_dir=tmp_path / 'm', data_dir=tmp_path / 'b',
                              feature_dim=D, num_answers=3, skip_bad=True)
  assert report.examples == {'images': 3, 'train': 5, 'val': 2, 'test_dev': 1}
  assert dict(report.bad_input) == {'missing_features': 1}
  assert report.dropped['questions'] == {'test_dev: image skipped (bad input or no features)': 1}


def test_split_devval_by_hand():
  qs = [{'question_id': q, 'image_id': i} for q, i in
        [(1, 30), (2, 10), (3, 20), (4, 40), (5, 20), (6, 50), (7, 60), (8, 40)]]
  # Images by id: 10 20 30 40 50 60 -> ranks 2 and 5 (ids 30, 60) are held out at every=3.
  devval, restval = vqa_v2.split_devval(qs, 3)
  assert [q['question_id'] for q in devval] == [1, 7]
  assert [q['question_id'] for q in restval] == [2, 3, 4, 5, 6, 8]
  devval, restval = vqa_v2.split_devval(qs, 2)  # ids 20, 40, 60
  assert [q['question_id'] for q in devval] == [3, 4, 5, 7, 8]
  assert vqa_v2.split_devval(qs, 0) == ([], qs)
  with pytest.raises(ValueError, match='devval_every'):
    vqa_v2.split_devval(qs, -1)


def test_vqa_devval_and_restval_splits(tmp_path):
  _write(str(tmp_path / 'm'))
  builder, report = prepare.prepare('vqa_v2', manual_dir=tmp_path / 'm', data_dir=tmp_path / 'd',
                                    feature_dim=D, num_answers=3, devval_every=2)
  assert builder.builder_config.name == 'float16_d8_ans3_devval2'
  # val images by id: 2 (q7), 4 (q6); rank 1 (image 4) is held out.
  assert report.examples == {'images': 4, 'train': 5, 'val': 2, 'test_dev': 2,
                             'devval': 1, 'restval': 1}
  assert builder.as_data_source('devval')[0]['question_id'] == 6
  rest = builder.as_data_source('restval')[0]
  assert rest['question_id'] == 7 and list(rest['labels']) == [1, 2]
  np.testing.assert_allclose(rest['scores'], [0.3, 0.3])
