"""Image-text matching job: the dual-stream matching model (`vlp.matching`) with
a pluggable similarity or pair scorer and a pluggable loss.

Training batches are matched pairs (the retrieval job's); the `matching`
objective scores every image of the batch against every caption
(vlp/matching/objective.py); they carry their training step (`StepStamped`) for
the objective's `matching.mean_warmup_steps`. `config.matching` names the mechanism: streams,
blocks, scorer, similarity and loss (vlp/matching/model.py).

Evaluation over the test gallery (`config.eval_gallery_images` images, 0 = all,
with all their captions); every image and caption is encoded once:
  * full ranking: the scorer on every (image, caption) pair, in blocks of
    `config.matching.eval_chunk` x `config.matching.eval_chunk`; R@1/5/10 both
    ways and RSUM (`vlp.evaluators.retrieval`), COCO 1K / 5K on 5000 images;
  * mechanisms that encode each side apart up to the similarity (scorer
    "similarity"; `MatchingSpec.encodes_apart`): "dual", exact top-k search over
    the global vectors (masked mean of the states, L2-normalised), and
    "two_stage_k<k>", that search's top k re-ranked by the mechanism's score, for
    each k of `config.two_stage_ks`. With a decomposable similarity
    (`cosine_global`) the dual search is the full ranking itself.
Each mode reports `seconds` (encoding included) and `pairs_scored` (pairs sent
to the mechanism's scorer). The gallery's states come back in row order on every
process (`vlp.jobs.eval_batches`); the scorer then runs on the run's mesh through
`vlp.matching.score_matrix`: fixed-shape blocks, image blocks split over the
batch axes, the scorer's weights gathered once from the sharded parameters (no
host copy), each row of blocks gathered to every process, so every process ends
with the same full score matrix.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vlp.data.streams import StepStamped
from vlp.evaluators import retrieval as retrieval_eval
from vlp.jobs import base, data_setup, eval_batches, pair_scoring
from vlp.jobs.base import EvalContext, Feed, Job
from vlp.jobs.pair_data import PairData
from vlp.matching import score_matrix as score_matrix_lib, similarities
from vlp.matching.model import SCORER_PARTS, MatchingModel, MatchingSpec
from vlp.matching.objective import STEP_KEY, make_matching_loss
from vlp.parallel import sharding as sharding_lib


class StepStampedPairData(PairData):
  """PairData whose training batches carry their step (`STEP_KEY`): the objective's
  warm-up switches loss on it, and the loss stays a pure function of its batch."""

  def train_iterator(self, kind_for_index, start_index: int = 0):
    return StepStamped(super().train_iterator(kind_for_index, start_index), STEP_KEY)


def make_matching_job(config: ml_collections.ConfigDict, feed: Feed) -> Job:
  data = StepStampedPairData(config, feed, masked=False, init_from=config.init_from)
  model_cfg = data_setup.model_config_for(config, data.tokenizer)
  m = config.matching
  spec = MatchingSpec.from_config(m)
  if config.init_from and spec.encoder != "uniter":
    raise ValueError(f"config.init_from={config.init_from!r} loads a UNITER backbone; set "
                     "config.matching.encoder='uniter' (the dual-stream encoders have none)")
  loss_fns = {"matching": make_matching_loss(
      loss=m.loss, loss_args=m.loss_args, shapley_weight=m.shapley_weight,
      shapley_permutations=m.shapley_permutations, mean_warmup_steps=m.mean_warmup_steps)}
  return Job(
      data=data, make_model=functools.partial(MatchingModel, model_cfg, spec),
      loss_fns=loss_fns, batch_kinds={"matching": None},  # Plain matched pairs.
      evaluate=functools.partial(evaluate_matching, data=data, spec=spec),
      init_params=base.init_params_fn(config, model_cfg),
      eval_file=f"eval_{config.eval_split}.json",
      model_info=base.model_info(MatchingModel, model_cfg, data.tokenizer,
                                 matching=dataclasses.asdict(spec)))


_ENCODERS = {"image": lambda model, batch: model.encode_image(batch),
             "text": lambda model, batch: model.encode_text(batch)}


def encode_gallery(params, ctx: EvalContext, rows: eval_batches.EvalRows, gallery,
                   which: str) -> tuple[np.ndarray, np.ndarray]:
  """(states [N, K or T, H], mask) of every gallery image or caption."""
  fn = eval_batches.forward_fn(ctx, _ENCODERS[which])
  n = gallery["img_feat" if which == "image" else "input_ids"].shape[0]
  states, masks = [], []
  for start in range(0, n, rows.size):
    idx = np.arange(start, min(start + rows.size, n))
    other = np.zeros_like(idx)  # The other modality's row is not read.
    batch, real = pair_scoring.pair_batch(gallery, idx if which == "image" else other,
                                          idx if which == "text" else other, rows.size)
    s, m = eval_batches.run_forward(fn, params, {k: v[rows.rows] for k, v in batch.items()},
                                    ctx)
    states.append(np.asarray(s)[:real])
    masks.append(np.asarray(m)[:real])
  return np.concatenate(states), np.concatenate(masks)


def _bucket(n: int) -> int:
  return 1 << max(0, int(n - 1).bit_length())


def pair_scorer(score, img, img_mask, txt, txt_mask):
  """`score_pairs(img_idx, txt_idx) -> [P]` for `two_stage_recall`: each chunk's
  images x captions block (sizes padded to powers of two), then its pairs."""
  def pad(x, size):
    return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])

  def score_pairs(img_idx, txt_idx):
    ui, inv_i = np.unique(img_idx, return_inverse=True)
    ut, inv_t = np.unique(txt_idx, return_inverse=True)
    bi, bt = _bucket(len(ui)), _bucket(len(ut))
    block = score(pad(img[ui], bi), pad(img_mask[ui], bi), pad(txt[ut], bt),
                  pad(txt_mask[ut], bt))
    return np.asarray(block)[inv_i, inv_t]
  return score_pairs


def replicate_scorer(params, mesh):
  """`params` with the leaves the scorer reads replicated over `mesh` (one gather
  for the whole evaluation, none inside the scoring blocks); the encoders' leaves,
  which the blocks do not read, stay as they are sharded."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  reads = [i for i, (path, _) in enumerate(leaves)
           if getattr(path[0], "key", None) in SCORER_PARTS]
  gathered = jax.jit(lambda xs: xs, out_shardings=NamedSharding(mesh, P()))(
      [leaves[i][1] for i in reads])
  values = [x for _, x in leaves]
  for i, x in zip(reads, gathered):
    values[i] = x
  return jax.tree.unflatten(treedef, values)


