r"""Ahead-of-time check: compile the train step for a target topology, no hardware.

  # 8 CPU devices standing in for 8 accelerators (works anywhere):
  python -m vlp.tools.aot --config=configs/uniter_base.py --topology=cpu:8 \
      --config.sharding=fsdp --config.mesh.fsdp=8 --config.mesh.data=1
  # A TPU pod slice, compile-only. With libtpu installed (pip install "jax[tpu]",
  # no TPU needed) XLA compiles for the TPU; without it the slice stands in as one
  # forced CPU device per chip (exact shardings and parameter / optimizer bytes,
  # CPU compiler figures for temporaries and FLOPs):
  python -m vlp.tools.aot --config=configs/uniter_base.py --topology=v5e:4x4 \
      --config.sharding=fsdp --config.mesh.fsdp=16 --config.mesh.data=1 \
      --config.compute_dtype=bfloat16

The mesh, sharding, batch shapes and model come from the config exactly as in
`vlp.pretrain`; the train step is the one the loop runs (`vlp.train.step`),
lowered on abstract shapes (nothing is allocated) and compiled by XLA for the
target devices. Prints, per device: parameter and optimizer-state bytes (exact,
from the shardings), then per task the compiled step's memory analysis
(arguments, outputs, temporaries, i.e. activations and workspace) and FLOPs
(XLA's count and the analytic model count), and finally one JSON line with
everything.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import re
import sys
from typing import Any, Sequence

from absl import app, flags

from vlp import entry

_CONFIG = entry.config_flag()
_TOPOLOGY = flags.DEFINE_string(
    "topology", "cpu:8", "cpu:N (N forced host CPU devices) or a TPU topology such as "
    "v5e:4x4, v5p:2x2x2, v4:2x2x2 (compiled for TPU where libtpu is installed, else "
    "one CPU device per chip).")
_TASKS = flags.DEFINE_list("tasks", None, "Tasks to compile (default: config.tasks).")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the size's default).")
_COMPILE = flags.DEFINE_bool("compile", True, "Compile the steps (else: shardings and "
                             "parameter / optimizer bytes only, in seconds).")

_CPU = re.compile(r"^cpu(?::(\d+))?$")
_TPU = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)*)$")  # v5e:4x4, v5p:2x2x2, v4:2x2x2.


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def resolve_topology(topology: str) -> tuple[str, int | None]:
  """("cpu", N) or ("tpu", None) for a --topology value.

  A TPU name compiles for that TPU where libtpu is installed (no TPU needed);
  elsewhere it stands in as one forced CPU device per chip, so the mesh, the
  shardings and the parameter / optimizer bytes per device are those of the
  slice (XLA's memory and FLOP figures are then the CPU compiler's).
  """
  m = _CPU.match(topology)
  if m:
    return "cpu", int(m.group(1)) if m.group(1) else None
  m = _TPU.match(topology)
  if m:
    if libtpu_available():
      return "tpu", None
    return "cpu", math.prod(int(d) for d in m.group(2).split("x"))
  raise ValueError(f"--topology={topology!r} is neither cpu:N nor a TPU topology such as "
                   f"v5e:4x4, v5p:2x2x2 or v4:2x2x2")


def topology_devices(topology: str) -> list:
  """The devices to compile for: host CPU devices, or compile-only TPU devices."""
  import jax
  kind, n = resolve_topology(topology)
  if kind == "cpu":
    cpus = jax.devices("cpu")
    n = n or len(cpus)
    if len(cpus) < n:
      raise ValueError(
          f"--topology={topology} needs {n} CPU devices but this process has {len(cpus)}; "
          f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting it "
          f"(the command line does this itself)")
    return cpus[:n]
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
  except Exception as e:  # A name this libtpu does not know.
    raise ValueError(f"--topology={topology!r}: libtpu could not describe this TPU "
                     f"topology ({e}); try a name like v5e:4x4, v5p:2x2x2 or v4:2x2x2, "
                     f"or cpu:N") from e


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (even shardings)."""
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def report(config, devices: Sequence, *, tasks: Sequence[str] | None = None,
           vocab_size: int | None = None, compile_steps: bool = True,
           topology: str | None = None) -> dict[str, Any]:
  """Compiles each task's train step for `devices` at the config's shapes
  (`config.batch_size` global rows); returns sizes and FLOPs.

  `compile_steps=False` only derives the shardings and the parameter and
  optimizer bytes per device (no XLA compilation: seconds even for big models).
  """
  import jax
  from vlp.parallel import logical, mesh as mesh_lib, sharding as sharding_lib
  from vlp.models.pretraining import UniterForPretraining
  from vlp.tasks import TASKS, make_loss_fn
  from vlp.train import bench, flops as flops_lib, optim, step as step_lib
  from vlp.train.state import abstract_state, state_shardings
  from vlp.train.task_mix import task_kwargs

  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.rules_for(config.sharding, mesh)
  cfg = bench.model_config_for(config, vocab_size)
  make_model = functools.partial(UniterForPretraining, cfg)
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps)
  graphdef, state_sh = state_shardings(make_model, tx, mesh=mesh, rules=rules,
                                       sharding_name=config.sharding,
                                       strict=config.strict_sharding)
  state = abstract_state(state_sh, make_model, tx)
  batch = config.batch_size
  shape_kw = bench.batch_shapes(config)
  mib = lambda b: round(b / 2**20, 2)
  out: dict[str, Any] = {
      "topology": topology or f"{devices[0].platform}:{len(devices)}",
      "platform": devices[0].platform,
      "num_devices": len(devices),
      "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
      "sharding": config.sharding, "model": config.model.size, "batch": batch,
      "dtype": config.compute_dtype,
      "params": sum(x.size for x in jax.tree.leaves(state.params)),
      "params_mib_per_device": mib(per_device_bytes(state.params)),
      "opt_state_mib_per_device": mib(per_device_bytes(state.opt_state)),
      "tasks": {}}
  out["params_opt_mib_per_device"] = round(
      out["params_mib_per_device"] + out["opt_state_mib_per_device"], 2)
  for task in bench.tasks_to_time(config, tasks) if compile_steps else ():
    one = bench.synthetic_batch(TASKS[task].batch_kind, batch=1, cfg=cfg, **shape_kw)
    host = {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype) for k, v in one.items()}
    fn = step_lib.make_train_step(graphdef, make_loss_fn(task, **task_kwargs(config, task)),
                                  tx, schedule, grad_accum=config.grad_accum)
    jitted = step_lib.jit_train_step(fn, state_sh,
                                     sharding_lib.batch_shardings(host, mesh, rules), mesh)
    with logical.activate(mesh, rules):
      compiled = jitted.lower(state, host).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    sizes = {f: int(getattr(mem, f"{f}_size_in_bytes", 0) or 0) for f in
             ("argument", "output", "alias", "temp", "generated_code")}
    model_flops = flops_lib.train_flops_per_example(cfg, task, **shape_kw) * batch
    out["tasks"][task] = {
        **{f"{f}_mib_per_device": mib(b) for f, b in sizes.items()},
        # Live at once: inputs, outputs not aliased onto donated inputs, temporaries.
        "total_mib_per_device": mib(sizes["argument"] + sizes["output"] - sizes["alias"]
                                    + sizes["temp"]),
        "xla_gflops_per_device": round(float(cost.get("flops", 0.0)) / 1e9, 3),
        "model_gflops_per_device": round(model_flops / len(devices) / 1e9, 3),
    }
  return out


