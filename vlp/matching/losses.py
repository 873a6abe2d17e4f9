"""Image-text matching losses on a score matrix, with a mask of positive pairs.

A loss is a pure, jittable function

    loss(scores [Bi, Bt] float, positives [Bi, Bt] bool, *, image_mask=None,
         text_mask=None, **hyper) -> scalar float32

`positives[i, t]` is True when caption t describes image i. A mask, not the
diagonal, because a COCO or Flickr image has five captions: captions of the same
image must count neither as negatives nor as anchors of another image.
`image_mask [Bi]` / `text_mask [Bt]` (default all True) mark real rows and
columns; a padded row or column is neither an anchor nor a negative. Rows with no
positive and anchors with no negative add nothing, and every gradient stays
finite (masked logits are large finite negatives, never -inf).

Terms are written per *anchor*, a positive pair (i, t) with score s_p = s(i, t),
in two directions: image-to-text compares s_p with the negatives of image i,
N(i) = {t' real, not a positive of i}; text-to-image with the negatives of t,
N(t) = {i' real, i' not showing t}. The loss is the sum of the two directions,
each the mean over anchors (`reduction='mean'`) or their sum ('sum', VSE++).

`LOSSES` maps names to these functions; `get_loss(name, **hyper)` binds the
hyper-parameters. The momentum-queue loss (CODER-style) is in
`vlp.matching.momentum_queue`, the hardest-negative sampler (MVPTR) in
`vlp.matching.hard_negatives`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vlp.matching.masked import NEG, masked_logsumexp

Loss = Callable[..., jax.Array]
REDUCTIONS = ("mean", "sum")


def pair_masks(scores: jax.Array, positives: jax.Array, image_mask=None, text_mask=None
               ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(scores in float32 with non-real entries zeroed, anchors, negatives, real pairs)."""
  scores = jnp.asarray(scores, jnp.float32)
  positives = jnp.asarray(positives, bool)
  if scores.ndim != 2 or positives.shape != scores.shape:
    raise ValueError(f"loss: scores must be [Bi, Bt] and positives the same shape; got "
                     f"{scores.shape} and {positives.shape}")
  num_images, num_texts = scores.shape
  image_mask = (jnp.ones((num_images,), bool) if image_mask is None
                else jnp.asarray(image_mask, bool))
  text_mask = (jnp.ones((num_texts,), bool) if text_mask is None
               else jnp.asarray(text_mask, bool))
  real = image_mask[:, None] & text_mask[None, :]
  return jnp.where(real, scores, 0.0), positives & real, real & ~positives, real


def reduce_terms(terms: jax.Array, anchors: jax.Array, reduction: str) -> jax.Array:
  """Sum or mean of per-anchor terms over the anchors (0 when there are none)."""
  if reduction not in REDUCTIONS:
    raise ValueError(f"unknown reduction {reduction!r}; expected one of {REDUCTIONS}")
  total = jnp.sum(jnp.where(anchors, terms, 0.0))
  if reduction == "sum":
    return total
  return total / jnp.maximum(jnp.sum(anchors), 1)


def both_directions(per_direction: Callable, scores, anchors, negatives,
                    reduction: str) -> jax.Array:
  """per_direction(scores, negatives) -> terms [A, C] for anchors along rows,
  applied to the matrix (image-to-text) and to its transpose (text-to-image)."""
  i2t = per_direction(scores, negatives)
  t2i = per_direction(scores.T, negatives.T)
  return reduce_terms(i2t, anchors, reduction) + reduce_terms(t2i, anchors.T, reduction)


def hinge_sum(scores, positives, *, image_mask=None, text_mask=None, margin: float = 0.2,
              reduction: str = "mean") -> jax.Array:
  """Triplet hinge summed over every negative (VSE0; DVSA with margin 1):

      l(i, t) = sum_{t' in N(i)} [m - s(i,t) + s(i,t')]_+  +  sum_{i' in N(t)} [m - s(i,t) + s(i',t)]_+
  """
  scores, anchors, negatives, _ = pair_masks(scores, positives, image_mask, text_mask)

  def rows(s, neg):
    # [A, C, C']: anchor (a, c) against every negative c' of row a.
    hinge = jax.nn.relu(margin - s[:, :, None] + s[:, None, :])
    return jnp.sum(jnp.where(neg[:, None, :], hinge, 0.0), axis=2)

  return both_directions(rows, scores, anchors, negatives, reduction)


