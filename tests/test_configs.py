"""Config files load, arguments parse, bad overrides fail clearly, and each job's
config holds exactly the keys that job reads."""

import glob
import os
import re
import subprocess
import sys

import pytest

from vlp import config_lib, jobs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Loaded by the job configs, not run on their own.
NOT_RUNNABLE = {"base.py", "finetune_common.py"}
# Top-level keys each job adds to configs/base.py (the schedule and `tasks` included).
SCHEDULE = {"job", "tasks", "total_steps", "batch_size", "log_every", "eval_every",
            "checkpoint_every"}
PRETRAINING_ONLY = {"loss_weights", "mlm", "mrm", "itm", "eval_batches"}
JOB_KEYS = {
    "pretrain": SCHEDULE | PRETRAINING_ONLY | {"init_from", "eval_gallery_images"},
    "retrieval": SCHEDULE | {"init_from", "retrieval_ft", "distill", "dual_dim",
                             "two_stage_ks", "eval_gallery_images"},
    "vqa": SCHEDULE | {"init_from", "head_lr_mult", "answer_vocab"},
    "grounding": SCHEDULE | {"init_from", "eval_splits", "det_data_dir", "grounding_mlp",
                             "proposal_filter"},
    "matching": SCHEDULE | {"init_from", "matching", "two_stage_ks", "eval_gallery_images"},
}
# The keys these were before the per-task subtrees; none may come back.
FLAT_KEYS = {"task", "mlm_prob", "mrm_prob", "itm_neg_prob", "itm_negatives",
             "max_mlm_predictions", "max_mrm_predictions", "wra_weight", "ot_beta",
             "ot_iterations", "ot_k", "num_hard_negatives", "margin", "num_anchors",
             "student_scale", "contrastive_weight"}


def documented_configs() -> list[str]:
  """Every `configs/<file>.py[:arg]` the README, Makefile, launch scripts, config
  docstrings and entry points name (the commands people copy)."""
  files = ([os.path.join(REPO, "README.md"), os.path.join(REPO, "Makefile")]
           + glob.glob(os.path.join(REPO, "launch", "*"))
           + glob.glob(os.path.join(REPO, "configs", "*.py"))
           + glob.glob(os.path.join(REPO, "vlp", "**", "*.py"), recursive=True))
  found = set()
  for path in files:
    with open(path) as f:
      found.update(re.findall(r"configs/[a-z_]+\.py(?::[A-Za-z0-9_=,]+)?", f.read()))
  return sorted(s for s in found if os.path.basename(s.split(":")[0]) not in NOT_RUNNABLE)


DOCUMENTED = documented_configs()
KEYS = ("total_steps", "batch_size", "seed", "log_every", "eval_every", "checkpoint_every",
        "data", "data_dir", "mesh", "sharding")


@pytest.mark.parametrize("spec", ["configs/uniter_base.py", "configs/uniter_base.py:tiny",
                                  "configs/uniter_base.py:size=tiny,data=coco_karpathy",
                                  "configs/uniter_large.py"])
def test_configs_load_with_contract_keys(spec):
  cfg = config_lib.load_config_file(os.path.join(REPO, spec))
  for key in KEYS:
    assert key in cfg, key
  assert sum(cfg.tasks.values()) > 0


def test_tiny_and_sizes():
  tiny = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py:tiny"))
  base = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py"))
  large = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_large.py"))
  assert (tiny.model.size, base.model.size, large.model.size) == ("tiny", "base", "large")
  assert base.optimizer.b2 == 0.98 and base.optimizer.grad_clip == 5.0
  assert base.feature_dim == 2048 and tiny.feature_dim == 64


def test_large_is_set_up_for_a_pod():
  # Its mesh keeps the sharding's promise: fsdp over every device, not fsdp=1 (which
  # would make the fsdp preset plain data parallelism).
  import jax
  from vlp.parallel import mesh as mesh_lib, sharding as sharding_lib
  large = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_large.py"))
  assert large.compute_dtype == "bfloat16" and large.sharding == "fsdp"
  for n in (8, 4):
    mesh = mesh_lib.make_mesh(large.mesh, jax.devices()[:n])
    assert dict(mesh.shape) == {"data": 1, "fsdp": n, "tensor": 1}
    assert sharding_lib.promises_param_sharding(sharding_lib.rules_for(large.sharding, mesh),
                                                mesh)


def test_parse_arg_types_and_unknown():
  a = config_lib.parse_arg("tiny,steps=3", size="base", steps=10)
  assert a.size == "tiny" and a.steps == 3 and isinstance(a.steps, int)
  with pytest.raises(ValueError, match="unknown config argument 'nope'"):
    config_lib.parse_arg("nope=1", size="base")


