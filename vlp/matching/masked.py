"""Masked reductions shared by the similarities and losses of `vlp.matching`.

Padding must never change a score or a loss, and must never put a NaN into a
gradient, even when a whole row is padding. Two rules make that hold:
  * padded features are replaced by zeros before any arithmetic (`zero_padding`),
    so garbage (even inf/NaN) in padded slots cannot reach a result through a
    `0 * x` product or a nonlinearity;
  * masked entries of a softmax or log-sum-exp get a large *finite* negative
    logit (`NEG`), so an all-padding row yields finite values (zeros where the
    reduction is empty) and finite (zero) gradients instead of NaN.
Everything is computed in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# A logit that loses every softmax yet stays finite (exp underflows to 0, no NaN).
NEG = -1e9
EPS = 1e-8


def zero_padding(x: jax.Array, mask: jax.Array) -> jax.Array:
  """x [..., N, D] as float32 with the rows where mask [..., N] is False set to 0."""
  return jnp.where(mask[..., None], jnp.asarray(x, jnp.float32), 0.0)


def safe_norm(x: jax.Array, axis: int = -1, keepdims: bool = False) -> jax.Array:
  """max(|x|, EPS) along `axis`, clamped *inside* the square root: the gradient of
  sqrt at 0 is infinite, and 0 * inf is a NaN for an all-zero (padded) vector."""
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=keepdims), EPS * EPS))


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(|x|, EPS): unit vectors; an all-zero (padded) vector stays zero."""
  return x / safe_norm(x, axis=axis, keepdims=True)


def masked_mean(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """Mean of x over the True entries of mask along `axis` (0 where there are none)."""
  mask = jnp.broadcast_to(mask, x.shape)
  total = jnp.sum(jnp.where(mask, x, 0.0), axis=axis)
  count = jnp.sum(mask, axis=axis)
  return total / jnp.maximum(count, 1)


def masked_sum(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  return jnp.sum(jnp.where(jnp.broadcast_to(mask, x.shape), x, 0.0), axis=axis)


def masked_max(x: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """Max of x over the True entries (0 where there are none)."""
  mask = jnp.broadcast_to(mask, x.shape)
  best = jnp.max(jnp.where(mask, x, NEG), axis=axis)
  return jnp.where(jnp.any(mask, axis=axis), best, 0.0)


def masked_softmax(logits: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """Softmax over the True entries; masked entries get weight 0, an all-False
  slice gets all zeros."""
  mask = jnp.broadcast_to(mask, logits.shape)
  weights = jax.nn.softmax(jnp.where(mask, logits, NEG), axis=axis)
  return jnp.where(mask, weights, 0.0)


def masked_logsumexp(logits: jax.Array, mask: jax.Array, axis: int) -> jax.Array:
  """log sum exp over the True entries; about NEG (a huge negative) where there are
  none, which `jnp.logaddexp(0, .)` or a `where` turns into 0 downstream."""
  mask = jnp.broadcast_to(mask, logits.shape)
  return jax.nn.logsumexp(jnp.where(mask, logits, NEG), axis=axis)


def zero_empty_pairs(scores: jax.Array, region_mask: jax.Array,
                     token_mask: jax.Array) -> jax.Array:
  """scores [Bi, Bt] set to 0 where the image or the text has no real fragment
  (e.g. an LSE over words whose context is empty would otherwise give log(n)/lambda)."""
  real = jnp.any(region_mask, axis=1)[:, None] & jnp.any(token_mask, axis=1)[None, :]
  return jnp.where(real, scores, 0.0)


def pool(values: jax.Array, mask: jax.Array, *, axis: int, how: str,
         lambda_lse: float = 1.0) -> jax.Array:
  """Pools per-fragment relevances into one score.

  how: 'mean' (SCAN's AVG), 'sum', 'max', or 'lse' = (1/lambda) log sum exp(lambda
  r) over the real fragments (a soft maximum: lambda -> inf gives the max, lambda
  -> 0 gives mean + log(n) / lambda). Empty slices pool to 0.
  """
  if how == "mean":
    return masked_mean(values, mask, axis)
  if how == "sum":
    return masked_sum(values, mask, axis)
  if how == "max":
    return masked_max(values, mask, axis)
  if how == "lse":
    lse = masked_logsumexp(lambda_lse * values, mask, axis) / lambda_lse
    return jnp.where(jnp.any(jnp.broadcast_to(mask, values.shape), axis=axis), lse, 0.0)
  raise ValueError(f"unknown pooling {how!r}; expected one of 'mean', 'sum', 'max', 'lse'")
