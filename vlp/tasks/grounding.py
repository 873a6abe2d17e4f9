"""Referring-expression grounding: softmax CE over the image's regions (UNITER
reference `model/re.py`, `train_re.py`; docs/reference.md, "Fine-tuning").

    l_b = -log softmax_k(s_bk)[target_b],   s_bk = -inf-like (-1e9) where img_mask is False
    L   = sum_{b real} l_b        (reduction="sum", the reference's train_loss='cls')
        or mean_{b real} l_b      (reduction="mean")

Padded regions are masked here again (independently of the model's own -1e4),
so a padded region is never predicted and never receives probability mass.
Metric `grounding_acc`: argmax over real regions == `target_region` (GT-box
accuracy; the IoU > 0.5 evaluation on detected boxes lives in the evaluators).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vlp.tasks import common

_MASKED = -1e9


def masked_region_logits(scores: jax.Array, img_mask: jax.Array) -> jax.Array:
  """[B, K] float32 scores with padded regions set to -1e9."""
  return jnp.where(jnp.asarray(img_mask, bool), scores.astype(jnp.float32), _MASKED)


def grounding_loss(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None,
                   *, reduction: str = "sum"
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Grounding loss on a `grounding` batch.

  Args:
    model: a `UniterForGrounding` (anything whose `encode` returns
      `region_scores` [B, K]).
    batch: `grounding` batch with `target_region` [B] int32 (index into K).
    rng: dropout key, or None for a deterministic pass.
    reduction: "sum" over real examples (reference) or "mean".

  Returns:
    (loss, metrics) with `loss/grounding`, `grounding_ce` (mean CE per real
    example, whatever the reduction) and `grounding_acc`.
  """
  if reduction not in ("sum", "mean"):
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
  out = common.encode(model, batch, rng)
  logits = masked_region_logits(out["region_scores"], batch["img_mask"])
  target = jnp.asarray(batch["target_region"], jnp.int32)
  weights = common.example_weights(batch)
  ce = common.cross_entropy(logits, target)
  mean_ce = common.weighted_mean(ce, weights)
  loss = jnp.sum(ce * weights) if reduction == "sum" else mean_ce
  correct = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)
  return loss, {"loss/grounding": loss, "grounding_ce": mean_ce,
                "grounding_acc": common.weighted_mean(correct, weights)}
