"""Momentum queues of past embeddings as extra negatives (CODER-style DCL).

The queue is a functional state (a NamedTuple pytree, so it can live in a train
state and pass through jit): a ring buffer of the last `size` image and text
key embeddings, with their image ids (so that a queued caption of the anchor's
own image is never a negative) and a validity flag (an empty or padded slot is
nothing). `update_queue` returns a new queue; nothing is modified in place.

`queue_loss` is the diversity-sensitive contrastive loss over batch + queue:
for image i, the candidates are the batch's text keys and the queued text keys;
negatives are weighted by softmax(beta * s) (`vlp.matching.losses.weighted_nce_rows`),
and the same for captions against image keys. Keys normally come from a
momentum (EMA) copy of the encoders: `momentum_update` moves those parameters.
Queue size and momentum are free choices (MoCo uses 4k-65k and 0.995-0.999).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vlp.matching.losses import positives_from_ids, reduce_terms, weighted_nce_rows


class MomentumQueue(NamedTuple):
  images: jax.Array  # [Q, D] image keys
  texts: jax.Array  # [Q, D] text keys
  image_ids: jax.Array  # [Q] int32, the image each entry shows
  valid: jax.Array  # [Q] bool, False on empty slots
  position: jax.Array  # [] int32, the next slot to write


def init_queue(size: int, dim: int, dtype=jnp.float32) -> MomentumQueue:
  """An empty queue of `size` slots of `dim`-d keys."""
  if size <= 0 or dim <= 0:
    raise ValueError(f"init_queue: size and dim must be positive, got {size}, {dim}")
  return MomentumQueue(jnp.zeros((size, dim), dtype), jnp.zeros((size, dim), dtype),
                       jnp.full((size,), -1, jnp.int32), jnp.zeros((size,), bool),
                       jnp.zeros((), jnp.int32))


def update_queue(queue: MomentumQueue, image_keys: jax.Array, text_keys: jax.Array,
                 image_ids: jax.Array, example_mask: jax.Array | None = None
                 ) -> MomentumQueue:
  """The queue with the batch's B keys written over its B oldest slots.

  Keys enter without gradient. Rows with `example_mask` False (padding) are
  written as invalid slots. B must not exceed the queue size.
  """
  size = queue.images.shape[0]
  batch = image_keys.shape[0]
  if batch > size:
    raise ValueError(f"update_queue: a batch of {batch} does not fit a queue of {size}")
  slots = (queue.position + jnp.arange(batch)) % size
  mask = jnp.ones((batch,), bool) if example_mask is None else jnp.asarray(example_mask, bool)
  keys = lambda x: jax.lax.stop_gradient(jnp.asarray(x, queue.images.dtype))
  return MomentumQueue(queue.images.at[slots].set(keys(image_keys)),
                       queue.texts.at[slots].set(keys(text_keys)),
                       queue.image_ids.at[slots].set(jnp.asarray(image_ids, jnp.int32)),
                       queue.valid.at[slots].set(mask),
                       (queue.position + batch) % size)


def queue_loss(image_emb: jax.Array, text_emb: jax.Array, image_ids: jax.Array,
               queue: MomentumQueue, *, image_keys: jax.Array | None = None,
               text_keys: jax.Array | None = None, example_mask: jax.Array | None = None,
               temperature: float = 0.07, beta: float = 5.0) -> jax.Array:
  """DCL over the batch and the queue, both directions, mean over anchors.

  Args:
    image_emb, text_emb: [B, D] online embeddings of B matched pairs (row b of
      each shows image image_ids[b]); inner products are the scores, so pass
      unit vectors for cosine scores.
    image_ids: [B] int ids; rows sharing an id are positives of each other.
    queue: the `MomentumQueue` (read only; call `update_queue` after the step).
    image_keys, text_keys: [B, D] momentum-encoder keys of the batch (default:
      the online embeddings).
    example_mask: [B] bool, False on padding rows.
    temperature, beta: as `vlp.matching.losses.dcl`.

  For image b (anchor pairs: the batch captions of its image), candidates are
  the batch text keys and the valid queued text keys; queued captions of the
  same image id are left out. Captions likewise against image keys.
  """
  image_keys = image_emb if image_keys is None else image_keys
  text_keys = text_emb if text_keys is None else text_keys
  batch = image_emb.shape[0]
  real = jnp.ones((batch,), bool) if example_mask is None else jnp.asarray(example_mask, bool)
  same = positives_from_ids(image_ids, image_ids) & real[:, None] & real[None, :]
  in_queue = positives_from_ids(image_ids, queue.image_ids)  # [B, Q]
  queue_neg = queue.valid[None, :] & ~in_queue & real[:, None]
  batch_neg = real[:, None] & real[None, :] & ~same

  def direction(queries, keys, queued):
    scores = jnp.concatenate([queries @ keys.T, queries @ queued.T], axis=1)
    scores = jnp.asarray(scores, jnp.float32)
    negatives = jnp.concatenate([batch_neg, queue_neg], axis=1)
    terms = weighted_nce_rows(scores, negatives, temperature=temperature, beta=beta)
    return reduce_terms(terms[:, :batch], same, "mean")

  return (direction(image_emb, text_keys, queue.texts)
          + direction(text_emb, image_keys, queue.images))


def momentum_update(target: Any, online: Any, momentum: float) -> Any:
  """EMA of parameters: target <- momentum * target + (1 - momentum) * online."""
  return jax.tree_util.tree_map(lambda t, o: momentum * t + (1.0 - momentum) * o,
                                target, online)