def hinge_hardest(scores, positives, *, image_mask=None, text_mask=None,
                  margin: float = 0.2, reduction: str = "mean") -> jax.Array:
  """VSE++'s max-violation triplet hinge, hardest negative in each direction:

      l(i, t) = max_{t' in N(i)} [m - s(i,t) + s(i,t')]_+  +  max_{i' in N(t)} [m - s(i,t) + s(i',t)]_+

  (margin 0.2, summed over the batch in VSE++: reduction='sum').
  """
  scores, anchors, negatives, _ = pair_masks(scores, positives, image_mask, text_mask)

  def rows(s, neg):
    hardest = jnp.max(jnp.where(neg, s, NEG), axis=1, keepdims=True)
    return jax.nn.relu(margin - s + hardest)  # 0 when the row has no negative

  return both_directions(rows, scores, anchors, negatives, reduction)


def info_nce(scores, positives, *, image_mask=None, text_mask=None,
             temperature: float = 0.07, reduction: str = "mean") -> jax.Array:
  """InfoNCE (cross-entropy over the batch), both directions:

      l(i, t) = -log e^{s(i,t)/tau} / (e^{s(i,t)/tau} + sum_{t' in N(i)} e^{s(i,t')/tau})
                + the same over images i' in N(t)

  Each positive is contrasted with the negatives only (not with its sibling
  captions), so with one positive per row this is the usual softmax CE.
  """
  scores, anchors, negatives, _ = pair_masks(scores, positives, image_mask, text_mask)

  def rows(s, neg):
    logits = s / temperature
    neg_lse = masked_logsumexp(logits, neg, axis=1)[:, None]
    return jnp.logaddexp(logits, neg_lse) - logits

  return both_directions(rows, scores, anchors, negatives, reduction)


def unified(scores, positives, *, image_mask=None, text_mask=None, gamma: float = 20.0,
            margin: float = 0.1, reduction: str = "mean") -> jax.Array:
  """The unified pair-similarity loss (Li et al. 2022), both directions:

      l(i, t) = (1/gamma) log(1 + sum_{t' in N(i)} exp(gamma (s(i,t') - s(i,t) + m)))
                + the same over images i' in N(t)

  Its limits: gamma -> inf gives max(0, max_neg s - s_p + m), the hardest-negative
  triplet (`hinge_hardest`); m = 0 and gamma = 1/tau give tau * `info_nce`. The
  defaults (gamma 20, m 0.1) are this module's choice, not published values.
  """
  scores, anchors, negatives, _ = pair_masks(scores, positives, image_mask, text_mask)

  def rows(s, neg):
    neg_lse = masked_logsumexp(gamma * s, neg, axis=1)[:, None]
    return jax.nn.softplus(neg_lse + gamma * (margin - s)) / gamma

  return both_directions(rows, scores, anchors, negatives, reduction)


def damsm(scores, positives, *, image_mask=None, text_mask=None, gamma3: float = 10.0,
          reduction: str = "mean") -> jax.Array:
  """AttnGAN's DAMSM matching loss on one score matrix: the batch cross-entropy of
  gamma3-scaled scores in both directions, P(t | i) = softmax_t(gamma3 s(i, t)),
  with same-image captions masked out (as AttnGAN masks same-class ones); i.e.
  `info_nce` at temperature 1/gamma3. The word loss applies it to `damsm_word`
  scores, the sentence loss to `cosine_global` scores (`damsm_total`)."""
  return info_nce(scores, positives, image_mask=image_mask, text_mask=text_mask,
                  temperature=1.0 / gamma3, reduction=reduction)


def damsm_total(word_scores, sentence_scores, positives, *, image_mask=None,
                text_mask=None, gamma3: float = 10.0) -> tuple[jax.Array, dict]:
  """L_DAMSM = word loss + sentence loss -> (total, {'damsm_word', 'damsm_sentence'})."""
  kw = dict(image_mask=image_mask, text_mask=text_mask, gamma3=gamma3)
  word = damsm(word_scores, positives, **kw)
  sentence = damsm(sentence_scores, positives, **kw)
  return word + sentence, {"damsm_word": word, "damsm_sentence": sentence}


