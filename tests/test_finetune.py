"""Fine-tuning end to end on `vlp_scenes` (small build, a very small model).

* pretrain a few steps, then fine-tune each task from that workdir (`init_from`):
  the backbone is loaded, the loss falls, and evaluation writes its file;
* VQA: the results file covers every val question once, and its accuracy,
  recomputed from the file with the official-format annotations, equals the
  reported one; `vlp.evaluate` on the test split writes eval_test.json;
* grounding: the reported accuracy equals an independent numpy recomputation
  (argmax region box vs ground truth at IoU >= 0.5) over the val split;
* retrieval: a fresh ranking head starts as the pre-trained ITM match row, and the
  full ranking reports R@K over the whole small gallery.
"""

import json
import os

import jax
import numpy as np
import pytest

from vlp import config_lib, jobs
from vlp.data import scenes
from vlp.jobs import retrieval as retrieval_job
from vlp.jobs.base import Feed
from vlp.evaluators import vqa as vqa_eval
from vlp.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = jax.devices()[:1]
pytestmark = pytest.mark.slow


def small(config_file, data_dir, **overrides):
  c = config_lib.load_config_file(os.path.join(REPO, config_file))
  values = dict(data_dir=str(data_dir), data_size="small", batch_size=16, max_text_len=20,
                mesh={"data": 1, "fsdp": 1, "tensor": 1}, eval_batch_size=40,
                **{"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
                   "model.intermediate_size": 64, "model.hidden_dropout": 0.0,
                   "model.attention_dropout": 0.0})
  values.update(overrides)
  return config_lib.set_values(c, values)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("scenes")
  work = tmp_path_factory.mktemp("pretrain")
  cfg = small("configs/uniter_base.py:tiny", data_dir, total_steps=4, eval_every=0,
              checkpoint_every=4, eval_batches=1, eval_gallery_images=4)
  loop.train_and_evaluate(cfg, str(work), devices=ONE)
  return data_dir, str(work)


def finetune(config_file, pretrained_dir, tmp_path, **overrides):
  data_dir, init = pretrained_dir
  cfg = small(config_file, data_dir, init_from=init, log_every=1, **overrides)
  work = str(tmp_path)
  out = loop.train_and_evaluate(cfg, work, devices=ONE)
  with open(os.path.join(work, "metrics.jsonl")) as f:
    losses = [r[f"loss/{r['task']}"] for r in map(json.loads, f)]
  return cfg, work, out, losses


def test_vqa(pretrained_dir, tmp_path):
  cfg, work, out, losses = finetune("configs/finetune_vqa.py:size=tiny,data=vlp_scenes",
                                    pretrained_dir, tmp_path, total_steps=30)
  assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])
  builder = scenes.prepare_scenes(cfg.data_dir, size="small")
  q_path, a_path = scenes.vqa_json_paths(builder, "val")
  with open(a_path) as f:
    annotations = json.load(f)
  results = vqa_eval.read_results(out["results_file"])
  assert sorted(r["question_id"] for r in results) == sorted(
      a["question_id"] for a in annotations["annotations"])
  again = vqa_eval.vqa_accuracy(results, annotations)
  assert again["overall"] == out["vqa_acc"]
  # The same checkpoint on the test split, through the evaluate entry point: the
  # step kept as the best on val (here the only evaluated one, 30).
  cfg.eval_split = "test"
  test_out = loop.evaluate_checkpoint(cfg, work, step="best", devices=ONE)
  assert os.path.exists(os.path.join(work, "eval_test.json"))
  assert test_out["split"] == "test" and test_out["num_questions"] > 0
  assert test_out["step"] == 30 and cfg.best_metric == "vqa_acc"


def _restored_state(cfg, work):
  """(job, graphdef, train state) of the latest checkpoint of a fine-tuning workdir."""
  from vlp import checkpoint as ckpt_lib
  from vlp.parallel import mesh as mesh_lib, sharding as sharding_lib
  from vlp.train import optim
  from vlp.train.state import abstract_state, state_shardings
  job = jobs.job_factory(cfg)(cfg, Feed.whole(cfg.batch_size))
  mesh = mesh_lib.make_mesh(cfg.mesh, ONE)
  tx, _ = optim.make_optimizer(cfg.optimizer, cfg.total_steps)
  graphdef, sh = state_shardings(job.make_model, tx, mesh=mesh,
                                 rules=sharding_lib.rules_for(cfg.sharding, mesh))
  ckpt = ckpt_lib.Checkpointer(os.path.join(work, "checkpoints"), save_every=1, keep=1)
  state, _ = ckpt.restore(ckpt.latest_step(), abstract_state(sh, job.make_model, tx))
  ckpt.close()
  return job, graphdef, state


