"""VQA and RefCOCO fine-tuning on the real-dataset builders, built from fixtures.

The fixtures are the official formats (as tests/test_builders_vqa.py and
tests/test_builders_refcoco.py write them): VQA v2 question / annotation JSON
plus a bottom-up-attention TSV; the refer toolkit's refs pickle, COCO
instances.json and per-image npz features. Every expectation is recomputed here
from the fixture itself (hand answer normalisation and leave-one-out accuracy,
numpy IoU), never from the builders' or evaluators' code.

* batches: keys / shapes / dtypes as on vlp_scenes; each row holds its
  question's text, its image's features and boxes, targets equal to the hand
  computed official scores / argmax-IoU region; deterministic from the seed,
  resumable, disjoint per-process shards; eval batches cover each example once
  with padding rows masked;
* VQA evaluation: annotations rebuilt from the records equal the official file;
  the fine-tuned model's results file is scored exactly as by hand; test_dev
  gets a results file and no accuracy;
* RefCOCO evaluation: a build on the ground-truth boxes is the "gt" setting, a
  second build on detector boxes (`det_data_dir`) the "det" one; per split the
  reported accuracy equals numpy IoU >= 0.5 over the predicted boxes, each of
  which is a region of its image;
* WordPiece: VQA and RefCOCO batches tokenised with a BERT vocabulary hold the hand
  tokenisation of their texts; the run's tokenizer follows `init_from`.
"""

import json
import os
import re
import types

import jax
import numpy as np
import pytest

from vlp import checkpoint as ckpt_lib, pretrained
from vlp.data import downstream as dr
from vlp.data import examples, prepare, vqa_targets
from vlp.data import records as record_reader
from vlp.data.image_records import ImageRecords
from vlp.data.batching import BatchSpec
from vlp.data.builders import vlp_scenes, vqa_v2
from vlp.data.tokenizer import Tokenizer, WordPieceTokenizer
from vlp.jobs import data_setup, grounding
from vlp.evaluators import vqa as vqa_eval
from vlp.train import loop

from real_format_fixtures import (D, POOL, ann_box, det_regions, expected_vocab, gt_regions,
                                  hand_accuracy, np_iou, ref_sentences, write_refcoco,
                                  write_vg_qa, write_vqa, xyxy)
from test_finetune import small  # The small-model config helper.

ONE = jax.devices()[:1]


# ------------------------------------------------------------------ builds
@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('real')
  questions, feats = write_vqa(str(root / 'vqa_manual'))
  # devval_every=2: of the val images 5..8, 6 and 8 are held out (devval).
  vqa, _ = prepare.prepare('vqa_v2', manual_dir=root / 'vqa_manual', data_dir=root / 'vqa',
                           feature_dim=D, num_answers=5, devval_every=2)
  write_vg_qa(str(root / 'vg_manual'), expected_vocab(questions))
  vg, _ = prepare.prepare('vg_qa', manual_dir=root / 'vg_manual', data_dir=root / 'vqa',
                          feature_dim=D)  # next to vqa_v2, as the VQA recipe reads both
  refs = {}
  for kind, regions_of in (('gt', gt_regions), ('det', det_regions)):
    write_refcoco(str(root / f'ref_manual_{kind}'), regions_of)
    refs[kind], _ = prepare.prepare('refcoco', manual_dir=root / f'ref_manual_{kind}',
                                    data_dir=root / f'ref_{kind}', feature_dim=D,
                                    conf_th=-1, min_bb=1)
  texts = [q['question'] for qs in questions.values() for q in qs]
  texts += [raw for *_, sents in ref_sentences() for _, raw in sents]
  spm_path = root / 'spm.model'
  spm_path.write_bytes(vlp_scenes.train_spm(texts * 3, vocab_size=120))
  return dict(root=root, vqa=vqa, vg=vg, questions=questions, feats=feats, refs=refs,
              tokenizer=Tokenizer(str(spm_path)))


