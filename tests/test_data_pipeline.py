"""grain pipelines over vlp_scenes: determinism, resumption, sharding, shapes, errors."""

import collections
import types

import numpy as np
import pytest

from vlp.data import pipeline, records, scenes
from vlp.data.image_records import ImageRecords
from vlp.data.tokenizer import Tokenizer

KINDS = ('mlm', 'mrm', 'itm')
COMMON = {'input_ids', 'txt_mask', 'img_feat', 'img_pos', 'img_mask', 'soft_labels',
          'image_id', 'example_mask'}
EXTRA = {'mlm': {'mlm_positions', 'mlm_labels', 'mlm_weights'},
         'mrm': {'img_masked', 'mrm_positions', 'mrm_weights', 'mrfr_target',
                 'mrc_target'},
         'itm': {'itm_target'}}
SPEC = pipeline.BatchSpec(batch_size=16, max_text_len=20, max_regions=8, feature_dim=64,
                          max_mlm_predictions=5, max_mrm_predictions=3)


def kind_for_index(i):  # module level: picklable for grain workers
  return KINDS[i % 3]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  builder = scenes.prepare_scenes(tmp_path_factory.mktemp('scenes'), feature_dim=64,
                                  size='small')
  return builder, Tokenizer(scenes.tokenizer_path(builder))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _train(data, **kw):
  builder, tok = data
  args = dict(tokenizer=tok, kind_for_index=kind_for_index, seed=3)
  args.update(kw)
  return pipeline.make_train_iterator(builder, args.pop('spec', SPEC), **args)


def test_static_shapes_and_keys(data):
  batches = _take(_train(data), 6)
  t, k, d, c = SPEC.max_text_len, SPEC.max_regions, SPEC.feature_dim, 9
  for i, batch in enumerate(batches):
    kind = KINDS[i % 3]
    assert set(batch) == COMMON | EXTRA[kind]
    assert batch['input_ids'].shape == (16, t) and batch['input_ids'].dtype == np.int32
    assert batch['img_feat'].shape == (16, k, d) and batch['img_feat'].dtype == np.float16
    assert batch['img_pos'].shape == (16, k, 7) and batch['img_pos'].dtype == np.float32
    assert batch['soft_labels'].shape == (16, k, c)
    assert batch['image_id'].dtype == np.int64 and batch['example_mask'].all()
    assert np.all(batch['input_ids'][:, 0] == 2)
    if kind == 'mlm':
      assert batch['mlm_positions'].shape == (16, 5)
    if kind == 'mrm':
      assert batch['mrfr_target'].shape == (16, 3, d) and batch['mrc_target'].shape[-1] == c
    # Region masks match the stored region counts (<= K) and text masks end at [SEP].
    lengths = batch['txt_mask'].sum(1)
    if kind != 'mlm':
      np.testing.assert_array_equal(batch['input_ids'][np.arange(16), lengths - 1], 3)


def test_same_seed_and_index_give_the_same_batch(data):
  first = _take(_train(data), 5)
  again = _take(_train(data), 5)
  for a, b in zip(first, again):
    _assert_same(a, b)
  other = next(_train(data, seed=4))
  assert not np.array_equal(other['image_id'], first[0]['image_id'])


def test_state_restore_and_start_index(data):
  it = _train(data)
  _take(it, 4)
  state = it.get_state()
  assert state == {'next_index': 4}
  tail = _take(it, 3)
  resumed = _train(data)
  resumed.set_state(state)
  for a, b in zip(tail, _take(resumed, 3)):
    _assert_same(a, b)
  for a, b in zip(tail, _take(_train(data, start_index=4), 3)):
    _assert_same(a, b)


