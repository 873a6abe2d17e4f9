"""Retrieval recall: brute force, COCO 1K/5K folds, two-stage re-ranking."""

import numpy as np
import pytest

from vlp.evaluators.retrieval import (coco_1k_5k, dual_encoder_search, fold_recall_at_k,
                                      recall_at_k, two_stage_recall)


def brute_force(scores, txt2img, ks):
  n_img, n_txt = scores.shape
  out = {}
  for k in ks:
    hits = 0
    for i in range(n_img):
      top = sorted(range(n_txt), key=lambda j: -scores[i, j])[:k]
      hits += any(txt2img[j] == i for j in top)
    out[f"i2t_r{k}"] = 100.0 * hits / n_img
  for k in ks:
    hits = 0
    for j in range(n_txt):
      top = sorted(range(n_img), key=lambda i: -scores[i, j])[:k]
      hits += txt2img[j] in top
    out[f"t2i_r{k}"] = 100.0 * hits / n_txt
  out["rsum"] = sum(out[f"i2t_r{k}"] + out[f"t2i_r{k}"] for k in ks)
  return out


@pytest.mark.parametrize("seed", range(5))
def test_matches_brute_force(seed):
  rng = np.random.default_rng(seed)
  n_img = int(rng.integers(3, 15))
  txt2img = rng.integers(0, n_img, int(rng.integers(n_img, 4 * n_img)))
  scores = rng.permutation(n_img * len(txt2img)).reshape(n_img, -1).astype(float)  # No ties.
  got = recall_at_k(scores, txt2img, ks=(1, 2, 5))
  want = brute_force(scores, txt2img, (1, 2, 5))
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k]), k


def test_perfect_and_hand_case():
  # 2 images, 4 captions: captions 0,1 -> image 0; 2,3 -> image 1.
  txt2img = np.array([0, 0, 1, 1])
  scores = np.array([[0.9, 0.1, 0.8, 0.2],
                     [0.3, 0.7, 0.6, 0.5]])
  r = recall_at_k(scores, txt2img, ks=(1, 2))
  # i2t: image 0 top-1 is caption 0 (hit); image 1 top-1 is caption 1 (miss), top-2 adds 2 (hit).
  assert r["i2t_r1"] == 50.0 and r["i2t_r2"] == 100.0
  # t2i: caption 0 -> img0 hit; 1 -> img1 miss; 2 -> img0 miss; 3 -> img1 hit.
  assert r["t2i_r1"] == 50.0 and r["t2i_r2"] == 100.0
  assert r["rsum"] == 300.0


def test_ties_break_by_index():
  scores = np.zeros((3, 3))
  r = recall_at_k(scores, np.array([0, 1, 2]), ks=(1,))
  # All tied: each query's top-1 is index 0.
  assert r["t2i_r1"] == pytest.approx(100 / 3)
  assert r["i2t_r1"] == pytest.approx(100 / 3)


def test_shape_error():
  with pytest.raises(ValueError, match="txt2img has shape"):
    recall_at_k(np.zeros((2, 3)), np.array([0, 1]))


# ---------------------------------------------------------------------------
# COCO 1K / 5K fold averaging.


def test_fold_average_by_hand():
  # 4 images in 2 folds of 2; captions: 0,1 -> img0, 2 -> img1, 3 -> img2, 4,5 -> img3.
  txt2img = np.array([0, 0, 1, 2, 3, 3])
  s = np.full((4, 6), -5.0)
  # Fold 0 (images 0,1; captions 0,1,2). Image 0: caption 2 beats its own -> i2t R@1 miss.
  s[0, :3] = [0.2, 0.1, 0.9]
  s[1, :3] = [0.3, 0.0, 0.8]
  # t2i fold 0: cap0: img1 (0.3) > img0 (0.2) miss; cap1: img0 (0.1) > img1 (0.0) hit;
  # cap2: img0 (0.9) > img1 (0.8) miss. i2t: img0 miss, img1 top is cap2 (0.8) hit.
  # Fold 1 (images 2,3; captions 3,4,5): everything right.
  s[2, 3:] = [0.9, 0.1, 0.2]
  s[3, 3:] = [0.1, 0.8, 0.7]
  # Cross-fold scores are high but must be ignored by the 1K protocol.
  s[0, 3] = s[3, 0] = 10.0
  r = fold_recall_at_k(s, txt2img, fold_size=2, ks=(1,))
  assert r["i2t_r1"] == pytest.approx((50.0 + 100.0) / 2)
  assert r["t2i_r1"] == pytest.approx((100 / 3 + 100.0) / 2)
  assert r["rsum"] == pytest.approx(r["i2t_r1"] + r["t2i_r1"])
  # coco_1k_5k with 2 folds of 2: "5k" is the full matrix, where cross-fold 10s hurt.
  both = coco_1k_5k(s, txt2img, ks=(1,), n_folds=2, fold_size=2)
  assert both["1k"] == r
  assert both["5k"] == recall_at_k(s, txt2img, ks=(1,))
  # Full matrix: img0's top caption is 3 and img3's is 0 (misses); img1, img2 hit.
  assert both["5k"]["i2t_r1"] == 50.0
  # Captions 1, 4, 5 hit; 0 (-> img3), 2 (-> img0), 3 (-> img0) miss.
  assert both["5k"]["t2i_r1"] == 50.0


