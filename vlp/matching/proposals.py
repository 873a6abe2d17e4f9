"""Query-aware proposal filtering before grounding (Ref-NMS / VL-NMS).

Ref-NMS (Chen et al., AAAI 2021) scores every proposal's relatedness to the
expression and multiplies the detector confidence by sigma(relatedness) before
NMS, so that the few proposals kept cover the referent more often; the
downstream grounding model then runs unchanged on the kept proposals.

* `QueryAwareProposalScorer`: relatedness r_k = w . tanh(W_f f_k + W_b b_k +
  W_q q) with q the mean of the expression's word embeddings (its own, so the
  scorer does not depend on the grounding backbone); trained with binary
  cross-entropy, the referred region positive ("att_vanilla").
* `nms_keep`: greedy NMS on fixed shapes (jittable): boxes in descending score
  order, each kept unless its IoU with an already kept box exceeds the threshold,
  at most `max_keep` kept.
* `FilteredGrounding`: a `UniterForGrounding` plus the scorer; `encode` scores
  the regions with every candidate (`region_scores`, training) and
  `filtered_encode` with only the kept proposals (final = sigma(r) * confidence,
  NMS at `iou_threshold`, the top `keep`): the pipeline evaluated by the grounding
  job next to the unfiltered one. vlp_scenes has no detector confidences (1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.models.downstream import UniterForGrounding
from vlp.models.layers import Dense, Embed
from vlp.models.uniter_config import UniterConfig


def iou_matrix(boxes: jax.Array) -> jax.Array:
  """[..., N, 4] x1 y1 x2 y2 -> [..., N, N] IoU (continuous areas)."""
  a, b = boxes[..., :, None, :], boxes[..., None, :, :]
  iw = jnp.clip(jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0]), 0)
  ih = jnp.clip(jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1]), 0)
  inter = iw * ih
  area = lambda x: jnp.clip(x[..., 2] - x[..., 0], 0) * jnp.clip(x[..., 3] - x[..., 1], 0)
  union = area(a) + area(b) - inter
  return jnp.where(union > 0, inter / jnp.where(union > 0, union, 1.0), 0.0)


def nms_keep(boxes: jax.Array, scores: jax.Array, valid: jax.Array, *,
             iou_threshold: float, max_keep: int) -> jax.Array:
  """[N] bool: the boxes greedy NMS keeps (ties in score: the lower index first)."""
  n = boxes.shape[0]
  order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf), stable=True)
  iou = iou_matrix(boxes.astype(jnp.float32))[order][:, order]
  ok = valid[order]

  def body(i, keep):
    blocked = jnp.any(keep & (iou[i] > iou_threshold))
    room = jnp.sum(keep) < max_keep
    return keep.at[i].set(ok[i] & ~blocked & room)

  keep_sorted = jax.lax.fori_loop(0, n, body, jnp.zeros(n, bool))
  return jnp.zeros(n, bool).at[order].set(keep_sorted)


class QueryAwareProposalScorer(nnx.Module):

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.word_embeddings = Embed(cfg.vocab_size, h, cfg, names=('vocab', 'embed'), rngs=rngs)
    self.query = Dense(h, h, cfg, names=('embed', 'mlp'), rngs=rngs)
    self.feat = Dense(cfg.img_dim, h, cfg, names=('region_feat', 'mlp'), rngs=rngs)
    self.box = Dense(cfg.img_pos_dim, h, cfg, names=('box', 'mlp'), rngs=rngs)
    self.out = Dense(h, 1, cfg, names=('mlp', None), rngs=rngs)

  def __call__(self, batch) -> jax.Array:
    """[B, K] float32 relatedness logits (padding -1e4)."""
    m = batch["txt_mask"].astype(jnp.float32)[..., None]
    q = jnp.sum(self.word_embeddings(batch["input_ids"]) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1)
    x = (self.feat(batch["img_feat"].astype(jnp.float32), out_dtype=jnp.float32)
         + self.box(batch["img_pos"], out_dtype=jnp.float32)
         + self.query(q, out_dtype=jnp.float32)[:, None])
    rel = self.out(jnp.tanh(x), out_dtype=jnp.float32)[..., 0]
    return jnp.where(batch["img_mask"].astype(bool), rel, -1e4)


def proposal_bce(logits: jax.Array, target: jax.Array, img_mask: jax.Array,
                 weights: jax.Array) -> jax.Array:
  """Mean over real examples of the mean BCE over real regions (target positive)."""
  mask = img_mask.astype(bool)
  labels = jax.nn.one_hot(target, logits.shape[-1])
  bce = jnp.maximum(logits, 0) - logits * labels + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  per = jnp.sum(jnp.where(mask, bce, 0), -1) / jnp.maximum(jnp.sum(mask, -1), 1)
  return jnp.sum(per * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class FilteredGrounding(UniterForGrounding):
  """`UniterForGrounding` + `proposal_scorer`; see the module docstring."""

  def __init__(self, cfg: UniterConfig, *, keep: int, iou_threshold: float = 0.3,
               mlp: int = 1, rngs: nnx.Rngs):
    if keep <= 0:
      raise ValueError(f"proposal_filter.keep must be positive, got {keep}")
    super().__init__(cfg, mlp=mlp, rngs=rngs)
    self.proposal_scorer = QueryAwareProposalScorer(cfg, rngs=rngs)
    self.keep, self.iou_threshold = keep, iou_threshold

  def encode(self, batch: dict, *, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    out = super().encode(batch, rngs=rngs)
    return dict(out, proposal_logits=self.proposal_scorer(batch))

  def kept_regions(self, batch: dict) -> jax.Array:
    """[B, K] bool: the proposals kept (final = sigma(r) * confidence, NMS, top keep)."""
    conf = batch.get("img_conf", jnp.ones(batch["img_mask"].shape, jnp.float32))
    final = jax.nn.sigmoid(self.proposal_scorer(batch)) * conf
    keep = lambda b, s, v: nms_keep(b, s, v, iou_threshold=self.iou_threshold,
                                    max_keep=self.keep)
    return jax.vmap(keep)(batch["img_boxes"], final, batch["img_mask"].astype(bool))

  def filtered_encode(self, batch: dict) -> dict[str, jax.Array]:
    """The grounding head on the kept proposals only: region_scores, kept."""
    kept = self.kept_regions(batch)
    out = super().encode(dict(batch, img_mask=kept))
    return dict(region_scores=out["region_scores"], kept=kept)
