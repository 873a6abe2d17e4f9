"""Referring-expression grounding job: a score per region, CE over regions.

Evaluation picks the best-scoring region of each expression and counts a hit
when its box has IoU >= 0.5 with the ground-truth box
(`vlp.evaluators.grounding`), for every split in `config.eval_splits` and each
region setting that has data: "gt" (the regions are the ground-truth boxes) and
"det" (detector proposals). On `vlp_scenes` the regions are the objects
themselves ("gt" only). A refcoco build holds one region set per image, so its
setting is read off the data (`region_setting`); `config.det_data_dir` adds a
second build of the same dataset with detector regions.

`config.proposal_filter.keep` > 0 adds Ref-NMS's query-aware proposal filter
(`vlp.matching.proposals.FilteredGrounding`): a relatedness head trained with
BCE next to the grounding loss (weight `proposal_filter.weight`), and an extra
evaluation of the main build where the grounding head sees only the `keep`
proposals that NMS (IoU `proposal_filter.iou`) keeps after re-scoring:
accuracy with the filter, the hit rate (the referred region kept) and the
mean number kept, under "proposal_filter".
"""

from __future__ import annotations

import functools
import time

import ml_collections
import numpy as np

from vlp import storage
from vlp.evaluators import grounding as grounding_eval
from vlp.jobs import base, data_setup, eval_batches
from vlp.jobs.base import EvalContext, Feed, Job
from vlp.jobs.task_data import TaskData
from vlp.matching import proposals
from vlp.models.downstream import UniterForGrounding
from vlp.tasks import common as task_common, make_loss_fn
from vlp.train import flops, metrics as metrics_lib


def make_grounding_job(config: ml_collections.ConfigDict, feed: Feed) -> Job:
  data = TaskData(config, feed, "re")
  model_cfg = data_setup.model_config_for(config, data.tokenizer)
  make_model = grounding_model(config, model_cfg)
  loss_fn = make_loss_fn("grounding")
  pf = config.proposal_filter
  if pf.keep > 0:
    make_model = functools.partial(proposals.FilteredGrounding, model_cfg,
                                   mlp=config.grounding_mlp, keep=pf.keep,
                                   iou_threshold=pf.iou)
    loss_fn = with_proposal_loss(loss_fn, pf.weight)
  return Job(
      data=data, make_model=make_model,
      loss_fns={"grounding": loss_fn}, batch_kinds={"grounding": "re"},
      evaluate=functools.partial(evaluate_grounding, data=data),
      init_params=base.init_params_fn(config, model_cfg),
      eval_file=f"eval_{config.eval_split}.json",
      model_info=base.model_info(UniterForGrounding, model_cfg, data.tokenizer,
                                 mlp=config.grounding_mlp),
      flops_per_example={"grounding": flops.encoder_train_flops_per_example(model_cfg, config)})


def grounding_model(config: ml_collections.ConfigDict, model_cfg):
  """`make_model(rngs=...)`: the grounding model with `config.grounding_mlp` head layers
  (1: one Linear, the reference's RefCOCO / RefCOCOg head; 2: its RefCOCO+ head)."""
  if config.grounding_mlp not in (1, 2):
    raise ValueError(f"config.grounding_mlp must be 1 or 2 (layers of the region-scoring "
                     f"head), got {config.grounding_mlp!r}")
  return functools.partial(UniterForGrounding, model_cfg, mlp=config.grounding_mlp)


def region_scores(model, batch):
  return model.encode(batch)["region_scores"]


def filtered_scores(model, batch):
  out = model.filtered_encode(batch)
  return out["region_scores"], out["kept"]


def with_proposal_loss(grounding_loss, weight: float):
  """The grounding loss plus `weight` x the proposal scorer's BCE (metric loss/proposal)."""
  def loss_fn(model, batch, rng):
    loss, metrics = grounding_loss(model, batch, rng)
    bce = proposals.proposal_bce(model.proposal_scorer(batch), batch["target_region"],
                                 batch["img_mask"], task_common.example_weights(batch))
    return loss + weight * bce, dict(metrics, **{"loss/proposal": bce})
  return loss_fn


