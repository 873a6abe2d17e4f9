r"""Ahead-of-time check: compile the train step for a target topology, no hardware.

  # A TPU slice, compiled by XLA's TPU compiler (libtpu; no TPU needed: install it
  # with `make install PLATFORM=tpu` or `pip install -r requirements-tpu.txt`):
  python -m vlp.tools.aot --config=configs/uniter_large.py --topology=v5e:16x16
  # Two such slices (multislice): the config's `mesh.dcn` axis spans the slices,
  # the other axes stay inside one.
  python -m vlp.tools.aot --config=configs/uniter_large.py --topology=v5e:16x16 \
      --num_slices=2 --config.mesh.dcn=2
  # N host CPU devices standing in for N accelerators (works anywhere: exact
  # shardings and parameter / optimizer bytes, the CPU compiler's temporaries and
  # FLOPs, and no HBM verdict):
  python -m vlp.tools.aot --config=configs/uniter_base.py --topology=cpu:8 \
      --config.sharding=fsdp --config.mesh.fsdp=8 --config.mesh.data=1

The mesh, sharding, batch shapes and model come from the config exactly as in
`vlp.pretrain`; the train step is the one the loop runs (`vlp.train.step`),
lowered on abstract shapes (nothing is allocated) and compiled by XLA for the
target devices. Prints, per chip: parameters and optimizer state (exact, from the
shardings), then for each task the compiled step's batch, activations (XLA
temporaries), program code and the rest of what XLA holds (layout padding, the
step counter, metrics), their total against the chip's HBM and the FLOPs; then
one "fits" / "does NOT fit" line for the largest step and one JSON line with
everything; the exit status is 2 when a step does not fit. XLA's TPU compiler
refuses a step whose buffers exceed HBM; that step is reported as not fitting,
with the compiler's message.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import sys
from typing import Any, Sequence

from absl import app, flags

from vlp import entry
from vlp.parallel import runtime

_CONFIG = entry.config_flag()
_TOPOLOGY = flags.DEFINE_string(
    "topology", "cpu:8", "A TPU slice such as v5e:16x16, v5p:4x4x4, v4:2x2x2 or "
    "v6e:8x8 (compiled for that TPU by libtpu), or cpu:N (N host CPU devices standing "
    "in for N chips).")
_NUM_SLICES = flags.DEFINE_integer(
    "num_slices", 1, "TPU slices of --topology joined over the data-center network "
    "(multislice); config.mesh.dcn must equal it.")
_TASKS = flags.DEFINE_list("tasks", None, "Tasks to compile (default: config.tasks).")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the size's default).")
_COMPILE = flags.DEFINE_bool("compile", True, "Compile the steps (else: shardings and "
                             "parameter / optimizer bytes only, in seconds).")

_CPU = re.compile(r"^cpu(?::(\d+))?$")
_TPU = re.compile(r"^(v\d+[a-z]*):(\d+(?:x\d+)*)$")  # v5e:4x4, v5p:2x2x2, v4:2x2x2.

# HBM per TPU chip, GiB, by JAX's device_kind: Google Cloud TPU documentation, the
# system architecture page of each version (v4: 32 GiB, v5e: 16 GiB, v5p: 95 GiB,
# v6e Trillium: 32 GiB). XLA keeps a little of it for itself (v5e: 15.75 GiB usable
# per its out-of-memory message).
HBM_GIB_PER_CHIP = {
    "TPU v4": 32, "TPU v5 lite": 16, "TPU v5e": 16, "TPU v5": 95, "TPU v5p": 95,
    "TPU v6 lite": 32, "TPU v6e": 32,
}

NO_LIBTPU = ("--topology={topology} compiles for a TPU, which needs libtpu (XLA's TPU "
             "compiler; no TPU needed): install it with `make install PLATFORM=tpu` or "
             "`pip install -r requirements-tpu.txt`. --topology=cpu:N stands N host CPU "
             "devices in for the chips instead (shardings and parameter / optimizer "
             "bytes, no HBM verdict).")


def libtpu_available() -> bool:
  return importlib.util.find_spec("libtpu") is not None


def resolve_topology(topology: str) -> tuple[str, int | None]:
  """("cpu", N or None) or ("tpu", None) for a --topology value.

  A TPU name needs libtpu; without it the name is an error that says how to
  install it (CPU stand-ins come only from cpu:N).
  """
  m = _CPU.match(topology)
  if m:
    return "cpu", int(m.group(1)) if m.group(1) else None
  if _TPU.match(topology):
    if not libtpu_available():
      raise ValueError(NO_LIBTPU.format(topology=topology))
    return "tpu", None
  raise ValueError(f"--topology={topology!r} is neither cpu:N nor a TPU topology such as "
                   f"v5e:4x4, v5p:2x2x2 or v4:2x2x2")


def topology_devices(topology: str, num_slices: int = 1) -> list:
  """The devices to compile for: host CPU devices, or compile-only TPU devices
  of `num_slices` slices (each device then has a `slice_index`)."""
  import jax
  kind, n = resolve_topology(topology)
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be at least 1")
  if kind == "cpu":
    if num_slices > 1:
      raise ValueError(f"--num_slices={num_slices} needs a TPU topology; {topology} "
                       f"devices form no slices")
    cpus = jax.devices("cpu")
    n = n or len(cpus)
    if len(cpus) < n:
      raise ValueError(
          f"--topology={topology} needs {n} CPU devices but this process has {len(cpus)}; "
          f"set XLA_FLAGS=--xla_force_host_platform_device_count={n} before starting it "
          f"(the command line does this itself)")
    return cpus[:n]
  from jax.experimental import topologies
  # Compile-only: no chip is driven, so libtpu's one-process-per-machine lock
  # (/tmp/libtpu_lockfile) would only stop two checks (or a check and a training
  # run on a TPU VM) from running side by side.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not runtime.on_cloud_tpu():
    # Off a TPU VM libtpu's start-up probe looks for the VM's metadata and prints an
    # error and two warnings; these placeholders only answer that probe (the compile
    # target is the topology described below, whatever the accelerator type says).
    for key, value in (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_WORKER_HOSTNAMES", "localhost"),
                       ("TPU_ACCELERATOR_TYPE", "v5litepod-4")):
      os.environ.setdefault(key, value)
  kwargs = dict(num_slices=num_slices) if num_slices > 1 else {}
  try:
    desc = topologies.get_topology_desc(topology_name=topology, platform="tpu", **kwargs)
  except Exception as e:  # A name this libtpu does not know.
    raise ValueError(f"--topology={topology!r}: libtpu could not describe this TPU "
                     f"topology ({e}); try a name like v5e:4x4, v5p:2x2x2 or v4:2x2x2, "
                     f"or cpu:N") from e
  return list(desc.devices)


def devices_per_chip(devices: Sequence) -> int:
  """TPU devices sharing a chip (2 on v4 without megacore); 1 for CPU devices."""
  if devices[0].platform != "tpu":
    return 1
  chips = {(getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices}
  return len(devices) // len(chips)


def num_slices_of(devices: Sequence) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def hbm_bytes_per_chip(device_kind: str) -> int | None:
  gib = HBM_GIB_PER_CHIP.get(device_kind)
  return None if gib is None else gib * 2**30


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (even shardings)."""
  import jax
  import numpy as np
  total = 0
  for leaf in jax.tree.leaves(tree):
    shard = leaf.sharding.shard_shape(leaf.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def out_of_memory(error: Exception) -> bool:
  """XLA's refusal of a program that does not fit the device memory."""
  return "RESOURCE_EXHAUSTED" in str(error)


def chip_memory(*, params: int, opt_state: int, batch: int, sizes: dict[str, int],
                per_chip: int) -> dict:
  """Bytes per chip of one compiled step: the parts and their sum, `total`.

  XLA's buffers on one device are the arguments (the state and the batch), the
  outputs not aliased onto the donated state (metrics) and the temporaries;
  the compiled program is loaded beside them. `other` is what XLA counts beyond
  the exact logical bytes of the named parts (TPU layout padding of small
  dimensions, the step counter and RNG key, the metrics). `sizes`: XLA's memory
  analysis of one device, bytes by kind (argument, output, alias, temp,
  generated_code).
  """
  held = sizes["argument"] + sizes["output"] - sizes["alias"]
  parts = dict(parameters=params, optimizer_state=opt_state, batch=batch,
               activations=sizes["temp"], code=sizes["generated_code"],
               other=held - params - opt_state - batch)
  parts = {k: v * per_chip for k, v in parts.items()}
  parts["total"] = sum(parts.values())
  return parts


def report(config, devices: Sequence, *, tasks: Sequence[str] | None = None,
           vocab_size: int | None = None, compile_steps: bool = True,
           topology: str | None = None) -> dict[str, Any]:
  """Compiles each task's train step for `devices` at the config's shapes
  (`config.batch_size` global rows); returns sizes per chip and FLOPs.

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

  slices = num_slices_of(devices)
  if slices > 1:
    dcn = mesh_lib.resolve_axis_sizes(config.mesh, len(devices)).get("dcn", 1)
    if dcn != slices:
      raise ValueError(f"the devices span {slices} TPU slices but config.mesh.dcn is {dcn}; "
                       f"set --config.mesh.dcn={slices} so that the dcn axis crosses the "
                       f"slices and the other axes stay inside one")
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
  per_chip = devices_per_chip(devices)
  kind = devices[0].device_kind
  hbm = hbm_bytes_per_chip(kind) if devices[0].platform == "tpu" else None
  mib = lambda b: round(b / 2**20, 2)
  params_b, opt_b = per_device_bytes(state.params), per_device_bytes(state.opt_state)
  out: dict[str, Any] = {
      "topology": topology or f"{devices[0].platform}:{len(devices)}",
      "num_slices": slices, "platform": devices[0].platform,
      "num_devices": len(devices), "devices_per_chip": per_chip, "device_kind": kind,
      "hbm_bytes_per_chip": hbm, "mesh": dict(mesh.shape),
      "sharding": config.sharding, "model": config.model.size, "batch": batch,
      "dtype": config.compute_dtype,
      "params": sum(x.size for x in jax.tree.leaves(state.params)),
      "params_bytes_per_device": params_b, "opt_state_bytes_per_device": opt_b,
      "params_mib_per_device": mib(params_b), "opt_state_mib_per_device": mib(opt_b),
      "params_opt_mib_per_device": mib(params_b + opt_b),
      "tasks": {}}
  for task in bench.tasks_to_time(config, tasks) if compile_steps else ():
    one = bench.synthetic_batch(TASKS[task].batch_kind, batch=1, cfg=cfg, **shape_kw)
    host = {k: jax.ShapeDtypeStruct((batch,) + v.shape[1:], v.dtype) for k, v in one.items()}
    host_sh = sharding_lib.batch_shardings(host, mesh, rules)
    fn = step_lib.make_train_step(graphdef, make_loss_fn(task, **task_kwargs(config, task)),
                                  tx, schedule, grad_accum=config.grad_accum)
    jitted = step_lib.jit_train_step(fn, state_sh, host_sh, mesh)
    with logical.activate(mesh, rules):
      lowered = jitted.lower(state, host)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
      if not out_of_memory(e):
        raise
      out["tasks"][task] = {"fits": False, "xla_error": str(e).strip().splitlines()[0]}
      continue
    mem = compiled.memory_analysis()
    # The batch arrays the step reads (jit drops the others, e.g. the soft labels).
    read = compiled.input_shardings[0][1]
    batch_b = per_device_bytes({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=host_sh[k])
                                for k, v in host.items() if read[k] is not None})
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    sizes = {f: int(getattr(mem, f"{f}_size_in_bytes", 0) or 0) for f in
             ("argument", "output", "alias", "temp", "generated_code")}
    chip = chip_memory(params=params_b, opt_state=opt_b, batch=batch_b, sizes=sizes,
                       per_chip=per_chip)
    # XLA's own estimate of the program's peak, a cross-check: a step fits when
    # neither figure exceeds the HBM.
    peak = int(getattr(mem, "peak_memory_in_bytes", 0) or 0) * per_chip
    model_flops = flops_lib.train_flops_per_example(cfg, task, **shape_kw) * batch
    compiled_on = {d.platform for s in jax.tree.leaves(compiled.input_shardings)
                   for d in s.device_set}
    out["tasks"][task] = {
        "compiled_for": sorted(compiled_on),
        "batch_arrays_read": sorted(k for k in host if read[k] is not None),
        **{f"{f}_mib_per_device": mib(b) for f, b in sizes.items()},
        "bytes_per_chip": chip, "xla_peak_bytes_per_chip": peak,
        "fits": None if hbm is None else max(chip["total"], peak) <= hbm,
        "xla_gflops_per_chip": round(float(cost.get("flops", 0.0)) * per_chip / 1e9, 3),
        "model_gflops_per_chip": round(model_flops / len(devices) * per_chip / 1e9, 3),
    }
  out.update(verdict(out))
  return out


def verdict(r: dict) -> dict[str, Any]:
  """`fits` (None when unknown) and `largest_task`: the step that needs the most
  memory per chip, or the first that XLA refused."""
  tasks = r["tasks"]
  if not tasks:
    return {"fits": None, "largest_task": None}
  refused = [t for t, v in tasks.items() if "xla_error" in v]
  if refused:
    return {"fits": False, "largest_task": refused[0]}
  largest = max(tasks, key=lambda t: need_bytes(tasks[t]))
  hbm = r["hbm_bytes_per_chip"]
  return {"fits": None if hbm is None else need_bytes(tasks[largest]) <= hbm,
          "largest_task": largest}


def need_bytes(task: dict) -> int:
  """What a compiled step needs per chip: its total, or XLA's peak if larger."""
  return max(task["bytes_per_chip"]["total"], task["xla_peak_bytes_per_chip"])


def fit_line(r: dict) -> str:
  """One line: whether the largest step fits the chip's HBM, and by how much."""
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  where = (f"{r['model']} at global batch {r['batch']} on "
           f"{_slices(r)}{r['topology']} ({r['sharding']!r}, mesh {r['mesh']})")
  if r["largest_task"] is None:
    return f"fit: not judged for {where}: no step compiled"
  task = r["tasks"][r["largest_task"]]
  if "xla_error" in task:
    return (f"does NOT fit: {where}: XLA's TPU compiler refused the {r['largest_task']} "
            f"step: {task['xla_error']}")
  need = need_bytes(task)
  hbm = r["hbm_bytes_per_chip"]
  if hbm is None:
    why = ("CPU devices stand in for the chips; compile for a TPU topology to judge"
           if r["platform"] == "cpu" else
           f"no HBM size known for {r['device_kind']!r} (vlp.tools.aot.HBM_GIB_PER_CHIP)")
    unit = "device" if r["platform"] == "cpu" else "chip"
    return (f"fit: not judged for {where}: the largest step ({r['largest_task']}) needs "
            f"{gib(need)} per {unit}; {why}")
  share = (f"{gib(need)} of the {gib(hbm)} HBM per chip ({100 * need / hbm:.0f} %; parts "
           f"{gib(task['bytes_per_chip']['total'])}, XLA's peak "
           f"{gib(task['xla_peak_bytes_per_chip'])})")
  if r["fits"]:
    return f"fits: {where}: the largest step ({r['largest_task']}) needs {share}"
  return f"does NOT fit: {where}: the largest step ({r['largest_task']}) needs {share}"


def _slices(r: dict) -> str:
  return f"{r['num_slices']} x " if r["num_slices"] > 1 else ""


def format_report(r: dict) -> str:
  per = r["devices_per_chip"]
  chip = "device" if r["platform"] == "cpu" else "chip"
  hbm = (f", {r['hbm_bytes_per_chip'] / 2**30:g} GiB HBM per chip"
         if r["hbm_bytes_per_chip"] else "")
  lines = [
      f"{_slices(r)}{r['topology']}: {r['num_devices']} x {r['device_kind']}"
      f"{f' ({per} per chip)' if per > 1 else ''}{hbm}, mesh {r['mesh']}, sharding "
      f"{r['sharding']!r}, model {r['model']} ({r['params'] / 1e6:.1f}M params), global "
      f"batch {r['batch']}, {r['dtype']}",
      f"per {chip}: parameters {r['params_mib_per_device'] * per:.1f} MiB, optimizer state "
      f"{r['opt_state_mib_per_device'] * per:.1f} MiB (exact, from the shardings)",
  ]
  if r["tasks"]:
    cols = ("params", "opt.", "batch", "activ.", "code", "other", "total", "XLA peak")
    lines.append(f"{'task':<7}" + "".join(f"{c:>9}" for c in cols) +
                 f"{'GFLOP XLA':>11}{'model':>9}   (MiB and GFLOP per {chip} and step)")
    for task, t in r["tasks"].items():
      if "xla_error" in t:
        lines.append(f"{task:<7}  refused by XLA: {t['xla_error']}")
        continue
      b = t["bytes_per_chip"]
      lines.append(f"{task:<7}" + "".join(f"{b[k] / 2**20:>9.1f}" for k in (
          "parameters", "optimizer_state", "batch", "activations", "code", "other",
          "total")) + f"{t['xla_peak_bytes_per_chip'] / 2**20:>9.1f}"
          f"{t['xla_gflops_per_chip']:>11.1f}{t['model_gflops_per_chip']:>9.1f}")
    lines.append("activ. = XLA temporaries (activations, gradients, workspace); code = the "
                 "compiled program; other = the rest of XLA's arguments and outputs (layout "
                 "padding, step counter, RNG key, metrics); total = their sum; XLA peak = "
                 "XLA's own estimate of the step's peak, a cross-check (the fit counts the "
                 "larger of the two)")
  lines.append(fit_line(r))
  return "\n".join(lines)


def main(config):
  if config.job != "pretrain":
    raise app.UsageError(f"--config has job {config.job!r}; vlp.tools.aot compiles the "
                         f"pretraining tasks of a pretraining config (job 'pretrain')")
  try:
    kind, num_cpus = resolve_topology(_TOPOLOGY.value)
    import jax
    # Before any backend starts: CPU only. Nothing runs on an accelerator (an idle
    # GPU stays untouched, and the chips of a TPU VM stay free: TPU devices here
    # are compile-only). For cpu:N, the device count (overrides XLA_FLAGS').
    jax.config.update("jax_platforms", "cpu")
    if kind == "cpu" and num_cpus:
      jax.config.update("jax_num_cpu_devices", num_cpus)
    devices = topology_devices(_TOPOLOGY.value, _NUM_SLICES.value)
    r = report(config, devices, tasks=_TASKS.value, vocab_size=_VOCAB.value or None,
               compile_steps=_COMPILE.value, topology=_TOPOLOGY.value)
  except ValueError as e:  # A topology, mesh or rule table that does not fit.
    sys.exit(f"vlp.tools.aot: {e}")
  print(format_report(r))
  print(json.dumps(r), flush=True)
  if r["fits"] is False:
    sys.exit(2)  # A launch script can gate on the check.


if __name__ == "__main__":
  # The devices are the --topology's, set up in `main`; no multi-host runtime.
  entry.run(main, config=_CONFIG, devices=False)
