"""HGAN-style three-level similarity (APPROXIMATE; docs/matching.md).

HGAN (Guo et al., TMM 2023) compares image and text at three levels after graph
reasoning (`vlp.matching.graph.GraphReasoning`); its equations were not
available, so the levels here are an HGAN-*style* choice:

    s = w_local * local + w_mid * mid + w_global * global
  * local: SCAN-like word-to-region attention, softmax(lambda_softmax * cos) over the
    real regions, each word's cosine with its attended region vector, averaged
    over the real words;
  * mid: cosine of the max-pooled features (the most salient value per channel);
  * global: cosine of the mean-pooled features (`cosine_global`).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from vlp.matching.masked import (l2_normalize, masked_max, masked_mean, masked_softmax,
                                 zero_padding)
from vlp.matching.similarity_alignment import cosine_global


def local_level(regions, region_mask, tokens, token_mask, *,
                lambda_softmax: float = 9.0) -> jax.Array:
  """[Bi, Bt]: mean over real words of cos(word, its attended region vector)."""
  r = zero_padding(regions, region_mask)
  t = zero_padding(tokens, token_mask)
  cos = jnp.einsum('ird,tld->itlr', l2_normalize(r), l2_normalize(t))
  attn = masked_softmax(lambda_softmax * cos, region_mask[:, None, None, :], axis=-1)
  attended = jnp.einsum('itlr,ird->itld', attn, r)
  rel = jnp.sum(l2_normalize(attended) * l2_normalize(t)[None], -1)  # [Bi, Bt, L]
  return masked_mean(rel, token_mask[None], axis=-1)


def hgan_3level(regions, region_mask, tokens, token_mask, *,
                weights: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
                lambda_softmax: float = 9.0) -> jax.Array:
  """[Bi, Bt] float32: the weighted sum of the local, mid and global levels."""
  w_local, w_mid, w_global = weights
  pool_max = lambda x, m: l2_normalize(masked_max(zero_padding(x, m), m[..., None], axis=1))
  mid = pool_max(regions, region_mask) @ pool_max(tokens, token_mask).T
  local = local_level(regions, region_mask, tokens, token_mask, lambda_softmax=lambda_softmax)
  return (w_local * local + w_mid * mid
          + w_global * cosine_global(regions, region_mask, tokens, token_mask))
