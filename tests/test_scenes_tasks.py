"""VQA questions and referring expressions of vlp_scenes, and their batches.

Every generated answer and referent is recomputed here from the Scene with code
written for the test (a parser of the question / expression text and its own
attribute and relation checks), not with the generator's helpers.
"""

import collections
import itertools
import json
import math
import os
import re

import numpy as np
import pytest

from vlp.data import downstream as db
from vlp.data import examples, scenes, scenes_tasks, scenes_world
from vlp.data import records as record_reader
from vlp.data.image_records import ImageRecords
from vlp.data.vqa_targets import SoftTargets, soft_targets
from vlp.data.builders import vlp_scenes
from vlp.data.pipeline import BatchSpec
from vlp.data.tokenizer import Tokenizer

SIZES, COLORS, SHAPES = ('small', 'large'), scenes_world.COLORS, scenes_world.SHAPES
WORDS = 'zero one two three four five six seven eight nine ten'.split()
REL = '(to the left of|to the right of|above|below)'
MARGIN = 40.0
SPEC = BatchSpec(batch_size=8, max_text_len=24, max_regions=10, feature_dim=64)
# Captions of the generator before questions existed (git HEAD when tasks were added).
OLD_CAPTIONS = {
    0: ['a small white ring to the left of a yellow cylinder',
        'there are ten objects and two of them are yellow',
        'a picture of a small red ring , a white ring and a red heart',
        'a small white ring below a small white cone', 'there is one cone but no stars'],
    20_000_003: ['a blue cone to the right of a small green cylinder',
                 'there are nine objects and one of them is purple',
                 'a black ring , a blue cone and a small yellow sphere',
                 'a large black ring above a white pyramid',
                 'there are two pyramids but no stars'],
}


# ----------------------------------------------------------------- independent checker
def parse(phrase, plural=False):
  """'large red cube' -> {'size': 1, 'color': 0, 'shape': 0}; noun 'object' = any shape."""
  *adjectives, noun = phrase.split()
  if plural:
    assert noun.endswith('s'), phrase
    noun = noun[:-1]
  spec = {} if noun == 'object' else {'shape': SHAPES.index(noun)}
  for word in adjectives:
    key = 'size' if word in SIZES else 'color'
    assert key not in spec, phrase
    spec[key] = (SIZES if key == 'size' else COLORS).index(word)
  assert list(spec) == sorted(spec, key=['shape', 'size', 'color'].index), phrase
  return spec


def objects(scene, spec):
  values = {'size': scene.size, 'color': scene.color, 'shape': scene.shape}
  return [k for k in range(scene.num_objects)
          if all(values[a][k] == v for a, v in spec.items())]


def the_one(scene, phrase):
  found = objects(scene, parse(phrase))
  assert len(found) == 1, (phrase, found)
  return found[0]


def holds(scene, i, relation, j):
  x = (scene.boxes[:, 0] + scene.boxes[:, 2]) / 2
  y = (scene.boxes[:, 1] + scene.boxes[:, 3]) / 2
  return {'to the left of': x[j] - x[i], 'to the right of': x[i] - x[j],
          'above': y[j] - y[i], 'below': y[i] - y[j]}[relation] > MARGIN


