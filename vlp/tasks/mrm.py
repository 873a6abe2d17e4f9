"""Masked region modelling: MRFR, MRC and MRC-kl (UNITER reference
`model/pretrain.py`; docs/reference.md, "MRFR, MRC and MRC-kl").

All three gather the hidden states of the masked regions (region slots follow
the T text slots in the sequence) before running their head, and reduce as the
reference does (per element, not per region, for MRFR and MRC-kl):
  * mrfr:  squared error, mean over (masked regions x feature dim).
  * mrc:   CE against argmax over classes 1..C-1 (background 0 excluded), mean
           over masked regions.
  * mrckl: t * (log t - log p) with 0 log 0 = 0, mean over (masked regions x C).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.scipy.special import xlogy

from vlp.tasks import common

Metrics = dict[str, jax.Array]


def _masked_region_states(model: Any, batch: Mapping[str, jax.Array],
                          rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
  """Encodes an `mrm` batch -> (masked-region states [B, Pr, H], weights)."""
  out = common.encode(model, batch, rng)
  num_text = jnp.shape(batch["input_ids"])[1]
  hidden = common.gather(out["sequence"][:, num_text:], batch["mrm_positions"])
  return hidden, common.slot_weights(batch, "mrm_weights")


def mrfr_loss(model: Any, batch: Mapping[str, jax.Array],
              rng: jax.Array | None) -> tuple[jax.Array, Metrics]:
  """Masked region feature regression against `mrfr_target` [B, Pr, D]."""
  hidden, weights = _masked_region_states(model, batch, rng)
  pred = model.mrfr_prediction(hidden).astype(jnp.float32)
  target = jnp.asarray(batch["mrfr_target"]).astype(jnp.float32)
  sq_err = jnp.sum(jnp.square(pred - target), axis=-1)  # [B, Pr]
  loss = common.weighted_mean(sq_err, weights, per_weight=target.shape[-1])
  return loss, {"loss/mrfr": loss}


def mrc_loss(model: Any, batch: Mapping[str, jax.Array],
             rng: jax.Array | None) -> tuple[jax.Array, Metrics]:
  """Masked region classification on the detector's top non-background class."""
  hidden, weights = _masked_region_states(model, batch, rng)
  logits = model.mrc_logits(hidden).astype(jnp.float32)  # [B, Pr, C]
  target = jnp.asarray(batch["mrc_target"]).astype(jnp.float32)
  # Class 0 is background: the label is the best of classes 1..C-1.
  labels = jnp.argmax(target[..., 1:], axis=-1) + 1
  loss = common.weighted_mean(common.cross_entropy(logits, labels), weights)
  return loss, {"loss/mrc": loss}


def mrckl_loss(model: Any, batch: Mapping[str, jax.Array],
               rng: jax.Array | None) -> tuple[jax.Array, Metrics]:
  """KL(soft labels || predicted class distribution), averaged per element."""
  hidden, weights = _masked_region_states(model, batch, rng)
  logits = model.mrc_logits(hidden).astype(jnp.float32)
  target = jnp.asarray(batch["mrc_target"]).astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  # xlogy makes zero-probability targets contribute exactly 0.
  kl = jnp.sum(xlogy(target, target) - target * log_p, axis=-1)  # [B, Pr]
  loss = common.weighted_mean(kl, weights, per_weight=target.shape[-1])
  return loss, {"loss/mrckl": loss}
