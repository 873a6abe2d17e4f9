"""Hardest in-batch negatives for image-text matching (MVPTR's ITM sampler).

MVPTR trains its cross-modal ITM head on the hardest negatives of the batch, as
ranked by a cheaper similarity (its first-stage contrastive scores): for each
image the non-matching caption it scores highest, for each caption the
non-matching image. The scores may come from any `vlp.matching` similarity or
from an ITM head scoring all pairs; the caller then builds the negative pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlp.matching.masked import NEG


def hardest_negatives(scores: jax.Array, positives: jax.Array, *,
                      image_mask: jax.Array | None = None,
                      text_mask: jax.Array | None = None
                      ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Hardest non-positive partner of every image and of every caption.

  Args:
    scores: [Bi, Bt] similarity of image i and caption t (higher = closer).
    positives: [Bi, Bt] bool, True where caption t describes image i; those
      (same-image captions included) are never chosen.
    image_mask, text_mask: [Bi] / [Bt] bool, False on padding (never chosen).

  Returns:
    (text_for_image [Bi] int32, image_for_text [Bt] int32, image_found [Bi] bool,
    text_found [Bt] bool). argmax over the candidates, ties to the lowest index;
    where no candidate exists (`*_found` False) the index is -1. No gradient.
  """
  scores = jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
  num_images, num_texts = scores.shape
  image_mask = (jnp.ones((num_images,), bool) if image_mask is None
                else jnp.asarray(image_mask, bool))
  text_mask = (jnp.ones((num_texts,), bool) if text_mask is None
               else jnp.asarray(text_mask, bool))
  candidates = image_mask[:, None] & text_mask[None, :] & ~jnp.asarray(positives, bool)
  masked = jnp.where(candidates, scores, NEG)
  image_found = jnp.any(candidates, axis=1)
  text_found = jnp.any(candidates, axis=0)
  text_for_image = jnp.where(image_found, jnp.argmax(masked, axis=1), -1).astype(jnp.int32)
  image_for_text = jnp.where(text_found, jnp.argmax(masked, axis=0), -1).astype(jnp.int32)
  return text_for_image, image_for_text, image_found, text_found