def solve(scene, text):
  """(answer, answer_type, question_type) of a question, from the scene alone."""
  m = re.fullmatch(f'what shape is {REL} the (.+)\\?', text)
  if m or (m := re.fullmatch(f'what color is the object {REL} the (.+)\\?', text)):
    j = the_one(scene, m.group(2))
    related = [k for k in range(scene.num_objects) if holds(scene, k, m.group(1), j)]
    assert len(related) == 1, text
    attr = SHAPES[scene.shape[related[0]]] if text.startswith('what shape') else (
        COLORS[scene.color[related[0]]])
    return attr, 'other', 'relation_query'
  if m := re.fullmatch('what (color|shape|size) is the (.+)\\?', text):
    asked = m.group(1)
    assert asked not in parse(m.group(2)), text  # the question does not give it away
    i = the_one(scene, m.group(2))
    names = {'color': (COLORS, scene.color), 'shape': (SHAPES, scene.shape),
             'size': (SIZES, scene.size)}[asked]
    return names[0][names[1][i]], 'other', asked
  if m := re.fullmatch('how many (.+) are there\\?', text):
    return str(len(objects(scene, parse(m.group(1), plural=True)))), 'number', 'count'
  if m := re.fullmatch('is there (a|an) (.+)\\?', text):
    assert m.group(1) == ('an' if m.group(2)[0] in 'aeiou' else 'a'), text
    return ('yes' if objects(scene, parse(m.group(2))) else 'no'), 'yes/no', 'exist'
  if m := re.fullmatch(f'is the (.+?) {REL} the (.+)\\?', text):
    i, j = the_one(scene, m.group(1)), the_one(scene, m.group(3))
    if holds(scene, i, m.group(2), j):
      return 'yes', 'yes/no', 'relation_verify'
    # A "no" is clear-cut: the opposite relation holds.
    opposite = {'to the left of': 'to the right of', 'to the right of': 'to the left of',
                'above': 'below', 'below': 'above'}[m.group(2)]
    assert holds(scene, i, opposite, j), text
    return 'no', 'yes/no', 'relation_verify'
  raise AssertionError(f'unparsed question {text!r}')


def referent(scene, sentence):
  """The one object an expression names (asserting it names exactly one)."""
  m = re.fullmatch(f'the (.+?)(?: {REL} the (.+))?', sentence)
  assert m, sentence
  candidates = objects(scene, parse(m.group(1)))
  if m.group(2):
    j = the_one(scene, m.group(3))
    candidates = [k for k in candidates if holds(scene, k, m.group(2), j)]
  assert len(candidates) == 1, (sentence, candidates)
  return candidates[0], ('relation' if m.group(2) else 'attributes'), parse(m.group(1))


def normalise(answer):  # enough of the VQA normalisation for this world's answers
  a = answer.strip().lower()
  return str(WORDS.index(a)) if a in WORDS else a


def record_scene(world, image_id):
  return scenes_world.scene_from_record(world.raw_record(image_id))


@pytest.fixture(scope='module')
def world_tasks():
  world = scenes_world.SceneWorld(0, 64)
  out = []
  for image_id in list(range(250)) + [10_000_000 + i for i in range(50)]:
    scene = record_scene(world, image_id)
    out.append((scene, *scenes_tasks.make_tasks(scene, 0)))
  return out


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  builder = scenes.prepare_scenes(tmp_path_factory.mktemp('scenes_tasks'), feature_dim=64,
                                  size='small')
  return builder, Tokenizer(scenes.tokenizer_path(builder))


# ----------------------------------------------------------------- generators
def test_question_answers_recomputed_from_scene(world_tasks):
  families, types, ids = collections.Counter(), collections.Counter(), set()
  for scene, questions, _ in world_tasks:
    assert scenes_tasks.MIN_QUESTIONS <= len(questions) <= scenes_tasks.MAX_QUESTIONS
    assert len({q.question for q in questions}) == len(questions)
    for slot, q in enumerate(questions):
      answer, answer_type, family = solve(scene, q.question)
      assert (q.answer, q.answer_type, q.question_type) == (answer, answer_type, family), q
      assert q.answer in scenes_tasks.ANSWER_VOCAB
      assert q.question_id == scene.image_id * 10 + slot
      ids.add(q.question_id)
      families[family] += 1
      types[answer_type] += 1
  assert len(ids) == sum(families.values())
  assert set(families) == set(scenes_tasks.QUESTION_TYPES)
  assert min(families.values()) > 0.05 * sum(families.values())
  assert set(types) == {'yes/no', 'number', 'other'}
  yes_no = collections.Counter(q.answer for _, qs, _ in world_tasks for q in qs
                               if q.answer_type == 'yes/no')
  assert 0.35 < yes_no['yes'] / sum(yes_no.values()) < 0.65


