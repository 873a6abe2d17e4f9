"""Retrieval fine-tuning with online hard negatives (the UNITER reference's
`train_itm_hard_negatives.py` recipe, with in-batch candidates; docs/reference.md,
"Fine-tuning").

The batch holds B matched (caption, image) rows; negatives are formed by
recombining rows: (text_a, image_j) and (text_j, image_a), j != a. Row j is a
candidate for anchor a only if it is real (`example_mask`) and, when the batch
has `image_id`, shows another image (COCO/Flickr images have 5 captions, so a
same-image row would be a false negative).

1. Scoring (eval mode: no dropout, under stop_gradient): for anchors a (the first
   `num_anchors` rows, all rows by default) s(text_a, image_j) for every j
   (text-anchored) and s(text_j, image_a) (image-anchored). With all rows as
   anchors this is one B x B matrix S[i, j] = s(text_i, image_j).
2. Selection: per anchor and direction, the `num_hard_negatives` valid candidates
   of highest score (`hardest_negatives`).
3. Train pass (dropout on, gradients): the A positives (a, a), the A * n hard
   negative images (a, j) and the A * n hard negative captions (j, a), in one
   forward. The positive's train-mode score serves both directions (the
   reference runs it once per direction, with its own dropout mask).
4. Loss, with sigma the logistic function and margin m = 0.2:

     h(a, neg) = max(0, m + sigma(s_neg) - sigma(s_(a,a)))
     L = sum_{dir in (t2i, i2t)} mean_{a real} mean_{k valid} h(a, neg_k^dir)

   The reference divides each anchor's mean hinge by its 8 anchors per update
   and sums both directions, which is the same sum of two means.

Sizes: the reference keeps the top 31 of 399 random candidates per
anchor; here the candidates are the other B - 1 rows, so B = 400 with
`num_hard_negatives=31` reproduces its ratio (n is clipped to B - 1). Cost: the
scoring pass runs B * B pairs with every row an anchor, 2 * A * B with
`num_anchors=A`; A = 8, B = 400 is the reference's per-GPU update (8 captions x
both directions x 400 candidates, then 8 x 63 train pairs). Scoring runs
`score_chunk` pairs at a time (0 = all at once) to bound memory.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.tasks import common

TEXT_KEYS = ("input_ids", "txt_mask")
IMAGE_KEYS = ("img_feat", "img_pos", "img_mask")


def pair_batch(batch: Mapping[str, jax.Array], txt_idx: jax.Array,
               img_idx: jax.Array) -> dict[str, jax.Array]:
  """The (text of row txt_idx[p], image of row img_idx[p]) pairs as a batch."""
  out = {k: jnp.take(jnp.asarray(batch[k]), txt_idx, axis=0) for k in TEXT_KEYS}
  out.update({k: jnp.take(jnp.asarray(batch[k]), img_idx, axis=0) for k in IMAGE_KEYS})
  return out


def pair_scores(model: Any, batch: Mapping[str, jax.Array], txt_idx: jax.Array,
                img_idx: jax.Array, *, chunk: int = 0) -> jax.Array:
  """Eval-mode `rank_scores` of the given pairs [P], float32, without gradient.

  Args:
    model: anything whose `encode` returns `rank_scores` [P].
    batch: rows to recombine.
    txt_idx, img_idx: [P] int row indices.
    chunk: pairs per forward pass (0 = all P at once); P is padded up to a
      multiple of it and the pass is a `jax.lax.map`.
  """
  txt_idx = jnp.asarray(txt_idx, jnp.int32)
  img_idx = jnp.asarray(img_idx, jnp.int32)
  num = txt_idx.shape[0]

  def score(idx):
    return model.encode(pair_batch(batch, *idx), rngs=None)["rank_scores"]

  if not chunk or chunk >= num:
    scores = score((txt_idx, img_idx))
  else:
    pad = -num % chunk
    idx = tuple(jnp.pad(i, (0, pad)).reshape(-1, chunk) for i in (txt_idx, img_idx))
    scores = jax.lax.map(score, idx).reshape(-1)[:num]
  return jax.lax.stop_gradient(scores.astype(jnp.float32))


def candidate_mask(batch: Mapping[str, jax.Array], anchors: jax.Array) -> jax.Array:
  """[A, B] bool: row j may serve as a negative for anchor row anchors[a]."""
  num_rows = jnp.shape(batch["input_ids"])[0]
  real = common.example_weights(batch) > 0
  rows = jnp.arange(num_rows)
  valid = real[None, :] & (rows[None, :] != anchors[:, None])
  if "image_id" in batch:
    image_id = jnp.asarray(batch["image_id"])
    valid &= image_id[None, :] != image_id[anchors][:, None]
  return valid


def hardest_negatives(scores: jax.Array, valid: jax.Array, num: int
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The `num` highest-scoring valid candidates per anchor row.

  Args:
    scores: [A, C] candidate scores.
    valid: [A, C] bool, False on candidates that must not be picked.
    num: how many to keep (<= C).

  Returns:
    (indices [A, num] int32 in decreasing score order, weights [A, num] float32
    that are 0 where fewer than `num` valid candidates exist, top scores [A, num]
    with -inf on those slots).
  """
  masked = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
  top, idx = jax.lax.top_k(masked, num)
  weights = jnp.take_along_axis(valid, idx, axis=-1).astype(jnp.float32)
  return idx.astype(jnp.int32), weights, top


