"""Evaluation batches: which rows a process feeds, and model outputs in row order.

Every evaluator builds global eval batches the same way on every host, feeds the
rows its devices hold (from the sharding, whatever the device order) and reads
outputs and host fields back in row order.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from vlp.jobs.base import EvalContext
from vlp.parallel import global_batch, sharding as sharding_lib


@dataclasses.dataclass(frozen=True)
class EvalRows:
  """One global eval batch: its size and the rows this process feeds.

  `size` is `config.eval_batch_size` rounded up to the batch pieces of the mesh
  (`pieces`), so that every piece, and so every process, gets whole rows.
  """
  size: int
  pieces: int
  rows: np.ndarray

  def gather(self, local: np.ndarray) -> np.ndarray:
    """A host field of this process's rows -> the global batch, in row order."""
    return global_batch.gather_rows(local, self.rows, self.size)


def eval_rows(ctx: EvalContext) -> EvalRows:
  pieces = sharding_lib.batch_shard_count(ctx.mesh, ctx.rules)
  size = -(-ctx.config.eval_batch_size // pieces) * pieces
  return EvalRows(size, pieces, global_batch.process_rows(ctx.mesh, ctx.rules, size))


def forward_fn(ctx: EvalContext, fn: Callable[[nnx.Module, dict], Any]):
  """jit of `fn(model, batch)` in eval mode (no dropout rngs), once per run and `fn`."""
  def make():
    def run(params, batch):
      return fn(nnx.merge(ctx.graphdef, params), batch)
    return jax.jit(run)
  return ctx.jit(("forward", fn), make)


# Host-only fields of eval batches (int64 ids): never sent to the devices.
HOST_FIELDS = ("question_id", "ref_id", "example_index")


def run_forward(fn, params, batch: dict, ctx: EvalContext) -> Any:
  """`fn` on this process's rows of a global batch; the output, in row order, on
  every host."""
  out = fn(params, ctx.to_global({k: v for k, v in batch.items() if k not in HOST_FIELDS}))
  return jax.tree.map(global_batch.to_host, out)
