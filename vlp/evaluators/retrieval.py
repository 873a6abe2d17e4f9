"""Image-text retrieval recall (R@K, RSUM), Karpathy protocol.

`scores[i, j]` is the similarity of image i and caption j; `txt2img[j]` is the
image of caption j. i2t (image query): an image scores a hit at K when *any* of
its captions ranks in its top K. t2i (caption query): a hit when its image ranks
in the top K. Ranks count the candidates scoring strictly higher, plus the ties
that come earlier in index order (a stable, documented rule: ties are broken by
index, as `np.argsort(-s, kind='stable')` would).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np


def _ranks_of_targets(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based rank of column targets[r] in each row r (stable ties by index)."""
  rows = np.arange(scores.shape[0])
  target_scores = scores[rows, targets][:, None]
  cols = np.arange(scores.shape[1])[None, :]
  higher = scores > target_scores
  tied_before = (scores == target_scores) & (cols < targets[:, None])
  return (higher | tied_before).sum(axis=1)


def recall_at_k(scores: np.ndarray, txt2img: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Returns i2t_r{k}, t2i_r{k} and rsum, in percent."""
  scores = np.asarray(scores, np.float64)
  txt2img = np.asarray(txt2img, np.int64)
  n_img, n_txt = scores.shape
  if txt2img.shape != (n_txt,):
    raise ValueError(f"txt2img has shape {txt2img.shape}, expected ({n_txt},) for scores {scores.shape}")
  if n_txt and (txt2img.min() < 0 or txt2img.max() >= n_img):
    raise ValueError(f"txt2img holds image indices outside [0, {n_img})")
  t2i_rank = _ranks_of_targets(scores.T, txt2img)
  # i2t: best (smallest) rank over each image's captions.
  i2t_rank = np.full(n_img, np.iinfo(np.int64).max)
  order = np.argsort(-scores, axis=1, kind="stable")
  rank_of = np.empty_like(order)
  rank_of[np.arange(n_img)[:, None], order] = np.arange(n_txt)[None, :]
  caption_ranks = rank_of[txt2img, np.arange(n_txt)]
  np.minimum.at(i2t_rank, txt2img, caption_ranks)
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = 100.0 * float(np.mean(i2t_rank < k))
  for k in ks:
    out[f"t2i_r{k}"] = 100.0 * float(np.mean(t2i_rank < k))
  out["rsum"] = sum(out[f"i2t_r{k}"] + out[f"t2i_r{k}"] for k in ks)
  return out
