"""The matching job's evaluation on a sharded mesh equals single-device scoring.

A few steps of the tiny matching job on 8 CPU devices, 2 data x 2 fsdp x 2 tensor
under `fsdp_tp` (weights split over devices), with a parametrised fine-grained
similarity (cross-attention with a learned bilinear score) or COMMA's pair scorer
(its layers' weights sharded too, gathered once before scoring). The evaluation
scores the gallery through `score_matrix` on that mesh; here the same encoded
gallery is scored the way the job used to, all pairs in one call on one device
with the weights copied to the host, and the score matrix and every R@K must agree.
"""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from vlp import config_lib
from vlp.data import scenes
from vlp.evaluators import retrieval as retrieval_eval
from vlp.jobs import eval_batches, matching as matching_job
from vlp.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("mechanism", [
    {"matching.similarity": "cross_attention", "matching.similarity_args": "score='general'"},
    {"matching.scorer": "comma", "eval_gallery_images": 24},  # Pairs cost layers here.
], ids=["cross_attention_general", "comma"])
def test_sharded_evaluation_equals_one_device_scoring(mechanism, tmp_path, monkeypatch):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  data_dir = tmp_path / "scenes"
  scenes.prepare_scenes(data_dir, feature_dim=64, size="small")
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/matching.py"))
  cfg = config_lib.set_values(cfg, {
      "data_dir": str(data_dir), "data_size": "small", "feature_dim": 64, "batch_size": 16,
      "max_text_len": 20, "total_steps": 2, "eval_every": 2, "checkpoint_every": 2,
      "log_every": 1, "eval_batch_size": 40, "two_stage_ks": (4,),
      "mesh": {"data": 2, "fsdp": 2, "tensor": 2}, "sharding": "fsdp_tp",
      "model.hidden_size": 32, "model.num_heads": 2, "model.intermediate_size": 64,
      "matching.text_layers": 1, **mechanism,
      # 100 x 500 (24 x 120) pairs in 16 x 48 blocks: last blocks padded.
      "matching.eval_chunk": 48})
  seen = {}

  def checked(params, ctx, **kwargs):
    out = evaluate(params, ctx, **kwargs)
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(params))
    gallery = kwargs["data"].gallery()
    rows = eval_batches.eval_rows(ctx)
    img, img_mask = matching_job.encode_gallery(params, ctx, rows, gallery, "image")
    txt, txt_mask = matching_job.encode_gallery(params, ctx, rows, gallery, "text")
    model = nnx.merge(ctx.graphdef, jax.device_get(params))
    seen["one_device"] = np.asarray(jax.jit(model.scores)(img, img_mask, txt, txt_mask))
    score, shards = matching_job.mesh_scorer(params, ctx)
    scorer_leaves = jax.tree.leaves(matching_job.replicate_scorer(params, ctx.mesh))
    seen["replicated"] = sum(x.sharding.is_fully_replicated for x in scorer_leaves)
    seen["was_replicated"] = sum(x.sharding.is_fully_replicated
                                 for x in jax.tree.leaves(params))
    seen["sharded"] = score(img, img_mask, txt, txt_mask, chunk_images=16, chunk_texts=48)
    seen["shards"], seen["txt2img"], seen["out"] = shards, gallery["txt2img"], out
    return out

  evaluate = matching_job.evaluate_matching
  monkeypatch.setattr(matching_job, "evaluate_matching", checked)
  loop.train_and_evaluate(cfg, str(tmp_path / "work"), devices=jax.devices())
  assert seen["shards"] == 4  # Image blocks split over data x fsdp.
  if "matching.scorer" in mechanism:  # COMMA's sharded weights, gathered for scoring.
    assert seen["replicated"] > seen["was_replicated"]
  images = mechanism.get("eval_gallery_images", 100)
  assert seen["sharded"].shape == (images, 5 * images)
  assert np.std(seen["one_device"]) > 1e-3  # Scores that rank, not a constant.
  np.testing.assert_allclose(seen["sharded"], seen["one_device"], rtol=1e-5, atol=1e-6)
  want = retrieval_eval.recall_at_k(seen["one_device"], seen["txt2img"])
  out = seen["out"]
  assert out["full"]["pairs_scored"] == images * 5 * images
  for key, value in want.items():
    assert out["full"][key] == pytest.approx(value), key
