"""Pieces every fine-tuning job shares: data setup, model config, init_from, eval I/O."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vlp import pretrained
from vlp.parallel import global_batch, sharding as sharding_lib
from vlp.train.job import EvalContext


def eval_rows_per_process(ctx: EvalContext) -> int:
  """Local eval batch: `config.eval_batch_size` split over processes, rounded up so
  that it divides evenly over this process's batch shards."""
  shards = sharding_lib.batch_shard_count(ctx.mesh, ctx.rules)
  per_shard = -(-ctx.config.eval_batch_size // shards)
  return per_shard * shards // jax.process_count()


def init_params_fn(config: ml_collections.ConfigDict, model_cfg,
                   after: Callable[[dict, dict], dict] | None = None):
  """`Job.init_params` loading `config.init_from` (None when it is empty).

  `after(params, report)` may fix up heads, e.g. the retrieval head copied from
  the pre-trained ITM head when the checkpoint has no retrieval head.
  """
  if not config.init_from:
    return None

  def init(params):
    loaded = pretrained.load_params_for_init(config.init_from, model_cfg)
    merged, report = pretrained.merge_params(params, loaded, strict_heads=False)
    return after(merged, report) if after else merged
  return init


def model_info(model_cls, model_cfg, tokenizer, **heads: Any) -> dict:
  return {"model_class": model_cls.__name__, "model_config": dataclasses.asdict(model_cfg),
          "tokenizer": tokenizer.path, **heads}


def gather(x: np.ndarray) -> np.ndarray:
  """Concatenates a host array over processes (in process order)."""
  if jax.process_count() == 1:
    return x
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def forward_fn(graphdef, fn: Callable[[nnx.Module, dict], Any]):
  """jit of `fn(model, batch)` in eval mode (no dropout rngs)."""
  def run(params, batch):
    return fn(nnx.merge(graphdef, params), batch)
  return jax.jit(run)


def run_forward(fn, params, batch: dict, ctx: EvalContext) -> Any:
  out = fn(params, ctx.to_global(batch))
  return jax.tree.map(global_batch.to_host, out)