# Every command that takes a config starts through vlp.entry.run.
@pytest.mark.parametrize("module", ["vlp.pretrain", "vlp.finetune", "vlp.evaluate",
                                    "vlp.bench", "vlp.tools.aot"])
def test_unknown_override_is_a_clear_flag_error(module):
  proc = subprocess.run(
      [sys.executable, "-m", module, "--config=configs/uniter_base.py:tiny",
       "--config.mlm_prob=0.2", "--workdir=/tmp/unused"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "unknown config key(s) mlm_prob" in proc.stderr, proc.stderr[-2000:]
  assert "mlm.prob" in proc.stderr  # The valid keys are listed.
  assert "Traceback" not in proc.stderr


def test_bench_refuses_a_fine_tuning_config():
  proc = subprocess.run(
      [sys.executable, "-m", "vlp.bench", "--config=configs/finetune_vqa.py:tiny",
       "--distributed=off"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "vlp.bench times the pretraining tasks" in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_check_overrides_accepts_nested_known_keys():
  # Known nested keys pass: no SystemExit, nothing returned.
  assert config_lib.check_overrides(
      ["prog", "--config=configs/uniter_base.py:tiny",
       "--config.optimizer.learning_rate=0.1", "--config.mesh.data=1"]) is None
  keys = config_lib.valid_keys(config_lib.load_config_file("configs/uniter_base.py:tiny"))
  assert {"optimizer.learning_rate", "mesh.data"} <= set(keys)


def test_set_values_sets_dotted_keys_and_refuses_unknown_ones():
  cfg = config_lib.load_config_file("configs/uniter_base.py:tiny")
  out = config_lib.set_values(cfg, {"optimizer.learning_rate": 0.5, "batch_size": 8})
  assert out is cfg and cfg.optimizer.learning_rate == 0.5 and cfg.batch_size == 8
  with pytest.raises(KeyError, match="optimizer.no_such_key"):
    config_lib.set_values(cfg, {"optimizer.no_such_key": 1})


def test_the_demo_and_readme_commands_are_among_the_documented_configs():
  # The scan must see the commands `make demo` and `make two-stage` run.
  assert {"configs/uniter_base.py:tiny",
          "configs/finetune_retrieval.py:size=tiny,data=vlp_scenes",
          "configs/finetune_retrieval.py:size=tiny,data=vlp_scenes,stage=dual",
          "configs/finetune_vqa.py:size=tiny,data=vlp_scenes",
          "configs/finetune_refcoco.py:size=tiny,data=vlp_scenes",
          "configs/uniter_large.py"} <= set(DOCUMENTED)
  files = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "configs", "*.py"))}
  assert {os.path.basename(s.split(":")[0]) for s in DOCUMENTED} == files - NOT_RUNNABLE


@pytest.mark.parametrize("spec", DOCUMENTED)
def test_each_job_config_holds_exactly_the_keys_its_job_reads(spec):
  cfg = config_lib.load_config_file(os.path.join(REPO, spec))
  size = cfg.model.size if cfg.model.size != "large" else "base"
  base = config_lib.load_config_file(
      os.path.join(REPO, f"configs/base.py:size={size},data={cfg.data}"))
  assert cfg.job in JOB_KEYS and cfg.job in jobs.JOBS, spec
  extra = set(cfg.keys()) - set(base.keys())
  assert extra == JOB_KEYS[cfg.job], (spec, sorted(extra ^ JOB_KEYS[cfg.job]))
  assert not set(config_lib.valid_keys(cfg)) & FLAT_KEYS, spec
  assert {"learning_rate", "warmup_steps", "grad_clip"} <= set(cfg.optimizer.keys())
  assert sum(cfg.tasks.values()) > 0, spec
  if cfg.job == "pretrain":
    assert set(cfg.loss_weights.keys()) | set(cfg.tasks.keys()) <= {
        "mlm", "mrfr", "mrc", "mrckl", "itm"}
  else:  # None of the pretraining objectives' keys reaches a fine-tuning job.
    assert not set(cfg.keys()) & PRETRAINING_ONLY, spec
  if cfg.job == "retrieval":  # Each objective's subtree is its loss's keyword arguments.
    assert set(cfg.retrieval_ft.keys()) == {"num_hard_negatives", "margin", "num_anchors"}
    assert set(cfg.distill.keys()) == {"student_scale", "contrastive_weight"}


def test_pretraining_objectives_keep_their_values_in_subtrees():
  tiny = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py:tiny"))
  base = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py"))
  assert (tiny.mlm.max_predictions, base.mlm.max_predictions) == (8, 12)
  assert (tiny.mrm.max_predictions, base.mrm.max_predictions) == (4, 30)
  assert tiny.mlm.prob == tiny.mrm.prob == 0.15
  assert (tiny.itm.negatives, base.itm.negatives) == ("balanced", "random")
  assert tiny.itm.neg_prob == 0.5 and tiny.itm.wra_weight == 0.1
  assert dict(tiny.itm.ot) == {"beta": 0.5, "iterations": 50, "k": 1}
  from vlp.train.task_mix import task_kwargs
  assert task_kwargs(tiny, "itm") == dict(wra_weight=0.1, ot_beta=0.5, ot_iterations=50,
                                          ot_k=1, negatives="balanced",
                                          hard_similarity="cosine_global")
  from vlp.data.batching import BatchSpec
  spec = BatchSpec.from_config(tiny, 32, masked=True)
  assert (spec.mlm_predictions, spec.mrm_predictions, spec.itm_negatives) == (8, 4, "balanced")
  # Fine-tuning batches are plain: the masking settings are not read at all.
  vqa = config_lib.load_config_file(os.path.join(REPO, "configs/finetune_vqa.py:tiny"))
  assert BatchSpec.from_config(vqa, 32).max_text_len == 20


def test_retrieval_stages_and_their_task_settings():
  cross = config_lib.load_config_file(
      os.path.join(REPO, "configs/finetune_retrieval.py:size=tiny,data=vlp_scenes"))
  dual = config_lib.load_config_file(
      os.path.join(REPO, "configs/finetune_retrieval.py:size=tiny,data=vlp_scenes,stage=dual"))
  assert dict(cross.retrieval_ft) == {"num_hard_negatives": 7, "margin": 0.2, "num_anchors": 8}
  assert (cross.distill.contrastive_weight, dual.distill.contrastive_weight) == (0.0, 1.0)
  assert dict(dual.tasks) == {"retrieval_ft": 0, "distill": 1} and dual.dual_dim == 64


def test_base_configs_follow_the_reference_recipes():
  load = lambda spec: config_lib.load_config_file(os.path.join(REPO, spec))
  base, large = load("configs/uniter_base.py"), load("configs/uniter_large.py")
  # 10-100 regions per image; MRM slots sized from them; the clip on the sum over
  # 8 GPUs x 6 (base) and 16 GPUs x 4 (large) accumulation steps.
  assert base.max_regions == large.max_regions == 100 and base.mrm.max_predictions == 30
  assert (base.optimizer.clip_scale, large.optimizer.clip_scale) == (48, 64)
  assert load("configs/uniter_base.py:tiny").optimizer.clip_scale == 1.0
  # train-refcoco{,+,g}-base-1gpu.json: lr, steps, warm-up, head; 128 per batch.
  for data, (lr, steps, warmup, mlp) in {"refcoco": (1e-4, 24000, 1500, 1),
                                         "refcoco_plus": (6e-5, 10000, 1000, 2),
                                         "refcocog": (1e-4, 24000, 1500, 1)}.items():
    c = load(f"configs/finetune_refcoco.py:data={data}")
    assert (c.optimizer.learning_rate, c.total_steps, c.optimizer.warmup_steps,
            c.grounding_mlp, c.batch_size, c.seed) == (lr, steps, warmup, mlp, 128, 24), data
    assert c.optimizer.clip_scale == 1.0 and c.best_metric == "grounding_acc"
  vqa = load("configs/finetune_vqa.py")
  assert (vqa.optimizer.clip_scale, vqa.best_metric, vqa.answer_vocab) == (20, "vqa_acc", "")
  # train-vqa-base-4gpu.json: vqa_train + vqa_trainval + vqa_vg, selected on vqa_devval.
  assert (vqa.data, vqa.eval_split) == ("vqa_v2:train+restval,vg_qa:train", "devval")
  scenes = load("configs/finetune_vqa.py:size=tiny,data=vlp_scenes")
  assert (scenes.data, scenes.eval_split) == ("vlp_scenes", "val")
  # itm-*-hard: 128 anchors per direction, 399 candidates and 31 hard negatives each.
  ret = load("configs/finetune_retrieval.py:data=coco_karpathy")
  assert (ret.batch_size, ret.retrieval_ft.num_anchors, ret.retrieval_ft.num_hard_negatives,
          ret.optimizer.clip_scale, ret.best_metric) == (400, 128, 31, 16, "")
  with pytest.raises(ValueError, match="finetune_refcoco.py: data must be one of"):
    load("configs/finetune_refcoco.py:data=coco")
