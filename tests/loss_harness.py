"""Runs an objective jitted, compiled once per (loss, kwargs, grad, shapes).

Shared by the objective tests (test_tasks.py, test_downstream_tasks.py), which call
losses many times on small hand-made batches and (fake or real) models.
"""

import functools

import jax


@functools.lru_cache(maxsize=None)
def _jitted(loss_fn, kwargs, grad):
  fn = functools.partial(loss_fn, **dict(kwargs))
  if grad:
    fn = jax.value_and_grad(fn, has_aux=True)
  return jax.jit(fn)


def run_loss(loss_fn, model, batch, rng=None, *, grad=False, **kwargs):
  """(loss, metrics), or with `grad` ((loss, metrics), d loss / d model)."""
  return _jitted(loss_fn, tuple(sorted(kwargs.items())), grad)(model, batch, rng)
