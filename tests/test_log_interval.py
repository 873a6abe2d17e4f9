"""The log interval's numbers, checked by hand: per-task means, MFU against the
peak table, the time split, and the device kinds the peak table knows."""

import types

import numpy as np
import pytest

from vlp.train import flops, log_interval


def _interval(peak):
  return log_interval.LogInterval(batch_size=4, total_steps=100, start_step=0,
                                  flops_per_example={"mlm": 3e9, "itm": 1e9},
                                  peak_flops=peak)


def _steps(interval, tasks):
  for i, task in enumerate(tasks):
    interval.add_step(task, {"loss": np.float32(9.0), "lr": np.float32(0.1 * (i + 1)),
                             f"loss/{task}": np.float32(i), "grad_norm": np.float32(2 * i)})


def test_means_per_task_and_mfu_by_hand():
  interval = _interval(peak=1e12)
  _steps(interval, ["mlm", "itm", "mlm", "mlm"])
  with interval.timed("data"):
    pass
  r = interval.report(4)
  assert r["loss/mlm"] == pytest.approx((0 + 2 + 3) / 3) and r["loss/itm"] == pytest.approx(1)
  assert r["grad_norm"] == pytest.approx((0 + 2 + 4 + 6) / 4)
  assert "loss" not in r and r["lr"] == pytest.approx(0.4) and r["task"] == "mlm"
  # MFU = model FLOP/s / peak: examples/s x mean FLOPs per example / peak.
  mean_flops = (3 * 3e9 + 1e9) / 4
  assert r["mfu"] == pytest.approx(r["examples_per_sec"] * mean_flops / 1e12, rel=1e-6)
  split = sum(r[f"step_time/{p}_ms"] for p in ("data", "compute", "checkpoint"))
  assert split * 4 / 1e3 == pytest.approx(4 * 4 / r["examples_per_sec"], rel=1e-6)
  # The next interval starts empty.
  _steps(interval, ["itm"])
  assert "loss/mlm" not in interval.report(5)


def test_no_mfu_without_a_peak_or_a_task_count():
  interval = _interval(peak=None)
  _steps(interval, ["mlm"])
  assert "mfu" not in interval.report(1)
  interval = _interval(peak=1e12)
  _steps(interval, ["mlm", "vqa"])  # No FLOP count for vqa: no MFU for the interval.
  assert "mfu" not in interval.report(2)


@pytest.mark.parametrize("kind, peak", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
    ("TPU v4", 275e12), ("TPU v6 lite", 918e12), ("cpu", None), ("NVIDIA GeForce RTX 4090", None)])
def test_peak_flops_by_device_kind(kind, peak):
  assert flops.peak_flops(types.SimpleNamespace(device_kind=kind)) == peak


def test_encoder_flops_by_hand():
  cfg = types.SimpleNamespace(hidden_size=4, intermediate_size=8, num_layers=2, img_dim=6,
                              img_pos_dim=7)
  config = types.SimpleNamespace(max_text_len=3, max_regions=2)
  embed = 2 * 2 * (6 * 4 + 7 * 4)  # Region features and positions -> H, per region.
  layer = 2 * 5 * (4 * 4 * 4 + 2 * 4 * 8) + 2 * 2 * 5 * 5 * 4  # Projections, FFN; QK^T, AV.
  pooler = 2 * 4 * 4
  assert flops.encoder_train_flops_per_example(cfg, config) == 3 * (embed + 2 * layer + pooler)
