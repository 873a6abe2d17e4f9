"""`vlp.tools.aot`: per-device memory and FLOPs of the train step for a topology.

* UNITER-base on 8 devices: under fsdp each device holds at most 1/6 of the
  parameter + optimizer bytes it holds under dp (exact, from the shardings);
* `python -m vlp.tools.aot --config=configs/uniter_base.py --topology=cpu:8` under
  fsdp compiles the base train step for 8 forced CPU devices, and XLA's own memory
  analysis of that program confirms the figure (the donated state it aliases is
  the fsdp share); it prints the activations and FLOPs of the step;
* a TPU topology without libtpu is an error that says how to install it (CPU
  stand-ins only come from cpu:N); topologies and meshes that do not fit are
  refused with the sizes;
* with libtpu (`make test` installs it; no TPU needed) a tiny config compiles
  for a v5e:2x2 slice and for two of them (multislice, the mesh's dcn axis
  across the slices): TPU executables, per-chip parameter and optimizer bytes
  equal to a hand count over the parameters' shardings, a memory report whose
  total is the sum of its parts and XLA's own figures, and the fit verdicts.
"""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlp import config_lib
from vlp.tools import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _base(sharding, **mesh):
  c = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py"))
  c.sharding = sharding
  c.mesh = dict(dict(data=1, fsdp=1, tensor=1), **mesh)
  return c


@pytest.fixture(scope="module")
def base_reports():
  """Shardings and bytes only (no compilation): seconds for UNITER-base."""
  devices = jax.devices()[:8]
  return {name: aot.report(_base(name, **mesh), devices, compile_steps=False)
          for name, mesh in (("dp", dict(data=8)), ("fsdp", dict(fsdp=8)),
                             ("fsdp_tp", dict(data=2, fsdp=2, tensor=2)))}


def test_fsdp_keeps_at_most_a_sixth_of_dp_state_per_device(base_reports):
  dp, fsdp, tp = base_reports["dp"], base_reports["fsdp"], base_reports["fsdp_tp"]
  assert dp["params"] == fsdp["params"] == tp["params"] > 100e6  # UNITER-base with heads.
  # dp: every device holds all float32 parameters and AdamW's two moments.
  assert dp["params_mib_per_device"] == pytest.approx(dp["params"] * 4 / 2**20, abs=0.01)
  assert dp["opt_state_mib_per_device"] == pytest.approx(2 * dp["params_mib_per_device"],
                                                         rel=1e-3)
  assert fsdp["params_opt_mib_per_device"] <= dp["params_opt_mib_per_device"] / 6
  # Not a bookkeeping artefact: close to an even 8-way split (small leaves such as
  # biases along non-embed axes stay replicated).
  assert fsdp["params_opt_mib_per_device"] < 1.05 * dp["params_opt_mib_per_device"] / 8
  assert tp["params_opt_mib_per_device"] <= dp["params_opt_mib_per_device"] / 3


def test_tpu_names_need_libtpu_and_bad_topologies_are_refused(monkeypatch):
  monkeypatch.setattr(aot, "libtpu_available", lambda: False)
  for bad in (lambda: aot.resolve_topology("v5e:4x4"), lambda: aot.topology_devices("v5e:2x2")):
    with pytest.raises(ValueError, match=r"--topology=v5e:\S+ compiles for a TPU, which needs "
                                         r"libtpu.*`make install PLATFORM=tpu`.*"
                                         r"`pip install -r requirements-tpu.txt`.*cpu:N"):
      bad()
  assert aot.resolve_topology("cpu") == ("cpu", None)
  assert aot.resolve_topology("cpu:4") == ("cpu", 4)
  monkeypatch.setattr(aot, "libtpu_available", lambda: True)
  assert aot.resolve_topology("v5e:4x4") == ("tpu", None)
  with pytest.raises(ValueError, match=r"needs 16 CPU devices but this process has 8.*"
                                       r"xla_force_host_platform_device_count=16"):
    aot.topology_devices("cpu:16")
  with pytest.raises(ValueError, match=r"--num_slices=2 needs a TPU topology"):
    aot.topology_devices("cpu:8", num_slices=2)
  with pytest.raises(ValueError, match=r"'gpu:8' is neither cpu:N nor a TPU topology"):
    aot.resolve_topology("gpu:8")
  with pytest.raises(ValueError, match=r"does not divide the 8 devices.*multiply to 3"):
    aot.report(_base("fsdp", data=-1, fsdp=3), jax.devices()[:8], compile_steps=False)


