"""Real processes: `python -m vlp.pretrain` under `launch/local_multiprocess.sh`,
real SIGTERMs, and a coordinator nobody can reach.

* 2 processes x 2 CPU devices give the first five losses of 1 process x 4 devices
  (same mesh, same fixed data shards, a data mixture), and only process 0 logs and
  writes metrics;
* SIGTERM to that 2-process job (the launcher forwards it to both, as a scheduler
  would) stops both after the same step with a checkpoint and exit status 42
  (`EXIT_PREEMPTED`: requeue me), which the launcher passes on;
  restarting from it as 1 process x 4 devices continues the same loss curve, and
  a SIGTERM to that single process again leaves a checkpoint where it stopped;
* a process that cannot reach its coordinator, or a coordinator whose peers never
  come, fails within --distributed_timeout with a message that says so;
* the launcher returns the status of a failing process and stops the others.

Every run uses the same config (total_steps 400, far more than any run gets to:
each ends by SIGTERM), so the 1-process programs compile once and then come from
the shared persistent compilation cache. Subprocesses compile with LLVM
optimisation off and XLA's older fusion emitters: these only cut compile time on CPU.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from vlp.parallel.preemption import EXIT_PREEMPTED

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "local_multiprocess.sh")
RTOL = 1e-4
TOTAL_STEPS = 400
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from vlp.data import scenes
  d = tmp_path_factory.mktemp("scenes")
  scenes.prepare_scenes(d, feature_dim=64, size="small")  # Once, before any process reads.
  return d


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


def _env(cache_dir, devices=None):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  flags = ["--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false"]
  if devices:
    flags.append(f"--xla_force_host_platform_device_count={devices}")
  env["XLA_FLAGS"] = " ".join(flags)
  return env


def _pretrain(workdir, data_dir, **extra):
  """The tiny run every test here shares: 4 devices as data=2 x fsdp=2, 2 data shards,
  a mixture of two splits (vlp.data.mixture) weighted 3:1."""
  overrides = dict(
      data_dir=data_dir, data="vlp_scenes:train=3,vlp_scenes:test=1", data_size="small",
      batch_size=8, max_text_len=20,
      **{"model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2,
         "model.intermediate_size": 64, "mesh.data": 2, "mesh.fsdp": 2,
         "tasks.mlm": 1, "tasks.mrfr": 0, "tasks.mrc": 0, "tasks.mrckl": 0, "tasks.itm": 0},
      sharding="fsdp", data_shards=2, total_steps=TOTAL_STEPS, log_every=1, eval_every=0,
      checkpoint_every=1000)
  overrides.update(extra)
  return ([sys.executable, "-m", "vlp.pretrain", "--config=configs/uniter_base.py:tiny",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()])


def _metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def _losses(workdir):
  return {r["step"]: r[f"loss/{r['task']}"] for r in _metrics(workdir)}


def _run_until(cmd, env, workdir, steps, timeout=400):
  """Starts `cmd`, SIGTERMs it once `steps` steps are logged; returns (rc, output)."""
  log = os.path.join(workdir, f"log_{time.time_ns()}.txt")  # A pipe could fill and block.
  os.makedirs(workdir, exist_ok=True)
  with open(log, "w") as f:
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    try:
      while len(_losses(workdir)) < steps and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
      assert p.poll() is None, "the run ended before it could be pre-empted"
      p.send_signal(signal.SIGTERM)
      p.wait(timeout=120)
    finally:
      if p.poll() is None:
        p.kill()
        p.wait()
  with open(log) as f:
    return p.returncode, f.read()


def _stopped_with_checkpoint(rc, out, workdir, prefix=""):
  """The step a pre-empted run stopped after; checks its exit and checkpoint."""
  assert rc == EXIT_PREEMPTED, out[-5000:]
  steps = sorted(_losses(workdir))
  stopped = steps[-1]
  assert stopped < TOTAL_STEPS
  assert (f"{prefix}pre-emption (SIGTERM) during training: checkpoint written at step {stopped}; "
          "exiting") in out, \
      out[-5000:]
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(stopped)))
  return stopped


@pytest.fixture(scope="module")
def reference(data_dir, cache_dir, tmp_path_factory):
  """One process with 4 devices: the loss curve of its first 40-odd steps."""
  workdir = tmp_path_factory.mktemp("ref")
  rc, out = _run_until(_pretrain(workdir, data_dir), _env(cache_dir, devices=4), workdir, 40)
  _stopped_with_checkpoint(rc, out, workdir)
  ref = _losses(workdir)
  assert sorted(ref) == list(range(1, len(ref) + 1))
  return ref


@pytest.fixture(scope="module")
def two_processes(data_dir, cache_dir, tmp_path_factory):
  """2 processes x 2 CPU devices under the launcher, SIGTERMed after 5 steps."""
  workdir = tmp_path_factory.mktemp("two_processes")
  cmd = [LAUNCH, "2", "--cpu_devices=2", "--"] + _pretrain(workdir, data_dir)
  rc, out = _run_until(cmd, _env(cache_dir), workdir, 5)
  return workdir, rc, out


def test_two_processes_match_one_process(two_processes, reference):
  workdir, rc, out = two_processes
  assert rc == EXIT_PREEMPTED, out[-5000:]
  assert "[0] process 0/2, 4 devices, mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in out
  assert "[1] process" not in out and "[1] step" not in out  # Progress from process 0 only.
  records = _metrics(workdir)
  steps = [r["step"] for r in records]
  assert steps == list(range(1, len(steps) + 1)), steps  # One writer: no duplicate lines.
  got = _losses(workdir)
  np.testing.assert_allclose([got[s] for s in range(1, 6)],
                             [reference[s] for s in range(1, 6)], rtol=RTOL)
  assert reference[1] != reference[5]


def test_sigterm_checkpoints_and_resumes(two_processes, reference, data_dir, cache_dir,
                                         tmp_path):
  # Both processes stopped after the same step, wrote one checkpoint and exited 42.
  first_dir, rc, out = two_processes
  stopped = _stopped_with_checkpoint(rc, out, first_dir, prefix="[0] ")
  # Only process 0 logs; every process says why it exits (its status: 42 on both,
  # or the launcher would report the failure).
  assert "[1] pre-emption (SIGTERM) during training: checkpoint written at step " \
         f"{stopped}; exiting" not in out
  assert all(f"[{i}] pre-emption (SIGTERM) during training: checkpoint written at step "
             f"{stopped}; exit status 42" in out for i in (0, 1))
  assert "exited with status" not in out

  # Resume as one process with 4 devices; pre-empt it 3 steps later.
  workdir = tmp_path / "resumed"
  shutil.copytree(first_dir, workdir, ignore=shutil.ignore_patterns("log_*"))
  rc, out = _run_until(_pretrain(workdir, data_dir), _env(cache_dir, devices=4), workdir,
                       stopped + 3)
  assert f"resumed from {workdir / 'checkpoints'} at step {stopped}" in out, out[-5000:]
  last = _stopped_with_checkpoint(rc, out, workdir)
  assert stopped + 3 <= last <= max(reference), "SIGTERM took effect too late to compare"
  got = _losses(workdir)
  assert sorted(got) == list(range(1, last + 1))
  np.testing.assert_allclose([got[s] for s in range(1, last + 1)],
                             [reference[s] for s in range(1, last + 1)], rtol=RTOL)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_unreachable_coordinator_and_missing_peers_fail_fast(data_dir, cache_dir, tmp_path):
  env = _env(cache_dir, 2)
  procs = {}
  t0 = time.time()
  for pid in (1, 0):  # Separate ports: process 1 finds nobody, process 0 waits for nobody.
    port = _free_port()
    cmd = _pretrain(tmp_path / str(pid), data_dir) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
        f"--process_id={pid}", "--distributed_timeout=3"]
    procs[pid] = (port, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
  out = {pid: (port, p.communicate(timeout=120), p.returncode) for pid, (port, p) in
         procs.items()}
  port, (_, err), rc = out[1]
  assert rc != 0
  assert (f"process 1 of 2 could not reach the JAX coordinator at 127.0.0.1:{port} within 3 s"
          in err), err[-3000:]
  port, (_, err), rc = out[0]
  assert rc == 75, err[-3000:]
  assert ("the distributed runtime did not start within 3 s: process 0 of 2 waited for all "
          f"processes to connect to the coordinator at 127.0.0.1:{port}") in err, err[-3000:]
  assert time.time() - t0 < 60


def test_launcher_returns_failure_and_stops_the_others():
  script = ("import os, sys, time\n"
            "if os.environ['VLP_PROCESS_ID'] == '1': sys.exit(3)\n"
            "time.sleep(120)\n")
  t0 = time.time()
  p = subprocess.run([LAUNCH, "2", "--", sys.executable, "-c", script], capture_output=True,
                     text=True, timeout=60, env=dict(os.environ, KILL_GRACE="2"))
  assert p.returncode == 3
  assert "process 1 exited with status 3; stopping the others" in p.stderr
  assert time.time() - t0 < 30
  p = subprocess.run([LAUNCH, "3", "--cpu_devices=1", "--", sys.executable, "-c",
                      "import os; print(os.environ['VLP_PROCESS_ID'], "
                      "os.environ['VLP_NUM_PROCESSES'], os.environ['VLP_COORDINATOR_ADDRESS'], "
                      "os.environ['JAX_PLATFORMS'], os.environ['XLA_FLAGS'])"],
                     capture_output=True, text=True, timeout=60,
                     env=dict(os.environ, VLP_PORT="12345"))
  assert p.returncode == 0, p.stderr
  for i in range(3):
    assert f"[{i}] {i} 3 127.0.0.1:12345 cpu " in p.stdout, p.stdout
  assert p.stdout.count("--xla_force_host_platform_device_count=1") == 3
  assert "device_count=8" not in p.stdout  # The inherited count is replaced.
  p = subprocess.run([LAUNCH, "two", "--", "true"], capture_output=True, text=True, timeout=60)
  assert p.returncode == 2 and "launch/local_multiprocess.sh N" in p.stdout + p.stderr
