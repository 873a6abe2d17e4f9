"""Similarity and loss look-ups of the matching model and job.

STAND-IN: this module carries two built-ins with the interface of the full
registries (`vlp.matching.similarities`, `vlp.matching.losses`), so that the
model, job and protocol run before those land. When they do, this module keeps
its names and only forwards to them (the model, job and protocol import nothing
else):

  similarity: `sim(regions [Bi,R,D], region_mask [Bi,R], tokens [Bt,L,D],
      token_mask [Bt,L]) -> [Bi,Bt] float32`; `get_similarity(name, **hyper)`,
      `is_decomposable(name)`, `init_params(name, dim, key)` (None: no parameters);
  loss: `loss(scores [Bi,Bt], positives [Bi,Bt] bool) -> scalar`; `get_loss(name, **hyper)`;
  evaluation: `score_matrix(sim, regions, region_mask, tokens, token_mask, *,
      chunk_images, chunk_texts, mesh=None) -> [N_img, N_txt]` numpy.

Built-ins: `cosine_global` (VSE++: cosine of the masked mean of each side),
`hinge_hardest` (VSE++: hinge on the hardest in-batch negative of each positive,
both directions, margin 0.2), `info_nce` (softmax cross-entropy over the batch at
temperature tau, both directions), plus the approximate HGAN similarity of
`vlp.matching.graph`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vlp.matching import graph
from vlp.matching.pooling import l2_normalize, masked_mean


def cosine_global(regions, region_mask, tokens, token_mask) -> jax.Array:
  """VSE++: cos(mean of real regions, mean of real tokens) for every pair."""
  img = l2_normalize(masked_mean(regions, region_mask))
  txt = l2_normalize(masked_mean(tokens, token_mask))
  return img @ txt.T


def hinge_hardest(scores: jax.Array, positives: jax.Array, *, margin: float = 0.2) -> jax.Array:
  """VSE++ max-violation hinge, mean over the positive pairs.

  For each positive (i, t): [margin - s(i,t) + max_{t' not pos of i} s(i,t')]_+ +
  [margin - s(i,t) + max_{i' not pos of t} s(i',t)]_+. Rows or columns without a
  negative contribute nothing.
  """
  s = scores.astype(jnp.float32)
  pos = positives.astype(bool)
  neg_inf = jnp.finfo(jnp.float32).min
  hardest_txt = jnp.max(jnp.where(pos, neg_inf, s), axis=1, keepdims=True)  # per image
  hardest_img = jnp.max(jnp.where(pos, neg_inf, s), axis=0, keepdims=True)  # per text
  cost = (jnp.where(hardest_txt > neg_inf, jax.nn.relu(margin - s + hardest_txt), 0.0)
          + jnp.where(hardest_img > neg_inf, jax.nn.relu(margin - s + hardest_img), 0.0))
  return jnp.sum(jnp.where(pos, cost, 0.0)) / jnp.maximum(jnp.sum(pos), 1)


def info_nce(scores: jax.Array, positives: jax.Array, *, temperature: float = 0.05) -> jax.Array:
  """-log softmax(s / tau) of each positive over its row and over its column, mean of the two.

  A positive competes with the row's (column's) negatives only: other positives
  of the same row are left out of its softmax.
  """
  s = scores.astype(jnp.float32) / temperature
  pos = positives.astype(bool)

  def direction(axis):
    # Per positive: logsumexp over itself and the negatives along `axis`.
    neg = jnp.where(pos, -jnp.inf, s)
    lse_neg = jax.scipy.special.logsumexp(neg, axis=axis, keepdims=True)
    return jnp.logaddexp(lse_neg, s) - s

  cost = 0.5 * (direction(1) + direction(0))
  return jnp.sum(jnp.where(pos, cost, 0.0)) / jnp.maximum(jnp.sum(pos), 1)


_SIMILARITIES: dict[str, tuple[Callable, bool]] = {
    "cosine_global": (cosine_global, True),
    "hgan_3level": (graph.hgan_3level, False),
}
_LOSSES: dict[str, Callable] = {"hinge_hardest": hinge_hardest, "info_nce": info_nce}


def _known(name: str, table: dict, what: str):
  if name not in table:
    raise ValueError(f"unknown {what} {name!r}; expected one of {sorted(table)}")
  return table[name]


def get_similarity(name: str, **hyper: Any) -> Callable:
  fn, _ = _known(name, _SIMILARITIES, "similarity")
  return functools.partial(fn, **hyper) if hyper else fn


def is_decomposable(name: str) -> bool:
  """True when the score is a dot product of one vector per image and per text."""
  return _known(name, _SIMILARITIES, "similarity")[1]


def init_params(name: str, dim: int, key: jax.Array) -> Any:
  """The similarity's parameters (None: it has none)."""
  _known(name, _SIMILARITIES, "similarity")
  return None


def get_loss(name: str, **hyper: Any) -> Callable:
  fn = _known(name, _LOSSES, "loss")
  return functools.partial(fn, **hyper) if hyper else fn


def score_matrix(sim: Callable, regions, region_mask, tokens, token_mask, *,
                 chunk_images: int, chunk_texts: int, mesh=None) -> np.ndarray:
  """[N_img, N_txt] scores of every pair, one jitted call per (image, text) block.

  Blocks are padded to full size (masked rows), so one program serves all.
  """
  del mesh  # Single-device stand-in.
  fn = jax.jit(sim)
  n_img, n_txt = regions.shape[0], tokens.shape[0]
  pad = lambda x, n, size: np.concatenate(
      [x, np.zeros((size - n,) + x.shape[1:], x.dtype)]) if n < size else x
  out = np.zeros((n_img, n_txt), np.float32)
  for i in range(0, n_img, chunk_images):
    ni = min(chunk_images, n_img - i)
    r, rm = pad(regions[i:i + ni], ni, chunk_images), pad(region_mask[i:i + ni], ni, chunk_images)
    for t in range(0, n_txt, chunk_texts):
      nt = min(chunk_texts, n_txt - t)
      block = fn(r, rm, pad(tokens[t:t + nt], nt, chunk_texts),
                 pad(token_mask[t:t + nt], nt, chunk_texts))
      out[i:i + ni, t:t + nt] = np.asarray(block)[:ni, :nt]
  return out