# --- With libtpu: XLA's TPU compiler, compile-only devices (no TPU needed). ---

requires_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(), reason="needs libtpu: `make test` installs it "
    "(requirements-tpu.txt)")
TINY_BATCH = 512  # Large enough that XLA keeps activations in HBM, not only in VMEM.


def _tiny(**mesh):
  c = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py:tiny"))
  c.sharding = "fsdp"
  c.mesh = dict(dict(dcn=1, data=1, fsdp=1, tensor=1), **mesh)
  c.batch_size = TINY_BATCH
  c.model.num_layers = 1  # Compile time.
  return c


def _hand_state_bytes(config, devices):
  """Per-device bytes of the float32 parameters and of AdamW's state, counted by
  hand: each parameter's size over the product of the mesh axes its sharding
  names; AdamW holds two moments per parameter plus two int32 step counts (its
  own and the learning-rate schedule's)."""
  from vlp.models.pretraining import UniterForPretraining
  from vlp.parallel import mesh as mesh_lib, sharding as sharding_lib
  from vlp.train import bench, optim
  from vlp.train.state import split_abstract, state_shardings
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  make_model = functools.partial(UniterForPretraining, bench.model_config_for(config))
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps)
  _, sh = state_shardings(make_model, tx, mesh=mesh,
                          rules=sharding_lib.rules_for(config.sharding, mesh))
  _, abstract = split_abstract(make_model)
  params = split = 0
  for leaf, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(sh.params)):
    axes = [a for part in s.spec if part for a in ((part,) if isinstance(part, str) else part)]
    ways = math.prod(mesh.shape[a] for a in axes)
    params += 4 * leaf.size // ways
    split += leaf.size if ways > 1 else 0
  return params, 2 * params + 2 * 4, split


@requires_libtpu
@pytest.mark.parametrize("topology,chips,per_chip,kind,hbm_gib", [
    ("v5e:4x4", 16, 1, "TPU v5 lite", 16), ("v5p:2x2x2", 8, 1, "TPU v5", 95),
    ("v4:2x2x2", 8, 2, "TPU v4", 32), ("v6e:2x2", 4, 1, "TPU v6 lite", 32)])
def test_tpu_generations_chips_and_hbm(topology, chips, per_chip, kind, hbm_gib):
  devices = aot.topology_devices(topology)
  assert {d.platform for d in devices} == {"tpu"} and devices[0].device_kind == kind
  assert len(devices) == chips * per_chip  # v4 shows its two cores as two devices.
  assert aot.devices_per_chip(devices) == per_chip
  assert aot.hbm_bytes_per_chip(kind) == hbm_gib * 2**30


@pytest.fixture(scope="module")
def tpu_one_slice():
  """Tiny, fsdp 2 x data 2 on one v5e:2x2 slice; the MLM step, compiled once."""
  devices = aot.topology_devices("v5e:2x2")
  config = _tiny(data=2, fsdp=2)
  return config, devices, aot.report(config, devices, tasks=["mlm"], topology="v5e:2x2")


@pytest.fixture(scope="module")
def tpu_two_slices():
  """Tiny over two v5e:2x2 slices: dcn 2 across them, fsdp 4 inside each; ITM."""
  devices = aot.topology_devices("v5e:2x2", num_slices=2)
  config = _tiny(dcn=2, fsdp=4)
  return config, devices, aot.report(config, devices, tasks=["itm"], topology="v5e:2x2")


