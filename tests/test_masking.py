"""Masking statistics and rules of vlp.data.masking on synthetic batches."""

import numpy as np
import pytest

from vlp.data import masking

IDS = masking.TokenIds(pad_id=0, cls_id=2, sep_id=3, mask_id=4, random_range=(5, 100_000))
COMMON = {'input_ids', 'txt_mask', 'img_feat', 'img_pos', 'img_mask', 'soft_labels',
          'image_id', 'example_mask'}


def _within(count, n, p, z=5.0):
  """|count - n p| within z binomial standard deviations."""
  return abs(count - n * p) <= z * np.sqrt(n * p * (1 - p)) + 1


def make_batch(rng, b=64, t=40, k=12, d=16, c=9, text_len=None, regions=None):
  text_len = rng.integers(1, t - 1, b) if text_len is None else np.broadcast_to(text_len, b)
  regions = rng.integers(1, k + 1, b) if regions is None else np.broadcast_to(regions, b)
  ids = np.zeros((b, t), np.int32)
  txt_mask = np.arange(t)[None] < (text_len + 2)[:, None]
  ids[txt_mask] = rng.integers(5, 1000, txt_mask.sum())
  ids[:, 0] = IDS.cls_id
  ids[np.arange(b), text_len + 1] = IDS.sep_id
  img_mask = np.arange(k)[None] < regions[:, None]
  soft = rng.random((b, k, c)).astype(np.float16) * img_mask[..., None]
  return {
      'input_ids': ids, 'txt_mask': txt_mask,
      'img_feat': (rng.standard_normal((b, k, d)) * img_mask[..., None]).astype(np.float16)
                  + np.float16(0.5) * img_mask[..., None],
      'img_pos': rng.random((b, k, 7)).astype(np.float32),
      'img_mask': img_mask, 'soft_labels': soft,
      'image_id': np.arange(b, dtype=np.int64) + 100,
      'example_mask': np.ones(b, bool),
  }


def test_mlm_rate_and_80_10_10():
  rng = np.random.default_rng(0)
  batch = make_batch(rng, b=2000, t=64, text_len=60)
  out = masking.make_mlm_batch(batch, rng, ids=IDS, max_predictions=64)
  assert set(out) == COMMON | {'mlm_positions', 'mlm_labels', 'mlm_weights'}
  w = out['mlm_weights'] > 0
  n_cand, n_sel = 2000 * 60, int(w.sum())
  assert _within(n_sel, n_cand, 0.15), n_sel / n_cand
  pos = out['mlm_positions']
  rows = np.nonzero(w)[0]
  orig = np.take_along_axis(batch['input_ids'], pos, 1)[w]
  new = np.take_along_axis(out['input_ids'], pos, 1)[w]
  np.testing.assert_array_equal(out['mlm_labels'][w], orig)
  assert np.all(out['mlm_labels'][~w] == 0) and np.all(pos[~w] == 0)
  assert len(np.unique(rows * 100 + pos[w])) == n_sel  # no position twice
  n_mask, n_keep = int(np.sum(new == IDS.mask_id)), int(np.sum(new == orig))
  assert _within(n_mask, n_sel, 0.8) and _within(n_keep, n_sel, 0.1)
  random = new[(new != IDS.mask_id) & (new != orig)]
  assert _within(random.size, n_sel, 0.1)
  assert np.all((random >= 5) & (random < 100_000))
  # Only selected positions changed.
  changed = out['input_ids'] != batch['input_ids']
  sel = np.zeros_like(changed)
  np.put_along_axis(sel, pos, w, 1)
  assert not np.any(changed & ~sel)


def test_mlm_never_touches_specials_or_padding():
  rng = np.random.default_rng(1)
  batch = make_batch(rng, b=500, t=24)
  out = masking.make_mlm_batch(batch, rng, ids=IDS, prob=0.9, max_predictions=24)
  special = ~batch['txt_mask'] | np.isin(batch['input_ids'], (0, 2, 3))
  np.testing.assert_array_equal(out['input_ids'][special], batch['input_ids'][special])
  targets = np.take_along_axis(batch['input_ids'], out['mlm_positions'], 1)
  assert not np.any(np.isin(targets[out['mlm_weights'] > 0], (0, 2, 3)))


