"""The cluster launchers refuse to run without their platform's JAX.

A CPU-only jaxlib would make every SLURM task (or TPU worker) train on its CPUs
without a word. `launch/slurm_gpu.sbatch` checks that its Python has JAX's CUDA
plugin before `srun` and runs with JAX_PLATFORMS=cuda; `launch/tpu_worker.sh`
checks for libtpu and runs with JAX_PLATFORMS=tpu. Here `srun` and the TPU
runtime are stand-ins: a fake `srun` on PATH records what it was asked to run,
and a stub package on PYTHONPATH plays the installed plugin.
"""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
TPU_WORKER = os.path.join(REPO, "launch", "tpu_worker.sh")
SLURM = {"SLURM_SUBMIT_DIR": REPO, "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8",
         "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2"}


def _fake_bin(tmp_path, name):
  """A `name` on PATH that writes its JAX_PLATFORMS and arguments to a file."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  record = tmp_path / f"{name}.txt"
  script = bin_dir / name
  script.write_text(f'#!/bin/bash\necho "JAX_PLATFORMS=$JAX_PLATFORMS '
                    f'CACHE=$JAX_COMPILATION_CACHE_DIR $*" > {record}\n')
  script.chmod(0o755)
  return bin_dir, record


def _stub_package(tmp_path, name):
  pkg = tmp_path / "site" / name
  pkg.mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  return str(tmp_path / "site")


def _run(cmd, env):
  base = {k: v for k, v in os.environ.items()
          if k not in ("JAX_PLATFORMS", "PYTHONPATH") and not k.startswith("SLURM")}
  return subprocess.run(cmd, env={**base, **env}, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True, timeout=120)


def test_slurm_launcher_stops_without_cuda_jax(tmp_path):
  bin_dir, record = _fake_bin(tmp_path, "srun")
  out = _run(["bash", SBATCH, "--config=configs/uniter_base.py"],
             dict(SLURM, PY=sys.executable, PATH=f"{bin_dir}:{os.environ['PATH']}"))
  assert out.returncode == 3, out.stdout
  assert "has no CUDA JAX" in out.stdout and "make install PLATFORM=cuda" in out.stdout
  assert not record.exists()  # Nothing was started.


def test_slurm_launcher_runs_on_cuda_only(tmp_path):
  bin_dir, record = _fake_bin(tmp_path, "srun")
  out = _run(["bash", SBATCH, "--config=configs/uniter_base.py"],
             dict(SLURM, PY=sys.executable, PATH=f"{bin_dir}:{os.environ['PATH']}",
                  PYTHONPATH=_stub_package(tmp_path, "jax_cuda12_plugin")))
  assert out.returncode == 0, out.stdout
  line = record.read_text()
  assert line.startswith(f"JAX_PLATFORMS=cuda CACHE={REPO}/.jax_cache ")
  assert "-m vlp.pretrain --distributed=on --config=configs/uniter_base.py" in line


@pytest.mark.parametrize("libtpu", [False, True])
def test_tpu_worker_needs_libtpu(tmp_path, libtpu):
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / ".vlp_ready").write_text("")  # An installed worker: no pip run here.
  python = venv / "bin" / "python"
  # The worker's python: records its JAX_PLATFORMS and module instead of running it.
  # Its checks run without site-packages (-S): libtpu is then found only where the
  # test puts a stub, not in the test's own environment (`make test` installs it).
  python.write_text(f'#!/bin/bash\nif [[ "$1" == -c ]]; then exec {sys.executable} -S "$@"; fi\n'
                    f'echo "JAX_PLATFORMS=$JAX_PLATFORMS CACHE=$JAX_COMPILATION_CACHE_DIR $*" '
                    f'> {tmp_path}/python.txt\n')
  python.chmod(0o755)
  env = dict(VENV=str(venv), JAX_COMPILATION_CACHE_DIR="/cache")
  if libtpu:
    env["PYTHONPATH"] = _stub_package(tmp_path, "libtpu")
  out = _run(["bash", TPU_WORKER, "--config=configs/uniter_base.py"], env)
  if not libtpu:
    assert out.returncode == 3 and "has no libtpu" in out.stdout, out.stdout
    assert not (tmp_path / "python.txt").exists()
  else:
    assert out.returncode == 0, out.stdout
    assert (tmp_path / "python.txt").read_text().startswith(
        "JAX_PLATFORMS=tpu CACHE=/cache -m vlp.pretrain --config=configs/uniter_base.py")