@requires_libtpu
def test_tiny_compiles_for_a_v5e_slice_with_exact_state_bytes(tpu_one_slice):
  config, devices, r = tpu_one_slice
  assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
  assert r["platform"] == "tpu" and r["device_kind"] == "TPU v5 lite"
  assert r["tasks"]["mlm"]["compiled_for"] == ["tpu"]  # The executable's devices.
  assert r["devices_per_chip"] == 1 and r["num_slices"] == 1
  assert r["hbm_bytes_per_chip"] == 16 * 2**30
  params, opt_state, split = _hand_state_bytes(config, devices)
  assert split > 0.9 * r["params"]  # fsdp splits nearly every parameter in two.
  assert params < 0.55 * 4 * r["params"]
  chip = r["tasks"]["mlm"]["bytes_per_chip"]
  assert r["params_bytes_per_device"] == chip["parameters"] == params
  assert r["opt_state_bytes_per_device"] == chip["optimizer_state"] == opt_state
  # The batch: the bytes of the arrays the step reads (MLM leaves the soft region
  # labels alone), global batch over the 4 chips (batch over data x fsdp).
  from vlp.tasks import TASKS
  from vlp.train import bench
  one = bench.synthetic_batch(TASKS["mlm"].batch_kind, batch=1,
                              cfg=bench.model_config_for(config), **bench.batch_shapes(config))
  read = r["tasks"]["mlm"]["batch_arrays_read"]
  assert {"input_ids", "img_feat", "mlm_labels"} <= set(read) and "soft_labels" not in read
  assert chip["batch"] == sum(one[k].nbytes for k in read) * TINY_BATCH // 4


@requires_libtpu
def test_memory_report_adds_up_to_xla_figures_and_judges_the_fit(tpu_one_slice):
  _, _, r = tpu_one_slice
  t = r["tasks"]["mlm"]
  chip = t["bytes_per_chip"]
  parts = ("parameters", "optimizer_state", "batch", "activations", "code", "other")
  assert chip["total"] == sum(chip[k] for k in parts)
  mib = lambda k: t[f"{k}_mib_per_device"]
  xla = mib("argument") + mib("output") - mib("alias") + mib("temp") + mib("generated_code")
  assert chip["total"] / 2**20 == pytest.approx(xla, abs=0.05)
  assert chip["activations"] / 2**20 == pytest.approx(mib("temp"), abs=0.01)
  assert chip["activations"] > 2**20
  assert chip["code"] > 0 and 0 <= chip["other"] < 2 * 2**20  # Padding, counters, metrics.
  # XLA's own peak estimate (its heap simulation; up to twice the parts at this
  # tiny size): the verdict counts the larger figure.
  assert t["xla_peak_bytes_per_chip"] > chip["activations"]
  need = max(chip["total"], t["xla_peak_bytes_per_chip"])
  assert r["fits"] is True and t["fits"] is True and r["largest_task"] == "mlm"
  line = aot.format_report(r).splitlines()[-1]
  assert line.startswith("fits: tiny at global batch 512 on v5e:2x2 ('fsdp', mesh "
                         "{'data': 2, 'fsdp': 2, 'tensor': 1}): the largest step (mlm) "
                         f"needs {need / 2**30:.2f} GiB of the 16.00 GiB HBM per chip"), line
  # The same step against a chip one byte too small.
  small = dict(r, hbm_bytes_per_chip=need - 1)
  small.update(aot.verdict(small))
  assert small["fits"] is False
  assert aot.fit_line(small).startswith("does NOT fit: tiny at global batch 512 on v5e:2x2")
  # A step XLA refuses outright (out of HBM) is reported as not fitting.
  refused = dict(r, tasks=dict(r["tasks"], itm={"fits": False, "xla_error": "RESOURCE_"
                                                "EXHAUSTED: Ran out of memory on HBM"}))
  refused.update(aot.verdict(refused))
  assert refused["fits"] is False and refused["largest_task"] == "itm"
  assert aot.fit_line(refused).endswith("refused the itm step: RESOURCE_EXHAUSTED: Ran out "
                                        "of memory on HBM")


