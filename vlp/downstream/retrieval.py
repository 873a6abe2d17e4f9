"""Image-text retrieval job: cross-encoder ranking with hard negatives, optional
dual encoder distilled from it, and the full and two-stage evaluations.

Training batches are matched pairs (the plain pretraining batch); the
`retrieval_ft` objective forms in-batch hard negatives with the current model
(vlp/tasks/retrieval_ft.py) and `distill` trains the dual-encoder head on the
cross-encoder's scores (vlp/tasks/distill.py).

Evaluation over the test gallery (`config.eval_gallery_images` images, 0 = all,
with all their captions):
  * full ranking: every (image, caption) pair scored by the cross-encoder;
    i2t/t2i R@1/5/10 and RSUM in percent, plus COCO 1K (5-fold mean) and 5K when
    the gallery has 5000 images;
  * with a dual head (`config.dual_dim` > 0): the dual encoder alone, and
    two-stage retrieval (exact top-k by the dual encoder, then cross-encoder
    re-ranking of those k) for each k in `config.two_stage_ks`, with the pairs
    scored and the wall time of each.
"""

from __future__ import annotations

import functools
import time

import jax
import ml_collections
import numpy as np

from vlp.dist import global_batch
from vlp.downstream import common
from vlp.evaluators import retrieval as retrieval_eval
from vlp.models.downstream import UniterForRetrieval
from vlp.tasks import make_loss_fn
from vlp.train import evaluation, pretrain_data
from vlp.train.job import EvalContext, Job

_TASK_KWARGS = {
    "retrieval_ft": ("num_hard_negatives", "margin", "num_anchors"),
    "distill": ("student_scale", "contrastive_weight"),
}


def make_retrieval_job(config: ml_collections.ConfigDict, rows: np.ndarray) -> Job:
  data = pretrain_data.PretrainData(config, rows)
  model_cfg = pretrain_data.model_config_for(config, data.tokenizer)
  dual = int(config.dual_dim) or None
  names = [k for k, v in config.tasks.items() if float(v) > 0]
  loss_fns = {n: make_loss_fn(n, **{k: config[k] for k in _TASK_KWARGS.get(n, ())})
              for n in names}
  return Job(
      data=data, make_model=functools.partial(UniterForRetrieval, model_cfg, dual_dim=dual),
      loss_fns=loss_fns, batch_kinds={n: None for n in names},  # Plain matched pairs.
      evaluate=functools.partial(evaluate_retrieval, data=data),
      init_params=common.init_params_fn(config, model_cfg, after=_rank_from_itm),
      eval_file=f"eval_{config.eval_split}.json",
      model_info=common.model_info(UniterForRetrieval, model_cfg, data.tokenizer,
                                   dual_dim=dual))


def _rank_from_itm(params: dict, report: dict) -> dict:
  """A checkpoint without a ranking head starts it from the ITM match row (spec §5.1)."""
  if "rank_output" in report["fresh"] and "itm_output" in report["loaded"]:
    itm = params["itm_output"]
    params = dict(params, rank_output={"kernel": itm["kernel"][:, 1:2], "bias": itm["bias"][1:2]})
  return params


def _rank(model, batch):
  return model.encode(batch)["rank_scores"]


def evaluate_retrieval(params, ctx: EvalContext, *, data) -> dict:
  cfg = ctx.config
  gallery = data.gallery()
  out: dict = {"step": ctx.step, "num_images": int(gallery["img_feat"].shape[0]),
               "num_captions": int(gallery["input_ids"].shape[0])}
  rows_per_call = common.eval_rows_per_process(ctx) * jax.process_count()
  score_fn = common.forward_fn(ctx.graphdef, _rank)
  t0 = time.perf_counter()
  full = evaluation.zero_shot_retrieval(lambda p, b: score_fn(p, b), params, gallery,
                                        rows_per_call, ctx.to_global)
  out["full"] = dict(full, pairs_scored=out["num_images"] * out["num_captions"],
                     seconds=time.perf_counter() - t0)
  out.update({k: v for k, v in full.items()})  # Top-level R@K: the full ranking.
  if out["num_images"] == 5000:
    scores = _score_matrix(score_fn, params, gallery, rows_per_call, ctx)
    out["coco"] = retrieval_eval.coco_1k_5k(scores, gallery["txt2img"])
  if cfg.dual_dim:
    out.update(_two_stage(params, ctx, gallery, score_fn, rows_per_call))
  return out