def test_coco_1k_5k_needs_the_full_test_set():
  with pytest.raises(ValueError, match="needs 5 x 1000 = 5000 images"):
    coco_1k_5k(np.zeros((1000, 5000)), np.repeat(np.arange(1000), 5))


# ---------------------------------------------------------------------------
# Two-stage (dual-encoder top-k, cross-encoder re-ranking).


def reference_two_stage(img, txt, txt2img, cross, k):
  """Plain-loop cascade: per query, candidates = k best dot products (ties: lower
  index), re-ranked by `cross` (ties: lower index), then the rest in dual order."""
  n_img, n_txt = len(img), len(txt)
  dual = img @ txt.T

  def ranking(dual_row, cross_row, n):
    by_dual = sorted(range(n), key=lambda j: (-dual_row[j], j))
    cands = by_dual[:k]
    return sorted(cands, key=lambda j: (-cross_row[j], j)) + by_dual[k:], set(cands)

  i2t, t2i, pairs = [], [], set()
  for i in range(n_img):
    order, cands = ranking(dual[i], cross[i], n_txt)
    pairs |= {(i, j) for j in cands}
    i2t.append(min([order.index(j) for j in range(n_txt) if txt2img[j] == i], default=10**9))
  for j in range(n_txt):
    order, cands = ranking(dual[:, j], cross[:, j], n_img)
    pairs |= {(i, j) for i in cands}
    t2i.append(order.index(txt2img[j]))
  return np.array(i2t), np.array(t2i), pairs


def recalls_from_ranks(i2t, t2i, ks):
  out = {f"i2t_r{k}": 100.0 * np.mean(i2t < k) for k in ks}
  out.update({f"t2i_r{k}": 100.0 * np.mean(t2i < k) for k in ks})
  out["rsum"] = sum(out[f"i2t_r{k}"] + out[f"t2i_r{k}"] for k in ks)
  return out


class PairScorer:
  """Cross-encoder stand-in: looks pairs up in a matrix and records the calls."""

  def __init__(self, matrix):
    self.matrix, self.calls = matrix, []

  def __call__(self, img_idx, txt_idx):
    self.calls.append((np.array(img_idx), np.array(txt_idx)))
    return self.matrix[img_idx, txt_idx]


def _gallery(seed, n_img, n_txt, dim=4):
  rng = np.random.default_rng(seed)
  txt2img = np.concatenate([np.arange(n_img), rng.integers(0, n_img, n_txt - n_img)])
  rng.shuffle(txt2img)
  # Small integers: exact dot products, with ties in both stages.
  img = rng.integers(-2, 3, (n_img, dim)).astype(float)
  txt = rng.integers(-2, 3, (n_txt, dim)).astype(float)
  cross = rng.integers(0, 6, (n_img, n_txt)).astype(float)
  return img, txt, txt2img, cross


@pytest.mark.parametrize("seed", range(4))
def test_two_stage_with_full_k_equals_full_ranking(seed):
  img, txt, txt2img, cross = _gallery(seed, 7, 19)
  scorer = PairScorer(cross)
  r = two_stage_recall(img, txt, txt2img, scorer, k=19, ks=(1, 2, 5), chunk_size=10,
                       query_chunk=3)
  assert r["two_stage"] == recall_at_k(cross, txt2img, ks=(1, 2, 5))
  assert r["dual"] == recall_at_k(img @ txt.T, txt2img, ks=(1, 2, 5))
  assert r["pairs_scored"] == 7 * 19 and (r["k_i2t"], r["k_t2i"]) == (19, 7)
  assert all(len(i) <= 10 for i, _ in scorer.calls)


@pytest.mark.parametrize("seed,k", [(0, 1), (1, 2), (2, 3), (3, 4), (4, 2)])
def test_two_stage_small_k_matches_reference(seed, k):
  img, txt, txt2img, cross = _gallery(seed, 9, 30)
  scorer = PairScorer(cross)
  ks = (1, 2, 3, 5, 10)
  r = two_stage_recall(img, txt, txt2img, scorer, k=k, ks=ks, chunk_size=7, query_chunk=4)
  i2t, t2i, pairs = reference_two_stage(img, txt, txt2img, cross, k)
  want = recalls_from_ranks(i2t, t2i, ks)
  for key in want:
    assert r["two_stage"][key] == pytest.approx(want[key]), key
  assert r["dual"] == recall_at_k(img @ txt.T, txt2img, ks)
  # Only the candidate pairs are scored, each once, in chunks of at most 7.
  called = [(int(i), int(j)) for ii, jj in scorer.calls for i, j in zip(ii, jj)]
  assert len(called) == len(set(called)) == r["pairs_scored"]
  assert set(called) == pairs
  assert all(len(ii) <= 7 for ii, _ in scorer.calls)
  # Beyond k the two-stage ranking is the dual-encoder one.
  dual_i2t, dual_t2i, _ = reference_two_stage(img, txt, txt2img, img @ txt.T, len(txt))
  assert np.all((i2t < k) | (i2t == dual_i2t)) and np.all((t2i < k) | (t2i == dual_t2i))