SPEC = BatchSpec(batch_size=6, max_text_len=16, max_regions=5, feature_dim=D)
COMMON = {'input_ids': ((6, 16), np.int32), 'txt_mask': ((6, 16), bool),
          'img_feat': ((6, 5, D), np.float16), 'img_pos': ((6, 5, 7), np.float32),
          'img_mask': ((6, 5), bool), 'soft_labels': ((6, 5, 0), np.float16),
          'image_id': ((6,), np.int64), 'example_mask': ((6,), bool)}


def _check_text(batch, i, text, tok):
  ids = [tok.cls_id] + tok.encode(text)[:SPEC.max_text_len - 2] + [tok.sep_id]
  np.testing.assert_array_equal(batch['input_ids'][i, :len(ids)], ids)
  assert batch['txt_mask'][i].sum() == len(ids)


def _check_vqa_rows(batch, by_qid, feats, vocab, tok):
  for i in np.flatnonzero(batch['example_mask']):
    q = by_qid[int(batch['question_id'][i])]
    assert batch['image_id'][i] == q['image_id']
    np.testing.assert_array_equal(batch['img_feat'][i, :3], feats[q['image_id']])
    assert batch['img_mask'][i].tolist() == [True] * 3 + [False] * 2
    _check_text(batch, i, q['question'], tok)
    want = [hand_accuracy(a, q['answers']) for a in vocab]
    np.testing.assert_allclose(batch['vqa_targets'][i], want, atol=1e-6)
  pad = ~batch['example_mask']
  assert (batch['question_id'][pad] == -1).all() and not batch['vqa_targets'][pad].any()
  assert not batch['img_mask'][pad].any() and not batch['txt_mask'][pad].any()


def test_vqa_v2_train_batches(built):
  builder, tok, qs = built['vqa'], built['tokenizer'], built['questions']
  vocab = expected_vocab(qs)
  assert dr.layout(builder, 'vqa') == 'examples' and vqa_v2.answer_vocab(builder) == vocab
  by_qid = {q['question_id']: q for q in qs['train']}
  it = dr.make_task_train_iterator(builder, SPEC, task='vqa', tokenizer=tok, seed=3)
  batches = [next(it) for _ in range(7)]  # > one epoch of 36 questions
  for batch in batches:
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        **COMMON, 'vqa_targets': ((6, 5), np.float32), 'question_id': ((6,), np.int64)}
    assert batch['example_mask'].all()
    _check_vqa_rows(batch, by_qid, built['feats'], vocab, tok)
  first_epoch = np.concatenate([b['question_id'] for b in batches[:6]])
  assert sorted(first_epoch) == sorted(by_qid)  # every question once per epoch
  # Deterministic from the seed, resumable from the stored position.
  again = dr.make_task_train_iterator(builder, SPEC, task='vqa', tokenizer=tok, seed=3)
  again.set_state({'next_index': 4})
  for key, value in next(again).items():
    np.testing.assert_array_equal(value, batches[4][key], err_msg=key)
  other = dr.make_task_train_iterator(builder, SPEC, task='vqa', tokenizer=tok, seed=4)
  assert not np.array_equal(next(other)['question_id'], batches[0]['question_id'])
  # Two data shards: contiguous halves of the questions, one epoch each.
  seen = []
  for p in range(2):
    shard = dr.make_task_train_iterator(builder, SPEC, task='vqa', tokenizer=tok, seed=3,
                                        process_index=p, process_count=2)
    ids = np.concatenate([next(shard)['question_id'] for _ in range(3)])
    assert sorted(ids) == sorted(q['question_id'] for q in qs['train'][18 * p:18 * (p + 1)])
    seen += list(ids)
  assert sorted(seen) == sorted(by_qid)


