"""The pretraining job: UNITER objectives on image-text pairs.

Evaluation (every `config.eval_every` steps and at the end) reports held-out
MLM and ITM accuracy and zero-shot retrieval by the ITM match score over the
test gallery (`config.eval_gallery_images` images and their captions).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import ml_collections
import numpy as np

from vlp.parallel import global_batch, sharding as sharding_lib
from vlp.models.pretraining import UniterForPretraining
from vlp.tasks import TASKS, make_loss_fn
from vlp.train import evaluation, pretrain_data
from vlp.train.job import EvalContext, Job
from vlp.train.task_mix import loss_weights, task_kwargs, weighted


def make_pretrain_job(config: ml_collections.ConfigDict, rows: np.ndarray) -> Job:
  data = pretrain_data.PretrainData(config, rows)
  model_cfg = pretrain_data.model_config_for(config, data.tokenizer)
  names = [k for k, v in config.tasks.items() if float(v) > 0]
  unknown = sorted(set(names) - set(TASKS))
  if unknown:
    raise ValueError(f"config.tasks names unknown task(s) {unknown}; known: {sorted(TASKS)}")
  weights = loss_weights(config, names, TASKS)
  return Job(
      data=data,
      make_model=functools.partial(UniterForPretraining, model_cfg),
      loss_fns={n: weighted(make_loss_fn(n, **task_kwargs(config, n)), weights[n])
                for n in names},
      batch_kinds={n: TASKS[n].batch_kind for n in names},
      evaluate=functools.partial(evaluate_pretraining, data=data),
      model_info={"model_class": "UniterForPretraining",
                  "model_config": dataclasses.asdict(model_cfg),
                  "tokenizer": data.tokenizer.path})


def evaluate_pretraining(params: Any, ctx: EvalContext, *, data) -> dict[str, Any]:
  t0 = time.perf_counter()
  out: dict[str, Any] = {"step": ctx.step}
  for task, key in (("mlm", "mlm_acc"), ("itm", "itm_acc")):
    fn = evaluation.jitted_eval_step(ctx.graphdef, ctx.loss_fns.get(task) or make_loss_fn(task))
    m = evaluation.mean_metrics(fn, params, data.eval_batches(TASKS[task].batch_kind),
                                ctx.to_global)
    out[key] = m.get(key)
    out[f"val_loss/{task}"] = m.get(f"loss/{task}")
  # Pair batches must split evenly over the batch shards (and so the processes).
  shards = sharding_lib.batch_shard_count(ctx.mesh, ctx.rules)
  pairs_per_call = -(-ctx.config.eval_batch_size // shards) * shards
  out.update(evaluation.zero_shot_retrieval(
      evaluation.jitted_score_step(ctx.graphdef), params, data.gallery(), pairs_per_call,
      ctx.to_global, rows=global_batch.process_rows(ctx.mesh, ctx.rules, pairs_per_call)))
  out["eval_seconds"] = time.perf_counter() - t0
  return out
