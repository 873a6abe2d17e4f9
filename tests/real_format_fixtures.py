"""Small fixtures in the official VQA v2, Visual Genome QA and RefCOCO formats, and
hand references.

Written for tests/test_finetune_real_data.py: VQA v2 question / annotation JSON plus
a bottom-up-attention TSV; the refer toolkit's refs pickle, COCO instances.json and
per-image npz features; and the hand answer normalisation, leave-one-out accuracy
and numpy IoU the tests compare against. For tests/test_imgdb.py: UNITER's image
DBs (LMDB written with the lmdb package, msgpack-numpy entries encoded by hand,
or npz archives in the compressed DBs).
"""

import base64
import collections
import json
import os
import io
import pickle

import numpy as np

from vlp.data.builders import vqa_v2

D = 8
W, H = 640, 480

# ------------------------------------------------------------------ VQA fixture
# Raw human answers: case, articles, number words and punctuation vary.
POOL = ['yes', 'Yes', 'no', 'two', '2', '3', 'the dog', 'dog', 'red', 'blue.']
_WORDS = {'two': '2', 'three': '3'}


def hand_norm(a):
  """VQA normalisation, enough for POOL: lowercase, no period, digits, no articles."""
  words = a.strip().lower().replace('.', '').split()
  return ' '.join(_WORDS.get(w, w) for w in words if w not in ('a', 'an', 'the'))


def hand_accuracy(pred, answers):
  """Official accuracy by its definition: mean over the 10 leave-one-out subsets."""
  gts = [a.strip() for a in answers]
  if len(set(gts)) > 1:  # only then are both sides normalised
    gts, pred = [hand_norm(g) for g in gts], hand_norm(pred)
  return np.mean([min(1.0, sum(g == pred for j, g in enumerate(gts) if j != k) / 3)
                  for k in range(len(gts))])


def _answers(rng, k):
  truth = POOL[rng.integers(len(POOL))]
  return [truth] * k + [POOL[i] for i in rng.integers(len(POOL), size=10 - k)]


def write_vqa(manual):
  """VQA v2 files for images 1..8; returns {split: [question dict]} and features."""
  rng = np.random.default_rng(7)
  os.makedirs(os.path.join(manual, 'features'), exist_ok=True)
  plan = {'train': [(1 + i % 6, rng.integers(2, 11)) for i in range(36)],
          'val': [(5 + i % 4, rng.integers(1, 11)) for i in range(11)],
          'test_dev': [(7, 0), (8, 0), (1, 0), (8, 0), (2, 0)]}
  out, qid = {}, 1000
  for split, rows in plan.items():
    qs = []
    for image_id, k in rows:
      qid += 1
      answers = _answers(rng, int(k)) if k else None
      if split == 'val' and len(qs) == 0:
        answers = ['Yes'] * 10  # all agree: compared raw, so 'yes' scores 0
      q = {'question_id': qid, 'image_id': image_id,
           'question': f'what is the {["dog", "cube", "sky"][qid % 3]} in {image_id}?'}
      if answers:
        counts = collections.Counter(hand_norm(a) for a in answers)
        mc = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        q.update(answers=answers, multiple_choice_answer=mc,
                 answer_type='yes/no' if mc in ('yes', 'no') else
                 'number' if mc.isdigit() else 'other',
                 question_type=['what is', 'how many', 'is the'][qid % 3])
      qs.append(q)
    out[split] = qs
    q_name, a_name = vqa_v2.FILES[split]
    with open(os.path.join(manual, q_name), 'w') as f:
      json.dump({'questions': [{k: q[k] for k in ('question_id', 'image_id', 'question')}
                               for q in qs]}, f)
    if a_name:
      with open(os.path.join(manual, a_name), 'w') as f:
        json.dump({'annotations': [
            {'question_id': q['question_id'], 'image_id': q['image_id'],
             'multiple_choice_answer': q['multiple_choice_answer'],
             'answer_type': q['answer_type'], 'question_type': q['question_type'],
             'answers': [{'answer': a, 'answer_confidence': 'yes', 'answer_id': j + 1}
                         for j, a in enumerate(q['answers'])]} for q in qs]}, f)
  return out, _write_tsv(os.path.join(manual, 'features', 'f.tsv'), range(1, 9))


