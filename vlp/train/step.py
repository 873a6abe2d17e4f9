"""Jitted train and eval steps, one per task, with explicit shardings and donation.

A task is a pure ``loss_fn(model, batch, rng) -> (loss, metrics)``. The step merges
the module structure with the parameter dict, differentiates the loss, optionally
accumulates gradients over micro-batches with `lax.scan`, and applies the optax
update. Nothing in it syncs with the host: metrics stay on device until the loop
decides to log them.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp.train.state import TrainState

LossFn = Callable[[nnx.Module, dict, Any], tuple[jax.Array, dict]]


def _microbatches(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...] taking every n-th row, so that each micro-batch keeps
  the batch's device layout (rows i*n + j for micro-batch j stay on their device)."""
  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split into {n} micro-batches")
    return x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
  return jax.tree.map(split, batch)


def make_train_step(graphdef, loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, grad_accum: int = 1):
  """The un-jitted train step: (state, batch) -> (state, metrics)."""

  def compute(params, batch, key):
    return loss_fn(nnx.merge(graphdef, params), batch, key)

  grad_fn = jax.value_and_grad(compute, has_aux=True)

  def train_step(state: TrainState, batch: dict):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum == 1:
      (loss, metrics), grads = grad_fn(state.params, batch, key)
    else:
      def body(grad_sum, xs):
        micro, i = xs
        (l, m), g = grad_fn(state.params, micro, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, grad_sum, g), (l, m)
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      grad_sum, (losses, ms) = jax.lax.scan(
          body, zeros, (_microbatches(batch, grad_accum), jnp.arange(grad_accum)))
      grads = jax.tree.map(lambda g: g / grad_accum, grad_sum)
      loss, metrics = losses.mean(), jax.tree.map(jnp.mean, ms)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=schedule(state.step))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics

  return train_step


def jit_train_step(step_fn, state_shardings: TrainState, batch_shardings: dict, mesh):
  replicated = NamedSharding(mesh, P())
  return jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def make_eval_step(graphdef, loss_fn: LossFn):
  """(params, batch) -> metrics, deterministic (no dropout)."""
  def eval_step(params, batch):
    _, metrics = loss_fn(nnx.merge(graphdef, params), batch, None)
    return metrics
  return eval_step


def make_score_step(graphdef):
  """(params, batch) -> [B] match logits (ITM row 1), for zero-shot retrieval."""
  def score_step(params, batch):
    model = nnx.merge(graphdef, params)
    return model.encode(batch)["itm_logits"][:, 1].astype(jnp.float32)
  return score_step