def mesh_scorer(params, ctx: EvalContext):
  """`score(regions, region_mask, tokens, token_mask) -> [Ni, Nt]` host scores for
  host arrays of any size, on the run's mesh (`score_matrix` in one block per
  call, padded to whole image shards), and the image shard count."""
  shards = sharding_lib.batch_shard_count(ctx.mesh, ctx.rules)
  params = replicate_scorer(params, ctx.mesh)

  def sim(r, rm, t, tm, params):
    return nnx.merge(ctx.graphdef, params).scores(r, rm, t, tm)
  tile = ctx.jit(("matching_scores",), lambda: score_matrix_lib.tile_function(
      sim, mesh=ctx.mesh, rules=ctx.rules, params=params))

  def score(r, rm, t, tm, chunk_images=None, chunk_texts=None):
    return score_matrix_lib.score_matrix(
        sim, r, rm, t, tm, chunk_images=chunk_images or -(-len(r) // shards) * shards,
        chunk_texts=chunk_texts or len(t), mesh=ctx.mesh, rules=ctx.rules, params=params,
        tile=tile)
  return score, shards


def evaluate_matching(params, ctx: EvalContext, *, data: PairData, spec: MatchingSpec) -> dict:
  gallery = data.gallery()
  n_img, n_txt = gallery["img_feat"].shape[0], gallery["input_ids"].shape[0]
  out: dict = {"step": ctx.step, "num_images": int(n_img), "num_captions": int(n_txt),
               "encodes_apart": spec.encodes_apart,
               "decomposable": spec.encodes_apart and similarities.is_decomposable(spec.similarity)}
  rows = eval_batches.eval_rows(ctx)
  t0 = time.perf_counter()
  img, img_mask = encode_gallery(params, ctx, rows, gallery, "image")
  txt, txt_mask = encode_gallery(params, ctx, rows, gallery, "text")
  encode_seconds = time.perf_counter() - t0
  score, shards = mesh_scorer(params, ctx)
  chunk = int(ctx.config.matching.eval_chunk)
  t1 = time.perf_counter()
  # Image blocks split over the shards: round the block up to whole shards.
  matrix = score(img, img_mask, txt, txt_mask, chunk_images=-(-chunk // shards) * shards,
                 chunk_texts=chunk)
  full = retrieval_eval.recall_at_k(matrix, gallery["txt2img"])
  out["full"] = dict(full, pairs_scored=int(matrix.size),
                     seconds=encode_seconds + time.perf_counter() - t1)
  out.update(full)
  if n_img == 5000:
    out["coco"] = retrieval_eval.coco_1k_5k(matrix, gallery["txt2img"])
  if spec.encodes_apart:
    vec = lambda s, m: np.asarray(MatchingModel.global_vectors(jnp.asarray(s), jnp.asarray(m)))
    t2 = time.perf_counter()
    img_vecs, txt_vecs = vec(img, img_mask), vec(txt, txt_mask)
    stage_one = encode_seconds + time.perf_counter() - t2
    scorer = pair_scorer(score, img, img_mask, txt, txt_mask)
    for k in ctx.config.two_stage_ks:
      t3 = time.perf_counter()
      res = retrieval_eval.two_stage_recall(img_vecs, txt_vecs, gallery["txt2img"], scorer,
                                            int(k), chunk_size=chunk)
      out["dual"] = dict(res["dual"], pairs_scored=0, seconds=stage_one)
      out[f"two_stage_k{k}"] = dict(res["two_stage"], pairs_scored=int(res["pairs_scored"]),
                                    seconds=stage_one + time.perf_counter() - t3)
  return out
