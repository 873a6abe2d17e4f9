"""HGAN-style graph reasoning and three-level similarity (APPROXIMATE).

HGAN (Guo et al., TMM 2023) builds a feature graph per modality, reasons over it
with graph convolution, aggregates multi-granularity features and compares
image and text with three levels of similarity. Its equations were not
available, so this is an HGAN-*style* mechanism, not a reproduction:

* `GraphReasoning`: one graph-convolution step per layer over a fully connected
  graph whose edge weights are the softmax of scaled feature similarities
  (padding never sends messages): x <- LN(x + ReLU((A x) W)).
* `hgan_3level`: w_local * local + w_mid * mid + w_global * global, where
  local is SCAN-like word-to-region attention (each word's cosine with its
  attended region vector, averaged over words), mid is the cosine of the
  max-pooled features (the most salient feature per channel) and global the
  cosine of the mean-pooled features.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.matching.pooling import MASKED, l2_normalize, masked_max, masked_mean
from vlp.models.layers import Dense, LayerNorm
from vlp.models.uniter_config import UniterConfig


class GraphReasoning(nnx.Module):
  """Graph convolution over a similarity graph of one modality's nodes."""

  def __init__(self, cfg: UniterConfig, num_layers: int, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.layers = nnx.List([Dense(h, h, cfg, names=('embed', 'mlp'), rngs=rngs)
                            for _ in range(num_layers)])
    self.norms = nnx.List([LayerNorm(h, cfg) for _ in range(num_layers)])

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, N, H] nodes, [B, N] mask -> [B, N, H]."""
    keep = mask.astype(bool)
    for dense, norm in zip(self.layers, self.norms):
      xf = x.astype(jnp.float32)
      logits = jnp.einsum('bnh,bmh->bnm', xf, xf) / jnp.sqrt(xf.shape[-1])
      adjacency = jax.nn.softmax(jnp.where(keep[:, None, :], logits, MASKED), axis=-1)
      messages = dense(jnp.einsum('bnm,bmh->bnh', adjacency, xf))
      x = norm(xf + jax.nn.relu(messages.astype(jnp.float32)))
    return x


def local_level(regions, region_mask, tokens, token_mask, *, lambda_softmax: float = 9.0):
  """[Bi, Bt]: mean over real words of cos(word, its attended region vector)."""
  r, t = l2_normalize(regions), l2_normalize(tokens)
  cos = jnp.einsum('ird,tld->itlr', r, t)
  cos = jnp.where(region_mask.astype(bool)[:, None, None, :], cos, MASKED)
  attn = jax.nn.softmax(lambda_softmax * cos, axis=-1)
  attended = jnp.einsum('itlr,ird->itld', attn, regions.astype(jnp.float32))
  rel = jnp.sum(l2_normalize(attended) * t[None], -1)  # [Bi, Bt, L]
  m = token_mask.astype(jnp.float32)[None]
  return jnp.sum(rel * m, -1) / jnp.maximum(jnp.sum(m, -1), 1.0)


def hgan_3level(regions, region_mask, tokens, token_mask, *,
                weights: Sequence[float] = (1 / 3, 1 / 3, 1 / 3),
                lambda_softmax: float = 9.0) -> jax.Array:
  """[Bi, Bt] float32: weighted sum of the local, mid and global levels."""
  w_local, w_mid, w_global = weights
  mid = l2_normalize(masked_max(regions, region_mask)) @ l2_normalize(
      masked_max(tokens, token_mask)).T
  glob = l2_normalize(masked_mean(regions, region_mask)) @ l2_normalize(
      masked_mean(tokens, token_mask)).T
  local = local_level(regions, region_mask, tokens, token_mask, lambda_softmax=lambda_softmax)
  return w_local * local + w_mid * mid + w_global * glob
