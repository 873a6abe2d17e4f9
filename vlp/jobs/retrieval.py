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

import ml_collections
import numpy as np

from vlp.evaluators import retrieval as retrieval_eval
from vlp.jobs import base, data_setup, eval_batches, pair_scoring
from vlp.jobs.base import EvalContext, Feed, Job
from vlp.jobs.pair_data import PairData
from vlp.models.downstream import UniterForRetrieval
from vlp.tasks import make_loss_fn

def make_retrieval_job(config: ml_collections.ConfigDict, feed: Feed) -> Job:
  data = PairData(config, feed, masked=False, init_from=config.init_from)
  model_cfg = data_setup.model_config_for(config, data.tokenizer)
  dual = int(config.dual_dim) or None
  names = [k for k, v in config.tasks.items() if float(v) > 0]
  # Each objective's keyword arguments are its config subtree (config.retrieval_ft, ...).
  loss_fns = {n: make_loss_fn(n, **config[n].to_dict()) for n in names}
  return Job(
      data=data, make_model=functools.partial(UniterForRetrieval, model_cfg, dual_dim=dual),
      loss_fns=loss_fns, batch_kinds={n: None for n in names},  # Plain matched pairs.
      evaluate=functools.partial(evaluate_retrieval, data=data),
      init_params=base.init_params_fn(config, model_cfg, after=rank_from_itm),
      eval_file=f"eval_{config.eval_split}.json",
      model_info=base.model_info(UniterForRetrieval, model_cfg, data.tokenizer,
                                   dual_dim=dual))


def rank_from_itm(params: dict, report: dict) -> dict:
  """A checkpoint without a ranking head starts it from the ITM match row, as UNITER does."""
  if "rank_output" in report["fresh"] and "itm_output" in report["loaded"]:
    itm = params["itm_output"]
    params = dict(params, rank_output={"kernel": itm["kernel"][:, 1:2], "bias": itm["bias"][1:2]})
  return params


def _rank(model, batch):
  return model.encode(batch)["rank_scores"]


def evaluate_retrieval(params, ctx: EvalContext, *, data) -> dict:
  gallery = data.gallery()
  out: dict = {"step": ctx.step, "num_images": int(gallery["img_feat"].shape[0]),
               "num_captions": int(gallery["input_ids"].shape[0])}
  rows = eval_batches.eval_rows(ctx)
  score = functools.partial(
      pair_scoring.score_pairs, eval_batches.forward_fn(ctx, _rank), params, gallery,
      batch_size=rows.size, to_global=ctx.to_global, rows=rows.rows)
  t0 = time.perf_counter()
  matrix = score(*pair_scoring.all_pairs(gallery)).reshape(out["num_images"], -1)
  full = retrieval_eval.recall_at_k(matrix, gallery["txt2img"])
  out["full"] = dict(full, pairs_scored=matrix.size, seconds=time.perf_counter() - t0)
  out.update(full)  # Top-level R@K: the full ranking.
  if out["num_images"] == 5000:
    out["coco"] = retrieval_eval.coco_1k_5k(matrix, gallery["txt2img"])
  if ctx.config.dual_dim:
    out.update(_two_stage(params, ctx, rows, gallery, score))
  return out


_ENCODERS = {"image": lambda model, batch: model.encode_image(batch),
             "text": lambda model, batch: model.encode_text(batch)}


def _vectors(params, ctx, rows: eval_batches.EvalRows, gallery, which: str) -> np.ndarray:
  """Dual-encoder vectors of every gallery image or caption, one eval batch per call."""
  fn = eval_batches.forward_fn(ctx, _ENCODERS[which])
  n = gallery["img_feat" if which == "image" else "input_ids"].shape[0]
  batch_size = rows.size
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    other = np.zeros_like(idx)  # The other modality's row is ignored by encode_<which>.
    batch, real = pair_scoring.pair_batch(gallery, idx if which == "image" else other,
                                        idx if which == "text" else other, batch_size)
    local = {k: v[rows.rows] for k, v in batch.items()}
    out.append(np.asarray(eval_batches.run_forward(fn, params, local, ctx))[:real])
  return np.concatenate(out)


def _two_stage(params, ctx, rows: eval_batches.EvalRows, gallery, score_pairs) -> dict:
  t0 = time.perf_counter()
  img_vecs = _vectors(params, ctx, rows, gallery, "image")
  txt_vecs = _vectors(params, ctx, rows, gallery, "text")
  encode_seconds = time.perf_counter() - t0
  out: dict = {}
  for k in ctx.config.two_stage_ks:
    t1 = time.perf_counter()
    res = retrieval_eval.two_stage_recall(img_vecs, txt_vecs, gallery["txt2img"], score_pairs,
                                          int(k), chunk_size=rows.size)
    out["dual"] = dict(res["dual"], seconds=encode_seconds, pairs_scored=0)
    out[f"two_stage_k{k}"] = dict(res["two_stage"], pairs_scored=int(res["pairs_scored"]),
                                  seconds=encode_seconds + time.perf_counter() - t1)
  return out