def expected_vocab(questions, size=5):
  counts = collections.Counter(q['multiple_choice_answer'] for q in questions['train'])
  return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size]]


def _write_tsv(path, image_ids, base=0.0):
  """Bottom-up-attention TSV of 3 regions per image; returns {image_id: features}."""
  feats, lines = {}, []
  for image_id in image_ids:
    boxes = np.float32([[0, 0, 40, 30], [10 * (image_id % 9), 5, 90, 45], [50, 20, 99, 49]])
    feats[image_id] = (base + image_id + 0.25 * np.arange(3 * D).reshape(3, D)).astype(
        np.float32)
    lines.append('\t'.join([str(image_id), '100', '50', '3',
                            base64.b64encode(boxes.tobytes()).decode(),
                            base64.b64encode(feats[image_id].tobytes()).decode()]))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return feats


def write_vg_qa(manual, vocab):
  """Visual Genome v1.2 question_answers.json / image_data.json for VG images
  11..14 (14 has no questions), answers decorated versions of `vocab` answers plus
  one outside it; the vocabulary as vqa_answers.json ({answer: label}, UNITER's
  ans2label.json layout). Returns ({qa_id: question dict with the normalised
  answer, None when out of vocabulary}, features)."""
  os.makedirs(manual, exist_ok=True)
  asked = {11: [('What is this?', f'The {vocab[0]}.'), ('Is it  red?', vocab[1].upper())],
           12: [('Where is the cat?', 'On a very tall chair.'),
                ('What color?', f' {vocab[2]}. ')],
           13: [('Why?', f'A {vocab[0]}')]}
  qas_json, out, qa_id = [], {}, 900
  for image_id in (11, 12, 13, 14):
    qas = []
    for question, answer in asked.get(image_id, []):
      qa_id += 1
      qas.append({'a_objects': [], 'question': question, 'image_id': image_id,
                  'qa_id': qa_id, 'answer': answer, 'q_objects': []})
      norm = hand_norm(answer.replace(',', ''))
      out[qa_id] = {'question_id': qa_id, 'image_id': image_id,
                    'question': ' '.join(question.split()),
                    'answer': norm if norm in vocab else None}
    qas_json.append({'id': image_id, 'qas': qas})
  meta = [{'image_id': i, 'width': 100, 'height': 50, 'coco_id': None, 'flickr_id': None,
           'url': f'https://cs.stanford.edu/people/rak248/VG_100K/{i}.jpg'}
          for i in (11, 12, 13, 14)]
  for name, data in (('question_answers.json', qas_json), ('image_data.json', meta),
                     ('vqa_answers.json', {a: k for k, a in enumerate(vocab)})):
    with open(os.path.join(manual, name), 'w') as f:
      json.dump(data, f)
  feats = _write_tsv(os.path.join(manual, 'features', 'vg.tsv'), (11, 12, 13, 14), base=0.5)
  return out, feats


# ------------------------------------------------------------------ RefCOCO fixture
IMAGES = range(1, 7)
SPLIT_OF = {1: 'train', 2: 'train', 3: 'train', 4: 'val', 5: 'testA', 6: 'testB'}


def ann_box(image_id, j):  # COCO xywh
  return [20 + 200 * j, 40 + 30 * image_id, 150, 120 + 10 * j]


def xyxy(b):
  return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def det_regions(image_id):
  """Detector boxes: each annotation shifted right (IoU 1 down to ~0.3), then a
  background box."""
  out = []
  for j in range(3):
    x1, y1, x2, y2 = xyxy(ann_box(image_id, j))
    dx = 25 * j + 5 * image_id
    out.append([x1 + dx, y1, x2 + dx, y2])
  return out + [[0, 0, 60, 60]]


def gt_regions(image_id):
  return [xyxy(ann_box(image_id, j)) for j in range(3)]


def ref_sentences():
  """[(ref_id, ann_id, image_id, split, [(sent_id, raw)])]: anns 0 and 1 of each
  image are referred to (2 and 1 sentences), ann 2 is a distractor."""
  out = []
  for image_id in IMAGES:
    for j, n in ((0, 2), (1, 1)):
      ref_id = 10 * image_id + j
      sents = [(100 * ref_id + s, f'the {["left", "middle"][j]} box number {s}')
               for s in range(n)]
      out.append((ref_id, 10 * image_id + j, image_id, SPLIT_OF[image_id], sents))
  return out


