"""recall_at_k against a brute-force computation."""

import numpy as np
import pytest

from vlp.evaluators.retrieval import recall_at_k


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