@requires_libtpu
def test_multislice_puts_the_dcn_axis_across_slices(tpu_two_slices):
  from vlp.parallel import mesh as mesh_lib
  config, devices, r = tpu_two_slices
  assert len(devices) == 8 and sorted({d.slice_index for d in devices}) == [0, 1]
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  slices = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  assert mesh.axis_names[0] == "dcn"
  assert (slices == np.arange(2).reshape((2,) + (1,) * (slices.ndim - 1))).all()
  assert r["num_slices"] == 2 and r["mesh"] == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
  assert r["tasks"]["itm"]["compiled_for"] == ["tpu"] and r["fits"] is True
  params, opt_state, _ = _hand_state_bytes(config, devices)  # fsdp 4: quarters.
  assert r["params_bytes_per_device"] == params and r["opt_state_bytes_per_device"] == opt_state
  assert params < 0.3 * 4 * r["params"]
  chip = r["tasks"]["itm"]["bytes_per_chip"]
  assert chip["total"] == sum(v for k, v in chip.items() if k != "total")
  assert aot.format_report(r).splitlines()[0].startswith("2 x v5e:2x2: 8 x TPU v5 lite")
  # Two slices need the dcn axis over them: refused with the key to set.
  with pytest.raises(ValueError, match=r"span 2 TPU slices but config.mesh.dcn is 1; set "
                                       r"--config.mesh.dcn=2"):
    aot.report(_tiny(fsdp=8), devices, compile_steps=False)


@pytest.mark.slow
def test_command_line_compiles_base_under_fsdp_for_8_cpu_devices(base_reports):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # --topology sets the count.
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_backend_optimization_level=0")  # Compile time only.
  cmd = [sys.executable, "-m", "vlp.tools.aot", "--config=configs/uniter_base.py",
         "--topology=cpu:8", "--config.sharding=fsdp", "--config.mesh.data=1",
         "--config.mesh.fsdp=8", "--tasks=mlm", "--config.batch_size=8"]
  p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  lines = p.stdout.strip().splitlines()
  assert lines[0].startswith("cpu:8: 8 x cpu, mesh {'data': 1, 'fsdp': 8, 'tensor': 1}, "
                             "sharding 'fsdp', model base (112.9M params)"), lines[0]
  assert lines[1].startswith("per device: parameters 54.2 MiB, optimizer state 108.4 MiB"), \
      lines[1]
  assert lines[-2].startswith("fit: not judged for base at global batch 8 on cpu:8"), lines[-2]
  assert any(l.startswith("mlm ") for l in lines)
  r = json.loads(lines[-1])
  dp, fsdp = base_reports["dp"], base_reports["fsdp"]
  assert r["num_devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
  assert r["params_opt_mib_per_device"] == fsdp["params_opt_mib_per_device"]
  assert r["params_opt_mib_per_device"] <= dp["params_opt_mib_per_device"] / 6
  mlm = r["tasks"]["mlm"]
  # XLA's view of the compiled program: the donated state is aliased to the new
  # state, so the aliased bytes are exactly the sharded state; arguments add the
  # batch (one example per device).
  assert mlm["alias_mib_per_device"] == pytest.approx(r["params_opt_mib_per_device"], abs=0.05)
  assert r["params_opt_mib_per_device"] <= mlm["argument_mib_per_device"] < (
      r["params_opt_mib_per_device"] + 1)
  assert mlm["temp_mib_per_device"] > 0  # Activations, gradients, workspace.
  assert r["hbm_bytes_per_chip"] is None and r["fits"] is None  # CPU stand-ins.
  assert 0.8 < mlm["xla_gflops_per_chip"] / mlm["model_gflops_per_chip"] < 1.25
