"""The synthetic world, the 7-d box feature, the vlp_scenes builder and the tokenizer."""

import io
import re
import time

import numpy as np
import pytest
import sentencepiece as spm

from vlp.data import boxes, scenes, scenes_world
from vlp.data.builders import vlp_scenes
from vlp.data.tokenizer import Tokenizer


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp('scenes')
  builder = scenes.prepare_scenes(data_dir, feature_dim=64, size='small')
  return data_dir, builder


def test_box_features_by_hand():
  got = boxes.box_features(np.array([[32., 24., 96., 144.], [0., 0., 320., 240.]]),
                           320, 240)
  want = np.array([[0.1, 0.1, 0.3, 0.6, 0.2, 0.5, 0.1],
                   [0., 0., 1., 1., 1., 1., 1.]], np.float32)
  assert got.dtype == np.float32 and got.shape == (2, 7)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_world_is_deterministic_and_sane():
  w1, w2 = scenes_world.SceneWorld(0, 64), scenes_world.SceneWorld(0, 64)
  w_big = scenes_world.SceneWorld(0, 2048)
  for image_id in (0, 7, 20_000_003):
    r1, r2, r_big = w1.record(image_id), w2.record(image_id), w_big.record(image_id)
    for key in r1:
      if key == 'captions':
        assert r1[key] == r2[key] == r_big[key]
      elif key not in ('features',):
        np.testing.assert_array_equal(r1[key], r2[key])
        np.testing.assert_array_equal(r1[key], r_big[key])  # only features depend on D
    np.testing.assert_array_equal(r1['features'], r2['features'])
    n = len(r1['obj_shape'])
    assert scenes_world.MIN_OBJECTS <= n <= scenes_world.MAX_OBJECTS
    assert r1['features'].shape == (n, 64) and r_big['features'].shape == (n, 2048)
    assert np.all(np.diff(r1['conf']) <= 0)  # most confident first
    np.testing.assert_allclose(r1['soft_labels'].astype(np.float32).sum(1), 1, atol=1e-2)
    # The class of region i is 1 + its shape id, and conf is its best non-background prob.
    np.testing.assert_array_equal(
        np.argmax(r1['soft_labels'][:, 1:], 1), r1['obj_shape'])
    b = r1['boxes']
    assert np.all((b[:, 0] >= 0) & (b[:, 2] <= 320) & (b[:, 1] >= 0) & (b[:, 3] <= 240))
    assert len(r1['captions']) == 5 and len(set(r1['captions'])) == 5
    assert f'there are {scenes_world.NUMBER_WORDS[n]} objects' in ' | '.join(r1['captions'])


def test_captions_discriminate_and_relations_hold():
  world = scenes_world.SceneWorld(0, 64)
  caption_sets = [tuple(world.captions(i)) for i in range(300)]
  assert len(set(caption_sets)) == 300
  for i in range(50):
    scene = world.layout(i)
    left = scenes_world.left_of_matrix(scene)
    above = scenes_world.above_matrix(scene)
    assert not np.any(left & left.T) and not np.any(above & above.T)
    # A claimed relation is clear-cut: centres differ by more than the margin.
    dx = scene.centers[None, :, 0] - scene.centers[:, None, 0]
    assert np.all(~left | (dx > scenes_world.RELATION_MARGIN))
    # Objects in one column two rows apart (or two columns apart) are always related.
    assert np.any(left) or np.any(above) or scene.num_objects <= 4


def test_builder_round_trip(built):
  _, builder = built
  world = scenes_world.SceneWorld(0, 64)
  sizes = {'train': 200, 'val': 40, 'test': 100}
  seen = set()
  for split, size in sizes.items():
    source = builder.as_data_source(split)
    assert len(source) == size
    ids = []
    for i in range(size):
      rec = source[i]
      assert rec['image_id'] == vlp_scenes.SPLIT_ID_BASE[split] + i  # record i = image i
      ids.append(rec['image_id'])
      raw = world.raw_record(rec['image_id'])
      for key in ('boxes', 'img_pos', 'conf', 'obj_shape', 'obj_color', 'obj_size'):
        np.testing.assert_array_equal(rec[key], raw[key], err_msg=key)
      for key in ('features', 'soft_labels'):
        assert rec[key].dtype == np.float16 and rec[key].shape == raw[key].shape
        # float16 rounding: relative error 2**-11 (plus subnormal slack).
        np.testing.assert_array_less(
            np.abs(rec[key].astype(np.float32) - raw[key]),
            np.abs(raw[key]) * 2.0 ** -11 + 1e-7 + 1e-12)
      assert [c.decode() for c in rec['captions']] == raw['captions']
      assert (rec['image_w'], rec['image_h']) == (320, 240)
    assert not seen & set(ids)
    seen |= set(ids)


def test_scene_from_record_recovers_ground_truth(built):
  _, builder = built
  rec = builder.as_data_source('val')[3]
  scene = scenes_world.scene_from_record(rec)
  raw = scenes_world.SceneWorld(0, 64).layout(rec['image_id'])
  order = np.lexsort((raw.boxes[:, 0], raw.boxes[:, 1]))
  order2 = np.lexsort((scene.boxes[:, 0], scene.boxes[:, 1]))
  np.testing.assert_array_equal(scene.shape[order2], raw.shape[order])
  assert scenes_world.describe(scene, 0).split()[-1] in scenes_world.SHAPES


def test_prepare_is_idempotent(built):
  data_dir, builder = built
  start = time.time()
  again = scenes.prepare_scenes(data_dir, feature_dim=64, size='small')
  assert time.time() - start < 2.0
  assert again.data_dir == builder.data_dir
  with pytest.raises(ValueError, match='feature_dim'):
    scenes.prepare_scenes(data_dir, feature_dim=100)


def test_tokenizer_special_ids(built):
  _, builder = built
  tok = Tokenizer(scenes.tokenizer_path(builder))
  assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 1, 2, 3, 4)
  assert tok.random_range == (5, tok.vocab_size)
  text = 'a large red cube to the left of a small blue sphere'
  ids = tok.encode(text)
  assert ids and not set(ids) & {0, 1, 2, 3, 4}
  assert tok.decode([tok.cls_id] + ids + [tok.sep_id, 0, 0]) == text
  assert tok.encode_batch([text, text.encode()]) == [ids, ids]
  # Trained on train captions only, it still covers val/test words.
  val = builder.as_data_source('test')
  pieces = tok.encode_batch([c for i in range(20) for c in val[i]['captions']])
  assert all(tok.unk_id not in p for p in pieces)
  assert max(len(p) for p in pieces) <= 20


def test_tokenizer_missing_piece_is_a_clear_error(tmp_path):
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(['a red cube', 'a blue sphere'] * 20), model_writer=buf,
      vocab_size=30, model_type='bpe', pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
      user_defined_symbols=['[CLS]', '[SEP]'], hard_vocab_limit=False, minloglevel=2)
  path = tmp_path / 'nomask.model'
  path.write_bytes(buf.getvalue())
  with pytest.raises(ValueError, match=re.escape(str(path)) + ".*'\\[MASK\\]'"):
    Tokenizer(path)
  with pytest.raises(FileNotFoundError, match='missing.model'):
    Tokenizer(tmp_path / 'missing.model')
