"""Referring-expression grounding job: a score per region, CE over regions.

Evaluation picks the best-scoring region of each expression and counts a hit
when its box has IoU >= 0.5 with the ground-truth box
(`vlp.evaluators.grounding`), for every split in `config.eval_splits`. On
`vlp_scenes` the regions are the objects themselves (the "ground-truth regions"
setting); detector regions come with real RefCOCO features.
"""

from __future__ import annotations

import functools
import time

import ml_collections
import numpy as np

from vlp.downstream import common
from vlp.downstream.task_data import TaskData
from vlp.evaluators import grounding as grounding_eval
from vlp.models.downstream import UniterForGrounding
from vlp.tasks import make_loss_fn
from vlp.train import pretrain_data
from vlp.train.job import EvalContext, Job


def make_grounding_job(config: ml_collections.ConfigDict, rows: np.ndarray) -> Job:
  data = TaskData(config, rows, "re")
  model_cfg = pretrain_data.model_config_for(config, data.tokenizer)
  return Job(
      data=data, make_model=functools.partial(UniterForGrounding, model_cfg),
      loss_fns={"grounding": make_loss_fn("grounding")}, batch_kinds={"grounding": "re"},
      evaluate=functools.partial(evaluate_grounding, data=data),
      init_params=common.init_params_fn(config, model_cfg),
      eval_file=f"eval_{config.eval_split}.json",
      model_info=common.model_info(UniterForGrounding, model_cfg, data.tokenizer))


def region_scores(model, batch):
  return model.encode(batch)["region_scores"]


def evaluate_grounding(params, ctx: EvalContext, *, data: TaskData) -> dict:
  t0 = time.perf_counter()
  fn = common.forward_fn(ctx.graphdef, region_scores)
  agg = grounding_eval.GroundingAggregator()
  splits = list(ctx.config.eval_splits) or [ctx.config.eval_split]
  for split in splits:
    for batch in data.eval_dataset(split, common.eval_rows_per_process(ctx)):
      scores = np.asarray(common.run_forward(fn, params, batch, ctx))
      agg.add_scores("gt", split, scores, common.gather(batch["img_boxes"]),
                     common.gather(batch["gt_box"]), common.gather(batch["img_mask"]),
                     common.gather(batch["example_mask"]))
  report = agg.report()
  out = {"step": ctx.step, "grounding_acc": report["gt"].get(ctx.config.eval_split)}
  out.update({f"grounding_acc/{s}": v for s, v in report["gt"].items()})
  out["counts"] = report["counts"]
  out["eval_seconds"] = time.perf_counter() - t0
  return out
