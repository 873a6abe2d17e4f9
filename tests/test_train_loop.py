"""End-to-end behaviour of the training loop on a tiny model and `vlp_scenes`.

* every objective's loss falls when the jitted train step is applied repeatedly;
* an interrupted run (checkpoint, stop, restart in the same workdir) continues
  with exactly the losses of an uninterrupted one;
* metrics.jsonl has one line per step with `log_every=1`, and eval.json the
  documented keys; with `log_every=3` each task's loss is its mean over the
  interval, in metrics.jsonl and in the TensorBoard events;
* SIGTERM during evaluation (a real signal, in a subprocess) stops it at the next
  eval batch: a checkpoint marked "evaluation pending", exit status 42; the
  resumed run evaluates that step first.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vlp import checkpoint as ckpt_lib, config_lib
from vlp.parallel import mesh as mesh_lib, preemption, sharding as sharding_lib
from vlp.models.pretraining import UniterForPretraining
from vlp.tasks import TASKS, make_loss_fn
from vlp.train import loop, optim, step as step_lib
from vlp.jobs.base import Feed
from vlp.jobs.data_setup import model_config_for
from vlp.jobs.pair_data import PairData
from vlp.train.state import create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = jax.devices()[:1]  # The sharded variants are covered by test_distributed.py.


# The tiny run of this module, as dotted overrides (also the subprocess's flags).
TINY = {"data_size": "small", "batch_size": 8, "max_text_len": 20, "model.hidden_size": 32,
        "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 64,
        "mesh.dcn": 1, "mesh.data": 1, "mesh.fsdp": 1, "mesh.tensor": 1, "eval_batches": 1,
        "eval_gallery_images": 4, "eval_batch_size": 20}


def tiny_config(data_dir, **overrides):
  c = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py:tiny"))
  c.data_dir = str(data_dir)
  config_lib.set_values(c, TINY)
  return config_lib.set_values(c, overrides)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("scenes")


def test_every_objective_loss_falls(data_dir):
  cfg = tiny_config(data_dir)
  cfg.model.hidden_dropout = 0.0
  cfg.model.attention_dropout = 0.0
  cfg.optimizer.learning_rate = 3e-3
  cfg.optimizer.warmup_steps = 5
  data = PairData(cfg, Feed.whole(cfg.batch_size))
  mcfg = model_config_for(cfg, data.tokenizer)
  mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
  rules = sharding_lib.rules_for("dp", mesh)
  tx, schedule = optim.make_optimizer(cfg.optimizer, 60)
  graphdef, state0, _ = create_train_state(
      functools.partial(UniterForPretraining, mcfg), tx, seed=0, mesh=mesh, rules=rules)
  for task in ("mlm", "mrfr", "mrc", "mrckl", "itm"):
    kind = TASKS[task].batch_kind
    it = data.train_iterator(lambda i, kind=kind: kind)
    batches = [next(it) for _ in range(2)]
    step = jax.jit(step_lib.make_train_step(graphdef, make_loss_fn(task), tx, schedule))
    state = jax.tree.map(lambda x: x, state0)
    losses = []
    for s in range(40):
      state, m = step(state, batches[s % 2])
      losses.append(float(m[f"loss/{task}"]))
    first, last = np.mean(losses[:2]), np.mean(losses[-2:])
    assert np.all(np.isfinite(losses)), task
    assert last < 0.7 * first, (task, first, last)


def _records(workdir, name="metrics.jsonl"):
  with open(os.path.join(workdir, name)) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  # Later lines win.
  return {r["step"]: (r["task"], r[f"loss/{r['task']}"]) for r in _records(workdir)}


def stop_after(checks: int) -> type:
  """`loop.Preemption` that reports a SIGTERM at its `checks`-th check (the loop
  checks once after each train step and before each eval batch)."""
  class StopAfter(preemption.PreemptionWatch):
    calls = 0

    def should_stop(self):
      self.calls += 1
      return self.calls >= checks
  return StopAfter


def event_scalars(workdir) -> dict[tuple[str, int], float]:
  """(tag, step) -> value of every scalar in the run's event files (`workdir` local
  or any epath). The TFRecord framing (length, crc, data, crc) is read here; the
  payload is an Event proto."""
  import struct
  from etils import epath
  from tensorboardX.proto import event_pb2
  out = {}
  for path in epath.Path(workdir).glob("events.out.tfevents.*"):
    data = path.read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for v in event.summary.value:
        out[(v.tag, event.step)] = v.simple_value
  return out


def _check_tensorboard_and_profile(workdir, losses):
  # Every logged loss and the last evaluation are in the TensorBoard event files.
  events = event_scalars(workdir)
  for step, (task, loss) in losses.items():
    assert events[(f"loss/{task}", step)] == pytest.approx(loss, rel=1e-6)
  with open(workdir / "eval.json") as f:
    ev = json.load(f)
  assert events[("eval/mlm_acc", 8)] == pytest.approx(ev["mlm_acc"], rel=1e-6)
  # Steps 2 and 3 were traced: an XLA trace for TensorBoard and one for Perfetto
  # that holds the train step's computation.
  import glob
  import gzip
  runs = glob.glob(str(workdir / "profile" / "plugins" / "profile" / "*"))
  assert len(runs) == 1, runs
  assert glob.glob(os.path.join(runs[0], "*.xplane.pb"))
  (trace,) = glob.glob(os.path.join(runs[0], "*.trace.json.gz"))
  names = {e.get("name", "") for e in json.load(gzip.open(trace))["traceEvents"]}
  assert any("train_step" in n for n in names), sorted(names)[:50]


OVERRIDES = {"total_steps": 8, "log_every": 1, "checkpoint_every": 3, "eval_every": 100,
             "tasks": {"mlm": 1, "mrfr": 1, "itm": 1}}


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """An uninterrupted run logging every step: (workdir, its records)."""
  ref_dir = tmp_path_factory.mktemp("ref")
  loop.train_and_evaluate(tiny_config(data_dir, profile_steps="2:4", **OVERRIDES),
                          str(ref_dir), devices=ONE)
  return ref_dir, _records(ref_dir)


def test_resume_after_interruption_matches_uninterrupted(data_dir, reference, tmp_path,
                                                         monkeypatch):
  ref_dir, _ = reference
  run_dir = tmp_path / "run"
  ref = _losses(ref_dir)
  assert sorted(ref) == list(range(1, 9))  # One line per step with log_every=1.
  _check_tensorboard_and_profile(ref_dir, ref)

  # Interrupt after step 5 through the pre-emption path, then restart.
  real = loop.Preemption
  monkeypatch.setattr(loop, "Preemption", stop_after(5))  # No evaluation before step 8.
  with pytest.raises(preemption.Preempted) as stopped:
    loop.train_and_evaluate(tiny_config(data_dir, **OVERRIDES), str(run_dir), devices=ONE)
  assert (stopped.value.step, stopped.value.where) == (5, "training")
  monkeypatch.setattr(loop, "Preemption", real)
  assert 5 in [int(s) for s in os.listdir(run_dir / "checkpoints") if s.isdigit()]
  assert max(_losses(run_dir)) == 5
  result = loop.train_and_evaluate(tiny_config(data_dir, **OVERRIDES), str(run_dir), devices=ONE)
  got = _losses(run_dir)
  assert sorted(got) == list(range(1, 9))
  for s in range(1, 9):
    assert got[s][0] == ref[s][0], s
    np.testing.assert_allclose(got[s][1], ref[s][1], rtol=1e-5, err_msg=f"step {s}")
  with open(run_dir / "eval.json") as f:
    ev = json.load(f)
  for key in ("mlm_acc", "itm_acc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
    assert key in ev and 0.0 <= ev[key] <= 100.0, key
  assert result["step"] == 8


def test_logged_losses_are_interval_means(data_dir, reference, tmp_path):
  _, ref_records = reference
  ref = {r["step"]: r for r in ref_records}
  run_dir = tmp_path / "every3"
  loop.train_and_evaluate(tiny_config(data_dir, **dict(OVERRIDES, log_every=3)), str(run_dir),
                          devices=ONE)
  records = _records(run_dir)
  assert [r["step"] for r in records] == [3, 6, 8]
  events = event_scalars(run_dir)
  previous = 0
  for r in records:
    step = r["step"]
    # Each task's losses over the interval, from the run that logged every step.
    per_task: dict[str, list[float]] = {}
    for s in range(previous + 1, step + 1):
      per_task.setdefault(ref[s]["task"], []).append(ref[s][f"loss/{ref[s]['task']}"])
    tasks = OVERRIDES["tasks"]  # (Sub-losses such as loss/itm_ce are not tasks.)
    logged = {t: r[f"loss/{t}"] for t in tasks if f"loss/{t}" in r}
    assert sorted(logged) == sorted(per_task), (step, logged, per_task)
    for task, losses in per_task.items():
      np.testing.assert_allclose(logged[task], np.mean(losses), rtol=1e-5,
                                 err_msg=f"{task} at step {step}")
      assert events[(f"loss/{task}", step)] == pytest.approx(logged[task], rel=1e-6)
    assert r["task"] == ref[step]["task"]
    assert r["lr"] == pytest.approx(ref[step]["lr"], rel=1e-6)  # The last step's.
    parts = [r[f"step_time/{p}_ms"] for p in ("data", "compute", "checkpoint")]
    assert min(parts) >= 0 and parts[1] > 0
    for tag in ("lr", "examples_per_sec", "step_time/data_ms", "step_time/compute_ms",
                "step_time/checkpoint_ms"):
      assert events[(tag, step)] == pytest.approx(r[tag], rel=1e-6), tag
    previous = step
  assert not any(tag == "mfu" for tag, _ in events)  # No peak FLOP/s for a CPU: no MFU.
  assert ("eval/mlm_acc", 8) in events


# A real SIGTERM, sent by the process to itself once evaluation has begun.
SIGTERM_IN_EVAL = """
import os, runpy, signal
from vlp.jobs import pair_scoring
real = pair_scoring.mean_metrics
def sigterm_first(*args, **kwargs):
  os.kill(os.getpid(), signal.SIGTERM)
  return real(*args, **kwargs)
