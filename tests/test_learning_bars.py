"""Learning bars on the demo split of `vlp_scenes` (the `make demo` configs).

Pretraining: the tiny config trained on ITM alone for 500 steps (a fifth of the demo's
ITM steps, without the other objectives) must leave ITM's chance plateau: held-out
ITM accuracy and zero-shot retrieval R@5 clearly above chance (thresholds below).
This checks balanced ITM negatives, the setting that gets a from-scratch model past
the plateau in CPU time (the ITM loss weight matters only in the task mix, which the
demo exercises).

Transfer: each task fine-tuned from that checkpoint must beat the same fine-tuning
from scratch (same config, steps and seed) by a stated margin, on a short run where
the initialisation still matters:

* retrieval, 40 steps on a 50-image gallery: RSUM by RSUM_MARGIN (measured 162.0
  against 64.0; chance RSUM is ~62);
* grounding, 50 steps: val accuracy by GROUNDING_MARGIN points (measured 39.9
  against 24.4 %);
* VQA, 100 steps: accuracy by VQA_MARGIN points (measured 50.8 against 48.0 %).

From an earlier checkpoint of the same recipe: grounding at 100 steps 62.1 against
49.1 %, and at the demo's 200 steps no gain (84.7 against 85.2 %); VQA at 50 steps
43.1 against 42.2 %, at 100 steps 50.5 against 48.0 % (colour 16.1 against 2.3 %,
relation_query 18.5 against 12.8 %; the other types equal within 2 points).

The demo's 4000-step checkpoint shows the same at the demo's full fine-tunings
(README), but takes 5 minutes to train, too long for the suite.

Fine-tuning bars:
* VQA accuracy >= the majority-answer baseline + 20 points, at 100 steps from this
  checkpoint and from scratch (measured: 50.8 and 48.0 against 25.2);
* grounding accuracy >= 3x a random region choice after the demo's 200 steps from
  a fresh init (measured: 85.2 vs 18.7 %).

Both baselines are recomputed here independently of the evaluators' code paths.
"""

import collections
import json
import os

import jax
import numpy as np
import pytest

from vlp import config_lib
from vlp.data import scenes
from vlp.evaluators import vqa as vqa_eval
from vlp.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Execution-bound runs, thresholds measured with full XLA optimisation (conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("full_optimization")]
# Measured (seed 42, 2 CPU cores): ITM accuracy 0.730, i2t / t2i R@5 = 31 / 18.4 %.
THRESH_ITM, THRESH_R5 = 0.62, 12.0
RSUM_MARGIN = 40.0
FT_STEPS = 40  # Of the demo's 100 retrieval steps: the scratch run stays at chance.
GROUNDING_MARGIN, GROUNDING_STEPS = 8.0, 50
VQA_MARGIN, VQA_STEPS = 1.0, 100
ITM_STEPS = 500


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("scenes_demo")
  scenes.prepare_scenes(path, size="demo")
  return str(path)


