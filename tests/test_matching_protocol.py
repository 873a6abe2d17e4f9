"""The matching protocol on two mechanisms at toy scale (vlp_scenes small build):
its JSON table has every field for every evaluation mode, the chart is written,
the trained mechanism's R@1 is above chance, and the matching job's pieces
agree with numpy (two-stage pair scores, chance levels); the same command on a
coco_karpathy build from real-format fixtures."""

import json
import os

import numpy as np
import pytest

from vlp import config_lib
from vlp.tools import matching_protocol

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow
FIELDS = {"mechanism", "mode", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10",
          "rsum", "train_seconds", "eval_seconds", "pairs_scored"}


def tiny_config(data_dir):
  c = config_lib.load_config_file(os.path.join(REPO, "configs/matching.py"))
  return config_lib.set_values(c, {
      "data_dir": str(data_dir), "data_size": "small", "total_steps": 90, "batch_size": 32,
      "log_every": 45, "checkpoint_every": 90, "eval_batch_size": 128,
      "two_stage_ks": (5,), "optimizer.learning_rate": 2e-3, "optimizer.warmup_steps": 5,
      "model.hidden_size": 32, "model.num_heads": 2, "model.intermediate_size": 64,
      "matching.text_layers": 1, "matching.eval_chunk": 50})


def test_protocol_table_on_two_mechanisms(tmp_path):
  cfg = tiny_config(tmp_path / "data")
  work = str(tmp_path / "protocol")
  result = matching_protocol.run_protocol(cfg, work, ["global_nce", "slan"])
  with open(os.path.join(work, "matching_protocol.json")) as f:
    table = json.load(f)
  assert table["rows"] == json.loads(json.dumps(result["rows"]))
  assert os.path.getsize(os.path.join(work, "matching_protocol.png")) > 10_000
  with open(os.path.join(work, "matching_protocol.md")) as f:
    assert len(f.read().splitlines()) == 2 + len(result["rows"])
  assert table["budget"] == {"steps": 90, "batch_size": 32, "seed": 42,
                             "learning_rate": 2e-3}
  done = table["rows"]
  for row in done:
    assert set(row) == FIELDS, row
  modes = {(r["mechanism"], r["mode"]) for r in done}
  # Decomposable: full, dual search and two-stage; SLAN's pair scorer: full only.
  assert modes == {("global_nce", "full"), ("global_nce", "dual"),
                   ("global_nce", "two_stage_k5"), ("slan", "full")}
  n_img, n_txt = table["num_images"], table["num_captions"]
  assert (n_img, n_txt) == (100, 500)
  by = {(r["mechanism"], r["mode"]): r for r in done}
  assert by[("global_nce", "full")]["pairs_scored"] == n_img * n_txt
  assert by[("global_nce", "dual")]["pairs_scored"] == 0
  assert 0 < by[("global_nce", "two_stage_k5")]["pairs_scored"] <= 5 * (n_img + n_txt)
  # Global cosine is decomposable: its dual search ranks exactly as its full ranking.
  for m in matching_protocol.METRICS:
    assert by[("global_nce", "dual")][m] == pytest.approx(by[("global_nce", "full")][m])
  chance = table["chance"]["r1"]
  assert chance["t2i"] == pytest.approx(1.0) and chance["i2t"] == pytest.approx(1.0)
  full = by[("global_nce", "full")]
  assert full["t2i_r1"] > 3 * chance["t2i"] and full["i2t_r1"] > 3 * chance["i2t"], full
  # Run again in the same workdir: finished mechanisms are read back, not retrained.
  again = matching_protocol.run_protocol(cfg, work, ["slan", "global_nce"])
  assert again["rows"] == [r for r in result["rows"] if r["mechanism"] == "slan"] + [
      r for r in result["rows"] if r["mechanism"] == "global_nce"]


def test_chance_levels_match_a_simulation():
  rng = np.random.default_rng(0)
  n_img, per = 20, 5
  txt2img = np.repeat(np.arange(n_img), per)
  hits = {"i2t": 0, "t2i": 0}
  trials = 4000
  for _ in range(trials):
    order = rng.permutation(n_img * per)[:3]
    hits["i2t"] += bool(np.any(txt2img[order] == 0))
    hits["t2i"] += bool(0 in rng.permutation(n_img)[:3])
  want = matching_protocol.chance(n_img, n_img * per, 3)
  assert 100 * hits["i2t"] / trials == pytest.approx(want["i2t"], abs=2.0)
  assert 100 * hits["t2i"] / trials == pytest.approx(want["t2i"], abs=2.0)


def test_pair_scorer_reads_the_same_scores_as_the_full_matrix():
  from vlp.jobs import matching as matching_job
  from vlp.matching import score_matrix, similarities
  rng = np.random.default_rng(1)
  img = rng.normal(size=(6, 3, 4)).astype(np.float32)
  txt = rng.normal(size=(9, 5, 4)).astype(np.float32)
  im, tm = np.ones((6, 3), bool), np.ones((9, 5), bool)
  tm[2, 3:] = False
  full = score_matrix.score_matrix(similarities.cosine_global, img, im, txt, tm,
                                   chunk_images=4, chunk_texts=4)
  ii = np.array([0, 0, 3, 5, 5, 5])
  tt = np.array([1, 8, 2, 0, 2, 7])
  got = matching_job.pair_scorer(similarities.cosine_global, img, im, txt, tm)(ii, tt)
  np.testing.assert_allclose(got, full[ii, tt], atol=1e-6)


def test_protocol_command_on_a_coco_karpathy_build(tmp_path):
  """The same command on a real-format dataset: a Karpathy COCO JSON and a
  bottom-up-attention TSV built with `vlp.data.prepare` (2048-d features)."""
  import subprocess
  import sys
  from vlp.data import prepare
  from test_builders_karpathy import write_images
  rng = np.random.default_rng(0)
  images = ([(100 + i, "train", 5, 12) for i in range(16)]
            + [(200 + i, "val", 5, 11) for i in range(2)]
            + [(300 + i, "test", 5, 10) for i in range(6)])
  manual, data_dir, work = tmp_path / "manual", tmp_path / "data", tmp_path / "protocol"
  write_images(str(manual), images, 2048, rng)
  prepare.prepare("coco_karpathy", manual_dir=str(manual), data_dir=str(data_dir))
  cmd = [sys.executable, "-m", "vlp.tools.matching_protocol", "--config=configs/matching.py",
         "--config.data=coco_karpathy", "--config.feature_dim=2048",
         f"--config.data_dir={data_dir}", f"--workdir={work}", "--mechanisms=global_nce",
         "--config.total_steps=4", "--config.batch_size=8", "--config.log_every=2",
         "--config.checkpoint_every=4", "--config.eval_batch_size=40"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
             "--xla_cpu_use_fusion_emitters=false")
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(work / "matching_protocol.json") as f:
    table = json.load(f)
  assert table["data"] == "coco_karpathy"
  assert (table["num_images"], table["num_captions"]) == (6, 30)
  assert {r["mode"] for r in table["rows"]} == {"full", "dual", "two_stage_k10",
                                                "two_stage_k20"}
  assert all(r["pairs_scored"] <= 6 * 30 for r in table["rows"])