def _direction_loss(hinge: jax.Array, neg_w: jax.Array, anchor_w: jax.Array) -> jax.Array:
  per_anchor = jnp.sum(hinge * neg_w, -1) / jnp.maximum(jnp.sum(neg_w, -1), 1.0)
  return common.weighted_mean(per_anchor, anchor_w)


def retrieval_ft_loss(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None,
                      *, num_hard_negatives: int = 31, num_anchors: int = 0,
                      margin: float = 0.2, score_chunk: int = 0
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Hard-negative ranking loss on a batch of matched pairs (module docstring).

  Args:
    model: a `UniterForRetrieval` (anything whose `encode` returns
      `rank_scores` [B]).
    batch: matched pairs: input_ids, txt_mask, img_feat, img_pos, img_mask,
      optionally example_mask and image_id.
    rng: dropout key for the train pass, or None for a deterministic pass.
    num_hard_negatives: n, negatives kept per anchor and direction (clipped to
      B - 1).
    num_anchors: A, rows 0..A-1 act as anchors; 0 = every row.
    margin: hinge margin on sigmoid scores.
    score_chunk: pairs per eval-mode scoring pass (0 = all at once).

  Returns:
    (loss, metrics): `loss/retrieval_ft`, `loss/retrieval_ft_t2i` (hard negative
    images for a caption), `loss/retrieval_ft_i2t` (hard negative captions for an
    image), and in-batch eval-mode recall at 1 `retrieval_ft_ir_r1` (caption
    query) / `retrieval_ft_tr_r1` (image query) over real anchors.
  """
  num_rows = jnp.shape(batch["input_ids"])[0]
  a = num_rows if num_anchors <= 0 else min(num_anchors, num_rows)
  n = min(num_hard_negatives, num_rows - 1)
  if n < 1:
    raise ValueError("retrieval_ft needs at least 2 rows per batch")
  anchors = jnp.arange(a, dtype=jnp.int32)
  rows = jnp.arange(num_rows, dtype=jnp.int32)

  # 1. Eval-mode scores, no gradient. t2i[a, j] = s(text_a, image_j),
  #    i2t[a, j] = s(text_j, image_a).
  if a == num_rows:
    full = pair_scores(model, batch, jnp.repeat(rows, num_rows), jnp.tile(rows, num_rows),
                       chunk=score_chunk).reshape(num_rows, num_rows)
    t2i, i2t = full, full.T
  else:
    both = pair_scores(
        model, batch,
        jnp.concatenate([jnp.repeat(anchors, num_rows), jnp.tile(rows, a)]),
        jnp.concatenate([jnp.tile(rows, a), jnp.repeat(anchors, num_rows)]),
        chunk=score_chunk).reshape(2, a, num_rows)
    t2i, i2t = both[0], both[1]

  # 2. Hardest valid negatives per anchor, both directions.
  valid = candidate_mask(batch, anchors)
  neg_img, w_img, top_img = hardest_negatives(t2i, valid, n)
  neg_txt, w_txt, top_txt = hardest_negatives(i2t, valid, n)

  # 3. One train-mode pass over positives, negative images, negative captions.
  rep = jnp.repeat(anchors, n)
  txt_idx = jnp.concatenate([anchors, rep, neg_txt.reshape(-1)])
  img_idx = jnp.concatenate([anchors, neg_img.reshape(-1), rep])
  rngs = None if rng is None else nnx.Rngs(dropout=rng)
  scores = model.encode(pair_batch(batch, txt_idx, img_idx), rngs=rngs)["rank_scores"]
  prob = jax.nn.sigmoid(scores.astype(jnp.float32))
  pos = prob[:a]
  neg = prob[a:].reshape(2, a, n)

  # 4. Hinge on sigmoid scores, mean over valid negatives, mean over real anchors.
  anchor_w = common.example_weights(batch)[:a]
  hinge = jax.nn.relu(margin + neg - pos[None, :, None])
  loss_t2i = _direction_loss(hinge[0], w_img, anchor_w)
  loss_i2t = _direction_loss(hinge[1], w_txt, anchor_w)
  loss = loss_t2i + loss_i2t

  diag_t2i = jnp.take_along_axis(t2i, anchors[:, None], axis=1)[:, 0]
  diag_i2t = jnp.take_along_axis(i2t, anchors[:, None], axis=1)[:, 0]
  ir_r1 = common.weighted_mean((diag_t2i > top_img[:, 0]).astype(jnp.float32), anchor_w)
  tr_r1 = common.weighted_mean((diag_i2t > top_txt[:, 0]).astype(jnp.float32), anchor_w)
  return loss, {"loss/retrieval_ft": loss, "loss/retrieval_ft_t2i": loss_t2i,
                "loss/retrieval_ft_i2t": loss_i2t, "retrieval_ft_ir_r1": ir_r1,
                "retrieval_ft_tr_r1": tr_r1}