def _score_matrix(score_fn, params, gallery, rows_per_call, ctx) -> np.ndarray:
  scores = []
  for batch, real in evaluation.pair_batches(gallery, rows_per_call):
    scores.append(np.asarray(common.run_forward(score_fn, params, _local(batch), ctx))[:real])
  return np.concatenate(scores).reshape(gallery["img_feat"].shape[0], -1)


def _local(batch: dict) -> dict:
  """This process's contiguous share of a global batch built on every host."""
  n = len(next(iter(batch.values())))
  return {k: v[global_batch.split_for_process(n)] for k, v in batch.items()}


def _vectors(params, ctx, gallery, which: str, rows_per_call: int) -> np.ndarray:
  fn = common.forward_fn(ctx.graphdef, lambda m, b: getattr(m, f"encode_{which}")(b))
  n = gallery["img_feat" if which == "image" else "input_ids"].shape[0]
  out = []
  for start in range(0, n, rows_per_call):
    idx = np.arange(start, start + rows_per_call) % n  # Static shape: wrap the tail.
    t_idx = idx if which == "text" else np.zeros_like(idx)
    i_idx = idx if which == "image" else np.zeros_like(idx)
    batch = {"input_ids": gallery["input_ids"][t_idx], "txt_mask": gallery["txt_mask"][t_idx],
             "img_feat": gallery["img_feat"][i_idx], "img_pos": gallery["img_pos"][i_idx],
             "img_mask": gallery["img_mask"][i_idx]}
    vecs = np.asarray(common.run_forward(fn, params, _local(batch), ctx))
    out.append(vecs[:min(rows_per_call, n - start)])
  return np.concatenate(out)


def _two_stage(params, ctx, gallery, score_fn, rows_per_call) -> dict:
  t0 = time.perf_counter()
  img_vecs = _vectors(params, ctx, gallery, "image", rows_per_call)
  txt_vecs = _vectors(params, ctx, gallery, "text", rows_per_call)
  encode_seconds = time.perf_counter() - t0

  def score_pairs(img_idx, txt_idx):
    scores = []
    for start in range(0, len(img_idx), rows_per_call):
      ii = img_idx[start:start + rows_per_call]
      tt = txt_idx[start:start + rows_per_call]
      real = len(ii)
      pad = rows_per_call - real
      ii, tt = np.pad(ii, (0, pad)), np.pad(tt, (0, pad))
      batch = {"input_ids": gallery["input_ids"][tt], "txt_mask": gallery["txt_mask"][tt],
               "img_feat": gallery["img_feat"][ii], "img_pos": gallery["img_pos"][ii],
               "img_mask": gallery["img_mask"][ii]}
      scores.append(np.asarray(common.run_forward(score_fn, params, _local(batch), ctx))[:real])
    return np.concatenate(scores)

  out: dict = {}
  for k in ctx.config.two_stage_ks:
    t1 = time.perf_counter()
    res = retrieval_eval.two_stage_recall(img_vecs, txt_vecs, gallery["txt2img"], score_pairs,
                                          int(k), chunk_size=rows_per_call)
    out["dual"] = dict(res["dual"], seconds=encode_seconds, pairs_scored=0)
    out[f"two_stage_k{k}"] = dict(res["two_stage"], pairs_scored=int(res["pairs_scored"]),
                                  seconds=encode_seconds + time.perf_counter() - t1)
  return out