def mil_nce(scores, positives, *, image_mask=None, text_mask=None,
            temperature: float = 1.0, reduction: str = "mean") -> jax.Array:
  """MIL-NCE as COMMA trains with it: all positives in the numerator.

  For each image i with positives P(i), with x = s / tau:

      l(i) = log( sum_{t real} e^{x(i,t)} + sum_{t in P(i)} sum_{i' real} e^{x(i',t)} )
             - log sum_{t in P(i)} e^{x(i,t)}

  The denominator is the image's row together with the columns of its captions
  (a positive appears in both, as in COMMA's code). Unlike the other losses this
  is one term per image (reduction over images that have a positive).
  """
  scores, anchors, _, real = pair_masks(scores, positives, image_mask, text_mask)
  x = scores / temperature
  numerator = masked_logsumexp(x, anchors, axis=1)
  row = masked_logsumexp(x, real, axis=1)
  column = masked_logsumexp(x, real, axis=0)  # [Bt]
  columns = masked_logsumexp(jnp.broadcast_to(column[None, :], x.shape), anchors, axis=1)
  terms = jnp.logaddexp(row, columns) - numerator
  return reduce_terms(terms, jnp.any(anchors, axis=1), reduction)


def weighted_nce_rows(scores, negatives, *, temperature: float, beta: float
                      ) -> jax.Array:
  """Per-anchor InfoNCE terms along rows with similarity-weighted negatives.

  For anchor (a, c) with x = s / tau and weights w_j = softmax_{j in N(a)}(beta s(a, j))
  (held fixed: no gradient flows through them):

      l(a, c) = log(e^{x(a,c)} + |N(a)| sum_{j in N(a)} w_j e^{x(a,j)}) - x(a,c)

  Harder negatives weigh more as beta grows; beta = 0 gives uniform weights
  1/|N(a)| and plain InfoNCE. Returns [A, C] (meaningful where (a, c) is an
  anchor).
  """
  x = scores / temperature
  log_w = jax.lax.stop_gradient(
      beta * scores - masked_logsumexp(beta * scores, negatives, axis=1)[:, None])
  count = jnp.maximum(jnp.sum(negatives, axis=1, keepdims=True), 1)
  weighted = jnp.log(count) + masked_logsumexp(x + log_w, negatives, axis=1)[:, None]
  return jnp.logaddexp(x, weighted) - x


def dcl(scores, positives, *, image_mask=None, text_mask=None, temperature: float = 0.07,
        beta: float = 5.0, reduction: str = "mean") -> jax.Array:
  """Diversity-sensitive contrastive loss (CODER-style) on in-batch negatives:
  InfoNCE in both directions whose negatives are weighted by softmax(beta * s)
  (`weighted_nce_rows`). With momentum queues of extra negatives see
  `vlp.matching.momentum_queue.queue_loss`. beta = 5 is this module's choice."""
  scores, anchors, negatives, _ = pair_masks(scores, positives, image_mask, text_mask)
  rows = functools.partial(weighted_nce_rows, temperature=temperature, beta=beta)
  return both_directions(rows, scores, anchors, negatives, reduction)


def positives_from_ids(image_ids, text_image_ids) -> jax.Array:
  """positives[i, t] = the caption t's image id equals image i's id."""
  return jnp.asarray(image_ids)[:, None] == jnp.asarray(text_image_ids)[None, :]


LOSSES: dict[str, Loss] = {
    "hinge_sum": hinge_sum,
    "hinge_hardest": hinge_hardest,
    "info_nce": info_nce,
    "unified": unified,
    "damsm": damsm,
    "mil_nce": mil_nce,
    "dcl": dcl,
}


def get_loss(name: str, **hyper: Any) -> Loss:
  """The loss `name` with its hyper-parameters bound; unknown names are errors
  that list the accepted ones."""
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; expected one of {sorted(LOSSES)}")
  fn = LOSSES[name]
  accepted = [p for p in list(inspect.signature(fn).parameters)[2:]
              if p not in ("image_mask", "text_mask")]
  unknown = sorted(set(hyper) - set(accepted))
  if unknown:
    raise ValueError(f"loss {name!r} has no hyper-parameter(s) {unknown}; accepted: {accepted}")
  bound = functools.partial(fn, **hyper)
  functools.update_wrapper(bound, fn)
  return bound