def test_mlm_forced_first_piece():
  rng = np.random.default_rng(2)
  b = 4000
  batch = make_batch(rng, b=b, t=8, text_len=1)
  batch['txt_mask'][:10] = False  # empty texts: nothing to mask
  batch['txt_mask'][:10, :2] = True
  batch['input_ids'][:10, 1] = IDS.sep_id
  out = masking.make_mlm_batch(batch, rng, ids=IDS, max_predictions=3)
  w = out['mlm_weights']
  assert np.all(w[:10] == 0)
  np.testing.assert_array_equal(w[10:].sum(1), 1)  # exactly one prediction
  np.testing.assert_array_equal(out['mlm_positions'][10:, 0], 1)  # the first piece
  masked = out['input_ids'][10:, 1] == IDS.mask_id
  # 0.85 forced (always [MASK]) + 0.15 natural selections * 0.8.
  assert _within(int(masked.sum()), b - 10, 0.85 + 0.15 * 0.8)


def test_mlm_cap_keeps_a_random_subset_and_counts():
  rng = np.random.default_rng(3)
  batch = make_batch(rng, b=300, t=32, text_len=30)
  stats = {}
  out = masking.make_mlm_batch(batch, rng, ids=IDS, prob=1.0, max_predictions=4,
                               stats=stats)
  assert out['mlm_positions'].shape == (300, 4)
  np.testing.assert_array_equal(out['mlm_weights'].sum(1), 4)
  assert np.all(np.diff(out['mlm_positions'], axis=1) > 0)
  assert stats['mlm_capped'] == 300 * 26
  changed = (out['input_ids'] != batch['input_ids']).sum(1)
  assert np.all(changed <= 4)
  assert len(np.unique(out['mlm_positions'][:, 0])) > 5  # not always the first ones


def test_mrm_rate_fallback_and_targets():
  rng = np.random.default_rng(4)
  b, k = 3000, 36
  batch = make_batch(rng, b=b, k=k, regions=k)
  batch['img_mask'][:50] = False
  batch['img_mask'][:50, 0] = True  # single-region images
  batch['img_mask'][50:60] = False  # no regions at all
  out = masking.make_mrm_batch(batch, rng, max_predictions=k)
  assert set(out) == COMMON | {'img_masked', 'mrm_positions', 'mrm_weights',
                               'mrfr_target', 'mrc_target'}
  masked = out['img_masked']
  assert not np.any(masked & ~batch['img_mask'])
  assert np.all(masked[:50, 0]) and not np.any(masked[50:60])
  # Full images: rate 0.15 plus a fallback region where nothing was drawn.
  n = (b - 60) * k
  expected = 0.15 + (0.85 ** k) / k
  assert _within(int(masked[60:].sum()), n, expected)
  assert np.all(masked[60:].sum(1) >= 1)
  # Zeroed exactly at masked regions; boxes and text untouched; targets are originals.
  np.testing.assert_array_equal(out['img_feat'][masked], 0)
  np.testing.assert_array_equal(out['img_feat'][~masked], batch['img_feat'][~masked])
  np.testing.assert_array_equal(out['img_pos'], batch['img_pos'])
  np.testing.assert_array_equal(out['input_ids'], batch['input_ids'])
  w = out['mrm_weights'] > 0
  np.testing.assert_array_equal(w.sum(1), masked.sum(1))
  pos = out['mrm_positions']
  rows = np.nonzero(w)[0]
  np.testing.assert_array_equal(out['mrfr_target'][w],
                                batch['img_feat'][rows, pos[w]].astype(np.float32))
  np.testing.assert_array_equal(out['mrc_target'][w],
                                batch['soft_labels'][rows, pos[w]].astype(np.float32))
  assert np.all(out['mrfr_target'][~w] == 0)
  assert out['mrfr_target'].dtype == out['mrc_target'].dtype == np.float32


def test_mrm_fallback_is_uniform_and_cap_leaves_rest_unmasked():
  rng = np.random.default_rng(5)
  batch = make_batch(rng, b=4000, k=4, regions=4)
  out = masking.make_mrm_batch(batch, rng, prob=0.0, max_predictions=2)
  counts = out['img_masked'].sum(0)
  assert out['img_masked'].sum() == 4000
  assert all(_within(c, 4000, 0.25) for c in counts)
  stats = {}
  out = masking.make_mrm_batch(batch, rng, prob=1.0, max_predictions=2, stats=stats)
  np.testing.assert_array_equal(out['img_masked'].sum(1), 2)
  assert stats['mrm_capped'] == 4000 * 2
  unmasked = ~out['img_masked']
  np.testing.assert_array_equal(out['img_feat'][unmasked], batch['img_feat'][unmasked])