def test_vqa_v2_trains_on_train_plus_restval(built):
  builder, tok, qs = built['vqa'], built['tokenizer'], built['questions']
  vocab = expected_vocab(qs)
  restval = [q for q in qs['val'] if q['image_id'] in (5, 7)]
  assert sorted(q['question_id'] for q in restval) == sorted(
      int(r['question_id']) for r in builder.as_data_source('restval'))
  assert sorted(int(r['question_id']) for r in builder.as_data_source('devval')) == sorted(
      q['question_id'] for q in qs['val'] if q['image_id'] in (6, 8))
  listed = qs['train'] + restval  # train, then restval: one list of 42 questions
  by_qid = {q['question_id']: q for q in listed}
  make = lambda **kw: dr.make_task_mixture_iterator(  # noqa: E731
      [(builder, ['train', 'restval'])], SPEC, task='vqa', tokenizer=tok, seed=3,
      name='vqa', **kw)
  it = make()
  batches = [next(it) for _ in range(8)]
  for batch in batches:
    assert batch['example_mask'].all()
    _check_vqa_rows(batch, by_qid, built['feats'], vocab, tok)
  first_epoch = np.concatenate([b['question_id'] for b in batches[:7]])
  assert sorted(first_epoch) == sorted(by_qid)  # every question once per epoch
  assert it.get_state() == {'next_index': 8, 'data': 'vqa'}
  again = make()
  again.set_state({'next_index': 5, 'data': 'vqa'})
  for key, value in next(again).items():
    np.testing.assert_array_equal(value, batches[5][key], err_msg=key)
  # Two data shards: contiguous halves of the list (21 questions each).
  for p in range(2):
    shard = make(process_index=p, process_count=2)
    ids = np.concatenate([next(shard)['question_id'] for _ in range(4)])[:21]
    assert sorted(ids) == sorted(q['question_id'] for q in listed[21 * p:21 * (p + 1)])
  # One split through the list reads what the one-split iterator reads.
  one = dr.make_task_mixture_iterator([(builder, ['train'])], SPEC, task='vqa',
                                      tokenizer=tok, seed=3)
  ref = dr.make_task_train_iterator(builder, SPEC, task='vqa', tokenizer=tok, seed=3)
  for _ in range(2):
    a, b = next(one), next(ref)
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize('reverse', [False, True])
def test_vqa_v2_and_vg_qa_as_one_list(built, reverse):
  vqa, vg, tok, qs = built['vqa'], built['vg'], built['tokenizer'], built['questions']
  vocab = expected_vocab(qs)
  # reverse: another label order (an ans2label file): both datasets' targets recomputed.
  answers = vocab[::-1] if reverse else None
  labels = vocab[::-1] if reverse else vocab
  vg_qs = {r['question_id']: r for r in
           (vg.as_data_source('train')[i] for i in range(len(vg.as_data_source('train'))))}
  assert len(vg_qs) == 4  # one of the 5 VG answers is outside the vocabulary
  by_qid = {q['question_id']: q for q in qs['train']}
  it = dr.make_task_mixture_iterator([(vqa, ['train']), (vg, ['train'])], SPEC, task='vqa',
                                     tokenizer=tok, seed=5, answers=answers)
  batches = [next(it) for _ in range(7)]  # 36 + 4 questions, and some of the next epoch
  ids = np.concatenate([b['question_id'] for b in batches])
  assert sorted(ids[:40]) == sorted(list(by_qid) + list(vg_qs))
  vg_rows = 0
  for batch in batches:
    for i in range(6):
      qid = int(batch['question_id'][i])
      if qid in by_qid:
        q = by_qid[qid]
        want = [hand_accuracy(a, q['answers']) for a in labels]
        np.testing.assert_allclose(batch['vqa_targets'][i], want, atol=1e-6)
        np.testing.assert_array_equal(batch['img_feat'][i, :3], built['feats'][q['image_id']])
        continue
      vg_rows += 1
      r = vg_qs[qid]
      answer = r['answers'][0].decode()
      want = np.zeros(len(vocab), np.float32)
      want[labels.index(answer)] = 1.0  # its one answer, given by all 10 "humans"
      np.testing.assert_array_equal(batch['vqa_targets'][i], want)
      assert batch['image_id'][i] == r['image_id'] and r['image_id'] >= 11
      # The VG image's regions, not the COCO image of the same row number.
      assert batch['img_feat'][i, 0, 0] == np.float16(r['image_id'] + 0.5)
      _check_text(batch, i, r['question'].decode(), tok)
  assert vg_rows >= 4