def test_two_stage_hand_case():
  # 3 images, 3 captions (caption j -> image j); 1-d vectors.
  img = np.array([[1.0], [2.0], [3.0]])
  txt = np.array([[1.0], [1.0], [1.0]])
  # Dual scores: image i scores i+1 with every caption, so for every caption the
  # dual order is images 2, 1, 0; for image i all captions tie -> order 0, 1, 2.
  cross = np.array([[9.0, 0.0, 0.0],
                    [0.0, 9.0, 0.0],
                    [0.0, 0.0, 9.0]])
  r = two_stage_recall(img, txt, np.arange(3), PairScorer(cross), k=2, ks=(1, 2, 3))
  # t2i with k=2: candidates images {2, 1}. Caption 0: its image 0 is not a candidate
  # -> rank 2 (dual rank). Caption 1: cross picks image 1 first -> rank 0. Caption 2 -> 0.
  assert r["two_stage"]["t2i_r1"] == pytest.approx(200 / 3)
  assert r["two_stage"]["t2i_r2"] == pytest.approx(200 / 3)
  assert r["two_stage"]["t2i_r3"] == 100.0
  # i2t with k=2: candidates captions {0, 1}. Image 0 -> caption 0 rank 0; image 1 ->
  # caption 1 rank 0; image 2: caption 2 not a candidate -> dual rank 2.
  assert (r["two_stage"]["i2t_r1"], r["two_stage"]["i2t_r3"]) == (pytest.approx(200 / 3), 100.0)
  # Dual alone: t2i top-1 is always image 2 (only caption 2 hits); i2t ties -> caption 0.
  assert r["dual"]["t2i_r1"] == pytest.approx(100 / 3)
  assert r["dual"]["i2t_r1"] == pytest.approx(100 / 3)
  # Pairs: i2t {(i, 0), (i, 1)} for 3 images, t2i {(2, j), (1, j)}: union = 6 + 2 = 8.
  assert r["pairs_scored"] == 8


def test_dual_encoder_search_ties_and_order():
  q = np.array([[1.0, 0.0], [0.0, 1.0]])
  c = np.array([[1.0, 1.0], [2.0, 0.0], [1.0, 0.0], [1.0, 5.0], [2.0, 1.0]])
  idx, val = dual_encoder_search(q, c, k=3, query_chunk=1)
  # Query 0 scores 1, 2, 1, 1, 2: best 1 and 4 (tie -> lower first), then 0 (first of 1s).
  assert idx[0].tolist() == [1, 4, 0] and val[0].tolist() == [2.0, 2.0, 1.0]
  # Query 1 scores 1, 0, 0, 5, 1.
  assert idx[1].tolist() == [3, 0, 4] and val[1].tolist() == [5.0, 1.0, 1.0]


def test_two_stage_errors():
  img, txt, txt2img, cross = _gallery(0, 3, 5)
  with pytest.raises(ValueError, match="returned shape"):
    two_stage_recall(img, txt, txt2img, lambda i, j: np.zeros(1), k=2)
  with pytest.raises(ValueError, match="NaN for pair"):
    two_stage_recall(img, txt, txt2img, lambda i, j: np.full(len(i), np.nan), k=2)
  with pytest.raises(ValueError, match="differ in width"):
    two_stage_recall(img, txt[:, :2], txt2img, PairScorer(cross), k=2)


def test_demo_table_two_stage_rows(tmp_path):
  """`make two-stage` prints full / dual / two-stage rows in k order with pair shares."""
  import json
  from vlp.tools import demo_table
  keys = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum")
  row = lambda v, pairs, sec: dict({k: v for k in keys}, pairs_scored=pairs, seconds=sec)
  (tmp_path / "ft_retrieval_dual").mkdir()
  with open(tmp_path / "ft_retrieval_dual" / "eval_test.json", "w") as f:
    json.dump({"num_images": 300, "num_captions": 1500, "full": row(15.7, 450000, 78.4),
               "two_stage_k20": row(16.7, 30111, 8.7), "dual": row(11.3, 0, 3.0),
               "two_stage_k10": row(14.3, 15228, 6.3)}, f)
  lines = demo_table.two_stage_table(str(tmp_path)).splitlines()
  assert "300 images x 1500 captions (450000 pairs)" in lines[0]
  assert [line[:16].strip() for line in lines[2:]] == [
      "full ranking", "dual encoder", "two-stage k=10", "two-stage k=20"]
  assert lines[-1].split()[2] == "16.7" and "30111 ( 6.7 %)" in lines[-1]
  assert "450000 (100.0 %)" in lines[2]
  assert demo_table.two_stage_table(str(tmp_path / "absent")) is None
