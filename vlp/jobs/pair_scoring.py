"""Scoring image-caption pairs and held-out task metrics, for pretraining and retrieval.

* Held-out MLM accuracy and ITM accuracy: the task losses run deterministically
  on a fixed set of validation batches (masking seeded independently of training).
* Zero-shot retrieval: every (image, caption) pair of a test gallery is scored by
  the ITM "match" logit (the score UNITER's retrieval head starts from), and the
  score matrix goes to `vlp.evaluators.retrieval.recall_at_k`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from vlp.evaluators import retrieval
from vlp.parallel import global_batch
from vlp.train import step as step_lib


def mean_metrics(eval_fn: Callable, params: Any, batches: Iterable[Mapping[str, np.ndarray]],
                 to_global: Callable) -> dict[str, float]:
  """Example-weighted means over the batches of every process.

  Each batch's metrics are already means over the real examples of the *global*
  batch (losses weight by `example_mask`), so batches are weighted by their
  global count of real examples, the same number on every host.
  """
  sums: dict[str, float] = {}
  weight = 0.0
  for host_batch in batches:
    if "example_mask" not in host_batch:
      host_batch = dict(host_batch, example_mask=np.ones(len(host_batch["input_ids"]), bool))
    batch = to_global(host_batch)
    metrics, n = jax.device_get((eval_fn(params, batch), _count(batch["example_mask"])))
    n = float(n)
    for k, v in metrics.items():
      sums[k] = sums.get(k, 0.0) + float(v) * n
    weight += n
  return {k: v / max(weight, 1.0) for k, v in sums.items()}


@jax.jit
def _count(mask: jax.Array) -> jax.Array:
  return jnp.sum(mask.astype(jnp.float32))


def pair_batch(gallery: Mapping[str, np.ndarray], img_idx: np.ndarray, txt_idx: np.ndarray,
               batch_size: int) -> tuple[dict, int]:
  """(batch of the given image x caption pairs, number of real pairs).

  At most `batch_size` pairs; padded with pair (0, 0) to `batch_size` rows so every
  call has the same shape, with `example_mask` False on the padding.
  """
  real = len(img_idx)
  if real > batch_size:
    raise ValueError(f"{real} pairs do not fit a batch of {batch_size}")
  ii = np.pad(np.asarray(img_idx), (0, batch_size - real))
  tt = np.pad(np.asarray(txt_idx), (0, batch_size - real))
  batch = {
      "input_ids": gallery["input_ids"][tt],
      "txt_mask": gallery["txt_mask"][tt],
      "img_feat": gallery["img_feat"][ii],
      "img_pos": gallery["img_pos"][ii],
      "img_mask": gallery["img_mask"][ii],
      "example_mask": np.arange(batch_size) < real,
  }
  return batch, real


def all_pairs(gallery: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """(image, caption) indices of every gallery pair, image-major."""
  n_img = gallery["img_feat"].shape[0]
  n_txt = gallery["input_ids"].shape[0]
  img_idx, txt_idx = np.meshgrid(np.arange(n_img), np.arange(n_txt), indexing="ij")
  return img_idx.ravel(), txt_idx.ravel()


def score_pairs(score_fn: Callable, params: Any, gallery: Mapping[str, np.ndarray],
                img_idx: np.ndarray, txt_idx: np.ndarray, *, batch_size: int,
                to_global: Callable, rows: np.ndarray) -> np.ndarray:
  """Scores [P] of the given pairs, `batch_size` pairs per `score_fn` call.

  Every host builds the same pair batches and feeds only `rows` of each (its
  `vlp.parallel.global_batch.process_rows` for `batch_size`).
  """
  scores = []
  for start in range(0, len(img_idx), batch_size):
    batch, real = pair_batch(gallery, img_idx[start:start + batch_size],
                             txt_idx[start:start + batch_size], batch_size)
    local = {k: v[rows] for k, v in batch.items()}
    scores.append(global_batch.to_host(score_fn(params, to_global(local)))[:real])
  return np.concatenate(scores) if scores else np.zeros((0,), np.float32)


def score_matrix(score_fn: Callable, params: Any, gallery: Mapping[str, np.ndarray], *,
                 batch_size: int, to_global: Callable, rows: np.ndarray) -> np.ndarray:
  """[N_img, N_txt] scores of every gallery pair."""
  img_idx, txt_idx = all_pairs(gallery)
  scores = score_pairs(score_fn, params, gallery, img_idx, txt_idx, batch_size=batch_size,
                       to_global=to_global, rows=rows)
  return scores.reshape(gallery["img_feat"].shape[0], gallery["input_ids"].shape[0])


def zero_shot_retrieval(score_fn: Callable, params: Any, gallery: Mapping[str, np.ndarray],
                        batch_size: int, to_global: Callable,
                        rows: np.ndarray) -> dict[str, float]:
  """Recall@K of the ITM score over every gallery pair (see `score_pairs` for `rows`)."""
  matrix = score_matrix(score_fn, params, gallery, batch_size=batch_size,
                        to_global=to_global, rows=rows)
  return retrieval.recall_at_k(matrix, gallery["txt2img"])


def jit_eval_step(graphdef, loss_fn: Callable):
  """`jax.jit` of `step.make_eval_step` (cache it per run: `EvalContext.jit`)."""
  return jax.jit(step_lib.make_eval_step(graphdef, loss_fn))


def jit_score_step(graphdef):
  """`jax.jit` of `step.make_score_step` (the ITM match logit per pair)."""
  return jax.jit(step_lib.make_score_step(graphdef))