def test_vqa_v2_labels_follow_an_ans2label_file(built, tmp_path):
  # UNITER's ans2label.json layout ({answer: label}): the data's own answers in
  # reverse order plus one it never saw; targets are recomputed over that order.
  builder, tok, qs = built['vqa'], built['tokenizer'], built['questions']
  order = expected_vocab(qs)[::-1] + ['zebra']
  path = tmp_path / 'ans2label.json'
  path.write_text(json.dumps({a: i for i, a in enumerate(order)}))
  answers = vqa_targets.read_answer_vocab(str(path))
  assert answers == order
  ev = dr.make_task_eval_dataset(builder, SPEC, task='vqa', tokenizer=tok, split='val',
                                 answers=answers)
  by_qid = {q['question_id']: q for q in qs['val']}
  for batch in ev:
    assert batch['vqa_targets'].shape == (6, len(order))
    _check_vqa_rows(batch, by_qid, built['feats'], order, tok)
  it = dr.make_task_train_iterator(builder, SPEC, task='vqa', tokenizer=tok, seed=3,
                                   answers=answers)
  _check_vqa_rows(next(it), {q['question_id']: q for q in qs['train']}, built['feats'], order,
                  tok)
  with pytest.raises(ValueError, match="target_scores must recompute"):
    dr.make_task_eval_dataset(builder, SPEC, task='vqa', tokenizer=tok, split='val',
                              answers=answers, target_scores='stored')
  path.write_text(json.dumps({'yes': 0, 'no': 2}))
  with pytest.raises(ValueError, match=r"ans2label.json: expected \{answer: label\} with the "
                                       r"labels 0..1"):
    vqa_targets.read_answer_vocab(str(path))


def test_vqa_v2_eval_batches_and_annotations(built):
  builder, tok, qs = built['vqa'], built['tokenizer'], built['questions']
  by_qid = {q['question_id']: q for q in qs['val']}
  seen, lengths = [], set()
  for p in range(3):
    ev = dr.make_task_eval_dataset(builder, SPEC, task='vqa', tokenizer=tok, split='val',
                                   shards=[p], num_shards=3)
    lengths.add(len(ev))
    for batch in ev:
      _check_vqa_rows(batch, by_qid, built['feats'], expected_vocab(qs), tok)
      seen += batch['question_id'][batch['example_mask']].tolist()
  assert lengths == {1} and sorted(seen) == sorted(by_qid)  # ceil(ceil(11/3)/6) = 1
  annotations = dr.vqa_annotations(ev.split_index)
  with open(built['root'] / 'vqa_manual' / vqa_v2.FILES['val'][1]) as f:
    official = json.load(f)['annotations']
  for ann in official:
    for a in ann['answers']:
      del a['answer_confidence']
  assert annotations == official
  # Any predictions score the same against both, and as by hand.
  rng = np.random.default_rng(0)
  results = [{'question_id': q, 'answer': POOL[rng.integers(len(POOL))]} for q in by_qid]
  got = vqa_eval.vqa_accuracy(results, annotations, digits=None)
  assert got == vqa_eval.vqa_accuracy(results, {'annotations': official}, digits=None)
  hand = np.mean([hand_accuracy(r['answer'], by_qid[r['question_id']]['answers'])
                  for r in results])
  assert got['overall'] == pytest.approx(100 * hand)
  test = dr.make_task_eval_dataset(builder, SPEC, task='vqa', tokenizer=tok, split='test_dev')
  assert dr.vqa_annotations(test.split_index) is None
  assert sorted(test.ids) == sorted(q['question_id'] for q in qs['test_dev'])


def _ref_table():
  return {sid: (ref_id, ann_id, image_id, split, raw)
          for ref_id, ann_id, image_id, split, sents in ref_sentences() for sid, raw in sents}