def test_refexps_name_exactly_their_target(world_tasks):
  kinds, per_image = collections.Counter(), collections.Counter()
  for scene, _, refexps in world_tasks:
    per_image[len(refexps)] += 1
    assert len({r.target_index for r in refexps}) == len(refexps)
    for slot, r in enumerate(refexps):
      target, kind, head = referent(scene, r.sentence)
      assert (r.target_index, r.kind) == (target, kind)
      assert r.ref_id == scene.image_id * 10 + slot
      np.testing.assert_array_equal(r.target_box, scene.boxes[target])
      kinds[kind] += 1
      if kind == 'attributes':  # shortest: no smaller attribute set is unique
        own = {'size': scene.size[target], 'color': scene.color[target],
               'shape': scene.shape[target]}
        for r_len in range(1, len(head)):
          for attrs in itertools.combinations(own, r_len):
            assert len(objects(scene, {a: own[a] for a in attrs})) > 1, r.sentence
  assert set(per_image) <= {1, 2, 3} and len(per_image) == 3
  assert kinds['relation'] > 0.15 * sum(kinds.values())
  assert kinds['attributes'] > 0.4 * sum(kinds.values())


def test_human_answers_noisy_but_majority_right(world_tasks):
  disagree = synonyms = 0
  for _, questions, _ in world_tasks:
    for q in questions:
      assert len(q.answers) == 10
      norm = [normalise(a) for a in q.answers]
      assert norm.count(q.answer) >= 6, q
      assert collections.Counter(norm).most_common(1)[0][0] == q.answer
      for a in set(norm) - {q.answer}:  # mistakes are plausible ones
        if q.answer_type == 'number':
          assert abs(int(a) - int(q.answer)) == 1, q
        elif q.answer_type == 'yes/no':
          assert {a, q.answer} == {'yes', 'no'}
        else:
          kinds = [set(SIZES), set(COLORS), set(SHAPES)]
          assert any(a in k and q.answer in k for k in kinds), q
      disagree += len(set(norm)) > 1
      synonyms += any(a != normalise(a) for a in q.answers)
  total = sum(len(qs) for _, qs, _ in world_tasks)
  assert 0.4 < disagree / total < 0.9 and synonyms > 0.2 * total


def test_soft_scores_by_hand():
  vocab = list(scenes_tasks.ANSWER_VOCAB)
  label_of = {a: i for i, a in enumerate(vocab)}
  answers = ['2', 'two', '2', '3', 'Three', '2', '1', '2', '2', 'two']
  labels, scores = soft_targets(answers, label_of)
  got = dict(zip((vocab[i] for i in labels), scores.tolist()))
  assert got == pytest.approx({'2': 1.0, '3': 2 / 3, '1': 1 / 3})
  labels, scores = soft_targets(answers, label_of, 'official')
  got = dict(zip((vocab[i] for i in labels), scores.tolist()))
  assert got == pytest.approx({'2': 1.0, '3': 0.6, '1': 0.3})
  with pytest.raises(ValueError, match='consensus'):
    soft_targets(answers, label_of, 'majority')


def test_tasks_deterministic_and_captions_unchanged():
  world = scenes_world.SceneWorld(0, 64)
  scene = record_scene(world, 5)
  assert scenes_tasks.make_tasks(scene, 0) == scenes_tasks.make_tasks(scene, 0)
  assert scenes_tasks.make_tasks(scene, 1)[0] != scenes_tasks.make_tasks(scene, 0)[0]
  for image_id, captions in OLD_CAPTIONS.items():
    assert world.captions(image_id) == captions
    assert world.record(image_id)['captions'] == captions


# ----------------------------------------------------------------- builder
def _decoded(value):
  return value.decode() if isinstance(value, bytes) else value


def test_builder_stores_tasks_of_the_record_scene(built):
  builder, tok = built
  assert builder.version == vlp_scenes.CURRENT_VERSION
  assert scenes.answer_vocab(builder) == list(scenes_tasks.ANSWER_VOCAB)
  world = scenes_world.SceneWorld(0, 64)
  for split, n in (('train', 200), ('val', 40), ('test', 100)):
    source = builder.as_data_source(split)
    for i in range(0, n, 7):
      rec = source[i]
      scene = scenes_world.scene_from_record(rec)
      assert [c.decode() for c in rec['captions']] == world.captions(rec['image_id'])
      questions, refexps = scenes_tasks.make_tasks(scene, 0)
      q = rec['questions']
      assert [_decoded(t) for t in q['question']] == [x.question for x in questions]
      assert list(q['question_id']) == [x.question_id for x in questions]
      for stored, x in zip(q['answers'], questions):
        assert [_decoded(a) for a in stored] == list(x.answers)
      assert [_decoded(t) for t in q['multiple_choice_answer']] == [x.answer for x in questions]
      assert [_decoded(t) for t in q['answer_type']] == [x.answer_type for x in questions]
      assert [_decoded(t) for t in q['question_type']] == [x.question_type for x in questions]
      for text, answer in zip(q['question'], q['multiple_choice_answer']):
        assert solve(scene, _decoded(text))[0] == _decoded(answer)
      r = rec['refexps']
      for sentence, target, box in zip(r['sentence'], r['target_index'], r['target_box']):
        assert referent(scene, _decoded(sentence))[0] == target
        np.testing.assert_array_equal(box, rec['boxes'][target])
      assert list(r['ref_id']) == [x.ref_id for x in refexps]
  # The tokenizer covers questions and expressions (no unknown pieces).
  rec = builder.as_data_source('test')[3]
  texts = [_decoded(t) for t in [*rec['questions']['question'], *rec['refexps']['sentence']]]
  assert all(tok.unk_id not in p and len(p) <= 20 for p in tok.encode_batch(texts))


