"""Masked language modelling: CE averaged over masked tokens, as the UNITER
reference's `model/pretrain.py` (docs/reference.md, "MLM").

Hidden states of the masked text slots are gathered first, so the vocabulary
projection runs on [B, P, H] only.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vlp.tasks import common


def mlm_loss(model: Any, batch: Mapping[str, jax.Array],
             rng: jax.Array | None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MLM loss on an `mlm` batch.

  Args:
    model: a `UniterForPretraining` (or anything with `encode`/`mlm_logits`).
    batch: `mlm` batch with `mlm_positions`, `mlm_labels`, `mlm_weights`.
    rng: dropout key, or None for a deterministic pass.

  Returns:
    (loss, metrics) with `loss/mlm` and `mlm_acc` (accuracy over masked tokens).
  """
  out = common.encode(model, batch, rng)
  num_text = jnp.shape(batch["input_ids"])[1]
  hidden = common.gather(out["sequence"][:, :num_text], batch["mlm_positions"])
  logits = model.mlm_logits(hidden).astype(jnp.float32)  # [B, P, V]
  labels = jnp.asarray(batch["mlm_labels"], jnp.int32)
  weights = common.slot_weights(batch, "mlm_weights")
  loss = common.weighted_mean(common.cross_entropy(logits, labels), weights)
  correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
  acc = common.weighted_mean(correct, weights)
  return loss, {"loss/mlm": loss, "mlm_acc": acc}
