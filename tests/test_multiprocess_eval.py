"""Fine-tuning on 2 processes whose rows of the global batch are not contiguous.

A TPU slice lists its devices in torus order, so a host's rows of every global
batch are scattered (tests/torus_driver.py replays such an order on CPU). Here the
8 devices are ordered so that process 0 holds batch pieces 0, 1, 5, 6 and process
1 pieces 2, 3, 4, 7. Pretraining trains 2 steps from scratch, each fine-tuning
job 2 steps from `init_from` (the matching job's dual-stream model from scratch),
and each evaluates; 2 processes x 4 devices must give what 1 process x 8 devices
(same order) gives:
* the training losses (so `init_from` restored the same weights into the sharded
  state on both processes: retrieval and grounding from a pretraining workdir,
  VQA from an exported directory; and the default `data_shards=0` found the 8
  shards that the 1-process run is given);
* pretraining's held-out MLM / ITM accuracy and zero-shot R@K; retrieval R@K,
  VQA accuracy and its per-question results file, grounding accuracy and its
  per-expression predictions; the matching job's R@K (full ranking, dual search
  and two-stage; SCAN scored on the mesh by both processes). A prediction matched
  to another row's label changes the per-example files even where the means agree.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlp import config_lib, pretrained
from vlp.data import scenes
from vlp.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "local_multiprocess.sh")
DRIVER = os.path.join(REPO, "tests", "torus_driver.py")
ORDER = [0, 1, 4, 5, 6, 2, 3, 7]  # Pieces of process 0: 0, 1, 5, 6.
pytestmark = pytest.mark.slow

SMALL = {"data_size": "small", "max_text_len": 20, "model.hidden_size": 32,
         "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 64,
         "model.hidden_dropout": 0.0, "model.attention_dropout": 0.0}
JOBS = {  # name: (config, init_from source, extra overrides)
    "pretrain": ("configs/uniter_base.py:tiny", None,
                 {"eval_batches": 2, "eval_gallery_images": 24, "eval_batch_size": 240,
                  "tasks": {"mlm": 1, "mrfr": 1, "mrc": 0, "mrckl": 0, "itm": 1}}),
    "retrieval": ("configs/finetune_retrieval.py:size=tiny,data=vlp_scenes", "workdir",
                  {"eval_gallery_images": 24, "eval_batch_size": 240}),
    "vqa": ("configs/finetune_vqa.py:size=tiny,data=vlp_scenes", "export",
            {"eval_batch_size": 96}),
    "grounding": ("configs/finetune_refcoco.py:size=tiny,data=vlp_scenes", "workdir",
                  {"eval_batch_size": 96}),
    # SCAN scored through score_matrix on the mesh: 8 x 8 blocks, one image per device.
    "matching": ("configs/matching.py:size=tiny,data=vlp_scenes", None,
                 {"eval_gallery_images": 24, "eval_batch_size": 240,
                  "matching.similarity": "scan_t2i", "matching.eval_chunk": 8}),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  """Scenes data, a 3-step pretraining workdir and its export."""
  data_dir = tmp_path_factory.mktemp("scenes")
  scenes.prepare_scenes(data_dir, feature_dim=64, size="small")
  work = str(tmp_path_factory.mktemp("pretrain"))
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py:tiny"))
  cfg = config_lib.set_values(cfg, dict(
      SMALL, data_dir=str(data_dir), batch_size=16, total_steps=3, eval_every=0,
      checkpoint_every=3, mesh={"data": 1, "fsdp": 1, "tensor": 1}))
  loop.train_and_evaluate(cfg, work, devices=jax.devices()[:1])
  export = str(tmp_path_factory.mktemp("export") / "model")
  pretrained.export_workdir(work, export)
  return {"data_dir": str(data_dir), "workdir": work, "export": export}


def _spec(sources, root, data_shards) -> str:
  runs = []
  for name, (config, source, extra) in JOBS.items():
    overrides = dict(SMALL, data_dir=sources["data_dir"], batch_size=16, data_shards=data_shards, total_steps=2, eval_every=2,
                     checkpoint_every=2, log_every=1,
                     mesh={"data": 8, "fsdp": 1, "tensor": 1}, **extra)
    if source:
      overrides["init_from"] = sources[source]
    runs.append({"config": config, "workdir": os.path.join(root, name),
                 "overrides": overrides})
  path = os.path.join(root, "spec.json")
  os.makedirs(root, exist_ok=True)
  with open(path, "w") as f:
    json.dump({"order": ORDER, "runs": runs}, f)
  return path


def _env(devices=None):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  flags = ["--xla_backend_optimization_level=0"]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  env.pop("VLP_NUM_PROCESSES", None)
  return env


def _run(cmd, env, root):
  out = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-6000:]
  return {name: _results(os.path.join(root, name)) for name in JOBS}, out.stdout


def _results(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [r[f"loss/{r['task']}"] for r in map(json.loads, f)]
  name = {"retrieval": "eval_test.json", "matching": "eval_test.json",
          "pretrain": "eval.json"}.get(
      os.path.basename(workdir), "eval_val.json")
  with open(os.path.join(workdir, name)) as f:
    ev = json.load(f)
  out = {"losses": losses, "eval": ev}
  for name in ("vqa_results_val.json", "grounding_predictions.json"):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        out[name] = json.load(f)
  return out


@pytest.fixture(scope="module")
def one_process(sources, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("one"))
  return _run([sys.executable, DRIVER, _spec(sources, root, 8)], _env(devices=8), root)


@pytest.fixture(scope="module")
def two_processes(sources, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("two"))
  # The default data_shards=0: shards follow the sharding, 8 of 2 rows for this order.
  return _run([LAUNCH, "2", "--cpu_devices=4", "--", sys.executable, DRIVER,
               _spec(sources, root, 0)], _env(), root)


def test_the_order_gives_each_process_scattered_rows(two_processes):
  _, log = two_processes
  assert "[0] process 0/2, 8 devices" in log
  assert "init from pre-trained parameters: loaded uniter" in log, log[-3000:]


def test_losses_after_init_from_match_one_process(one_process, two_processes):
  for name in JOBS:
    one, two = one_process[0][name]["losses"], two_processes[0][name]["losses"]
    assert len(one) == 2
    np.testing.assert_allclose(two, one, rtol=1e-4, err_msg=name)


def test_pretraining_evaluation_matches_one_process(one_process, two_processes):
  one, two = one_process[0]["pretrain"]["eval"], two_processes[0]["pretrain"]["eval"]
  keys = ["mlm_acc", "itm_acc", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "rsum"]
  assert all(one[k] is not None for k in keys), one
  np.testing.assert_allclose([two[k] for k in keys], [one[k] for k in keys], atol=1e-6)


def test_retrieval_recall_matches_one_process(one_process, two_processes):
  one, two = one_process[0]["retrieval"]["eval"], two_processes[0]["retrieval"]["eval"]
  assert one["num_images"] == 24 and one["num_captions"] == 120
  keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
  assert all(k in one for k in keys), sorted(one)
  np.testing.assert_allclose([two[k] for k in keys], [one[k] for k in keys], atol=1e-9)


def test_vqa_results_match_one_process(one_process, two_processes):
  one, two = one_process[0]["vqa"], two_processes[0]["vqa"]
  by_q = lambda rs: {r["question_id"]: r["answer"] for r in rs}
  assert len(one["vqa_results_val.json"]) == one["eval"]["num_questions"] > 0
  assert by_q(two["vqa_results_val.json"]) == by_q(one["vqa_results_val.json"])
  assert two["eval"]["vqa_acc"] == pytest.approx(one["eval"]["vqa_acc"], abs=1e-9)


def test_grounding_predictions_match_one_process(one_process, two_processes):
  one, two = one_process[0]["grounding"], two_processes[0]["grounding"]
  key = lambda p: (p["ref_id"], p["sent_id"])
  preds = lambda r: {key(p): (p["pred_box"], p["gt_box"])
                     for p in r["grounding_predictions.json"]["gt"]["val"]}
  assert len(preds(one)) == one["eval"]["counts"]["gt"]["val"] > 0
  assert preds(two) == preds(one)
  assert two["eval"]["grounding_acc"] == pytest.approx(one["eval"]["grounding_acc"], abs=1e-9)


def test_matching_recall_matches_one_process(one_process, two_processes):
  one, two = one_process[0]["matching"]["eval"], two_processes[0]["matching"]["eval"]
  assert (one["num_images"], one["num_captions"]) == (24, 120)
  assert one["full"]["pairs_scored"] == 24 * 120
  modes = ["full", "dual", "two_stage_k10", "two_stage_k20"]
  keys = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
  got = lambda ev: [ev[mode][k] for mode in modes for k in keys]
  np.testing.assert_allclose(got(two), got(one), atol=1e-9)