def test_processes_read_disjoint_images_and_epochs_reshuffle(data):
  spec = pipeline.BatchSpec(batch_size=50, max_text_len=20, max_regions=8, feature_dim=64)
  seen = []
  for process in range(2):
    it = _train(data, spec=spec, kind_for_index=None, process_index=process,
                process_count=2)
    epoch0 = _take(it, 10)  # 100 images x 5 captions per process = 10 batches
    ids = np.concatenate([b['image_id'] for b in epoch0])
    counts = collections.Counter(ids.tolist())
    assert len(counts) == 100 and set(counts.values()) == {5}
    captions = {(b['image_id'][i], b['input_ids'][i].tobytes())
                for b in epoch0 for i in range(50)}
    assert len(captions) >= 495  # each pair once (a few captions may repeat)
    epoch1 = np.concatenate([b['image_id'] for b in _take(it, 10)])
    assert sorted(epoch1.tolist()) == sorted(ids.tolist())
    assert not np.array_equal(epoch1, ids)
    seen.append(set(counts))
  assert not seen[0] & seen[1]


def test_grain_workers_give_the_same_stream(data):
  plain = _take(_train(data), 3)
  it = _train(data, worker_count=2)
  try:
    for a, b in zip(plain, _take(it, 3)):
      _assert_same(a, b)
    state = it.get_state()
  finally:
    it.close()
  assert state == {'next_index': 3}


