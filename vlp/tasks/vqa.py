"""VQA fine-tuning: multi-label BCE on soft answer targets (UNITER reference
`model/vqa.py`; docs/reference.md, "Fine-tuning").

    L = (1 / N) sum_{b real} sum_{a=1..A} bce(x_ba, y_ba)
    bce(x, y) = log(1 + e^x) - x y     (= -y log s(x) - (1 - y) log(1 - s(x)))

i.e. the reference's BCE-with-logits averaged over all B x A cells and multiplied
by A (the number of answers): summed over answers, averaged over the N real
questions (`example_mask`). Metric `vqa_score` is the mean soft target of the
argmax answer (VQA accuracy when the targets are the consensus scores).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vlp.tasks import common


def sigmoid_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Element-wise binary cross-entropy with logits, float32, stable for large |x|."""
  x = logits.astype(jnp.float32)
  y = targets.astype(jnp.float32)
  # softplus(x) = log(1 + e^x) via logaddexp: stable, and its derivative is
  # exactly sigmoid(x) (also at x = 0, where max(x, 0) + log1p(e^-|x|) has none).
  return jax.nn.softplus(x) - x * y


def vqa_loss(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """VQA loss on a `vqa` batch.

  Args:
    model: a `UniterForVqa` (anything whose `encode` returns `vqa_logits` [B, A]).
    batch: `vqa` batch with `vqa_targets` [B, A] float32 soft scores.
    rng: dropout key, or None for a deterministic pass.

  Returns:
    (loss, metrics) with `loss/vqa` and `vqa_score`.
  """
  out = common.encode(model, batch, rng)
  logits = out["vqa_logits"].astype(jnp.float32)  # [B, A]
  targets = jnp.asarray(batch["vqa_targets"], jnp.float32)
  weights = common.example_weights(batch)
  loss = common.weighted_mean(jnp.sum(sigmoid_bce(logits, targets), axis=-1), weights)
  best = jnp.argmax(logits, axis=-1)
  score = jnp.take_along_axis(targets, best[:, None], axis=-1)[:, 0]
  return loss, {"loss/vqa": loss, "vqa_score": common.weighted_mean(score, weights)}
