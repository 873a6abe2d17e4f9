"""Downstream learning bars on the demo split of `vlp_scenes` (the `make demo` configs).

The tiny VQA and grounding fine-tunings, 200 steps each with their demo settings
and seed (from a fresh init: the checks are about the heads, losses and evaluators,
and no pretraining run fits the suite's time), must clear the baselines that their
evaluations report next to the accuracy:

* VQA accuracy >= the majority-answer baseline + 20 points (measured: 52.6 vs 25.2);
* grounding accuracy >= 3x a random region choice (measured: 97.5 vs 18.7 %).

Both baselines are recomputed here independently of the evaluators' code paths.
"""

import collections
import json
import os

import jax
import numpy as np
import pytest

from vlp import config_lib, downstream
from vlp.data import scenes
from vlp.evaluators import vqa as vqa_eval
from vlp.train import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("scenes_demo")
  scenes.prepare_scenes(path, size="demo")
  return str(path)


def run(config_file, data_dir, workdir):
  cfg = config_lib.load_config_file(os.path.join(REPO, config_file))
  cfg = config_lib.set_values(cfg, dict(data_dir=data_dir,
                                        mesh={"data": 1, "fsdp": 1, "tensor": 1}))
  return loop.train_and_evaluate(cfg, str(workdir), devices=jax.devices()[:1],
                                 job_factory=downstream.job_factory(cfg))


def test_vqa_beats_the_majority_answer_by_20_points(data_dir, tmp_path):
  out = run("configs/finetune_vqa.py:size=tiny,data=vlp_scenes", data_dir, tmp_path)
  with open(out["annotations"]) as f:
    annotations = json.load(f)["annotations"]
  # Independent baseline: the most common normalised human answer, for every question.
  counts = collections.Counter(vqa_eval.normalize_answer(a["answer"])
                               for ann in annotations for a in ann["answers"])
  majority = counts.most_common(1)[0][0]
  accs = [vqa_eval.question_accuracy(majority, [a["answer"] for a in ann["answers"]])
          for ann in annotations]
  assert out["vqa_majority_answer"] == majority
  assert out["vqa_acc_majority"] == pytest.approx(100 * np.mean(accs), abs=0.01)
  assert out["vqa_acc"] >= out["vqa_acc_majority"] + 20, out


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