@pytest.mark.parametrize('kind', ['gt', 'det'])
def test_refcoco_batches_and_region_setting(built, kind):
  builder, tok = built['refs'][kind], built['tokenizer']
  regions_of = gt_regions if kind == 'gt' else det_regions
  table = _ref_table()
  by_ref = {}
  for ref_id, ann_id, image_id, split, raw in table.values():
    by_ref.setdefault(ref_id, []).append((ann_id, image_id, split, raw))
  datasets = {}
  for split in ('val', 'testA', 'testB'):
    ev = dr.make_task_eval_dataset(builder, SPEC, task='re', tokenizer=tok, split=split)
    datasets[split] = ev
    (batch,) = list(ev)
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        **COMMON, 'img_boxes': ((6, 5, 4), np.float32), 'target_region': ((6,), np.int32),
        'gt_box': ((6, 4), np.float32), 'ref_id': ((6,), np.int64),
        'example_index': ((6,), np.int64)}
    keep = batch['example_mask']
    # Each row's example_index points at its own expression in the split index.
    np.testing.assert_array_equal(
        ev.split_index.ids[batch['example_index'][keep]], batch['ref_id'][keep])
    assert keep.sum() == 3 and sorted(ev.split_index.sent_ids) == sorted(
        s for s, v in table.items() if v[3] == split)
    for i in np.flatnonzero(keep):
      ((ann_id, image_id, s, _), *_) = by_ref[int(batch['ref_id'][i])]
      assert s == split and batch['image_id'][i] == image_id
      regions = np.float32(regions_of(image_id))
      np.testing.assert_allclose(batch['img_boxes'][i, :len(regions)], regions, atol=1e-3)
      assert not batch['img_boxes'][i, len(regions):].any()
      gt = xyxy(ann_box(image_id, ann_id % 10))
      np.testing.assert_allclose(batch['gt_box'][i], gt)
      assert batch['target_region'][i] == np.argmax([np_iou(gt, r) for r in regions])
    assert (batch['ref_id'][~keep] == -1).all() and not batch['img_mask'][~keep].any()
  setting, why = grounding.region_setting('examples', datasets)
  assert setting == kind, why
  it = dr.make_task_train_iterator(builder, SPEC, task='re', tokenizer=tok, seed=1)
  batch = next(it)
  for i in range(6):
    sid = [s for s, v in table.items() if v[0] == batch['ref_id'][i]]
    assert table[sid[0]][3] == 'train'
    texts = [table[s][4] for s in sid]
    ids = batch['input_ids'][i, 1:batch['txt_mask'][i].sum() - 1].tolist()
    assert ids in [tok.encode(t) for t in texts]
  tight = BatchSpec(batch_size=6, max_text_len=16, max_regions=1, feature_dim=D)
  with pytest.raises(ValueError, match=r"split 'val' of refcoco.*refers to region 1.*"
                                       r"max_regions=1"):
    dr.make_task_eval_dataset(builder, tight, task='re', tokenizer=tok, split='val')


@pytest.mark.parametrize('task', ['vqa', 're'])
def test_generic_decoding_reads_the_same(built, task, monkeypatch):
  builder = built['vqa'] if task == 'vqa' else built['refs']['det']
  split = 'val'
  def index():
    return examples.index_example_records(builder, split, 0, 3, task=task, max_regions=5,
                                          num_images=8, num_answers=5)

  def images():
    return ImageRecords(builder, 'images', D, captions=False, boxes=True)

  fast, fast_images = index(), images()
  assert fast_images.fast
  fast_records = fast_images.read([0, 2])
  monkeypatch.setattr(record_reader, 'tf_example_pb2', None)  # tfds' own decoder instead
  slow, slow_images = index(), images()
  assert not slow_images.fast and len(fast) == len(slow) == 3
  for name in examples.ExampleIndex.ATTRS:
    a, b = getattr(fast, name), getattr(slow, name)
    if isinstance(a, list) and a and isinstance(a[0], np.ndarray):
      assert all(np.array_equal(x, y) for x, y in zip(a, b)), name
    else:
      np.testing.assert_array_equal(np.asarray(a, object), np.asarray(b, object), name)
  for a, b in zip(fast_records, slow_images.read([0, 2])):
    for key in ('image_id', 'features', 'img_pos', 'boxes'):
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_reader_errors(built, tmp_path):
  builder, tok = built['vqa'], built['tokenizer']
  with pytest.raises(ValueError, match=r"no example split 'testA'; it has \['devval', 'restval', "
                                       r"'test_dev', 'train', 'val'\]"):
    dr.make_task_eval_dataset(builder, SPEC, task='vqa', tokenizer=tok, split='testA')
  with pytest.raises(ValueError, match='per-example fields'):
    dr.layout(builder, 're')
  with pytest.raises(ValueError, match=r'answers.json \(5 answers\).*\(2 answers\)'):
    dr.make_task_eval_dataset(builder, SPEC, task='vqa', tokenizer=tok, answers=['a', 'b'],
                              target_scores='stored')
  wide = BatchSpec(batch_size=6, max_text_len=16, max_regions=5, feature_dim=2048)
  with pytest.raises(ValueError, match='region features of dim 8, config expects '
                                       'feature_dim=2048'):
    dr.make_task_eval_dataset(builder, wide, task='vqa', tokenizer=tok)


