"""`python -m vlp.pretrain` trains on a real-format dataset built from fixtures.

Writes a Karpathy COCO JSON and a bottom-up-attention TSV, builds `coco_karpathy`
with `vlp.data.prepare` (default config: 2048-d float16 features), then runs the
pretraining command on it and checks that it trained and evaluated.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vlp.data import prepare

from test_builders_karpathy import write_images  # Fixture writer for the real formats.

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_pretrain_command_on_coco_karpathy_fixture(tmp_path):
  rng = np.random.default_rng(0)
  images = ([(100 + i, "train", 5, 12) for i in range(24)] +
            [(200 + i, "val", 5, 11) for i in range(4)] +
            [(300 + i, "test", 5, 10) for i in range(4)])
  manual, data_dir = tmp_path / "manual", tmp_path / "data"
  write_images(str(manual), images, 2048, rng)
  prepare.prepare("coco_karpathy", manual_dir=str(manual), data_dir=str(data_dir))
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "vlp.pretrain", "--config=configs/uniter_base.py:tiny",
         "--config.data=coco_karpathy", f"--config.data_dir={data_dir}",
         f"--workdir={workdir}", "--config.total_steps=6", "--config.log_every=1",
         "--config.eval_every=6", "--config.checkpoint_every=6", "--config.batch_size=8",
         "--config.feature_dim=2048",
         "--config.tasks.mrc=0", "--config.tasks.mrckl=0", "--config.eval_batch_size=40"]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
             "--xla_cpu_use_fusion_emitters=false")  # Compile time (conftest.py).
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [json.loads(l) for l in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in lines] == list(range(1, 7))
  assert all(np.isfinite(r[f"loss/{r['task']}"]) for r in lines)
  ev = json.load(open(workdir / "eval.json"))
  assert ev["step"] == 6 and 0.0 <= ev["t2i_r10"] <= 100.0
