"""Pair-dependent scoring blocks of the matching model.

* `AlternatingCrossAttention` (COMMA, Tan et al. NeurIPS 2021): layers alternate
  a parameter-free cross-attention between the two modalities (scaled dot
  product, softmax over the other side's real tokens, added as a residual) with
  a self-attention layer per modality. As in COMMA it runs on every
  (image, text) pair of the batch; the score is the cosine of the two sides'
  masked means after the last layer.
* `TextConditionedRegionFilter` (SLAN, Zhai et al. ICCV 2023; APPROXIMATE: the
  paper's equations were not available): each region gets a relevance to the
  text (bilinear in the region state and the text's mean state), the k most
  relevant regions of each pair are kept, softmax-weighted by relevance and
  pooled; the score is that vector's cosine with the text's mean. Relevance
  learns through the weights (the hard top-k carries no gradient). SLAN's box
  adaptor (text-guided box regression with RoIAlign) is not built: detector
  features are fixed here.

Both score pairs as `[Bi, Bt]` from token states with the similarity signature
(`vlp.matching.similarities`), so the same chunked evaluation serves them; neither
is decomposable (a pair's score needs both sides together).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.matching.masked import NEG, l2_normalize, masked_mean, zero_padding
from vlp.matching.similarity_alignment import global_embedding
from vlp.models.layers import Dense, attention_bias
from vlp.models.uniter import BertLayer
from vlp.models.uniter_config import UniterConfig


def cross_attend(x: jax.Array, y: jax.Array, y_mask: jax.Array) -> jax.Array:
  """x + softmax(x y^T / sqrt(d)) y over y's real tokens: [P, N, D], [P, M, D], [P, M]."""
  logits = jnp.einsum('pnd,pmd->pnm', x.astype(jnp.float32), y.astype(jnp.float32))
  logits = logits / jnp.sqrt(x.shape[-1])
  attn = jax.nn.softmax(jnp.where(y_mask.astype(bool)[:, None, :], logits, NEG), -1)
  return x.astype(jnp.float32) + jnp.einsum('pnm,pmd->pnd', attn, y.astype(jnp.float32))


def all_pairs(regions, region_mask, tokens, token_mask):
  """Every (image, text) pair as rows: ([Bi*Bt, R, D], [Bi*Bt, R], [Bi*Bt, L, D], [Bi*Bt, L])."""
  bi, bt = regions.shape[0], tokens.shape[0]
  rep = lambda a: jnp.repeat(a, bt, axis=0)  # image i at rows i*bt .. i*bt+bt-1
  tile = lambda a: jnp.tile(a, (bi,) + (1,) * (a.ndim - 1))
  return rep(regions), rep(region_mask), tile(tokens), tile(token_mask)


class AlternatingCrossAttention(nnx.Module):
  """COMMA's stack: [cross-attention (no parameters), self-attention per modality] x n."""

  def __init__(self, cfg: UniterConfig, num_layers: int, *, rngs: nnx.Rngs):
    self.image_layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(num_layers)])
    self.text_layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(num_layers)])
    self.num_layers = num_layers

  def fuse(self, x, x_mask, y, y_mask, *, rngs: nnx.Rngs | None = None):
    """Paired rows [P, R, D] / [P, L, D] -> the fused states of both sides."""
    for layer in range(self.num_layers):
      x, y = cross_attend(x, y, y_mask), cross_attend(y, x, x_mask)
      x = self.image_layers[layer](x, attention_bias(x_mask), rngs=rngs)
      y = self.text_layers[layer](y, attention_bias(y_mask), rngs=rngs)
    return x, y

  def __call__(self, regions, region_mask, tokens, token_mask, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """[Bi, Bt] float32 scores of every pair."""
    bi, bt = regions.shape[0], tokens.shape[0]
    x, xm, y, ym = all_pairs(regions, region_mask, tokens, token_mask)
    x, y = self.fuse(x, xm, y, ym, rngs=rngs)
    score = jnp.sum(global_embedding(x, xm) * global_embedding(y, ym), -1)
    return score.reshape(bi, bt)


class TextConditionedRegionFilter(nnx.Module):
  """SLAN-style region filter: keep the k regions most relevant to the text."""

  def __init__(self, cfg: UniterConfig, k: int, *, rngs: nnx.Rngs):
    if k <= 0:
      raise ValueError(f"the region filter needs k > 0 regions to keep, got {k}")
    h = cfg.hidden_size
    self.query = Dense(h, h, cfg, names=('embed', 'mlp'), rngs=rngs)
    self.k = k

  def relevance(self, regions, region_mask, tokens, token_mask) -> jax.Array:
    """[Bi, Bt, R] float32 relevance of each region to each text (padding -1e9)."""
    mean = masked_mean(zero_padding(tokens, token_mask), token_mask[..., None], axis=1)
    q = self.query(mean, out_dtype=jnp.float32)  # [Bt, H]
    rel = jnp.einsum('td,ird->itr', q, regions.astype(jnp.float32)) / jnp.sqrt(q.shape[-1])
    return jnp.where(region_mask.astype(bool)[:, None, :], rel, NEG)

  def keep_mask(self, relevance: jax.Array) -> jax.Array:
    """[Bi, Bt, R] bool: the top k of each pair (ties: the lower region index)."""
    k = min(self.k, relevance.shape[-1])
    _, idx = jax.lax.top_k(relevance, k)
    keep = jnp.any(jax.nn.one_hot(idx, relevance.shape[-1], dtype=bool), axis=-2)
    return keep & (relevance > NEG / 2)

  def __call__(self, regions, region_mask, tokens, token_mask, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    del rngs
    rel = self.relevance(regions, region_mask, tokens, token_mask)
    keep = self.keep_mask(rel)
    weights = jax.nn.softmax(jnp.where(keep, rel, NEG), axis=-1)
    pooled = jnp.einsum('itr,ird->itd', weights, regions.astype(jnp.float32))
    text = global_embedding(tokens, token_mask)
    return jnp.sum(l2_normalize(pooled) * text[None], -1)