def run(config_file, data_dir, workdir, **overrides):
  cfg = config_lib.load_config_file(os.path.join(REPO, config_file))
  cfg = config_lib.set_values(cfg, dict(data_dir=data_dir,
                                        mesh={"data": 1, "fsdp": 1, "tensor": 1}, **overrides))
  return loop.train_and_evaluate(cfg, str(workdir), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def itm_pretrained(data_dir, tmp_path_factory):
  """(workdir, eval) of the tiny config trained on ITM alone for ITM_STEPS steps."""
  cfg = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py:tiny"))
  assert cfg.itm.negatives == "balanced" and cfg.loss_weights.itm > 1
  cfg = config_lib.set_values(cfg, {
      "data_dir": data_dir, "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
      "tasks": {"mlm": 0, "mrfr": 0, "mrc": 0, "mrckl": 0, "itm": 1},
      "total_steps": ITM_STEPS, "eval_every": ITM_STEPS, "checkpoint_every": ITM_STEPS,
      "log_every": 100, "optimizer.learning_rate": 1e-3})  # Short run: the demo's 7e-4 is
  # for 4000 steps; 1e-3 over 500 is the setting the thresholds were measured with.
  work = tmp_path_factory.mktemp("itm_pretrain")
  return str(work), loop.train_and_evaluate(cfg, str(work), devices=jax.devices()[:1])


def pretrained_and_scratch(itm_pretrained, config_file, data_dir, tmp_path, **overrides):
  """The same fine-tuning from the ITM checkpoint and from scratch: (pre, scratch)."""
  init, _ = itm_pretrained
  return tuple(run(config_file, data_dir, tmp_path / name, init_from=path, **overrides)
               for name, path in (("pretrained", init), ("scratch", "")))


def test_itm_leaves_the_chance_plateau(itm_pretrained):
  _, out = itm_pretrained
  # Chance: ITM 0.5 on balanced pairs; R@5 over 100 images / 500 captions is 5 % for
  # t2i and 1 - C(495, 5) / C(500, 5) ~ 4.9 % for i2t (any of 5 captions in the top 5).
  assert out["step"] == ITM_STEPS
  assert out["itm_acc"] >= THRESH_ITM, out
  assert out["i2t_r5"] >= THRESH_R5 and out["t2i_r5"] >= THRESH_R5, out


def test_retrieval_finetuning_gains_from_pretraining(itm_pretrained, data_dir, tmp_path):
  pre, scratch = pretrained_and_scratch(
      itm_pretrained, "configs/finetune_retrieval.py:size=tiny,data=vlp_scenes", data_dir,
      tmp_path, total_steps=FT_STEPS, eval_gallery_images=50)
  print([{k: out[k] for k in ("rsum", "i2t_r5", "t2i_r5")} for out in (pre, scratch)])
  assert pre["step"] == scratch["step"] and pre["num_images"] == 50
  assert pre["rsum"] >= scratch["rsum"] + RSUM_MARGIN, (pre, scratch)
  # And above chance in both directions at R@5 (t2i 10 %, i2t ~ 9.8 % on 50 images).
  assert pre["i2t_r5"] >= 2 * 10 and pre["t2i_r5"] >= 2 * 10, pre


def test_vqa_gains_from_pretraining_and_beats_the_majority_answer(itm_pretrained, data_dir,
                                                                  tmp_path):
  pre, scratch = pretrained_and_scratch(
      itm_pretrained, "configs/finetune_vqa.py:size=tiny,data=vlp_scenes", data_dir, tmp_path,
      total_steps=VQA_STEPS)
  print(pre["vqa_acc"], scratch["vqa_acc"])
  assert pre["vqa_acc"] >= scratch["vqa_acc"] + VQA_MARGIN, (pre, scratch)
  with open(pre["annotations"]) as f:
    annotations = json.load(f)["annotations"]
  # Independent baseline: the most common normalised human answer, for every question.
  counts = collections.Counter(vqa_eval.normalize_answer(a["answer"])
                               for ann in annotations for a in ann["answers"])
  majority = counts.most_common(1)[0][0]
  accs = [vqa_eval.question_accuracy(majority, [a["answer"] for a in ann["answers"]])
          for ann in annotations]
  for out in (pre, scratch):
    assert out["vqa_majority_answer"] == majority
    assert out["vqa_acc_majority"] == pytest.approx(100 * np.mean(accs), abs=0.01)
    assert out["vqa_acc"] >= out["vqa_acc_majority"] + 20, out


def test_grounding_gains_from_pretraining(itm_pretrained, data_dir, tmp_path):
  pre, scratch = pretrained_and_scratch(
      itm_pretrained, "configs/finetune_refcoco.py:size=tiny,data=vlp_scenes", data_dir,
      tmp_path, total_steps=GROUNDING_STEPS)
  print(pre["grounding_acc/val"], scratch["grounding_acc/val"])
  assert pre["step"] == scratch["step"] == GROUNDING_STEPS
  assert pre["grounding_acc/val"] >= scratch["grounding_acc/val"] + GROUNDING_MARGIN, (
      pre, scratch)


def test_grounding_beats_a_random_region_3x(data_dir, tmp_path):
  out = run("configs/finetune_refcoco.py:size=tiny,data=vlp_scenes", data_dir, tmp_path)
  # Independent chance level: every vlp_scenes region is one object in its own grid
  # cell (boxes never overlap), so a random pick hits with probability 1 / #objects.
  builder = scenes.scenes_builder(data_dir, size="demo")
  source = builder.as_data_source(split="val")
  odds = [1.0 / len(source[i]["obj_shape"])
          for i in range(len(source)) for _ in source[i]["refexps"]["ref_id"]]
  assert len(odds) == out["counts"]["gt"]["val"]
  assert out["grounding_chance"] == pytest.approx(100 * np.mean(odds), abs=1e-6)
  assert out["grounding_acc"] >= 3 * out["grounding_chance"], out
