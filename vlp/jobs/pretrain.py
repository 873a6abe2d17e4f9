"""The pretraining job: UNITER objectives on image-text pairs.

Evaluation (every `config.eval_every` steps and at the end) reports held-out
MLM and ITM accuracy and zero-shot retrieval by the ITM match score over the
test gallery (`config.eval_gallery_images` images and their captions).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import ml_collections

from vlp.jobs import data_setup, eval_batches, pair_scoring
from vlp.jobs.base import EvalContext, Feed, Job, init_params_fn, model_info
from vlp.jobs.pair_data import PairData
from vlp.models.pretraining import UniterForPretraining
from vlp.tasks import TASKS, make_loss_fn
from vlp.train import flops
from vlp.train.task_mix import loss_weights, task_kwargs, weighted


def make_pretrain_job(config: ml_collections.ConfigDict, feed: Feed) -> Job:
  data = PairData(config, feed, init_from=config.init_from)
  model_cfg = data_setup.model_config_for(config, data.tokenizer)
  names = [k for k, v in config.tasks.items() if float(v) > 0]
  unknown = sorted(set(names) - set(TASKS))
  if unknown:
    raise ValueError(f"config.tasks names unknown task(s) {unknown}; known: {sorted(TASKS)}")
  for name in names:
    for field in TASKS[name].record_fields:
      lacking = data.lacking(field)
      if lacking:
        raise ValueError(
            f"task {name!r} (config.tasks.{name}={config.tasks[name]}) needs the records' "
            f"{field!r}, which {', '.join(lacking)} lacks: prepare the data from features "
            f"that carry them (e.g. --features=lmdb: UNITER's image DBs, or npz with "
            f"soft_labels) or set --config.tasks.{name}=0")
  weights = loss_weights(config, names, TASKS)
  return Job(
      data=data,
      make_model=functools.partial(UniterForPretraining, model_cfg),
      loss_fns={n: weighted(make_loss_fn(n, **task_kwargs(config, n)), weights[n])
                for n in names},
      batch_kinds={n: TASKS[n].batch_kind for n in names},
      evaluate=functools.partial(evaluate_pretraining, data=data),
      # `config.init_from` (e.g. BERT imported by vlp.tools.import_uniter): the
      # entries it has; the rest stay as initialised.
      init_params=init_params_fn(config, model_cfg),
      flops_per_example={n: flops.train_flops_per_example(model_cfg, n, **flops.batch_shapes(config))
                         for n in names if n in flops.COUNTED_TASKS},
      model_info=model_info(UniterForPretraining, model_cfg, data.tokenizer))


def evaluate_pretraining(params: Any, ctx: EvalContext, *, data) -> dict[str, Any]:
  t0 = time.perf_counter()
  out: dict[str, Any] = {"step": ctx.step}
  for task, key in (("mlm", "mlm_acc"), ("itm", "itm_acc")):
    loss_fn = ctx.loss_fns.get(task) or make_loss_fn(task)
    fn = ctx.jit(("eval", task), lambda: pair_scoring.jit_eval_step(ctx.graphdef, loss_fn))
    m = pair_scoring.mean_metrics(fn, params, data.eval_batches(TASKS[task].batch_kind),
                                ctx.to_global)
    out[key] = m.get(key)
    out[f"val_loss/{task}"] = m.get(f"loss/{task}")
  rows = eval_batches.eval_rows(ctx)
  out.update(pair_scoring.zero_shot_retrieval(
      ctx.jit("score", lambda: pair_scoring.jit_score_step(ctx.graphdef)), params, data.gallery(),
      rows.size, ctx.to_global, rows=rows.rows))
  out["eval_seconds"] = time.perf_counter() - t0
  return out
