"""Image-text retrieval recall (R@K, RSUM), Karpathy protocol.

`scores[i, j]` is the similarity of image i and caption j; `txt2img[j]` is the
image of caption j. i2t (image query): an image scores a hit at K when *any* of
its captions ranks in its top K. t2i (caption query): a hit when its image ranks
in the top K. Ranks count the candidates scoring strictly higher, plus the ties
that come earlier in index order (a stable, documented rule: ties are broken by
index, as `np.argsort(-s, kind='stable')` would). An image without captions
counts as an i2t miss.

COCO 1K / 5K (`coco_1k_5k`): 5K is R@K over the full 5000-image test matrix. 1K
is the mean over 5 folds of R@K on fold f's 1000 images (f*1000 .. f*1000+999)
against their own captions only (the captions whose image is in the fold: with
captions listed image by image, captions f*5000 .. f*5000+4999). The 1K rsum is
the mean of the fold rsums (= the sum of the mean recalls).

Two-stage retrieval (`two_stage_recall`), for each query in both directions:
1. exact dual-encoder search: the candidates are the k highest dot products
   `img_vecs @ txt_vecs.T` (ties to the lower index);
2. the cross-encoder scores only those k (query, candidate) pairs; candidates
   are ranked by that score (ties to the lower index), and every non-candidate
   ranks *below all candidates*, in dual-encoder order. A non-candidate's final
   rank is therefore its dual-encoder rank (>= k): R@K for K <= k depends only on
   the cross-encoder scores of the candidates, and for K > k on the dual encoder.
The pairs of both directions are scored once each (their union); with k equal
to the gallery sizes two-stage equals `recall_at_k` on the full cross-encoder
matrix.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

_NEVER = np.iinfo(np.int64).max  # rank of a query without any target (never a hit).


def _check_txt2img(txt2img, n_img: int, n_txt: int) -> np.ndarray:
  txt2img = np.asarray(txt2img, np.int64)
  if txt2img.shape != (n_txt,):
    raise ValueError(f"txt2img has shape {txt2img.shape}, expected ({n_txt},) for "
                     f"{n_img} images and {n_txt} captions")
  if n_txt and (txt2img.min() < 0 or txt2img.max() >= n_img):
    raise ValueError(f"txt2img holds image indices outside [0, {n_img})")
  return txt2img


def _ranks_of_targets(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based rank of column targets[r] in each row r (stable ties by index)."""
  rows = np.arange(scores.shape[0])
  target_scores = scores[rows, targets][:, None]
  cols = np.arange(scores.shape[1])[None, :]
  higher = scores > target_scores
  tied_before = (scores == target_scores) & (cols < targets[:, None])
  return (higher | tied_before).sum(axis=1)


def _best_caption_ranks(scores: np.ndarray, images: np.ndarray,
                        txt2img: np.ndarray) -> np.ndarray:
  """i2t rank of image rows (scores [q, N_txt]): the rank of its best caption."""
  own = txt2img[None, :] == images[:, None]
  masked = np.where(own, scores, -np.inf)
  best = masked.max(axis=1, keepdims=True)
  # The first own caption reaching the row maximum has the smallest rank.
  first_best = np.argmax(own & (masked == best), axis=1)
  ranks = _ranks_of_targets(scores, first_best)
  return np.where(own.any(axis=1), ranks, _NEVER)