def evaluate_grounding(params, ctx: EvalContext, *, data: TaskData) -> dict:
  """Accuracy per split of `config.eval_splits` and per region setting.

  The regions of a build decide its setting (`region_setting`). The main data
  gives one; `config.det_data_dir` may name a second build of the same dataset
  whose regions are detector proposals ("det"). A setting without a build is
  reported as not evaluated, with the reason, under "settings".
  The predictions go to `WORKDIR/grounding_predictions.json`
  ({setting: {split: [{"ref_id", "sent_id", "pred_box", "gt_box"}]}}; sent_id -1
  on vlp_scenes).
  """
  t0 = time.perf_counter()
  fn = eval_batches.forward_fn(ctx, region_scores)
  agg = grounding_eval.GroundingAggregator()
  splits = list(ctx.config.eval_splits) or [ctx.config.eval_split]
  rows = eval_batches.eval_rows(ctx)
  builds = [("data_dir", data.builder)]
  det = data.det_builder
  if det is not None:
    builds.append(("det_data_dir", det))
  settings, notes, predictions = {}, {}, {}
  for key, builder in builds:
    datasets = {split: data.eval_dataset(split, rows, builder) for split in splits}
    setting, why = region_setting(data.layout, datasets)
    if setting in settings:
      raise ValueError(
          f"config.data_dir and config.det_data_dir both hold {setting!r} regions ({why}); "
          "det_data_dir must be a build from detector features, data_dir one from features "
          "on the ground-truth boxes")
    settings[setting] = key
    notes[setting] = f"evaluated on config.{key}={builder.data_dir}: {why}"
    predictions[setting] = {}
    for split, ds in datasets.items():
      predictions[setting][split] = _run_split(fn, params, ctx, rows, ds, agg, setting, split)
  for setting in grounding_eval.SETTINGS:
    if setting not in notes:
      notes[setting] = ("not evaluated: " + (
          "vlp_scenes regions are the scene objects themselves (ground-truth regions only)"
          if data.layout == "images" else
          f"{ctx.config.data} stores one region set per image and no build of the other "
          "kind was given; set config.det_data_dir to a build of the same dataset from "
          "detector features" if setting == "det" else
          "the stored regions are not the ground-truth boxes; prepare the dataset from "
          "features extracted on the ground-truth COCO boxes for this setting"))
  report = agg.report()
  main = next(iter(settings))
  out = {"step": ctx.step, "setting": main,
         "grounding_acc": report[main].get(ctx.config.eval_split)}
  out.update({f"grounding_acc/{s}": v for s, v in report[main].items()})
  # Chance level: a uniformly random region per expression (the bar to beat).
  chance = report.get("chance", {}).get(main, {})
  out["grounding_chance"] = chance.get(ctx.config.eval_split)
  out.update({f"grounding_chance/{s}": v for s, v in chance.items()})
  for setting in settings:
    out.update({f"grounding_acc_{setting}/{s}": v for s, v in report[setting].items()})
  out["settings"] = notes
  out["counts"] = report["counts"]
  if ctx.config.proposal_filter.keep > 0:
    datasets = {split: data.eval_dataset(split, rows, data.builder) for split in splits}
    out["proposal_filter"] = _filtered(params, ctx, rows, datasets, main, report[main])
  out["predictions_file"] = storage.join(ctx.workdir, "grounding_predictions.json")
  metrics_lib.write_json(out["predictions_file"], predictions)
  out["eval_seconds"] = time.perf_counter() - t0
  return out


def region_setting(layout: str, datasets: dict) -> tuple[str, str]:
  """("gt" | "det", reason) for the regions of the eval datasets of one build.

  vlp_scenes regions are the objects. On the refcoco builders a build whose
  regions were extracted on the ground-truth COCO boxes holds, for every
  expression, a region equal to the referred box (the stored `target_iou` is 1
  up to float rounding); any expression without one means detector regions.
  """
  if layout == "images":
    return "gt", "vlp_scenes regions are the scene objects"
  ious = np.concatenate([ds.split_index.target_iou for ds in datasets.values()])
  worst = float(ious.min()) if ious.size else 0.0
  if worst >= GT_IOU:
    return "gt", (f"every referred box is one of the stored regions (IoU >= {GT_IOU} for "
                  f"all {ious.size} expressions)")
  return "det", (f"{int((ious < GT_IOU).sum())} of {ious.size} referred boxes match no stored "
                 f"region (best IoU down to {worst:.3f}): detector regions")


GT_IOU = 0.99


def _filtered(params, ctx: EvalContext, rows: eval_batches.EvalRows, datasets: dict,
              setting: str, unfiltered: dict) -> dict:
  """Accuracy with only the kept proposals, hit rate and mean kept, per split."""
  fn = eval_batches.forward_fn(ctx, filtered_scores)
  agg = grounding_eval.GroundingAggregator()
  pf = ctx.config.proposal_filter
  out: dict = {"keep": pf.keep, "iou": pf.iou}
  for split, ds in datasets.items():
    hits, kept_counts = [], []
    for batch in ds:
      scores, kept = eval_batches.run_forward(fn, params, batch, ctx)
      scores, kept = np.asarray(scores), np.asarray(kept)
      real = rows.gather(batch["example_mask"])
      agg.add_scores(setting, split, scores, rows.gather(batch["img_boxes"]),
                     rows.gather(batch["gt_box"]), kept, real)
      target = rows.gather(batch["target_region"])
      hits.append(kept[np.arange(len(target)), target][real])
      kept_counts.append(kept.sum(1)[real])
    out[f"grounding_acc/{split}"] = agg.report()[setting].get(split)
    out[f"unfiltered_acc/{split}"] = unfiltered.get(split)
    out[f"hit_rate/{split}"] = 100.0 * float(np.mean(np.concatenate(hits)))
    out[f"mean_kept/{split}"] = float(np.mean(np.concatenate(kept_counts)))
  return out


def _run_split(fn, params, ctx: EvalContext, rows: eval_batches.EvalRows, ds, agg, setting: str,
               split: str) -> list:
  out = []
  for batch in ds:
    scores = np.asarray(eval_batches.run_forward(fn, params, batch, ctx))
    boxes, mask = rows.gather(batch["img_boxes"]), rows.gather(batch["img_mask"])
    keep, gt = rows.gather(batch["example_mask"]), rows.gather(batch["gt_box"])
    pred = agg.add_scores(setting, split, scores, boxes, gt, mask, keep)
    agg.add_chance(setting, split, boxes, gt, mask, keep)
    example = rows.gather(batch["example_index"])[keep]
    sent_ids = ds.split_index.sent_ids[example]  # -1 where records store none (vlp_scenes)
    ref_ids = rows.gather(batch["ref_id"])
    out += [{"ref_id": int(r), "sent_id": int(s), "pred_box": p.tolist(), "gt_box": g.tolist()}
            for r, s, p, g in zip(ref_ids[keep], sent_ids, pred[keep], gt[keep])]
  return out
