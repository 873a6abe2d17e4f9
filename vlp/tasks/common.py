"""Pieces every task loss needs: the encoder call, gathers and weighted means.

Kept apart from the loss modules so that `mlm`, `mrm` and `itm` share one
definition of how dropout rngs reach the model and how padding is weighted out.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx


def encode(model: Any, batch: Mapping[str, jax.Array],
           rng: jax.Array | None) -> dict[str, jax.Array]:
  """Runs `model.encode`; `rng=None` is deterministic, else it seeds dropout."""
  rngs = None if rng is None else nnx.Rngs(dropout=rng)
  return model.encode(batch, rngs=rngs)


def gather(hidden: jax.Array, positions: jax.Array) -> jax.Array:
  """Hidden states [B, L, H] at per-example positions [B, P] -> [B, P, H]."""
  positions = jnp.asarray(positions, jnp.int32)
  return jnp.take_along_axis(hidden, positions[..., None], axis=1)


def example_weights(batch: Mapping[str, jax.Array]) -> jax.Array:
  """[B] float32: 1 on real examples, 0 on eval padding (`example_mask`)."""
  mask = batch.get("example_mask")
  if mask is None:
    return jnp.ones(jnp.shape(batch["input_ids"])[:1], jnp.float32)
  return jnp.asarray(mask).astype(jnp.float32)


def slot_weights(batch: Mapping[str, jax.Array], key: str) -> jax.Array:
  """[B, P] float32 slot weights `batch[key]`, zeroed on padded examples."""
  weights = jnp.asarray(batch[key]).astype(jnp.float32)
  return weights * example_weights(batch)[:, None]


def weighted_mean(values: jax.Array, weights: jax.Array,
                  per_weight: int = 1) -> jax.Array:
  """sum(values * weights) / (max(sum(weights), 1) * per_weight), in float32.

  Args:
    values: per-slot values, same shape as `weights`.
    weights: slot weights (0 on unused slots).
    per_weight: number of elements each unit of weight stands for (e.g. the
      feature size when a per-slot value is a sum over features).
  """
  total = jnp.sum(values.astype(jnp.float32) * weights)
  # No masked slot in the batch -> loss 0, not nan.
  count = jnp.maximum(jnp.sum(weights), 1.0)
  return total / (count * per_weight)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-slot softmax CE in float32; labels are clipped into range."""
  logits = logits.astype(jnp.float32)
  labels = jnp.clip(jnp.asarray(labels, jnp.int32), 0, logits.shape[-1] - 1)
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return logz - picked
