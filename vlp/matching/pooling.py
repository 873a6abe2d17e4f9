"""Masked pooling and normalisation shared by the similarities and scorers (float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Logit for padded positions before a softmax or max (finite, so 0 * it stays 0).
MASKED = -1e9


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """[..., N, D], [..., N] -> [..., D] mean over the real positions (0 when none)."""
  m = mask.astype(jnp.float32)[..., None]
  return jnp.sum(x.astype(jnp.float32) * m, -2) / jnp.maximum(jnp.sum(m, -2), 1.0)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
  """[..., N, D], [..., N] -> [..., D] per-channel max over the real positions."""
  return jnp.max(jnp.where(mask.astype(bool)[..., None], x.astype(jnp.float32), MASKED), -2)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))