@pytest.mark.parametrize('task', ['vqa', 're'])
def test_wordpiece_batches(built, task, tmp_path):
  # Records store raw text, so a BERT vocabulary tokenises at batching time. The
  # vocabulary holds every word and punctuation mark of the fixture texts whole, so
  # the ids are the words' line numbers, in order (hand tokenisation).
  texts = [q['question'] for qs in built['questions'].values() for q in qs]
  texts += [raw for *_, sents in ref_sentences() for _, raw in sents]
  words = sorted({w for t in texts for w in re.findall(r'\w+|[^\w\s]', t)})
  vocab = ['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + words
  (tmp_path / 'vocab.txt').write_text('\n'.join(vocab) + '\n')
  tok = WordPieceTokenizer(str(tmp_path / 'vocab.txt'))
  builder = built['vqa'] if task == 'vqa' else built['refs']['gt']
  it = dr.make_task_train_iterator(builder, SPEC, task=task, tokenizer=tok, seed=0)
  batch = next(it)
  if task == 'vqa':  # The row's question.
    by_qid = {q['question_id']: [q['question']] for q in built['questions']['train']}
    options = [by_qid[int(q)] for q in batch['question_id']]
  else:  # An expression of the row's ref (which one is the sampler's choice).
    by_ref = {ref_id: [raw for _, raw in sents] for ref_id, *_, sents in ref_sentences()}
    options = [by_ref[int(r)] for r in batch['ref_id']]
  for i in range(SPEC.batch_size):
    ids = batch['input_ids'][i, :int(batch['txt_mask'][i].sum())].tolist()
    hand = [[2] + [vocab.index(w) for w in re.findall(r'\w+|[^\w\s]', t)][:14] + [3]
            for t in options[i]]
    assert ids in hand, (ids, options[i])


def test_tokenizer_resolution(built, tmp_path):
  cfg = small('configs/finetune_vqa.py:size=tiny,data=vqa_v2', built['vqa'].data_dir)
  with pytest.raises(FileNotFoundError, match=r'stores no tokenizer \(spm.model\) and '
                                              'config.init_from is empty'):
    data_setup.tokenizer_path(cfg, built['vqa'], init_from=cfg.init_from)
  spm = str(built['tokenizer'].path)
  # A pretrained directory names its tokenizer file in config.json.
  pre = tmp_path / 'pre'
  pre.mkdir()
  (pre / 'config.json').write_text(json.dumps({
      'format': pretrained.FORMAT, 'format_version': pretrained.FORMAT_VERSION,
      'tokenizer': {'type': 'sentencepiece', 'file': 'spm.model'}}))
  (pre / 'spm.model').write_bytes(open(spm, 'rb').read())
  cfg.init_from = str(pre)
  assert data_setup.tokenizer_path(cfg, built['vqa'], init_from=cfg.init_from) == str(pre / 'spm.model')
  # A training workdir: the model_info of its latest checkpoint.
  work = tmp_path / 'work'
  ckpt = ckpt_lib.Checkpointer(str(work / 'checkpoints'), save_every=1, keep=1)
  ckpt.save(3, {'x': np.zeros(2)}, {'model_info': {'tokenizer': spm}}, force=True)
  ckpt.close()
  cfg.init_from = str(work)
  assert data_setup.tokenizer_path(cfg, built['vqa'], init_from=cfg.init_from) == spm
  # The tokenizer follows the checkpoint: a copy of its file may be named, another
  # file is an error that names both.
  copy = tmp_path / 'copy.model'
  copy.write_bytes(open(spm, 'rb').read())
  cfg.tokenizer = str(copy)
  assert data_setup.tokenizer_path(cfg, built['vqa'], init_from=cfg.init_from) == spm
  other = tmp_path / 'other.model'
  other.write_bytes(b'x' + open(spm, 'rb').read())
  cfg.tokenizer = str(other)
  with pytest.raises(ValueError, match=f"config.tokenizer='{other}' is not the tokenizer "
                                       f"'{spm}' that config.init_from='{work}' was trained"):
    data_setup.tokenizer_path(cfg, built['vqa'], init_from=cfg.init_from)
  # Without init_from, config.tokenizer is used as it is.
  assert data_setup.tokenizer_path(cfg, built['vqa'], init_from='') == str(other)
  # A checkpoint whose tokenizer file is gone: an error, unless config.tokenizer names a copy.
  gone = tmp_path / 'gone'
  ckpt = ckpt_lib.Checkpointer(str(gone / 'checkpoints'), save_every=1, keep=1)
  ckpt.save(1, {'x': np.zeros(2)}, {'model_info': {'tokenizer': '/elsewhere/spm.model'}},
            force=True)
  ckpt.close()
  cfg.tokenizer = ''
  with pytest.raises(FileNotFoundError, match="tokenizer '/elsewhere/spm.model', which does "
                                              "not exist here"):
    data_setup.tokenizer_path(cfg, built['vqa'], init_from=str(gone))
  cfg.tokenizer = str(copy)
  assert data_setup.tokenizer_path(cfg, built['vqa'], init_from=str(gone)) == str(copy)


# ------------------------------------------------------------------ end to end
def _config(spec, built, data_builder, **overrides):
  cfg = small(spec, data_builder.data_dir, tokenizer=str(built['tokenizer'].path),
              feature_dim=D, log_every=1, **overrides)
  cfg.data = f'{data_builder.info.name}/{data_builder.builder_config.name}'
  cfg.data_dir = os.path.dirname(os.path.dirname(os.path.dirname(
      os.fspath(data_builder.data_dir))))  # <data_dir>/<name>/<config>/<version>
  return cfg


@pytest.mark.slow
def test_vqa_v2_finetune_devval_and_test_dev(built, tmp_path):
  cfg = _config('configs/finetune_vqa.py:size=tiny,data=vqa_v2', built, built['vqa'],
                total_steps=8, batch_size=8, eval_batch_size=8)
  assert cfg.eval_split == 'devval'
  cfg.data += '=2'
  with pytest.raises(ValueError, match='one list of questions.*drop the weights'):
    loop.train_and_evaluate(cfg, str(tmp_path / 'weighted'), devices=ONE)
  vg = built['vg']  # the recipe's data, with the fixture's build names
  cfg.data = (cfg.data[:-len('=2')] + ':train+restval,'
              f'{vg.info.name}/{vg.builder_config.name}:train')
  work = str(tmp_path)
  out = loop.train_and_evaluate(cfg, work, devices=ONE)
  with open(os.path.join(work, 'metrics.jsonl')) as f:
    assert all(np.isfinite(r['loss/vqa']) for r in map(json.loads, f))
  # devval: the questions of val images 6 and 8 (devval_every=2).
  qs = {q['question_id']: q for q in built['questions']['val'] if q['image_id'] in (6, 8)}
  results = vqa_eval.read_results(out['results_file'])
  assert sorted(r['question_id'] for r in results) == sorted(qs)
  vocab = expected_vocab(built['questions'])
  assert all(r['answer'] in vocab for r in results)
  hand = [hand_accuracy(r['answer'], qs[r['question_id']]['answers']) for r in results]
  assert out['vqa_acc'] == round(100 * np.mean(hand), 2) and out['num_questions'] == 5
  for atype in ('yes/no', 'number', 'other'):
    mine = [h for r, h in zip(results, hand) if qs[r['question_id']]['answer_type'] == atype]
    if mine:
      assert out['vqa_acc_per_answer_type'][atype] == round(100 * np.mean(mine), 2)
  # test_dev: no answers, so a results file for the server and no accuracy.
  cfg.eval_split = 'test_dev'
  test = loop.evaluate_checkpoint(cfg, work, devices=ONE)
  assert test['vqa_acc'] is None and 'no answers' in test['note']
  assert sorted(r['question_id'] for r in vqa_eval.read_results(test['results_file'])) == \
      sorted(q['question_id'] for q in built['questions']['test_dev'])
  assert os.path.exists(os.path.join(work, 'eval_test_dev.json'))


@pytest.mark.slow
def test_refcoco_finetune_gt_and_det_settings(built, tmp_path):
  gt, det = built['refs']['gt'], built['refs']['det']
  det_dir = os.path.dirname(os.path.dirname(os.path.dirname(os.fspath(det.data_dir))))
  cfg = _config('configs/finetune_refcoco.py:size=tiny,data=refcoco', built, gt,
                total_steps=6, batch_size=8, eval_batch_size=8, max_regions=5,
                det_data_dir=det_dir)
  out = loop.train_and_evaluate(cfg, str(tmp_path), devices=ONE)
  assert out['setting'] == 'gt' and out['settings']['det'].startswith('evaluated on')
  with open(out['predictions_file']) as f:
    predictions = json.load(f)
  table = _ref_table()
  for setting, regions_of in (('gt', gt_regions), ('det', det_regions)):
    for split in ('val', 'testA', 'testB'):
      rows = predictions[setting][split]
      assert sorted(r['sent_id'] for r in rows) == sorted(
          s for s, v in table.items() if v[3] == split)
      hits = []
      for r in rows:
        ref_id, ann_id, image_id, _, _ = table[r['sent_id']]
        assert r['ref_id'] == ref_id
        regions = np.asarray(regions_of(image_id), np.float64)
        assert np.abs(regions - r['pred_box']).max(axis=1).min() < 1e-3  # one of its regions
        gt_box = xyxy(ann_box(image_id, ann_id % 10))
        np.testing.assert_allclose(r['gt_box'], gt_box)
        hits.append(np_iou(r['pred_box'], gt_box) >= 0.5)
      assert out[f'grounding_acc_{setting}/{split}'] == pytest.approx(100 * np.mean(hits))
      assert out['counts'][setting][split] == len(rows) == 3
  assert out['grounding_acc'] == out['grounding_acc/val'] == out['grounding_acc_gt/val']
  # Without det_data_dir the det setting is reported as not evaluated, with the reason.
  cfg.det_data_dir = ''
  again = loop.evaluate_checkpoint(cfg, str(tmp_path), devices=ONE)
  assert again['settings']['det'].startswith('not evaluated') and 'det_data_dir' in \
      again['settings']['det']
  assert again['grounding_acc/testB'] == out['grounding_acc_gt/testB']
  assert 'grounding_acc_det/val' not in again


def test_tokenizer_stored_with_the_data_is_recorded_absolute(built, tmp_path, monkeypatch):
  # `make demo` passes a relative data_dir; the path a checkpoint records must still
  # name the file when a later run starts in another directory.
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'rel' / 'build').mkdir(parents=True)
  (tmp_path / 'rel' / 'build' / 'spm.model').write_bytes(
      open(built['tokenizer'].path, 'rb').read())
  cfg = small('configs/finetune_vqa.py:size=tiny,data=vqa_v2', 'rel')
  builder = types.SimpleNamespace(data_dir='rel/build')
  path = data_setup.tokenizer_path(cfg, builder, init_from='')
  assert path == str(tmp_path / 'rel' / 'build' / 'spm.model')