def test_prediction_slots_bound_the_overflow_of_full_images():
  from scipy import stats as sp_stats
  for length, prob, bound in [(100, 0.15, 1e-4), (36, 0.15, 1e-4), (100, 0.15, 1e-2)]:
    cap = masking.prediction_slots(length, prob, bound)
    # The smallest cap whose binomial tail P(selected > cap) is within the bound.
    assert sp_stats.binom.sf(cap, length, prob) <= bound < sp_stats.binom.sf(cap - 1, length,
                                                                             prob)
  assert masking.prediction_slots(100, 0.15) == 30  # The base config's 100 regions.
  # 2000 full 100-region images: the sized cap drops nothing, the former 10 slots
  # drop about 2000 x (15 - 10) selections.
  rng = np.random.default_rng(7)
  batch = make_batch(rng, b=2000, k=100, d=4, c=2, regions=100)
  for cap, capped in [(30, lambda n: n == 0), (10, lambda n: n > 2000 * 4)]:
    counts = {}
    out = masking.make_mrm_batch(batch, np.random.default_rng(8), max_predictions=cap,
                                 stats=counts)
    assert capped(counts['mrm_capped']), (cap, counts)
    np.testing.assert_array_equal(out['mrm_weights'].sum(1), out['img_masked'].sum(1))
  with pytest.raises(ValueError, match='prediction_slots needs'):
    masking.prediction_slots(0, 0.15)


def test_itm_negatives():
  rng = np.random.default_rng(6)
  negatives, total = 0, 0
  for _ in range(20):
    batch = make_batch(rng, b=100)
    for key in masking.ITM_IMAGE_KEYS:  # pairs of captions share images
      batch[key][50:] = batch[key][:50]
    batch['example_mask'][-5:] = False  # eval padding: zero image id
    batch['image_id'][-5:] = 0
    out = masking.make_itm_batch(batch, rng)
    assert set(out) == COMMON | {'itm_target'}
    neg = out['itm_target'] == 0
    assert not np.any(neg[-5:])
    negatives += int(neg.sum())
    total += 95
    assert np.all(out['image_id'][neg] != batch['image_id'][neg])
    assert np.all(out['image_id'][~neg] == batch['image_id'][~neg])
    for key in masking.ITM_IMAGE_KEYS:  # image fields come from one partner row
      src = [np.nonzero(batch['image_id'][:95] == i)[0][0] for i in out['image_id'][neg]]
      np.testing.assert_array_equal(out[key][neg], batch[key][src])
    assert not np.any(out['image_id'][neg] == 0)
    for key in ('input_ids', 'txt_mask', 'example_mask'):
      np.testing.assert_array_equal(out[key], batch[key])
  assert _within(negatives, total, 0.5)


def test_itm_without_partner_stays_positive_and_is_counted():
  rng = np.random.default_rng(7)
  batch = make_batch(rng, b=64)
  batch['image_id'][:] = 7
  stats = {}
  out = masking.make_itm_batch(batch, rng, stats=stats)
  assert np.all(out['itm_target'] == 1)
  assert 10 < stats['itm_no_negative'] < 54
  np.testing.assert_array_equal(out['img_feat'], batch['img_feat'])


def _row_key(out, i):
  """(caption, image) identity of output row i."""
  return out['input_ids'][i].tobytes(), int(out['image_id'][i])


@pytest.mark.parametrize('real,shared', [(96, False), (95, False), (96, True)])
def test_itm_balanced_each_caption_and_image_once_matched_once_not(real, shared):
  rng = np.random.default_rng(9)
  batch = make_batch(rng, b=100)
  batch['input_ids'][:, 1] = np.arange(100) + 5  # every caption distinct
  if shared:  # rows 10..19 show the images of rows 0..9 (two captions of one image)
    for key in masking.ITM_IMAGE_KEYS:
      batch[key][10:20] = batch[key][:10]
  batch['example_mask'][real:] = False
  stats = {}
  out = masking.make_itm_batch(batch, rng, negatives='balanced', stats=stats)
  half = real // 2
  target = out['itm_target']
  assert target[:half].all() and not target[half:2 * half].any()
  assert stats.get('itm_no_negative', 0) == 0
  if real % 2:  # the odd last real row stays as it was, positive
    assert target[2 * half] == 1 and _row_key(out, 2 * half) == _row_key(batch, 2 * half)
  for key in batch:  # padding rows untouched
    np.testing.assert_array_equal(out[key][real:], batch[key][real:])
  # Rows [half, 2 half) repeat the captions of rows [0, half) ...
  for key in ('input_ids', 'txt_mask', 'example_mask'):
    np.testing.assert_array_equal(out[key][half:2 * half], batch[key][:half])
  # ... with the images of rows [0, half) in another order, never their own image.
  neg_ids = out['image_id'][half:2 * half]
  assert np.all(neg_ids != batch['image_id'][:half])
  if not shared:  # a permutation: each image once matched, once mismatched
    assert sorted(neg_ids) == sorted(batch['image_id'][:half])
  pos_txt = {out['input_ids'][i].tobytes() for i in range(half)}
  neg_txt = [out['input_ids'][i].tobytes() for i in range(half, 2 * half)]
  assert sorted(neg_txt) == sorted(pos_txt)
  for key in masking.ITM_IMAGE_KEYS:  # image fields travel together
    src = [int(np.nonzero(batch['image_id'][:half] == i)[0][0]) for i in neg_ids]
    np.testing.assert_array_equal(out[key][half:2 * half], batch[key][src])


