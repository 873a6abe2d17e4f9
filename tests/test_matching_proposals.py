"""Ref-NMS's proposal filter: the jittable NMS against a numpy greedy NMS, the
relatedness BCE by hand, and the grounding job with the filter on vlp_scenes
(a filter that keeps every region changes nothing; a tight one keeps at most
`keep` and reports a hit rate consistent with its accuracy)."""

import os

import jax
import numpy as np
import pytest

from vlp import config_lib
from vlp.matching import proposals
from vlp.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def numpy_nms(boxes, scores, valid, iou_threshold, max_keep):
  def iou(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0
  keep = []
  for i in sorted(np.flatnonzero(valid), key=lambda i: (-scores[i], i)):
    if len(keep) < max_keep and all(iou(boxes[i], boxes[j]) <= iou_threshold for j in keep):
      keep.append(i)
  out = np.zeros(len(boxes), bool)
  out[keep] = True
  return out


@pytest.mark.parametrize("iou,max_keep", [(0.3, 100), (0.5, 4), (0.1, 2)])
def test_nms_matches_numpy(iou, max_keep):
  rng = np.random.default_rng(7)
  fn = jax.jit(lambda b, s, v: proposals.nms_keep(b, s, v, iou_threshold=iou,
                                                  max_keep=max_keep))
  for _ in range(20):
    xy = rng.uniform(0, 50, (12, 2))
    wh = rng.uniform(5, 30, (12, 2))
    boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    scores = rng.choice([0.1, 0.5, 0.9], 12).astype(np.float32)  # ties included
    valid = rng.uniform(size=12) > 0.2
    np.testing.assert_array_equal(np.asarray(fn(boxes, scores, valid)),
                                  numpy_nms(boxes, scores, valid, iou, max_keep))


def test_proposal_bce_by_hand():
  logits = np.array([[2.0, -1.0, 0.5, -1e4]], np.float32)
  mask = np.array([[True, True, True, False]])
  got = float(proposals.proposal_bce(logits, np.array([1]), mask, np.ones(1, np.float32)))
  sp = lambda x: np.log1p(np.exp(x))
  want = (sp(2.0) + sp(1.0) + sp(0.5)) / 3  # -log(1-s(2)), -log s(-1), -log(1-s(.5))
  assert got == pytest.approx(want, rel=1e-5)


def grounding_config(data_dir, keep, iou):
  c = config_lib.load_config_file(
      os.path.join(REPO, "configs/finetune_refcoco.py:size=tiny,data=vlp_scenes"))
  return config_lib.set_values(c, {
      "data_dir": str(data_dir), "data_size": "small", "batch_size": 16, "total_steps": 6,
      "eval_every": 6, "checkpoint_every": 6, "log_every": 3, "eval_batch_size": 40,
      "eval_splits": ["val"], "eval_split": "val",
      "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
      "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
      "model.intermediate_size": 64, "proposal_filter.keep": keep,
      "proposal_filter.iou": iou})


@pytest.mark.slow
def test_grounding_job_with_the_proposal_filter(tmp_path):
  one = jax.devices()[:1]
  work = str(tmp_path / "run")
  tight = loop.train_and_evaluate(grounding_config(tmp_path / "data", 2, 0.3), work,
                                  devices=one)
  pf = tight["proposal_filter"]
  assert 1.0 <= pf["mean_kept/val"] <= 2.0
  assert pf["unfiltered_acc/val"] == pytest.approx(tight["grounding_acc/val"])
  # A filtered expression is right only if its referent (or an object with IoU >=
  # 0.5 with it: none on vlp_scenes' grid) was kept.
  assert pf["grounding_acc/val"] <= pf["hit_rate/val"] + 1e-9
  # The same weights keeping every region (no suppression at IoU 1): the unfiltered
  # pipeline (keep and iou are not parameters).
  everything = loop.evaluate_checkpoint(grounding_config(tmp_path / "data", 10, 1.0), work,
                                        devices=one)
  pf = everything["proposal_filter"]
  assert pf["hit_rate/val"] == 100.0 and pf["mean_kept/val"] > 2.0
  assert pf["grounding_acc/val"] == pytest.approx(everything["grounding_acc/val"])
  assert everything["grounding_acc/val"] == pytest.approx(tight["grounding_acc/val"])


def test_filtered_grounding_parameters_carry_logical_axis_names():
  from flax import nnx
  from vlp.models.uniter_config import model_config
  cfg = model_config("tiny", vocab_size=30, hidden_size=16, num_layers=1, num_heads=2,
                     intermediate_size=32, img_dim=8)
  model = proposals.FilteredGrounding(cfg, keep=2, rngs=nnx.Rngs(0))
  flat = nnx.to_flat_state(nnx.state(model.proposal_scorer, nnx.Param))
  assert len(flat) == 9  # embeddings, 4 Dense layers with biases
  for path, var in flat:
    names = var.get_metadata().get("out_sharding")
    assert names is not None and len(names) == var[...].ndim, (path, names)