def test_official_vqa_json_files(built):
  builder, _ = built
  q_path, a_path = scenes.vqa_json_paths(builder, 'val')
  with open(q_path) as f:
    questions = json.load(f)
  with open(a_path) as f:
    annotations = json.load(f)
  source = builder.as_data_source('val')
  records = [source[i] for i in range(len(source))]
  want = [(int(r['image_id']), int(qid), _decoded(t)) for r in records
          for qid, t in zip(r['questions']['question_id'], r['questions']['question'])]
  assert [(q['image_id'], q['question_id'], q['question'])
          for q in questions['questions']] == want
  anns = annotations['annotations']
  assert [a['question_id'] for a in anns] == [w[1] for w in want]
  for a in anns:
    assert set(a) == {'question_id', 'image_id', 'answer_type', 'question_type',
                      'multiple_choice_answer', 'answers'}
    assert [x['answer_id'] for x in a['answers']] == list(range(1, 11))
    assert sum(normalise(x['answer']) == a['multiple_choice_answer']
               for x in a['answers']) >= 6
  assert os.path.exists(scenes.vqa_json_paths(builder, 'test')[1])
  with pytest.raises(ValueError, match="not 'train'"):
    scenes.vqa_json_paths(builder, 'train')


def test_old_version_is_read_only(tmp_path):
  with pytest.raises(ValueError, match='only the newest version'):
    scenes.prepare_scenes(tmp_path, size='small', version='1.0.0')
  with pytest.raises(ValueError, match='version must be one of'):
    scenes.scenes_builder(tmp_path, version='0.9.0')


# ----------------------------------------------------------------- batches
def _records(builder, split):
  source = builder.as_data_source(split)
  return {int(r['image_id']): r for r in (source[i] for i in range(len(source)))}


def _check_rows(batch, records, tok, task):
  """Every real row against its record, recomputed from stored fields."""
  vocab = scenes_tasks.ANSWER_VOCAB
  for i in np.flatnonzero(batch['example_mask']):
    rec = records[int(batch['image_id'][i])]
    n = len(rec['boxes'])
    assert batch['img_mask'][i].sum() == n
    np.testing.assert_array_equal(batch['img_feat'][i, :n], rec['features'])
    np.testing.assert_array_equal(batch['img_pos'][i, :n], rec['img_pos'])
    text = tok.decode(batch['input_ids'][i])
    if task == 'vqa':
      q = rec['questions']
      slot = list(q['question_id']).index(batch['question_id'][i])
      assert text == _decoded(q['question'][slot])
      counts = collections.Counter(normalise(_decoded(a)) for a in q['answers'][slot])
      want = np.array([min(1, counts[v] / 3) for v in vocab], np.float32)
      np.testing.assert_allclose(batch['vqa_targets'][i], want, rtol=1e-6)
    else:
      r = rec['refexps']
      slot = list(r['ref_id']).index(batch['ref_id'][i])
      assert text == _decoded(r['sentence'][slot])
      scene = scenes_world.scene_from_record(rec)
      target = referent(scene, text)[0]
      assert batch['target_region'][i] == target
      np.testing.assert_array_equal(batch['img_boxes'][i, :n], rec['boxes'])
      np.testing.assert_array_equal(batch['gt_box'][i], rec['boxes'][target])
      np.testing.assert_array_equal(batch['gt_box'][i],
                                    batch['img_boxes'][i, batch['target_region'][i]])
  pad = ~batch['example_mask']
  ids = batch['question_id' if task == 'vqa' else 'ref_id']
  assert np.all(ids[pad] == -1) and not batch['txt_mask'][pad].any()
  assert not batch['img_mask'][pad].any()