pair_scoring.mean_metrics = sigterm_first
runpy.run_module("vlp.pretrain", run_name="__main__")
"""


def test_sigterm_during_evaluation_checkpoints_and_exits_42(data_dir, tmp_path):
  workdir = tmp_path / "run"
  tasks = {"tasks.mlm": 1, "tasks.mrfr": 0, "tasks.mrc": 0, "tasks.mrckl": 0, "tasks.itm": 0}
  overrides = dict(TINY, data_dir=data_dir, total_steps=4, eval_every=2, log_every=1,
                   checkpoint_every=100, cpu_devices=1, **tasks)
  tiny_config(data_dir)  # Data prepared here, before the subprocess reads it.
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_cpu_use_fusion_emitters=false",
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir or "")
  out = subprocess.run(
      [sys.executable, "-c", SIGTERM_IN_EVAL, "--config=configs/uniter_base.py:tiny",
       f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in overrides.items()],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      timeout=300)
  assert out.returncode == preemption.EXIT_PREEMPTED == 42, out.stdout[-3000:]
  assert ("pre-emption (SIGTERM) during evaluation: checkpoint written at step 2; exiting"
          in out.stdout), out.stdout[-3000:]
  assert [r["step"] for r in _records(workdir)] == [1, 2]
  assert not (workdir / "eval.json").exists()  # The evaluation stopped early.
  ckpt = ckpt_lib.Checkpointer(str(workdir / "checkpoints"), save_every=100)
  assert ckpt.all_steps() == [2] and ckpt.restore_meta(2)["eval_pending"] is True
  ckpt.close()

  # The resumed run evaluates step 2 first, then trains on.
  cfg = tiny_config(data_dir, total_steps=4, eval_every=2, log_every=1, checkpoint_every=100,
                    tasks={"mlm": 1, "mrfr": 0, "mrc": 0, "mrckl": 0, "itm": 0})
  result = loop.train_and_evaluate(cfg, str(workdir), devices=ONE)
  assert [r["step"] for r in _records(workdir, "eval_history.jsonl")] == [2, 4]
  assert [r["step"] for r in _records(workdir)] == [1, 2, 3, 4]
  assert result["step"] == 4
