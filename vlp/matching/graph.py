"""HGAN-style graph reasoning (APPROXIMATE).

HGAN (Guo et al., TMM 2023) builds a feature graph per modality, reasons over it
with graph convolution, aggregates multi-granularity features and compares
image and text with three levels of similarity. Its equations were not
available, so this is an HGAN-*style* mechanism, not a reproduction:

* `GraphReasoning`: one graph-convolution step per layer over a fully connected
  graph whose edge weights are the softmax of scaled feature similarities
  (padding never sends messages): x <- LN(x + ReLU((A x) W)).
* its three-level similarity is `hgan_3level`
  (`vlp.matching.similarity_hierarchical`, registered in `similarities`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.matching.masked import NEG
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
      adjacency = jax.nn.softmax(jnp.where(keep[:, None, :], logits, NEG), axis=-1)
      messages = dense(jnp.einsum('bnm,bmh->bnh', adjacency, xf))
      x = norm(xf + jax.nn.relu(messages.astype(jnp.float32)))
    return x