def format_report(r: dict) -> str:
  stand_in = (" standing in for the TPU slice (libtpu is not installed)"
              if r["platform"] == "cpu" and _TPU.match(r["topology"]) else "")
  lines = [
      f"{r['topology']}: {r['num_devices']} x {r['device_kind']}{stand_in}, mesh {r['mesh']}, "
      f"sharding {r['sharding']!r}, model {r['model']} ({r['params'] / 1e6:.1f}M params), "
      f"batch {r['batch']}, {r['dtype']}",
      f"per device: parameters {r['params_mib_per_device']:.1f} MiB, optimizer state "
      f"{r['opt_state_mib_per_device']:.1f} MiB, together {r['params_opt_mib_per_device']:.1f} MiB",
  ]
  if not r["tasks"]:
    return "\n".join(lines)
  lines.append(f"{'task':<7}{'args':>10}{'outputs':>10}{'aliased':>10}{'activ.':>10}"
               f"{'total':>10}{'GFLOP (XLA)':>13}{'GFLOP (model)':>15}   (MiB and GFLOP "
               f"per device and step)")
  for task, t in r["tasks"].items():
    lines.append(
        f"{task:<7}{t['argument_mib_per_device']:>10.1f}{t['output_mib_per_device']:>10.1f}"
        f"{t['alias_mib_per_device']:>10.1f}{t['temp_mib_per_device']:>10.1f}"
        f"{t['total_mib_per_device']:>10.1f}{t['xla_gflops_per_device']:>13.1f}"
        f"{t['model_gflops_per_device']:>15.1f}")
  lines.append("activ. = XLA temporaries (activations, gradients, workspace); total = args + "
               "outputs - aliased + activ.")
  return "\n".join(lines)


def main(config):
  if config.job != "pretrain":
    raise app.UsageError(f"--config has job {config.job!r}; vlp.tools.aot compiles the "
                         f"pretraining tasks of a pretraining config (job 'pretrain')")
  try:
    kind, num_cpus = resolve_topology(_TOPOLOGY.value)
    if kind == "cpu":
      import jax
      # Before any backend starts: CPU only (an idle GPU stays untouched), and the
      # device count (this setting overrides XLA_FLAGS' count).
      jax.config.update("jax_platforms", "cpu")
      if num_cpus:
        jax.config.update("jax_num_cpu_devices", num_cpus)
    devices = topology_devices(_TOPOLOGY.value)
    r = report(config, devices, tasks=_TASKS.value, vocab_size=_VOCAB.value or None,
               compile_steps=_COMPILE.value, topology=_TOPOLOGY.value)
  except ValueError as e:  # A topology, mesh or rule table that does not fit.
    sys.exit(f"vlp.tools.aot: {e}")
  print(format_report(r))
  print(json.dumps(r), flush=True)


if __name__ == "__main__":
  # The devices are the --topology's, set up in `main`; no multi-host runtime.
  entry.run(main, config=_CONFIG, devices=False)
