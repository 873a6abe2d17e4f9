"""End-to-end behaviour of the training loop on a tiny model and `vlp_scenes`.

* every objective's loss falls when the jitted train step is applied repeatedly;
* an interrupted run (checkpoint, stop, restart in the same workdir) continues
  with exactly the losses of an uninterrupted one;
* metrics.jsonl has one line per step with `log_every=1`, and eval.json the
  documented keys.
"""

import functools
import json
import os

import jax
import numpy as np
import pytest

from vlp import config_lib
from vlp.parallel import mesh as mesh_lib, sharding as sharding_lib
from vlp.models.pretraining import UniterForPretraining
from vlp.tasks import TASKS, make_loss_fn
from vlp.train import loop, optim, step as step_lib
from vlp.jobs.base import Feed
from vlp.jobs.data_setup import model_config_for
from vlp.jobs.pair_data import PairData
from vlp.train.state import create_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = jax.devices()[:1]  # The sharded variants are covered by test_distributed.py.


def tiny_config(data_dir, **overrides):
  c = config_lib.load_config_file(os.path.join(REPO, "configs/uniter_base.py:tiny"))
  c.data_dir = str(data_dir)
  c.data_size = "small"
  c.batch_size = 8
  c.max_text_len = 20
  c.model.hidden_size = 32
  c.model.num_layers = 1
  c.model.num_heads = 2
  c.model.intermediate_size = 64
  c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  c.eval_batches = 1
  c.eval_gallery_images = 4
  c.eval_batch_size = 20
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


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out[r["step"]] = (r["task"], r[f"loss/{r['task']}"])  # Later lines win.
  return out


def _events(workdir) -> dict[tuple[str, int], float]:
  """(tag, step) -> value of every scalar in the run's event files. The TFRecord
  framing (length, crc, data, crc) is read here; the payload is an Event proto."""
  import struct
  from tensorboardX.proto import event_pb2
  out = {}
  for name in os.listdir(workdir):
    if not name.startswith("events.out.tfevents."):
      continue
    data = open(os.path.join(workdir, name), "rb").read()
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
  events = _events(workdir)
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


def test_resume_after_interruption_matches_uninterrupted(data_dir, tmp_path, monkeypatch):
  overrides = {"total_steps": 8, "log_every": 1, "checkpoint_every": 3, "eval_every": 100,
               "tasks": {"mlm": 1, "mrfr": 1, "itm": 1}}
  ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
  loop.train_and_evaluate(tiny_config(data_dir, profile_steps="2:4", **overrides),
                          str(ref_dir), devices=ONE)
  ref = _losses(ref_dir)
  assert sorted(ref) == list(range(1, 9))  # One line per step with log_every=1.
  _check_tensorboard_and_profile(ref_dir, ref)

  # Interrupt after step 5 through the pre-emption path, then restart.
  real = loop.Preemption

  class StopAt5(real):
    def should_stop(self, step):
      return step >= 5

  monkeypatch.setattr(loop, "Preemption", StopAt5)
  loop.train_and_evaluate(tiny_config(data_dir, **overrides), str(run_dir), devices=ONE)
  monkeypatch.setattr(loop, "Preemption", real)
  assert 5 in [int(s) for s in os.listdir(run_dir / "checkpoints") if s.isdigit()]
  assert max(_losses(run_dir)) == 5
  result = loop.train_and_evaluate(tiny_config(data_dir, **overrides), str(run_dir), devices=ONE)
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