def test_eval_padding_and_equal_batch_counts(data):
  builder, tok = data
  source = builder.as_data_source('val')
  val_ids = np.array([source[i]['image_id'] for i in range(len(source))])
  total, lengths = 0, set()
  for process in range(3):
    ds = pipeline.make_eval_dataset(builder, SPEC, tokenizer=tok, split='val',
                                    shards=[process], num_shards=3)
    batches = list(ds)
    lengths.add(len(batches))
    assert len(batches) == len(ds) == 5  # 14 images x 5 captions / 16, rounded up
    mask = np.concatenate([b['example_mask'] for b in batches])
    total += int(mask.sum())
    assert mask[:ds.num_examples].all() and not mask[ds.num_examples:].any()
    # Shard p holds the pairs of images [40p/3, 40(p+1)/3): example_index = 5 image + slot.
    lo, hi = 40 * process // 3, 40 * (process + 1) // 3
    example = np.concatenate([b['example_index'] for b in batches])
    np.testing.assert_array_equal(example[mask], np.arange(5 * lo, 5 * hi))
    assert (example[~mask] == -1).all()
    for b in batches:
      rows = b['example_mask']
      np.testing.assert_array_equal(b['image_id'][rows], val_ids[b['example_index'][rows] // 5])
    last = batches[-1]
    pad = ~last['example_mask']
    assert not last['txt_mask'][pad].any() and not last['img_mask'][pad].any()
    assert np.all(last['img_feat'][pad] == 0) and np.all(last['image_id'][pad] == 0)
  assert total == 40 * 5 and lengths == {5}
  # Shards 2 and 0 of 3 in one dataset: each batch is shard 2's rows, then shard 0's,
  # each masked as the one-shard datasets mask them.
  two = pipeline.make_eval_dataset(builder, SPEC, tokenizer=tok, split='val', kind='mlm',
                                   shards=[2, 0], num_shards=3)
  for s, part in ((2, slice(0, 16)), (0, slice(16, 32))):
    one = pipeline.make_eval_dataset(builder, SPEC, tokenizer=tok, split='val', kind='mlm',
                                     shards=[s], num_shards=3)
    for key, value in one[3].items():
      np.testing.assert_array_equal(two[3][key][part], value, err_msg=key)
  # Images as units, task batches deterministic across passes.
  ds = pipeline.make_eval_dataset(builder, SPEC, tokenizer=tok, split='test',
                                  unit='images', kind='mlm')
  assert len(ds) == 7
  _assert_same(ds[2], list(ds)[2])


def test_retrieval_gallery(data):
  builder, tok = data
  gallery = pipeline.load_retrieval_gallery(builder, SPEC, tokenizer=tok, split='test')
  assert gallery['img_feat'].shape == (100, 8, 64)
  assert gallery['input_ids'].shape == (500, 20) and gallery['txt_mask'].shape == (500, 20)
  np.testing.assert_array_equal(gallery['txt2img'], np.repeat(np.arange(100), 5))
  np.testing.assert_array_equal(gallery['img2txts'][7], np.arange(35, 40))
  source = builder.as_data_source('test')
  rec = source[7]
  assert tok.decode(gallery['input_ids'][36]) == rec['captions'][1].decode()
  assert gallery['image_id'][7] == rec['image_id']
  n = len(rec['features'])
  np.testing.assert_array_equal(gallery['img_feat'][7, :n], rec['features'])
  assert gallery['img_mask'][7].sum() == n and gallery['num_truncated'] == 0


def test_truncation_and_soft_label_padding(data):
  spec = pipeline.BatchSpec(batch_size=16, max_text_len=6, max_regions=3, feature_dim=64,
                            num_region_classes=1601)
  it = _train(data, spec=spec, kind_for_index=None)
  batch = next(it)
  assert batch['txt_mask'].all() and np.all(batch['input_ids'][:, -1] == 3)
  assert it.stats['truncated'] > 0
  assert batch['soft_labels'].shape == (16, 3, 1601)
  assert np.all(batch['soft_labels'][..., 9:] == 0)
  # Every image has >= 3 objects; K = 3 keeps the first (most confident) three.
  assert batch['img_mask'].all()
  source = data[0].as_data_source('train')
  for row, image_id in enumerate(batch['image_id'][:4]):
    rec = source[int(image_id)]  # train image i is record i
    np.testing.assert_array_equal(batch['img_feat'][row], rec['features'][:3])
    np.testing.assert_array_equal(batch['soft_labels'][row, :, :9], rec['soft_labels'][:3])


def test_clear_errors(data):
  builder, tok = data
  spec = pipeline.BatchSpec(batch_size=4, max_text_len=20, max_regions=8, feature_dim=2048)
  with pytest.raises(ValueError, match="split 'train' of vlp_scenes has region features of "
                                       'dim 64, config expects feature_dim=2048'):
    _train(data, spec=spec)
  with pytest.raises(ValueError, match="no split 'dev'"):
    _train(data, split='dev')
  with pytest.raises(ValueError, match='too few for 400 processes'):
    _train(data, process_index=0, process_count=400)
  empty = types.SimpleNamespace(info=builder.info, data_dir='/nowhere',
                                as_data_source=lambda split, **kw: [])
  with pytest.raises(ValueError, match="split 'val' of vlp_scenes .*is empty"):
    pipeline.make_eval_dataset(empty, SPEC, tokenizer=tok, split='val')
  info = types.SimpleNamespace(
      name='vlp_scenes', splits=builder.info.splits,
      features={k: v for k, v in builder.info.features.items() if k != 'captions'})
  partial = types.SimpleNamespace(info=info, data_dir='/nowhere')
  with pytest.raises(KeyError, match=r"split 'train' of vlp_scenes .*lacks fields \['captions'\]"):
    _train((partial, tok))
  with pytest.raises(ValueError, match='unknown batch kind'):
    next(_train(data, kind_for_index=lambda i: 'mlmx'))


def test_fast_record_parsing_matches_tfds_decoding(data, monkeypatch):
  builder, _ = data
  split = ImageRecords(builder, 'val', 64)
  assert split.fast  # vlp_scenes stores arrays as raw bytes
  reference = builder.as_data_source('val')
  for i, rec in zip([3, 0, 3, 39], split.read(np.array([3, 0, 3, 39]))):
    ref = reference[i]
    assert rec['image_id'] == ref['image_id'] and rec['captions'] == ref['captions']
    for key in ('features', 'img_pos', 'soft_labels'):
      assert rec[key].dtype == ref[key].dtype
      np.testing.assert_array_equal(rec[key], ref[key])
  fast = next(_train(data))
  monkeypatch.setattr(records, 'tf_example_pb2', None)  # tfds' generic decoding
  assert not ImageRecords(builder, 'val', 64).fast
  _assert_same(fast, next(_train(data)))
