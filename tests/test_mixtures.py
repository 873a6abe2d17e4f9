"""Data mixtures (vlp.data.mixture): the spec, the weights, determinism, resume, shards.

Two parts of `vlp_scenes` small (train: 200 images, val: 40; image ids differ
between the splits), so every row's part is read off its image id.
"""

import pickle

import numpy as np
import pytest

from vlp import config_lib
from vlp.data import mixture, pipeline, scenes
from vlp.data.tokenizer import Tokenizer
from vlp.jobs.base import Feed
from vlp.jobs.pair_data import PairData

SPEC = pipeline.BatchSpec(batch_size=32, max_text_len=20, max_regions=8, feature_dim=64,
                          max_mlm_predictions=5, max_mrm_predictions=3)


def kind_for_index(i):  # module level: picklable for grain workers
  return ('mlm', 'mrm', 'itm')[i % 3]


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('scenes')
  builder = scenes.prepare_scenes(root, feature_dim=64, size='small')
  tok = Tokenizer(scenes.tokenizer_path(builder))
  val_ids = {int(r['image_id']) for r in pipeline.open_splits(builder, ['val'], 64).read(
      np.arange(40))}
  return builder, tok, val_ids, root


def _mix(data, weights=(1, 3), **kw):
  builder, tok = data[:2]
  args = dict(tokenizer=tok, kind_for_index=kind_for_index, seed=5, name='mix')
  args.update(kw)
  return pipeline.make_mixture_iterator(
      [(builder, ['train'], weights[0]), (builder, ['val'], weights[1])],
      args.pop('spec', SPEC), **args)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _same(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_parse_the_spec_and_its_errors():
  parts = mixture.parse('coco_karpathy:train+restval=1, vg_captions/float16_c1601=0.5')
  assert parts == [mixture.Part('coco_karpathy', '', ('train', 'restval'), 1.0),
                   mixture.Part('vg_captions', 'float16_c1601', ('train',), 0.5)]
  assert parts[0].name == 'coco_karpathy:train+restval'
  assert mixture.parse('vqa_v2', default_split='images')[0].splits == ('images',)
  for bad, message in [('coco_karpathy=0', 'positive'), ('coco_karpathy=x', 'not a number'),
                       ('coco_karpathy,', 'empty part'), ('COCO', 'not a dataset name'),
                       ('coco_karpathy:train+train', 'distinct'),
                       ('a:train,a:train=2', 'twice')]:
    with pytest.raises(ValueError, match=message):
      mixture.parse(bad)


def test_integer_shares():
  assert mixture.integer_shares([1, 1]) == [1, 1]
  assert mixture.integer_shares([0.5, 1.5, 2]) == [1, 3, 4]
  assert mixture.integer_shares([3]) == [1]
  assert mixture.integer_shares([1 / 3, 2 / 3]) == [1, 2]
  fine = mixture.integer_shares([0.3, 0.7001])  # 3000:7001, rounded to a period of 4096
  assert sum(fine) == 4096 and abs(fine[0] - 4096 * 0.3 / 1.0001) < 1


def test_interleave_counts_each_parts_positions_by_hand():
  mix = mixture.Interleave([1, 3], seed=0, shard=0)
  assert mix.block == 1024 and list(mix.counts) == [256, 768]
  part, own = mix.locate(np.arange(3 * 1024))
  for k, count in enumerate((256, 768)):
    for b in range(3):  # exactly `count` positions of part k per block ...
      assert np.sum(part[b * 1024:(b + 1) * 1024] == k) == count
    # ... numbered 0, 1, 2, ... in stream order: a part's own stream has no gap.
    np.testing.assert_array_equal(own[part == k], np.arange(3 * count))
  assert not np.array_equal(part[:1024], part[1024:2048])  # blocks shuffle apart
  again, _ = mix.locate(np.arange(1500, 2500))  # any window: the same answer
  np.testing.assert_array_equal(again, part[1500:2500])


def test_proportions_match_the_weights(data):
  val_ids = data[2]
  batches = _take(_mix(data, kind_for_index=None), 24)  # 768 rows: within the first block
  from_val = np.array([[int(i) in val_ids for i in b['image_id']] for b in batches])
  n = from_val.size
  # Drawn without replacement from a block of 256 train + 768 val positions:
  # hypergeometric, mean 3/4 n; 5 standard deviations is the bound.
  sd = np.sqrt(n * 0.75 * 0.25 * (1024 - n) / 1023)
  assert abs(from_val.sum() - 0.75 * n) <= 5 * sd
  per_batch = from_val.sum(1)
  assert len(set(per_batch.tolist())) > 1  # mixed per row, not a fixed pattern
  assert from_val.any(1).all() and (~from_val).any(1).all()
  # Over whole blocks the share is exact: 32 batches of 32 rows = one block.
  more = _take(_mix(data, kind_for_index=None, start_index=24), 8)
  total = from_val.sum() + sum(int(i) in val_ids for b in more for i in b['image_id'])
  assert total == 768


def test_each_part_reads_its_epochs_in_order(data):
  val_ids = data[2]
  rows = np.concatenate([b['image_id'] for b in _take(_mix(data, kind_for_index=None), 32)])
  val_rows = [int(i) for i in rows if int(i) in val_ids]
  # 768 val pairs = 3.84 epochs of 200 pairs: each epoch shows every image 5 times.
  for e in range(3):
    counts = np.unique(val_rows[e * 200:(e + 1) * 200], return_counts=True)[1]
    assert len(counts) == 40 and set(counts.tolist()) == {5}


def test_deterministic_and_resumes_to_the_example(data):
  first = _take(_mix(data), 5)
  for a, b in zip(first, _take(_mix(data), 5)):
    _same(a, b)
  assert not np.array_equal(next(_mix(data, seed=6))['image_id'], first[0]['image_id'])
  it = _mix(data)
  _take(it, 3)
  state = it.get_state()
  assert state == {'next_index': 3, 'data': 'mix'}
  resumed = _mix(data)
  resumed.set_state(state)
  for a, b in zip(first[3:], _take(resumed, 2)):
    _same(a, b)
  with pytest.raises(ValueError, match="reads 'mix', this run config.data='other'"):
    _mix(data, name='other').set_state(state)


def test_interleave_pickles_for_grain_workers():
  mix = mixture.Interleave([2, 1, 1], seed=3, shard=1)
  want = mix.locate(np.arange(5000))
  copy = pickle.loads(pickle.dumps(mix))  # what a grain worker process gets
  for a, b in zip(want, copy.locate(np.arange(5000))):
    np.testing.assert_array_equal(a, b)


def test_one_part_is_the_plain_stream(data):
  builder, tok = data[:2]
  plain = pipeline.make_train_iterator(builder, SPEC, tokenizer=tok,
                                       kind_for_index=kind_for_index, seed=5)
  one = pipeline.make_mixture_iterator([(builder, ['train'], 2.0)], SPEC, tokenizer=tok,
                                       kind_for_index=kind_for_index, seed=5)
  for a, b in zip(_take(plain, 3), _take(one, 3)):
    _same(a, b)


def test_splits_of_a_part_are_read_as_one(data):
  builder, val_ids = data[0], data[2]
  images = pipeline.open_splits(builder, ['train', 'val'], 64)
  assert len(images) == 240 and images.split == 'train+val'
  ids = [int(r['image_id']) for r in images.read(np.array([239, 0, 200, 199]))]
  assert ids[0] in val_ids and ids[2] in val_ids and not {ids[1], ids[3]} & val_ids
  single = pipeline.open_splits(builder, ['val'], 64)
  assert ids[2] == int(single.read([0])[0]['image_id'])


def _config(root, **overrides):
  c = config_lib.load_config_file('configs/uniter_base.py:tiny')
  c.data_dir, c.data_size, c.batch_size = str(root), 'small', 32
  c.max_text_len, c.max_regions = 20, 8
  c.data = 'vlp_scenes:train=1,vlp_scenes:val=3'
  c.update_from_flattened_dict(overrides)
  return c


def test_global_batches_equal_on_one_and_two_processes(data):
  """Two data shards: one process feeding both equals two feeding one each."""
  c = _config(data[3])
  whole = PairData(c, Feed(np.arange(32), 2)).train_iterator(kind_for_index)
  halves = [PairData(c, Feed(np.arange(16) + 16 * p, 2)).train_iterator(kind_for_index)
            for p in range(2)]
  assert whole.get_state()['data'] == 'vlp_scenes/d64_small:train=1,vlp_scenes/d64_small:val=3'
  for _ in range(4):
    batch, parts = next(whole), [next(h) for h in halves]
    _same(batch, {k: np.concatenate([p[k] for p in parts]) for k in batch})
