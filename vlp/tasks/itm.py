"""Image-text matching with word-region alignment (UNITER reference
`model/pretrain.py` and `model/ot.py`; docs/reference.md, "ITM" and "WRA").

    L = L_itm + wra_weight * L_ot
    L_itm = 2-way softmax CE on the pooled output, mean over pairs
    L_ot  = (sum_{pos} d - sum_{neg} d) / B

d is the optimal-transport distance between all real text positions (incl.
[CLS]/[SEP]) and all real regions of the same forward pass, so matched pairs are
pulled together and mismatched ones pushed apart. Eval padding (`example_mask`
False) is left out of both sums and of B.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vlp.models.ot import optimal_transport_distance
from vlp.tasks import common


def itm_loss(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None,
             *, wra_weight: float = 0.1, ot_beta: float = 0.5,
             ot_iterations: int = 50, ot_k: int = 1
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """ITM + WRA loss on an `itm` batch.

  Args:
    model: a `UniterForPretraining` (anything with `encode` returning
      `sequence` and `itm_logits`).
    batch: `itm` batch with `itm_target` [B] (1 = match).
    rng: dropout key, or None for a deterministic pass.
    wra_weight: weight of the OT term; 0 skips the OT computation.
    ot_beta: IPOT proximal step size.
    ot_iterations: IPOT outer iterations.
    ot_k: IPOT inner iterations.

  Returns:
    (loss, metrics) with `loss/itm` (the total), `loss/itm_ce`, `loss/wra` and
    `itm_acc`.
  """
  out = common.encode(model, batch, rng)
  logits = out["itm_logits"].astype(jnp.float32)  # [B, 2]
  target = jnp.asarray(batch["itm_target"], jnp.int32)
  ex_weights = common.example_weights(batch)
  ce = common.weighted_mean(common.cross_entropy(logits, target), ex_weights)
  correct = (jnp.argmax(logits, axis=-1) == target).astype(jnp.float32)
  acc = common.weighted_mean(correct, ex_weights)

  if wra_weight:
    num_text = jnp.shape(batch["input_ids"])[1]
    seq = out["sequence"]
    dist = optimal_transport_distance(
        seq[:, :num_text], seq[:, num_text:], jnp.asarray(batch["txt_mask"]),
        jnp.asarray(batch["img_mask"]), beta=ot_beta, iterations=ot_iterations,
        k=ot_k)
    # Positives add their distance, negatives subtract it.
    sign = jnp.where(target == 1, 1.0, -1.0)
    wra = common.weighted_mean(sign * dist, ex_weights)
  else:
    wra = jnp.zeros((), jnp.float32)

  loss = ce + wra_weight * wra
  return loss, {"loss/itm": loss, "loss/itm_ce": ce, "loss/wra": wra,
                "itm_acc": acc}
