"""Image-text matching with word-region alignment (UNITER reference
`model/pretrain.py` and `model/ot.py`; docs/reference.md, "ITM" and "WRA").

    L = L_itm + wra_weight * L_ot
    L_itm = 2-way softmax CE on the pooled output, mean over pairs
    L_ot  = (sum_{pos} d - sum_{neg} d) / B

d is the optimal-transport distance between all real text positions (incl.
[CLS]/[SEP]) and all real regions of the same forward pass, so matched pairs are
pulled together and mismatched ones pushed apart. Eval padding (`example_mask`
False) is left out of both sums and of B.

Negatives come with the batch (`itm.negatives` 'random' or 'balanced', made on
the host by `vlp.data.masking.make_itm_batch`) or, for 'hardest' (after MVPTR),
are mined here from an all-matched batch (`hardest_itm_pairs`): the backbone
encodes each modality alone (eval mode, no gradient), a `vlp.matching`
similarity (`hard_similarity`, default cosine of the mean token states) scores
every image against every caption, and the second half of the rows becomes the
hardest non-matching partners of the first half: even anchors keep their
caption and take its closest other image, odd anchors keep their image and take
its closest other caption. Same-image captions are never negatives. The mining
costs two single-modality forward passes of the batch. Nothing trains those
single-modality states to agree, so early on "hardest" is close to random; it
sharpens as MLM/ITM shape the backbone.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from vlp.matching.hard_negatives import hardest_negatives
from vlp.matching.similarities import get_similarity
from vlp.models.ot import optimal_transport_distance
from vlp.tasks import common
from vlp.tasks.retrieval_ft import pair_batch


def single_modality_states(model: Any, batch: Mapping[str, jax.Array]
                           ) -> tuple[jax.Array, jax.Array]:
  """Backbone outputs of each modality alone, eval mode, without gradient:
  (text states [B, T, H] of `[text T]`, region states [B, K, H] of `[[CLS] | regions K]`)."""
  uniter = model.uniter
  txt, _ = uniter(batch["input_ids"], batch["txt_mask"], batch["img_feat"][:, :0],
                  batch["img_pos"][:, :0], batch["img_mask"][:, :0])
  cls = batch["input_ids"][:, :1]
  img, _ = uniter(cls, jnp.ones(cls.shape, bool), batch["img_feat"], batch["img_pos"],
                  batch["img_mask"])
  return jax.lax.stop_gradient(txt), jax.lax.stop_gradient(img[:, 1:])


def hardest_itm_pairs(model: Any, batch: Mapping[str, jax.Array], *,
                      similarity: str = "cosine_global"
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """MVPTR-style ITM pairs from a batch of B matched rows.

  Returns (text_source [B], image_source [B], itm_target [B] int32): row r pairs
  the caption of row text_source[r] with the image of row image_source[r]. Rows
  r < B // 2 stay matched; row B // 2 + a is anchor a's hardest negative (see the
  module docstring), or stays matched when the anchor or the row is padding or
  the batch holds no other image. Needs `image_id` [B] in the batch.
  """
  if "image_id" not in batch:
    raise ValueError("itm.negatives='hardest' needs `image_id` in the itm batch (rows "
                     "sharing an image_id are positives of each other)")
  txt, regions = single_modality_states(model, batch)
  img_mask = jnp.asarray(batch["img_mask"], bool)
  txt_mask = jnp.asarray(batch["txt_mask"], bool)
  scores = get_similarity(similarity)(regions, img_mask, txt, txt_mask)  # [images, texts]
  image_id = jnp.asarray(batch["image_id"])
  real = common.example_weights(batch) > 0
  text_for_image, image_for_text, image_found, text_found = hardest_negatives(
      scores, image_id[:, None] == image_id[None, :], image_mask=real, text_mask=real)
  num = image_id.shape[0]
  half = num // 2
  rows = jnp.arange(num)
  anchor = jnp.clip(rows - half, 0, max(half - 1, 0))
  hard_image = anchor % 2 == 0  # even anchors keep the caption, odd ones the image
  found = ((rows >= half) & (rows < 2 * half) & real & real[anchor]
           & jnp.where(hard_image, text_found[anchor], image_found[anchor]))
  text_source = jnp.where(found, jnp.where(hard_image, anchor, text_for_image[anchor]), rows)
  image_source = jnp.where(found, jnp.where(hard_image, image_for_text[anchor], anchor), rows)
  return text_source, image_source, jnp.where(found, 0, 1).astype(jnp.int32)


def itm_loss(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None,
             *, wra_weight: float = 0.1, ot_beta: float = 0.5,
             ot_iterations: int = 50, ot_k: int = 1, negatives: str = "random",
             hard_similarity: str = "cosine_global"
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
    negatives: the batch's sampler (`itm.negatives`); 'hardest' mines the
      negatives here (`hardest_itm_pairs`), the others arrive made.
    hard_similarity: the `vlp.matching` similarity that ranks them ('hardest').

  Returns:
    (loss, metrics) with `loss/itm` (the total), `loss/itm_ce`, `loss/wra` and
    `itm_acc`.
  """
  if negatives == "hardest":
    text_source, image_source, target = hardest_itm_pairs(model, batch,
                                                          similarity=hard_similarity)
    batch = dict(batch, **pair_batch(batch, text_source, image_source), itm_target=target)
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