def _recalls(i2t_rank: np.ndarray, t2i_rank: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
  out = {}
  for k in ks:
    out[f"i2t_r{k}"] = 100.0 * float(np.mean(i2t_rank < k))
  for k in ks:
    out[f"t2i_r{k}"] = 100.0 * float(np.mean(t2i_rank < k))
  out["rsum"] = sum(out[f"i2t_r{k}"] + out[f"t2i_r{k}"] for k in ks)
  return out


def recall_at_k(scores: np.ndarray, txt2img: np.ndarray,
                ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Returns i2t_r{k}, t2i_r{k} and rsum, in percent."""
  scores = np.asarray(scores, np.float64)
  n_img, n_txt = scores.shape
  txt2img = _check_txt2img(txt2img, n_img, n_txt)
  t2i_rank = _ranks_of_targets(scores.T, txt2img)
  i2t_rank = _best_caption_ranks(scores, np.arange(n_img), txt2img)
  return _recalls(i2t_rank, t2i_rank, ks)


def fold_recall_at_k(scores: np.ndarray, txt2img: np.ndarray, fold_size: int,
                     ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
  """Mean over consecutive folds of `fold_size` images (each against its own captions)."""
  scores = np.asarray(scores, np.float64)
  n_img, n_txt = scores.shape
  txt2img = _check_txt2img(txt2img, n_img, n_txt)
  if fold_size <= 0 or n_img % fold_size:
    raise ValueError(f"{n_img} images do not split into folds of {fold_size}")
  folds = []
  for start in range(0, n_img, fold_size):
    captions = np.flatnonzero((txt2img >= start) & (txt2img < start + fold_size))
    folds.append(recall_at_k(scores[start:start + fold_size][:, captions],
                             txt2img[captions] - start, ks))
  return {key: float(np.mean([f[key] for f in folds])) for key in folds[0]}


def coco_1k_5k(scores: np.ndarray, txt2img: np.ndarray, ks: Sequence[int] = (1, 5, 10), *,
               n_folds: int = 5, fold_size: int = 1000) -> dict[str, dict[str, float]]:
  """{"1k": 5-fold mean, "5k": full} recalls from the full COCO test score matrix."""
  n_img = np.shape(scores)[0]
  if n_img != n_folds * fold_size:
    raise ValueError(f"COCO 1K/5K needs {n_folds} x {fold_size} = {n_folds * fold_size} "
                     f"images, got a score matrix with {n_img}")
  return {"1k": fold_recall_at_k(scores, txt2img, fold_size, ks),
          "5k": recall_at_k(scores, txt2img, ks)}


def _vectors(vecs, name: str) -> np.ndarray:
  vecs = np.asarray(vecs, np.float64)
  if vecs.ndim != 2:
    raise ValueError(f"{name} must be [N, E], got shape {vecs.shape}")
  if not np.all(np.isfinite(vecs)):
    raise ValueError(f"{name} holds non-finite values")
  return vecs


def _top_k_rows(scores: np.ndarray, k: int) -> np.ndarray:
  """[q, k] column indices of each row's k best, best first (ties: lower index)."""
  n = scores.shape[1]
  if k < n:
    kth = np.partition(scores, n - k, axis=1)[:, n - k:n - k + 1]  # k-th largest
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(axis=1, keepdims=True)
    chosen = above | (tied & (np.cumsum(tied, axis=1) <= room))
    idx = np.nonzero(chosen)[1].reshape(-1, k)  # increasing index per row
  else:
    idx = np.broadcast_to(np.arange(n), scores.shape)
  order = np.argsort(-np.take_along_axis(scores, idx, axis=1), axis=1, kind="stable")
  return np.take_along_axis(idx, order, axis=1)


def dual_encoder_search(query_vecs, cand_vecs, k: int, *, query_chunk: int = 256):
  """Exact top-k by dot product: ([Q, k] candidate indices best first, [Q, k] scores)."""
  q, c = _vectors(query_vecs, "query_vecs"), _vectors(cand_vecs, "cand_vecs")
  if q.shape[1] != c.shape[1]:
    raise ValueError(f"query_vecs {q.shape} and cand_vecs {c.shape} differ in width")
  k = min(int(k), c.shape[0])
  if k <= 0:
    raise ValueError(f"k must be positive, got {k}")
  idx, val = [], []
  for start in range(0, q.shape[0], query_chunk):
    s = q[start:start + query_chunk] @ c.T
    top = _top_k_rows(s, k)
    idx.append(top)
    val.append(np.take_along_axis(s, top, axis=1))
  if not idx:
    return np.zeros((0, k), np.int64), np.zeros((0, k))
  return np.concatenate(idx), np.concatenate(val)


def _stage_one(img, txt, txt2img, k_i2t, k_t2i, query_chunk):
  """Dual-encoder candidates and full-ranking target ranks of both directions."""
  i2t_cand, i2t_rank, t2i_cand, t2i_rank = [], [], [], []
  for start in range(0, img.shape[0], query_chunk):
    s = img[start:start + query_chunk] @ txt.T
    i2t_cand.append(_top_k_rows(s, k_i2t))
    i2t_rank.append(_best_caption_ranks(s, np.arange(start, start + s.shape[0]), txt2img))
  for start in range(0, txt.shape[0], query_chunk):
    s = txt[start:start + query_chunk] @ img.T
    t2i_cand.append(_top_k_rows(s, k_t2i))
    t2i_rank.append(_ranks_of_targets(s, txt2img[start:start + s.shape[0]]))
  cat = lambda xs, k: np.concatenate(xs) if xs else np.zeros((0, k), np.int64)
  return (cat(i2t_cand, k_i2t), np.concatenate(i2t_rank) if i2t_rank else np.zeros(0, np.int64),
          cat(t2i_cand, k_t2i), np.concatenate(t2i_rank) if t2i_rank else np.zeros(0, np.int64))


def _score_union(pair_keys: np.ndarray, n_txt: int, score_pairs: Callable,
                 chunk_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Scores each distinct pair (key = img * n_txt + txt) once, in sorted chunks."""
  keys = np.unique(pair_keys)
  out = np.empty(len(keys))
  for start in range(0, len(keys), chunk_size):
    chunk = keys[start:start + chunk_size]
    img_idx, txt_idx = chunk // n_txt, chunk % n_txt
    got = np.asarray(score_pairs(img_idx, txt_idx), np.float64)
    if got.shape != chunk.shape:
      raise ValueError(f"score_pairs returned shape {got.shape} for {len(chunk)} pairs; "
                       f"expected ({len(chunk)},)")
    if np.isnan(got).any():
      bad = int(np.flatnonzero(np.isnan(got))[0])
      raise ValueError(f"score_pairs returned NaN for pair (image {img_idx[bad]}, "
                       f"caption {txt_idx[bad]})")
    out[start:start + len(chunk)] = got
  return keys, out


def _rerank(cand: np.ndarray, cross: np.ndarray, is_target: np.ndarray,
            dual_rank: np.ndarray) -> np.ndarray:
  """Two-stage rank of each query's best target (see the module docstring)."""
  by_index = np.argsort(cand, axis=1, kind="stable")
  cross_by_index = np.take_along_axis(cross, by_index, axis=1)
  order = np.argsort(-cross_by_index, axis=1, kind="stable")  # ties: lower index first
  rank_by_index = np.empty_like(order)
  np.put_along_axis(rank_by_index, order, np.arange(cand.shape[1])[None, :], axis=1)
  rank = np.empty_like(rank_by_index)
  np.put_along_axis(rank, by_index, rank_by_index, axis=1)  # back to candidate order
  best = np.where(is_target, rank, _NEVER).min(axis=1)
  return np.where(is_target.any(axis=1), best, dual_rank)


def two_stage_recall(img_vecs, txt_vecs, txt2img, score_pairs: Callable, k: int,
                     ks: Sequence[int] = (1, 5, 10), *, k_t2i: int | None = None,
                     chunk_size: int = 4096, query_chunk: int = 256) -> dict:
  """Dual-encoder top-k retrieval re-ranked by a cross-encoder, both directions.

  Args:
    img_vecs: [N_img, E] image vectors; txt_vecs: [N_txt, E] caption vectors
      (similarity = dot product; normalise them first for cosine).
    txt2img: [N_txt] image of each caption.
    score_pairs: `score_pairs(img_idx [P] int64, txt_idx [P] int64) -> scores [P]`,
      the cross-encoder; called with at most `chunk_size` pairs at a time, each
      distinct pair once, sorted by (image, caption).
    k: candidates per image query (i2t), and per caption query unless `k_t2i`
      is given; clipped to the gallery size.

  Returns:
    {"dual": R@K of the dual encoder alone (full ranking), "two_stage": R@K
    after re-ranking, "pairs_scored": distinct pairs sent to score_pairs,
    "k_i2t", "k_t2i"}; the R@K dicts as `recall_at_k`.
  """
  img, txt = _vectors(img_vecs, "img_vecs"), _vectors(txt_vecs, "txt_vecs")
  if img.shape[1] != txt.shape[1]:
    raise ValueError(f"img_vecs {img.shape} and txt_vecs {txt.shape} differ in width")
  n_img, n_txt = img.shape[0], txt.shape[0]
  txt2img = _check_txt2img(txt2img, n_img, n_txt)
  k_i2t = min(int(k), n_txt)
  k_t2i = min(int(k if k_t2i is None else k_t2i), n_img)
  if k_i2t <= 0 or k_t2i <= 0 or chunk_size <= 0 or query_chunk <= 0:
    raise ValueError(f"k ({k_i2t}, {k_t2i}), chunk_size ({chunk_size}) and query_chunk "
                     f"({query_chunk}) must be positive (and the gallery non-empty)")
  i2t_cand, i2t_dual, t2i_cand, t2i_dual = _stage_one(img, txt, txt2img, k_i2t, k_t2i,
                                                      query_chunk)
  i2t_keys = np.arange(n_img)[:, None] * n_txt + i2t_cand
  t2i_keys = t2i_cand * n_txt + np.arange(n_txt)[:, None]
  keys, values = _score_union(np.concatenate([i2t_keys.ravel(), t2i_keys.ravel()]), n_txt,
                              score_pairs, chunk_size)
  lookup = lambda q: values[np.searchsorted(keys, q)]
  i2t_rank = _rerank(i2t_cand, lookup(i2t_keys), txt2img[i2t_cand] == np.arange(n_img)[:, None],
                     i2t_dual)
  t2i_rank = _rerank(t2i_cand, lookup(t2i_keys), t2i_cand == txt2img[:, None], t2i_dual)
  return {"dual": _recalls(i2t_dual, t2i_dual, ks),
          "two_stage": _recalls(i2t_rank, t2i_rank, ks),
          "pairs_scored": int(len(keys)), "k_i2t": k_i2t, "k_t2i": k_t2i}
