"""Train-step benchmark on a fixed synthetic workload.

Times the same jitted, sharded, donated train step the loop uses, one task at a
time, after warm-up, on batches of the config's shapes (`batch_size`,
`max_text_len`, `max_regions` of `feature_dim`, the objectives' prediction slots;
the README's GPU workload: UNITER-base at 128 examples and 40 text tokens). Reports
examples/s, step time, model FLOPs per example (analytic, see `flops.py`) and
XLA's own count, MFU against the device's bf16 peak, and peak device memory.
"""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import numpy as np

from vlp.parallel import global_batch, logical, mesh as mesh_lib, sharding as sharding_lib
from vlp.models.pretraining import UniterForPretraining
from vlp.models.uniter_config import model_config
from vlp.tasks import TASKS, make_loss_fn
from vlp.train import flops as flops_lib, optim, step as step_lib
from vlp.train.state import create_train_state
from vlp.train.task_mix import task_kwargs

batch_shapes = flops_lib.batch_shapes  # The shapes the benchmark's batches have.


def synthetic_batch(kind: str, *, batch: int, text_len: int, regions: int, cfg,
                    mlm_predictions: int, mrm_predictions: int, seed: int = 0) -> dict:
  """A full-length batch of the given kind with random content."""
  rng = np.random.default_rng(seed)
  d, c = cfg.img_dim, cfg.num_region_classes
  soft = rng.random((batch, regions, c), np.float32)
  b = {
      "input_ids": rng.integers(5, cfg.vocab_size, (batch, text_len), dtype=np.int32),
      "txt_mask": np.ones((batch, text_len), bool),
      "img_feat": rng.standard_normal((batch, regions, d), np.float32).astype(np.float16),
      "img_pos": rng.random((batch, regions, 7), np.float32),
      "img_mask": np.ones((batch, regions), bool),
      "soft_labels": (soft / soft.sum(-1, keepdims=True)).astype(np.float16),
  }
  if kind == "mlm":
    b["mlm_positions"] = np.sort(rng.choice(np.arange(1, text_len - 1), (batch, mlm_predictions)), -1).astype(np.int32)
    b["mlm_labels"] = rng.integers(5, cfg.vocab_size, (batch, mlm_predictions), dtype=np.int32)
    b["mlm_weights"] = np.ones((batch, mlm_predictions), np.float32)
  elif kind == "mrm":
    pos = np.stack([rng.choice(regions, mrm_predictions, replace=False) for _ in range(batch)]).astype(np.int32)
    b["mrm_positions"] = pos
    b["mrm_weights"] = np.ones(pos.shape, np.float32)
    b["img_masked"] = np.zeros((batch, regions), bool)
    np.put_along_axis(b["img_masked"], pos, True, axis=1)
    b["mrfr_target"] = np.take_along_axis(b["img_feat"], pos[..., None], 1).astype(np.float32)
    b["mrc_target"] = np.take_along_axis(b["soft_labels"], pos[..., None], 1).astype(np.float32)
    b["img_feat"] = np.where(b["img_masked"][..., None], 0, b["img_feat"]).astype(np.float16)
  elif kind == "itm":
    b["itm_target"] = rng.integers(0, 2, batch, dtype=np.int32)
    b["image_id"] = np.arange(batch, dtype=np.int32)  # itm.negatives="hardest" reads it
  return b


def tasks_to_time(config, tasks: list[str] | None) -> list[str]:
  """`tasks`, or by default every task `config.tasks` gives a positive ratio."""
  return list(tasks) if tasks else [k for k, v in config.tasks.items() if v > 0]


def model_config_for(config, vocab_size: int | None = None):
  """The model of `config` without its dataset: the size's vocabulary unless given."""
  overrides = {k: v for k, v in config.model.items() if k != "size" and v is not None}
  overrides.update(img_dim=config.feature_dim, num_region_classes=config.num_region_classes,
                   dtype=config.compute_dtype)
  if vocab_size:
    overrides["vocab_size"] = vocab_size
  return model_config(config.model.size, **overrides)


def run(config, *, tasks: list[str] | None = None, steps: int, warmup: int,
        vocab_size: int | None = None) -> dict[str, Any]:
  """Times each of `tasks` (default: those of config.tasks) at the config's shapes."""
  batch = config.batch_size
  shape_kw = batch_shapes(config)
  mesh = mesh_lib.make_mesh(config.mesh)
  rules = sharding_lib.rules_for(config.sharding, mesh)
  cfg = model_config_for(config, vocab_size)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  make_model = functools.partial(UniterForPretraining, cfg)
  with logical.activate(mesh, rules):
    graphdef, state, state_sh = create_train_state(
        make_model, tx, seed=0, mesh=mesh, rules=rules, sharding_name=config.sharding,
                                                        strict=config.strict_sharding)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  device = jax.devices()[0]
  peak = flops_lib.peak_flops(device)
  report: dict[str, Any] = {
      "device": device.device_kind, "platform": device.platform, "num_devices": jax.device_count(),
      "dtype": config.compute_dtype, "model": config.model.size, "params": n_params,
      "batch": batch, "text_len": shape_kw["text_len"], "regions": shape_kw["regions"],
      "img_dim": cfg.img_dim,
      "mesh": dict(mesh.shape), "sharding": config.sharding, "tasks": {}}
  local = global_batch.process_rows(mesh, rules, batch)
  for task in tasks_to_time(config, tasks):
    host = synthetic_batch(TASKS[task].batch_kind, batch=batch, cfg=cfg, **shape_kw)
    host = {k: v[local] for k, v in host.items()}
    fn = step_lib.make_train_step(graphdef, make_loss_fn(task, **task_kwargs(config, task)),
                                  tx, schedule, grad_accum=config.grad_accum)
    jitted = step_lib.jit_train_step(fn, state_sh, sharding_lib.batch_shardings(host, mesh, rules), mesh)
    with logical.activate(mesh, rules):
      gbatch = global_batch.host_to_global(host, mesh, rules)
      t0 = time.perf_counter()
      compiled = jitted.lower(state, gbatch).compile()
      compile_s = time.perf_counter() - t0
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      xla_flops = float((cost or {}).get("flops", 0.0)) * jax.device_count()
      for _ in range(warmup):
        state, m = compiled(state, gbatch)
      jax.block_until_ready(m)
      t0 = time.perf_counter()
      for _ in range(steps):
        state, m = compiled(state, gbatch)
      jax.block_until_ready(m)
      dt = (time.perf_counter() - t0) / steps
    model_flops = flops_lib.train_flops_per_example(cfg, task, **shape_kw)
    achieved = model_flops * batch / dt
    report["tasks"][task] = {
        "examples_per_sec": round(batch / dt, 1),
        "step_time_ms": round(dt * 1e3, 3),
        "compile_s": round(compile_s, 2),
        "model_flops_per_example": model_flops,
        "xla_flops_per_example": xla_flops / batch if xla_flops else None,
        "model_tflops_per_sec_per_device": round(achieved / jax.device_count() / 1e12, 3),
        "mfu": round(achieved / (peak * jax.device_count()), 4) if peak else None,
        "loss": float(m["loss"]),
    }
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  report["peak_memory_bytes"] = (stats or {}).get("peak_bytes_in_use")
  report["peak_flops_per_device"] = peak
  return report
