"""`vlp.tools.aot`: per-device memory and FLOPs of the train step for a topology.

* UNITER-base on 8 devices: under fsdp each device holds at most 1/6 of the
  parameter + optimizer bytes it holds under dp (exact, from the shardings);
* `python -m vlp.tools.aot --config=configs/uniter_base.py --topology=cpu:8` under
  fsdp compiles the base train step for 8 forced CPU devices, and XLA's own memory
  analysis of that program confirms the figure (the donated state it aliases is
  the fsdp share); it prints the activations and FLOPs of the step;
* TPU topology names stand in as one CPU device per chip without libtpu;
  topologies and meshes that do not fit are refused with the sizes.
"""

import json
import os
import subprocess
import sys

import jax
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


def test_tpu_names_stand_in_as_cpu_devices_and_bad_topologies_are_refused(monkeypatch):
  monkeypatch.setattr(aot, "libtpu_available", lambda: False)
  assert aot.resolve_topology("v5p:2x2x2") == ("cpu", 8)
  assert aot.resolve_topology("v5e:4x4") == ("cpu", 16)
  assert aot.resolve_topology("cpu") == ("cpu", None)
  devices = aot.topology_devices("v5e:2x2")
  assert len(devices) == 4 and all(d.platform == "cpu" for d in devices)
  monkeypatch.setattr(aot, "libtpu_available", lambda: True)
  assert aot.resolve_topology("v5e:4x4") == ("tpu", None)
  with pytest.raises(ValueError, match=r"needs 16 CPU devices but this process has 8.*"
                                       r"xla_force_host_platform_device_count=16"):
    aot.topology_devices("cpu:16")
  with pytest.raises(ValueError, match=r"'gpu:8' is neither cpu:N nor a TPU topology"):
    aot.resolve_topology("gpu:8")
  with pytest.raises(ValueError, match=r"does not divide the 8 devices.*multiply to 3"):
    aot.report(_base("fsdp", data=-1, fsdp=3), jax.devices()[:8], compile_steps=False)


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
  assert 0.8 < mlm["xla_gflops_per_device"] / mlm["model_gflops_per_device"] < 1.25