def write_refcoco(root, regions_of):
  d = os.path.join(root, 'refcoco')
  os.makedirs(d, exist_ok=True)
  os.makedirs(os.path.join(root, 'features'), exist_ok=True)
  refs = [{'ref_id': r, 'ann_id': a, 'image_id': i, 'split': s, 'category_id': 1,
           'sentences': [{'sent_id': sid, 'raw': raw, 'sent': raw, 'tokens': raw.split()}
                         for sid, raw in sents], 'sent_ids': [sid for sid, _ in sents]}
          for r, a, i, s, sents in ref_sentences()]
  with open(os.path.join(d, 'refs(unc).p'), 'wb') as f:
    pickle.dump(refs, f, protocol=2)
  instances = {
      'images': [{'id': i, 'width': W, 'height': H, 'file_name': f'{i}.jpg'} for i in IMAGES],
      'annotations': [{'id': 10 * i + j, 'image_id': i, 'bbox': ann_box(i, j),
                       'category_id': 1, 'area': 1, 'iscrowd': 0}
                      for i in IMAGES for j in range(3)],
      'categories': [{'id': 1, 'name': 'thing'}]}
  with open(os.path.join(d, 'instances.json'), 'w') as f:
    json.dump(instances, f)
  for i in IMAGES:
    boxes = np.asarray(regions_of(i), np.float64)
    np.savez(os.path.join(root, 'features', f'coco_train2014_{i:012d}.npz'),
             features=np.full((len(boxes), D), i, np.float16),
             norm_bb=boxes / [W, H, W, H], conf=np.linspace(0.9, 0.5, len(boxes)))


def np_iou(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  area = lambda x: (x[2] - x[0]) * (x[3] - x[1])
  return iw * ih / (area(a) + area(b) - iw * ih)


# ------------------------------------------------------------------ UNITER image DB
UNITER_ENV = 'feat_th0.2_max100_min10'


def msgpack_numpy(array):
  """msgpack-numpy's encoding of an ndarray (its `encode`), written out by hand."""
  array = np.asarray(array)
  data = pickle.dumps(array, protocol=2) if array.dtype.kind == 'O' else array.tobytes()
  return {b'nd': True, b'type': array.dtype.str, b'kind': b'', b'shape': list(array.shape),
          b'data': data}


def uniter_entry(arrays, compressed=False) -> bytes:
  """One DB value: a msgpack map of msgpack-numpy arrays, or npz archive bytes."""
  import msgpack
  if compressed:
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    return buf.getvalue()
  return msgpack.packb({k: msgpack_numpy(v) for k, v in arrays.items()}, use_bin_type=True)


def write_uniter_db(img_db, name, entries, *, compressed=False, raw=None):
  """`img_db/<name>/feat_th0.2_max100_min10[_compressed]/`: an LMDB whose keys are
  file names and values `uniter_entry(arrays)`, plus `__keys__` (a JSON list);
  `raw` adds {key: bytes} values as they are."""
  import lmdb
  env_dir = os.path.join(img_db, name, UNITER_ENV + ('_compressed' if compressed else ''))
  os.makedirs(env_dir, exist_ok=True)
  env = lmdb.open(env_dir, map_size=1 << 26)
  with env.begin(write=True) as txn:
    for key, arrays in entries.items():
      txn.put(key.encode(), uniter_entry(arrays, compressed))
    for key, value in (raw or {}).items():
      txn.put(key.encode(), value)
    txn.put(b'__keys__', json.dumps(sorted(entries) + sorted(raw or {})).encode())
  env.close()
  return env_dir


def uniter_image(rng, n, d=D, classes=5, confident=4):
  """UNITER's arrays of one image (float16, descending conf, `confident` above 0.2)."""
  xy = rng.uniform(0, 0.5, (n, 2))
  wh = rng.uniform(0.05, 0.4, (n, 2))
  norm = np.concatenate([xy, xy + wh, wh], 1)
  conf = np.concatenate([np.linspace(0.9, 0.3, confident), np.linspace(0.19, 0.01, n - confident)])
  return {'features': rng.gamma(2.0, 1.0, (n, d)).astype(np.float16),
          'norm_bb': norm.astype(np.float16), 'conf': conf.astype(np.float16),
          'soft_labels': rng.dirichlet(np.ones(classes), n).astype(np.float16)}
