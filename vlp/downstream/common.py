"""Pieces every fine-tuning job shares: data setup, model config, init_from, eval I/O."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx

from vlp import pretrained
from vlp.parallel import global_batch, sharding as sharding_lib
from vlp.train.job import EvalContext


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


def init_params_fn(config: ml_collections.ConfigDict, model_cfg,
                   after: Callable[[dict, dict], dict] | None = None):
  """`Job.init_params` loading `config.init_from` (None when it is empty) straight
  into the shardings of the fresh parameters.

  `after(params, report)` may fix up heads, e.g. the retrieval head copied from
  the pre-trained ITM head when the checkpoint has no retrieval head; it runs
  under jit into the same shardings, so it works on arrays that span processes.
  """
  if not config.init_from:
    return None

  def init(params):
    merged, report = pretrained.init_params_from(params, config.init_from, model_cfg)
    if after is None:
      return merged
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda p: after(p, report), out_shardings=shardings)(merged)
  return init


def model_info(model_cls, model_cfg, tokenizer, **heads: Any) -> dict:
  return {"model_class": model_cls.__name__, "model_config": dataclasses.asdict(model_cfg),
          "tokenizer": tokenizer.path, **heads}


def forward_fn(graphdef, fn: Callable[[nnx.Module, dict], Any]):
  """jit of `fn(model, batch)` in eval mode (no dropout rngs)."""
  def run(params, batch):
    return fn(nnx.merge(graphdef, params), batch)
  return jax.jit(run)


# Host-only fields of eval batches (int64 ids): never sent to the devices.
HOST_FIELDS = ("question_id", "ref_id", "example_index")


def run_forward(fn, params, batch: dict, ctx: EvalContext) -> Any:
  """`fn` on this process's rows of a global batch; the output, in row order, on
  every host."""
  out = fn(params, ctx.to_global({k: v for k, v in batch.items() if k not in HOST_FIELDS}))
  return jax.tree.map(global_batch.to_host, out)
