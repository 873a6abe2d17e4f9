"""The matching objective: a `vlp.matching.losses` loss on the in-batch score matrix.

A training batch holds B matched (image, caption) rows. Every image of the
batch is scored against every caption (`MatchingModel.scores`, [B, B]); pair
(i, t) is a positive when rows i and t show the same image (`image_id`; the
diagonal without it). Padded rows (`example_mask` False) are neither positives
nor negatives (the loss's image and text masks). The loss is
`vlp.matching.losses`' `loss` with `loss_args`; `shapley_weight` > 0 adds LOUPE's
(approximate) Shapley alignment regulariser on the matched rows.

`mean_warmup_steps` > 0 (with `hinge_hardest` only) is VSE-infinity's warm-up:
`hinge_sum` with the same arguments until that step, then the hardest negative.
From random init the hardest negative alone gives every anchor one gradient
through a near-random negative, and the embedding can collapse; the sum over all
negatives first spreads the space out. The loss reads the step from the batch
(`STEP_KEY`, one value per row: `vlp.data.streams.StepStamped`, which the
matching job's training stream applies), so it stays a pure function of
(model, batch, rng).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.matching import losses, shapley
from vlp.matching.model import parse_args

_PAD_SCORE = -1e4
STEP_KEY = "train_step"  # [B] int32: the training step of the batch (every row alike).


def positives_of(batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """([B, B] bool positives, [B] bool real rows)."""
  b = batch["input_ids"].shape[0]
  real = batch["example_mask"].astype(bool) if "example_mask" in batch else jnp.ones(b, bool)
  same = (batch["image_id"][:, None] == batch["image_id"][None, :] if "image_id" in batch
          else jnp.eye(b, dtype=bool))
  return same & real[:, None] & real[None, :], real


def make_matching_loss(*, loss: str, loss_args: str = "", shapley_weight: float = 0.0,
                       shapley_permutations: int = 4, mean_warmup_steps: int = 0):
  hyper = parse_args(loss_args, "matching.loss_args")
  base = losses.get_loss(loss, **hyper)
  warmup = warmup_loss(loss, hyper, mean_warmup_steps)

  def matching_loss(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None):
    rngs = None if rng is None else nnx.Rngs(dropout=rng)
    regions, region_mask = model.encode_image(batch, rngs=rngs)
    tokens, token_mask = model.encode_text(batch, rngs=rngs)
    scores = model.scores(regions, region_mask, tokens, token_mask, rngs=rngs)
    positives, real = positives_of(batch)
    value = base(scores, positives, image_mask=real, text_mask=real)
    if warmup is not None:
      if STEP_KEY not in batch:
        raise ValueError(f"matching.mean_warmup_steps={mean_warmup_steps} needs the batch's "
                         f"training step {STEP_KEY!r} (vlp.data.streams.StepStamped); this "
                         f"batch has {sorted(batch)}")
      in_warmup = batch[STEP_KEY][0] < mean_warmup_steps
      value = jnp.where(in_warmup, warmup(scores, positives, image_mask=real, text_mask=real),
                        value)
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


def warmup_loss(loss: str, hyper: dict, mean_warmup_steps: int):
  """The loss used before `mean_warmup_steps` (None without a warm-up): `hinge_sum`
  with `hinge_hardest`'s margin and reduction."""
  if int(mean_warmup_steps) < 0:
    raise ValueError(f"matching.mean_warmup_steps must be >= 0, got {mean_warmup_steps}")
  if not mean_warmup_steps:
    return None
  if loss != "hinge_hardest":
    raise ValueError(f"matching.mean_warmup_steps={mean_warmup_steps} warms up "
                     f"'hinge_hardest' with 'hinge_sum'; matching.loss is {loss!r} (set it "
                     "to 'hinge_hardest' or mean_warmup_steps to 0)")
  return losses.get_loss("hinge_sum", **hyper)