def test_itm_hardest_leaves_the_batch_matched_for_the_task_to_mine():
  rng = np.random.default_rng(11)
  batch = make_batch(rng, b=8)
  out = masking.make_itm_batch(batch, rng, negatives='hardest')
  assert out['itm_target'].dtype == np.int32 and out['itm_target'].tolist() == [1] * 8
  for key in COMMON:
    np.testing.assert_array_equal(out[key], batch[key])
  with pytest.raises(ValueError, match='hardest ITM negatives.*itm_neg_prob must be 0.5'):
    masking.make_itm_batch(batch, rng, neg_prob=0.3, negatives='hardest')


def test_itm_balanced_same_image_everywhere_counted_and_rejects_other_ratio():
  rng = np.random.default_rng(10)
  batch = make_batch(rng, b=8)
  batch['image_id'][:] = 3
  stats = {}
  out = masking.make_itm_batch(batch, rng, negatives='balanced', stats=stats)
  assert stats['itm_no_negative'] == 4 and out['itm_target'].all()
  with pytest.raises(ValueError, match='itm_neg_prob must be 0.5'):
    masking.make_itm_batch(batch, rng, neg_prob=0.3, negatives='balanced')
  with pytest.raises(ValueError, match='unknown ITM negatives'):
    masking.make_itm_batch(batch, rng, negatives='hard')
  # A config that asks for both fails when its BatchSpec is built, before any batch.
  from vlp.data.batching import BatchSpec
  with pytest.raises(ValueError, match='itm_neg_prob must be 0.5'):
    BatchSpec(batch_size=4, max_text_len=8, max_regions=4, feature_dim=8,
              itm_neg_prob=0.3, itm_negatives='balanced')


@pytest.mark.parametrize('kind', ['mlm', 'mrm', 'itm'])
def test_conditional_masking_and_determinism(kind):
  batch = make_batch(np.random.default_rng(8), b=32)
  make = {'mlm': lambda b, r: masking.make_mlm_batch(b, r, ids=IDS, max_predictions=8),
          'mrm': lambda b, r: masking.make_mrm_batch(b, r, max_predictions=6),
          'itm': masking.make_itm_batch}[kind]
  out = make(batch, np.random.default_rng(9))
  again = make(batch, np.random.default_rng(9))
  for key in out:
    np.testing.assert_array_equal(out[key], again[key])
  text_changed = np.any(out['input_ids'] != batch['input_ids'])
  regions_zeroed = np.any((out['img_feat'] == 0) & (batch['img_feat'] != 0)
                          & (out['image_id'] == batch['image_id'])[:, None, None])
  assert not (text_changed and regions_zeroed)
  assert text_changed == (kind == 'mlm') and regions_zeroed == (kind == 'mrm')
  assert ('img_masked' in out) == (kind == 'mrm')
  # Inputs are never modified in place.
  fresh = make_batch(np.random.default_rng(8), b=32)
  for key in batch:
    np.testing.assert_array_equal(batch[key], fresh[key])


@pytest.mark.parametrize('kind', ['mrm', 'random', 'balanced'])
def test_in_place_gives_the_copying_result(kind):
  """A batch built for the call (streams pass inplace=True) may be changed in place:
  the result equals the copying path's, rows swapped among negatives included."""
  make = {'mrm': lambda b, r, **kw: masking.make_mrm_batch(b, r, max_predictions=6, **kw),
          'random': lambda b, r, **kw: masking.make_itm_batch(b, r, **kw),
          'balanced': lambda b, r, **kw: masking.make_itm_batch(b, r, negatives='balanced',
                                                                **kw)}[kind]
  batch = make_batch(np.random.default_rng(8), b=32)
  want = make(batch, np.random.default_rng(9))
  got = make(make_batch(np.random.default_rng(8), b=32), np.random.default_rng(9),
             inplace=True)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert not np.array_equal(want['img_feat'], batch['img_feat'])  # something changed
