"""Distilling cross-encoder scores into the dual encoder (ALADIN-style: Messina
et al., "ALADIN: ALign And DIstill Network", CBMI 2022; its `listnet`
distillation mode, github mesnico/ALADIN `alad/loss.py`).

On a batch of B matched pairs (the retrieval batch of `retrieval_ft`), with row
j a candidate only when real (`example_mask`):

  teacher  T_ij = s(text_i, image_j) / tau_t    cross-encoder rank score, eval mode,
                                                stop_gradient (or batch["teacher_scores"])
  student  S_ij = gamma * <e_t(i), e_v(j)>       dual-encoder cosine (unit-norm
                                                embeddings), gamma = student_scale

  L_kd  = mean_{i real} KL(softmax_j T_i. || softmax_j S_i.)      (caption -> images)
        + mean_{j real} KL(softmax_i T_.j || softmax_i S_.j)      (image -> captions)
  L_nce = mean_{i real} -log sum_{j in P(i)} softmax_j(S'_i.)
        + mean_{j real} -log sum_{i in P(j)} softmax_i(S'_.j)
          S' = <e_t, e_v> / contrastive_temperature, P = same image_id (the diagonal
          when the batch has no image_id)
  L     = distill_weight * L_kd + contrastive_weight * L_nce

ALADIN's listnet loss is the cross-entropy -sum_j softmax(T) log softmax(S) summed
over rows and columns, with tau_t = 1 and gamma = 6.0; KL differs from it by the
teacher entropy, a constant for the student, so the gradients are the same and
L_kd = 0 exactly when the student reproduces the teacher's distributions.

The teacher shares the backbone with the student here (the same
`UniterForRetrieval`): its scores are recomputed with the current weights each
step but never receive gradient. ALADIN's second stage freezes the backbone and
trains only the matching head: `--config.optimizer.frozen=uniter,itm_output,
rank_output` (vlp.train.optim) does that, and the teacher is then fixed; the
`stage=dual` argument of configs/finetune_retrieval.py sets it all up.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.tasks import common
from vlp.tasks.retrieval_ft import pair_scores

_MASKED = -1e9


def _log_softmax_masked(logits: jax.Array, valid: jax.Array) -> jax.Array:
  return jax.nn.log_softmax(jnp.where(valid, logits, _MASKED), axis=-1)


def _kl_rows(teacher: jax.Array, student: jax.Array, valid: jax.Array) -> jax.Array:
  """Per-row KL(softmax teacher || softmax student) over valid columns -> [R]."""
  log_t = _log_softmax_masked(teacher, valid)
  log_s = _log_softmax_masked(student, valid)
  p_t = jnp.exp(log_t)
  return jnp.sum(jnp.where(valid, p_t * (log_t - log_s), 0.0), axis=-1)


def _nce_rows(logits: jax.Array, valid: jax.Array, positive: jax.Array) -> jax.Array:
  """Per-row -log sum over positives of softmax over valid columns -> [R]."""
  log_p = _log_softmax_masked(logits, valid)
  pos = valid & positive
  return -jax.nn.logsumexp(jnp.where(pos, log_p, _MASKED), axis=-1)


def teacher_scores(model: Any, batch: Mapping[str, jax.Array], *,
                   chunk: int = 0) -> jax.Array:
  """[B, B] float32 cross-encoder scores s(text_i, image_j), no gradient."""
  if "teacher_scores" in batch:
    return jax.lax.stop_gradient(jnp.asarray(batch["teacher_scores"], jnp.float32))
  rows = jnp.arange(jnp.shape(batch["input_ids"])[0], dtype=jnp.int32)
  b = rows.shape[0]
  return pair_scores(model, batch, jnp.repeat(rows, b), jnp.tile(rows, b),
                     chunk=chunk).reshape(b, b)


def distill_loss(model: Any, batch: Mapping[str, jax.Array], rng: jax.Array | None,
                 *, student_scale: float = 6.0, teacher_temperature: float = 1.0,
                 distill_weight: float = 1.0, contrastive_weight: float = 0.0,
                 contrastive_temperature: float = 0.05, score_chunk: int = 0
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-encoder -> dual-encoder distillation (module docstring for the formula).

  Args:
    model: a `UniterForRetrieval` with a dual head (`encode_text`,
      `encode_image` -> [B, E] unit vectors; `encode` -> `rank_scores`).
    batch: matched pairs (as for `retrieval_ft`), optionally `image_id` and a
      precomputed `teacher_scores` [B, B] (then the cross-encoder is not run).
    rng: dropout key for the student passes, or None.
    student_scale: gamma, multiplies the student cosine (ALADIN: 6.0).
    teacher_temperature: tau_t, divides the teacher scores.
    distill_weight, contrastive_weight: weights of L_kd and L_nce.
    contrastive_temperature: temperature of the InfoNCE term.
    score_chunk: pairs per teacher scoring pass (0 = all B * B at once).

  Returns:
    (loss, metrics): `loss/distill`, `loss/distill_kd`, `loss/distill_nce`,
    `distill_top1_agree` (student and teacher argmax agree, caption rows) and
    `distill_ir_r1` (the student's top image for a caption is a positive).
  """
  weights = common.example_weights(batch)
  real = weights > 0
  teacher = teacher_scores(model, batch, chunk=score_chunk) / teacher_temperature

  rngs = None if rng is None else nnx.Rngs(dropout=rng)
  txt = model.encode_text(batch, rngs=rngs).astype(jnp.float32)
  img = model.encode_image(batch, rngs=rngs).astype(jnp.float32)
  cos = txt @ img.T  # [B, B], rows captions, columns images
  student = student_scale * cos

  valid = jnp.broadcast_to(real[None, :], cos.shape)
  if "image_id" in batch:
    image_id = jnp.asarray(batch["image_id"])
    positive = image_id[:, None] == image_id[None, :]
  else:
    positive = jnp.eye(cos.shape[0], dtype=bool)
  kd = (common.weighted_mean(_kl_rows(teacher, student, valid), weights)
        + common.weighted_mean(_kl_rows(teacher.T, student.T, valid), weights))

  if contrastive_weight:
    logits = cos / contrastive_temperature
    nce = (common.weighted_mean(_nce_rows(logits, valid, positive), weights)
           + common.weighted_mean(_nce_rows(logits.T, valid, positive.T), weights))
  else:
    nce = jnp.zeros((), jnp.float32)
  loss = distill_weight * kd + contrastive_weight * nce

  masked_student = jnp.where(valid, student, -jnp.inf)
  top_student = jnp.argmax(masked_student, axis=-1)
  agree = top_student == jnp.argmax(jnp.where(valid, teacher, -jnp.inf), axis=-1)
  own = jnp.take_along_axis(positive, top_student[:, None], axis=1)[:, 0]
  return loss, {"loss/distill": loss, "loss/distill_kd": kd, "loss/distill_nce": nce,
                "distill_top1_agree": common.weighted_mean(agree.astype(jnp.float32),
                                                           weights),
                "distill_ir_r1": common.weighted_mean(own.astype(jnp.float32), weights)}