def test_grounding_accuracy_matches_numpy(pretrained_dir, tmp_path):
  cfg, work, out, losses = finetune("configs/finetune_refcoco.py:size=tiny,data=vlp_scenes",
                                    pretrained_dir, tmp_path, total_steps=10)
  # (That this loss falls is checked on a fixed batch in test_downstream_tasks.py.)
  assert all(np.isfinite(losses))
  from vlp.jobs import grounding
  from vlp.jobs.eval_batches import EvalRows
  from flax import nnx
  job, graphdef, state = _restored_state(cfg, work)
  model = nnx.merge(graphdef, state.params)
  hits = n = 0
  for batch in job.data.eval_dataset("val", EvalRows(size=40, pieces=1, rows=np.arange(40))):
    scores = np.asarray(grounding.region_scores(model, batch))
    scores = np.where(batch["img_mask"], scores, -np.inf)
    for b in np.flatnonzero(batch["example_mask"]):
      box, gt = batch["img_boxes"][b, scores[b].argmax()], batch["gt_box"][b]
      iw = max(0.0, min(box[2], gt[2]) - max(box[0], gt[0]))
      ih = max(0.0, min(box[3], gt[3]) - max(box[1], gt[1]))
      union = ((box[2] - box[0]) * (box[3] - box[1]) + (gt[2] - gt[0]) * (gt[3] - gt[1])
               - iw * ih)
      hits += iw * ih / union >= 0.5
      n += 1
  assert n == out["counts"]["gt"]["val"]
  assert out["grounding_acc/val"] == pytest.approx(100.0 * hits / n, abs=1e-6)


def test_retrieval_rank_head_from_itm(pretrained_dir, tmp_path):
  params = {"itm_output": {"kernel": np.arange(8.0).reshape(4, 2), "bias": np.array([1.0, 2.0])},
            "rank_output": {"kernel": np.zeros((4, 1)), "bias": np.zeros(1)}}
  out = retrieval_job.rank_from_itm(params, {"fresh": ["rank_output"],
                                              "loaded": ["itm_output"]})
  np.testing.assert_array_equal(out["rank_output"]["kernel"][:, 0], [1.0, 3.0, 5.0, 7.0])
  np.testing.assert_array_equal(out["rank_output"]["bias"], [2.0])
  cfg, work, out, losses = finetune(
      "configs/finetune_retrieval.py:size=tiny,data=vlp_scenes", pretrained_dir, tmp_path,
      total_steps=6, eval_gallery_images=10,
      **{"retrieval_ft.num_anchors": 4, "retrieval_ft.num_hard_negatives": 3})
  assert out["num_images"] == 10 and out["num_captions"] == 50
  assert out["full"]["pairs_scored"] == 500
  assert 0.0 <= out["t2i_r1"] <= out["t2i_r5"] <= out["t2i_r10"] <= 100.0
  assert all(np.isfinite(losses))


def test_frozen_backbone_holds_no_optimizer_state_and_resumes(pretrained_dir, tmp_path):
  """ALADIN's second stage: only the dual head trains; the checkpoint holds Adam
  moments for that head alone, and a restart resumes from it."""
  from vlp import checkpoint as ckpt_lib
  # The `stage=dual` preset sets the ALADIN second stage up (frozen modules, tasks).
  args = ("configs/finetune_retrieval.py:size=tiny,data=vlp_scenes,stage=dual",
          pretrained_dir, tmp_path)
  kw = dict(dual_dim=8, eval_every=0, eval_gallery_images=4, checkpoint_every=2)
  cfg, work, _, _ = finetune(*args, total_steps=2, **kw)
  assert cfg.optimizer.frozen == "uniter,itm_output,rank_output"
  assert dict(cfg.tasks) == {"retrieval_ft": 0, "distill": 1}
  _, _, state = _restored_state(cfg, work)
  opt_leaves = jax.tree.leaves(state.opt_state)
  dual_size = sum(x.size for x in jax.tree.leaves(state.params["dual_output"]))
  # mu and nu of the dual head, plus AdamW's and the schedule's step counts.
  assert sum(x.size for x in opt_leaves) == 2 * dual_size + 2
  # Resume to step 4: the backbone is bit-identical to the pre-trained one.
  cfg, work, _, losses = finetune(*args, total_steps=4, **kw)
  assert len(losses) == 4 and all(np.isfinite(losses))  # Steps 1-2, then 3-4 resumed.
  _, _, resumed = _restored_state(cfg, work)
  assert int(resumed.step) == 4
  init, _, _ = ckpt_lib.restore_params(os.path.join(pretrained_dir[1], "checkpoints"))
  for a, b in zip(jax.tree.leaves(resumed.params["uniter"]), jax.tree.leaves(init["uniter"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  moved = [not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(resumed.params["dual_output"]), jax.tree.leaves(state.params["dual_output"]))]
  assert any(moved)


def test_matching_on_a_pretrained_uniter_backbone(pretrained_dir, tmp_path):
  """The matching job's `encoder=uniter` loads the pretrained backbone (`init_from`)
  and encodes each modality alone; the dual-stream encoders refuse `init_from`."""
  from vlp.jobs.matching import make_matching_job
  data_dir, init = pretrained_dir
  cfg = small("configs/matching.py", data_dir, init_from=init, total_steps=3, eval_every=3,
              checkpoint_every=3, log_every=1, two_stage_ks=(4,),
              **{"matching.encoder": "uniter", "matching.eval_chunk": 20})
  out = loop.train_and_evaluate(cfg, str(tmp_path / "uniter"), devices=ONE)
  assert out["num_images"] == 100 and set(out) >= {"full", "dual", "two_stage_k4"}
  assert out["full"]["pairs_scored"] == 100 * 500
  cfg.matching.encoder = "dual_stream"
  with pytest.raises(ValueError, match="matching.encoder='uniter'"):
    make_matching_job(cfg, Feed.whole(cfg.batch_size))