@pytest.mark.parametrize('task', db.TASKS)
def test_train_batches(built, task):
  builder, tok = built
  records = _records(builder, 'train')
  it = db.make_task_train_iterator(builder, SPEC, task=task, tokenizer=tok, seed=5)
  batches = [next(it) for _ in range(4)]
  b, t, k = SPEC.batch_size, SPEC.max_text_len, SPEC.max_regions
  common = {'input_ids': ((b, t), np.int32), 'txt_mask': ((b, t), bool),
            'img_feat': ((b, k, 64), np.float16), 'img_pos': ((b, k, 7), np.float32),
            'img_mask': ((b, k), bool), 'soft_labels': ((b, k, 9), np.float16),
            'image_id': ((b,), np.int64), 'example_mask': ((b,), bool)}
  extra = ({'vqa_targets': ((b, len(scenes_tasks.ANSWER_VOCAB)), np.float32),
            'question_id': ((b,), np.int64)} if task == 'vqa' else
           {'img_boxes': ((b, k, 4), np.float32), 'target_region': ((b,), np.int32),
            'gt_box': ((b, 4), np.float32), 'ref_id': ((b,), np.int64)})
  for batch in batches:
    assert {key: (v.shape, v.dtype) for key, v in batch.items()} == {**common, **extra}
    assert batch['example_mask'].all()
    _check_rows(batch, records, tok, task)
  # Deterministic from the seed; resumable from the stored position.
  state = it.get_state()
  following = next(it)
  again = db.make_task_train_iterator(builder, SPEC, task=task, tokenizer=tok, seed=5)
  np.testing.assert_array_equal(next(again)['input_ids'], batches[0]['input_ids'])
  again.set_state(state)
  resumed = next(again)
  for key in following:
    np.testing.assert_array_equal(resumed[key], following[key], err_msg=key)
  other = next(db.make_task_train_iterator(builder, SPEC, task=task, tokenizer=tok, seed=6))
  key = 'question_id' if task == 'vqa' else 'ref_id'
  assert not np.array_equal(other[key], batches[0][key])
  # One epoch visits every example of the process's images exactly once.
  shard = db.make_task_train_iterator(builder, SPEC, task=task, tokenizer=tok, seed=5,
                                      process_index=1, process_count=2)
  n = len(shard.examples)
  seen = [x for _ in range(-(-n // b)) for x in next(shard)[key]]
  assert sorted(seen[:n]) == sorted(shard.examples.ids.tolist())
  assert all(100 <= i // 10 < 200 for i in seen[:n])  # its images: train 100..199


@pytest.mark.parametrize('task', db.TASKS)
def test_eval_batches_pad_and_cover_every_example_once(built, task):
  builder, tok = built
  records = _records(builder, 'val')
  field = 'questions' if task == 'vqa' else 'refexps'
  id_key = 'question_id' if task == 'vqa' else 'ref_id'
  want = sorted(int(i) for r in records.values() for i in r[field][id_key])
  seen, lengths = [], set()
  for p in range(3):
    ev = db.make_task_eval_dataset(builder, SPEC, task=task, tokenizer=tok, split='val',
                                   shards=[p], num_shards=3)
    lengths.add(len(ev))
    batches = list(ev)
    assert len(batches) == len(ev) == math.ceil(math.ceil(len(want) / 3) / SPEC.batch_size)
    for batch in batches:
      _check_rows(batch, records, tok, task)
      seen += batch[id_key][batch['example_mask']].tolist()
    assert sum(int(x['example_mask'].sum()) for x in batches) == ev.num_examples
  assert len(lengths) == 1 and sorted(seen) == want
  # Shards 2 and 0 of 3 together: each batch is shard 2's rows, then shard 0's, and
  # `example_index` names each row's example in the one-shard order (-1 on padding).
  whole = db.make_task_eval_dataset(builder, SPEC, task=task, tokenizer=tok, split='val')
  ids = np.concatenate([b[id_key][b['example_mask']] for b in whole])
  two = db.make_task_eval_dataset(builder, SPEC, task=task, tokenizer=tok, split='val',
                                  shards=[2, 0], num_shards=3)
  lo2 = len(want) * 2 // 3
  for b in range(len(two)):
    batch = two[b]
    assert len(batch[id_key]) == 2 * SPEC.batch_size
    real = batch['example_mask']
    np.testing.assert_array_equal(batch['example_index'][~real], -1)
    np.testing.assert_array_equal(ids[batch['example_index'][real]], batch[id_key][real])
    first = batch['example_index'][:SPEC.batch_size][real[:SPEC.batch_size]]
    assert (first >= lo2).all()
    assert (batch['example_index'][SPEC.batch_size:] < lo2).all()


def test_batch_errors(built):
  builder, tok = built
  with pytest.raises(ValueError, match="task must be one of"):
    db.make_task_eval_dataset(builder, SPEC, task='nlvr', tokenizer=tok)
  small = BatchSpec(batch_size=4, max_text_len=24, max_regions=3, feature_dim=64)
  with pytest.raises(ValueError, match='raise max_regions'):
    db.make_task_eval_dataset(builder, small, task='re', tokenizer=tok)
  with pytest.raises(ValueError, match='target_scores'):
    db.make_task_eval_dataset(builder, SPEC, task='vqa', tokenizer=tok, target_scores='x')
  with pytest.raises(ValueError, match='normalise to the same'):
    db.make_task_eval_dataset(builder, SPEC, task='vqa', tokenizer=tok,
                              answers=['two', '2'])


@pytest.mark.parametrize('task', db.TASKS)
def test_generic_decoding_indexes_the_same_examples(built, task, monkeypatch):
  builder, _ = built
  label_of = {a: i for i, a in enumerate(scenes_tasks.ANSWER_VOCAB)}
  targets = SoftTargets(label_of, 'consensus') if task == 'vqa' else None
  fast_split = ImageRecords(builder, 'val', 64, captions=False, boxes=True)
  assert fast_split.fast and 'boxes' in fast_split.layout
  fast = examples.index_scene_examples(fast_split, task, 5, 30, max_regions=10,
                                       targets=targets)
  fast_boxes = fast_split.read([3])[0]['boxes']
  monkeypatch.setattr(record_reader, 'tf_example_pb2', None)  # tfds' own decoder instead
  slow_split = ImageRecords(builder, 'val', 64, captions=False, boxes=True)
  assert not slow_split.fast
  slow = examples.index_scene_examples(slow_split, task, 5, 30, max_regions=10,
                                       targets=targets)
  assert len(fast) > 25 and fast.texts == slow.texts
  for name in examples.ExampleIndex.ATTRS:
    a, b = getattr(fast, name), getattr(slow, name)
    assert len(a) == len(b) == (len(fast) if len(a) else 0), name
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y, err_msg=name)
  if task == 'vqa':  # the raw answers of a question, as stored
    rec = builder.as_data_source('val')[int(fast.rows[0])]['questions']
    slot = list(rec['question_id']).index(fast.ids[0])
    assert fast.answers[0] == [a.decode() for a in rec['answers'][slot]]
    assert fast.question_type[0] == rec['question_type'][slot].decode()
  np.testing.assert_array_equal(fast_boxes, slow_split.read([3])[0]['boxes'])


def test_official_scores_option(built):
  builder, tok = built
  records = _records(builder, 'val')
  ev = db.make_task_eval_dataset(builder, SPEC, task='vqa', tokenizer=tok,
                                 target_scores='official')
  official = {0: 0.0, 1: 0.3, 2: 0.6, 3: 0.9}
  batch = ev[1]
  for i in np.flatnonzero(batch['example_mask']):
    q = records[int(batch['image_id'][i])]['questions']
    slot = list(q['question_id']).index(batch['question_id'][i])
    counts = collections.Counter(normalise(_decoded(a)) for a in q['answers'][slot])
    want = [official.get(counts[v], 1.0) for v in scenes_tasks.ANSWER_VOCAB]
    np.testing.assert_allclose(batch['vqa_targets'][i], want, rtol=1e-6)
