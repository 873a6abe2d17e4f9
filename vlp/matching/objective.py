"""The matching objective: a `vlp.matching.losses` loss on the in-batch score matrix.

A training batch holds B matched (image, caption) rows. Every image of the
batch is scored against every caption (`MatchingModel.scores`, [B, B]); pair
(i, t) is a positive when rows i and t show the same image (`image_id`; the
diagonal without it). Padded rows (`example_mask` False) are neither positives
nor negatives (the loss's image and text masks). The loss is
`vlp.matching.losses`' `loss` with `loss_args`; `shapley_weight` > 0 adds LOUPE's
(approximate) Shapley alignment regulariser on the matched rows.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.matching import losses, shapley
from vlp.matching.model import parse_args

_PAD_SCORE = -1e4


def positives_of(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """([B, B] bool positives, [B] bool real rows)."""
  b = batch["input_ids"].shape[0]
  real = batch["example_mask"].astype(bool) if "example_mask" in batch else jnp.ones(b, bool)
  same = (batch["image_id"][:, None] == batch["image_id"][None, :] if "image_id" in batch
          else jnp.eye(b, dtype=bool))
  return same & real[:, None] & real[None, :], real


def make_matching_loss(*, loss: str, loss_args: str = "", shapley_weight: float = 0.0,
                       shapley_permutations: int = 4):
  base = losses.get_loss(loss, **parse_args(loss_args, "matching.loss_args"))

  def matching_loss(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None):
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    regions, region_mask = model.encode_image(batch, rngs=rngs)
    tokens, token_mask = model.encode_text(batch, rngs=rngs)
    scores = model.scores(regions, region_mask, tokens, token_mask, rngs=rngs)
    positives, real = positives_of(batch)
    value = base(scores, positives, image_mask=real, text_mask=real)
    scores = jnp.where(real[:, None] & real[None, :], scores, _PAD_SCORE)  # for the R@1
    # In-batch R@1 both ways (a row's top column is one of its positives).
    hit_i2t = jnp.take_along_axis(positives, jnp.argmax(scores, 1)[:, None], 1)[:, 0]
    hit_t2i = jnp.take_along_axis(positives, jnp.argmax(scores, 0)[None, :], 0)[0]
    n = jnp.maximum(jnp.sum(real), 1)
    metrics = {"loss/matching": value,
               "matching_i2t_r1": jnp.sum(hit_i2t & real) / n,
               "matching_t2i_r1": jnp.sum(hit_t2i & real) / n}
    if shapley_weight > 0:
      key = jax.random.PRNGKey(0) if rng is None else jax.random.fold_in(rng, 1)
      reg = shapley.shapley_alignment_loss(regions, region_mask, tokens, token_mask, key,
                                           num_permutations=shapley_permutations,
                                           example_mask=real)
      metrics["loss/shapley"] = reg
      value = value + shapley_weight * reg
    return value, metrics

  return matching_loss
