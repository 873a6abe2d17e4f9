"""Image-text similarities in which one side's fragments attend over the other's.

Signature as in `vlp.matching.similarities`: (regions [Bi, R, D], region_mask
[Bi, R], tokens [Bt, L, D], token_mask [Bt, L], **hyper) -> [Bi, Bt] float32.
None of them is decomposable: every image-text pair is scored jointly.

Common pattern: each query fragment q gets an attended context vector
a = sum_c alpha_c x_c over the other side's fragments, its relevance is
cos(q, a), and the relevances are pooled into one score. The attended vectors are
never materialised ([Bi, Bt, L, D] would not fit for evaluation-size blocks):

    <q, a> = sum_c alpha_c <q, x_c>,   |a|^2 = alpha^T G alpha,  G = Gram matrix of x

so memory stays at the [Bi, Bt, R, L] alignment tensor.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vlp.matching import attention_scores
from vlp.matching.masked import (EPS, l2_normalize, masked_softmax, pool, safe_norm,
                                 zero_empty_pairs, zero_padding)
from vlp.matching.similarity_alignment import pair_masks

POOLINGS = ("mean", "lse", "max", "sum")


def attended_cosines(att: jax.Array, dots: jax.Array, regions: jax.Array,
                     tokens: jax.Array, *, context: str) -> jax.Array:
  """cos(query fragment, its attended context vector).

  att [Bi, Bt, R, L] sums to 1 over the context axis; dots [Bi, Bt, R, L] are the
  inner products <v_r, t_l> of the same features that `regions` [Bi, R, D] and
  `tokens` [Bt, L, D] hold (padding zeroed). context='regions' gives one value per
  word [Bi, Bt, L]; context='words' one per region [Bi, Bt, R].
  """
  if context == "regions":
    num = jnp.sum(att * dots, axis=2)
    gram = jnp.einsum("ard,aqd->arq", regions, regions)
    sq_norm = jnp.einsum("abrl,arq,abql->abl", att, gram, att)
    query_norm = safe_norm(tokens)[None, :, :]
  else:
    num = jnp.sum(att * dots, axis=3)
    gram = jnp.einsum("bld,bmd->blm", tokens, tokens)
    sq_norm = jnp.einsum("abrl,blm,abrm->abr", att, gram, att)
    query_norm = safe_norm(regions)[:, None, :]
  # Clamp before the square root: an empty context has |a| = 0 (no inf gradient).
  context_norm = jnp.sqrt(jnp.maximum(sq_norm, EPS * EPS))
  return num / jnp.maximum(context_norm * query_norm, EPS)


def clipped_l2norm(sims: jax.Array, mask: jax.Array, axis: int, *, clip: str) -> jax.Array:
  """SCAN's normalisation of the alignment scores before the softmax: clip
  negatives (hard ReLU, or LeakyReLU(0.1) as SCAN's default) then divide by the
  L2 norm over the real fragments of `axis` (plus 1e-8; at least 1e-8)."""
  if clip == "leaky_relu":
    clipped = jax.nn.leaky_relu(sims, 0.1)
  elif clip == "relu":
    clipped = jax.nn.relu(sims)
  else:
    raise ValueError(f"SCAN clip must be 'leaky_relu' or 'relu', got {clip!r}")
  clipped = jnp.where(mask, clipped, 0.0)
  return clipped / (safe_norm(clipped, axis=axis, keepdims=True) + EPS)


def check_pooling(agg: str) -> None:
  if agg not in POOLINGS:
    raise ValueError(f"unknown pooling {agg!r}; expected one of {POOLINGS}")


def stacked_cross_attention(regions, region_mask, tokens, token_mask, *, queries: str,
                            lambda_softmax: float, agg: str, lambda_lse: float, clip: str
                            ) -> jax.Array:
  """SCAN with `queries` ('words': t2i, 'regions': i2t) attending over the other side."""
  check_pooling(agg)
  v = l2_normalize(zero_padding(regions, region_mask))
  t = l2_normalize(zero_padding(tokens, token_mask))
  sims = jnp.einsum("ard,bld->abrl", v, t)
  rmask, tmask = pair_masks(region_mask, token_mask)
  # Normalise over the query fragments, attend over the context fragments, pool
  # the queries' relevances.
  query_axis, context_axis = (3, 2) if queries == "words" else (2, 3)
  query_mask, context_mask = (tmask, rmask) if queries == "words" else (rmask, tmask)
  normed = clipped_l2norm(sims, query_mask, axis=query_axis, clip=clip)
  att = masked_softmax(lambda_softmax * normed, context_mask, axis=context_axis)
  relevance = attended_cosines(att, sims, v, t,
                               context="regions" if queries == "words" else "words")
  pool_mask = token_mask[None] if queries == "words" else region_mask[:, None]
  scores = pool(relevance, pool_mask, axis=2, how=agg, lambda_lse=lambda_lse)
  return zero_empty_pairs(scores, region_mask, token_mask)


def scan_t2i(regions, region_mask, tokens, token_mask, *, lambda_softmax: float = 9.0,
             agg: str = "mean", lambda_lse: float = 6.0, clip: str = "leaky_relu"
             ) -> jax.Array:
  """SCAN text-to-image: every word attends over the regions.

  With s_rl = cos(v_r, t_l):
    1. s'_rl = clip(s_rl) / ||clip(s_.l)||  ... norm over the words of the caption
       (SCAN's clipped l2norm; ReLU or LeakyReLU(0.1))
    2. alpha_rl = softmax_r(lambda_softmax * s'_rl)
    3. R_l = cos(t_l, sum_r alpha_rl v_r)
    4. pool over words: agg='mean' (AVG), 'lse' ((1/lambda_lse) log sum exp(lambda_lse R_l)),
       'max' or 'sum'.
  SCAN's tuned values: lambda_softmax = 9, lambda_lse = 6.
  """
  return stacked_cross_attention(regions, region_mask, tokens, token_mask,
                                 queries="words", lambda_softmax=lambda_softmax, agg=agg,
                                 lambda_lse=lambda_lse, clip=clip)


def scan_i2t(regions, region_mask, tokens, token_mask, *, lambda_softmax: float = 4.0,
             agg: str = "mean", lambda_lse: float = 5.0, clip: str = "leaky_relu"
             ) -> jax.Array:
  """SCAN image-to-text: every region attends over the words.

  The t2i recipe with the roles swapped: the clipped scores are normalised over
  the regions of the image, alpha_rl = softmax_l(lambda_softmax * s'_rl), R_r =
  cos(v_r, sum_l alpha_rl t_l), pooled over the regions. SCAN's tuned values:
  lambda_softmax = 4, lambda_lse = 5 (Flickr30K) or 20 (COCO).
  """
  return stacked_cross_attention(regions, region_mask, tokens, token_mask,
                                 queries="regions", lambda_softmax=lambda_softmax, agg=agg,
                                 lambda_lse=lambda_lse, clip=clip)


def damsm_word(regions, region_mask, tokens, token_mask, *, gamma1: float = 4.0,
               gamma2: float = 5.0, paper_scaling: bool = False) -> jax.Array:
  """AttnGAN's DAMSM word-level relevance R(Q, D) of image Q and caption D.

  On raw features, e_rl = <v_r, t_l>:
    1. p_rl = softmax_l(e_rl)                (each region over the words)
    2. alpha_rl = softmax_r(gamma1 * p_rl)   (each word over the regions)
    3. c_l = sum_r alpha_rl v_r and R_l = cos(c_l, t_l)
    4. R(Q, D) = log sum_l exp(gamma2 R_l)
  The paper writes step 4 as log(sum exp)^(1/gamma2); its released code leaves
  the 1/gamma2 out, and so does this by default (paper_scaling=True adds it).
  The DAMSM losses are `damsm` in `vlp.matching.losses` (gamma3-scaled batch
  cross-entropy) on these scores and on `cosine_global`.
  """
  v = zero_padding(regions, region_mask)
  t = zero_padding(tokens, token_mask)
  dots = jnp.einsum("ard,bld->abrl", v, t)
  rmask, tmask = pair_masks(region_mask, token_mask)
  over_words = masked_softmax(dots, tmask, axis=3)
  att = masked_softmax(gamma1 * over_words, rmask, axis=2)
  relevance = attended_cosines(att, dots, v, t, context="regions")  # [Bi, Bt, L]
  lse = pool(relevance, token_mask[None], axis=2, how="lse", lambda_lse=gamma2)
  return zero_empty_pairs(lse if paper_scaling else gamma2 * lse, region_mask, token_mask)


def cross_attention(regions, region_mask, tokens, token_mask, *, score: str = "cosine",
                    activation: str = "tanh", lambda_softmax: float = 9.0,
                    agg: str = "mean", lambda_lse: float = 6.0, params: Any = None
                    ) -> jax.Array:
  """SCAN-style text-to-image scoring with a swappable alignment score function.

  e_rl = score(word t_l, region v_r) (see `vlp.matching.attention_scores`:
  dot, scaled_dot, cosine, general, biased, activated, additive), then
  alpha_rl = softmax_r(lambda_softmax * e_rl), R_l = cos(t_l, sum_r alpha_rl v_r)
  on the raw features, pooled over the words as in `scan_t2i`. The parametrised
  scores read `params` from `init_params('cross_attention', dim, key, score=...)`.
  lambda_softmax assumes cosine-scale scores; re-tune it for the others.
  """
  check_pooling(agg)
  v = zero_padding(regions, region_mask)
  t = zero_padding(tokens, token_mask)
  e = attention_scores.alignment_scores(t, v, score=score, activation=activation,
                                        params=params)
  rmask, _ = pair_masks(region_mask, token_mask)
  att = masked_softmax(lambda_softmax * e, rmask, axis=2)
  dots = jnp.einsum("ard,bld->abrl", v, t)
  relevance = attended_cosines(att, dots, v, t, context="regions")
  scores = pool(relevance, token_mask[None], axis=2, how=agg, lambda_lse=lambda_lse)
  return zero_empty_pairs(scores, region_mask, token_mask)
