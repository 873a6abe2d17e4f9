"""Sharded training on 8 forced CPU devices: meshes, rule tables, sharded state,
parity of every preset with one device, and checkpoints across meshes.

* mesh and rule-table errors name the sizes / axes at fault;
* a table that promises parameter sharding but leaves a large one replicated is
  refused;
* train state is created sharded (optax counts replicated over the whole mesh),
  the jitted step keeps those shardings in and out and donates the state;
* the first five losses under dp (data=8), fsdp_tp (data=2, fsdp=2, tensor=2) and,
  through the loop, fsdp (data=4, fsdp=2) match the one-device run;
* a checkpoint written on that (4, 2) mesh resumes on (2, 2) and on one device with
  the losses of the uninterrupted run, without initialising a throw-away state.
Compilation dominates the run time on CPU, so every program compiled here is used
for as many checks as possible (the one-device resume reuses the one-device step
through the persistent compilation cache). Real processes, SIGTERM and the
launcher are in test_multiprocess.py; the AOT memory report in test_aot.py.
"""

import functools
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from test_train_loop import tiny_config
from vlp.parallel import global_batch, logical, mesh as mesh_lib, runtime, sharding as sharding_lib
from vlp.models.pretraining import UniterForPretraining
from vlp.models.uniter_config import model_config
from vlp.tasks import make_loss_fn
from vlp.data import shards as shards_lib
from vlp.jobs import data_setup
from vlp.jobs.base import Feed
from vlp.jobs.pair_data import PairData
from vlp.train import loop, optim, step as step_lib
from vlp.train.state import create_train_state, state_shardings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4
_LOOP = dict(total_steps=6, log_every=1, checkpoint_every=3, eval_every=0)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("scenes")


def _mesh(data=1, fsdp=1, tensor=1):
  n = data * fsdp * tensor
  return mesh_lib.make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor}, jax.devices()[:n])


def _spec(tree, *keys):
  for k in keys:
    tree = tree[k]
  return tree.spec


# ----------------------------------------------------------------------------- bad input


def test_mesh_errors_name_sizes_and_subsets_work():
  with pytest.raises(ValueError, match=r"does not divide the 8 devices.*multiply to 3"):
    mesh_lib.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
  with pytest.raises(ValueError, match=r"needs 16 devices but 8 are available"):
    mesh_lib.make_mesh({"data": 4, "fsdp": 2, "tensor": 2})
  with pytest.raises(ValueError, match=r"needs 8 devices but 4 are available"):
    mesh_lib.make_mesh({"data": 4, "fsdp": 2}, jax.devices()[:4])
  m = mesh_lib.make_mesh({"dcn": 1, "data": -1, "fsdp": 2, "tensor": 1}, jax.devices()[:4])
  assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 1}  # A size-1 dcn is left out.
  assert all(t == jax.sharding.AxisType.Auto for t in m.axis_types)
  # One process is one granule: a dcn axis of 2 has nothing to span, and is refused
  # rather than laid over the devices in a flat order.
  with pytest.raises(ValueError, match="dcn axis of size 2 must span 2 processes"):
    mesh_lib.make_mesh({"dcn": 2, "data": -1, "fsdp": 2, "tensor": 1})
  m = mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert list(m.devices.ravel()) == jax.devices()  # One canonical order.


def test_rule_tables_from_strings_and_their_errors():
  m = _mesh(2, 2, 2)
  rules = sharding_lib.rules_for("embed=fsdp,mlp=tensor,batch=data+fsdp", m)
  assert rules == [("embed", "fsdp"), ("mlp", "tensor"), ("batch", ("data", "fsdp"))]
  assert logical.logical_to_spec(("batch", "length", "mlp"), rules, m) == P(("data", "fsdp"),
                                                                           None, "tensor")
  # A preset plus overrides: explicit rules come first, so they win.
  rules = sharding_lib.rules_for("fsdp_tp, vocab=none", m)
  assert logical.rules_dict(rules)["vocab"] is None
  assert logical.rules_dict(rules)["mlp"] == "tensor"
  assert sharding_lib.rules_for([["embed", "fsdp"]], m) == [("embed", "fsdp")]
  assert sharding_lib.rules_for({"embed": "fsdp"}, m) == [("embed", "fsdp")]
  with pytest.raises(ValueError, match=r"names mesh axis 'model', but the mesh has axes "
                                       r"\['data', 'fsdp', 'tensor'\]"):
    sharding_lib.rules_for("embed=model", m)
  with pytest.raises(ValueError, match=r"unknown logical axis"):
    sharding_lib.rules_for("emb=fsdp", m)
  with pytest.raises(ValueError, match=r"'zero3' is not a preset"):
    sharding_lib.rules_for("zero3", m)
  with pytest.raises(ValueError, match=r"several presets"):
    sharding_lib.rules_for("dp,fsdp", m)


def _base_shardings(sharding, mesh):
  cfg = model_config("base")
  tx, _ = optim.make_optimizer(tiny_config("/unused").optimizer, 10)
  rules = sharding_lib.rules_for(sharding, mesh)
  return state_shardings(functools.partial(UniterForPretraining, cfg), tx, mesh=mesh,
                         rules=rules, sharding_name=sharding)


def test_refuses_tables_that_leave_large_parameters_replicated(monkeypatch):
  _, sh = _base_shardings("fsdp", _mesh(1, 8))  # The real presets pass.
  assert _spec(sh.params, "uniter", "embeddings", "word_embeddings", "embedding") == P(None,
                                                                                       "fsdp")
  _base_shardings("fsdp_tp", _mesh(2, 2, 2))
  _base_shardings("dp", _mesh(8))  # dp promises no parameter sharding.
  with pytest.raises(ValueError, match=r"leaves parameters over 4 MiB replicated: "
                                       r".*word_embeddings.*\(28996, 768\)"):
    _base_shardings("batch=data+fsdp,mlp=fsdp", _mesh(1, 8))
  monkeypatch.setitem(sharding_lib.PRESETS, "fsdp", [("batch", ("data", "fsdp")),
                                                     ("heads", "fsdp")])
  with pytest.raises(ValueError, match=r"sharding 'fsdp' .* replicated"):
    _base_shardings("fsdp", _mesh(1, 8))


def test_unreachable_coordinator_fails_within_timeout():
  with pytest.raises(ConnectionError, match=r"process 1 of 2 could not reach the JAX "
                                            r"coordinator at 127.0.0.1:1 within 1 s"):
    runtime.wait_for_coordinator("127.0.0.1:1", 1, process_id=1, num_processes=2)
  with pytest.raises(ValueError, match="needs --num_processes and --process_id"):
    runtime.initialize(coordinator_address="127.0.0.1:1", num_processes=2, timeout=1)


def test_when_the_runtime_initialises():
  assert not runtime.wants_initialize("auto", None, env={})
  assert runtime.wants_initialize("auto", 2, env={})
  slurm = {"SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "3", "SLURM_NTASKS": "16"}
  assert runtime.wants_initialize("auto", None, env=slurm)
  assert not runtime.wants_initialize("auto", None, env=dict(slurm, SLURM_NTASKS="1"))
  assert not runtime.wants_initialize("auto", None, env={"SLURM_NTASKS": "4"})  # Not in srun.
  assert runtime.wants_initialize("auto", None, env={"TPU_WORKER_HOSTNAMES": "a,b"})
  assert runtime.wants_initialize("on", None, env={})
  assert not runtime.wants_initialize("off", 4, env={})


def test_cpu_devices_split_the_host_unless_the_environment_chose():
  # An explicit choice in the environment wins; 0 keeps JAX's default.
  forced = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert runtime.split_host_cpu(2, forced) is None
  assert runtime.split_host_cpu(2, {"JAX_NUM_CPU_DEVICES": "4"}) is None
  assert runtime.split_host_cpu(0, {}) is None
  # Otherwise the CPU platform gets that many devices (in a fresh process: this one's
  # backend is up already).
  code = ("import jax; from vlp.parallel import runtime; "
          "assert runtime.split_host_cpu(3, {}) == 3; print(jax.device_count('cpu'))")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  out = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu"),
                       capture_output=True, text=True, timeout=120, cwd=REPO)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split()[-1] == "3"


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None or runtime.on_cloud_tpu()
                    or bool(glob.glob("/dev/nvidia[0-9]*")),
                    reason="needs libtpu installed (`make test` does) on a machine without "
                           "TPU or GPU")
def test_an_installed_libtpu_stays_unloaded_on_a_machine_without_a_tpu():
  assert runtime.skip_absent_tpu({"JAX_PLATFORMS": ""}) is None  # An explicit choice wins.
  code = ("from vlp.parallel import runtime; print(runtime.skip_absent_tpu()); "
          "import jax; print(jax.devices()[0].platform)")
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO,
                                   capture_output=True, text=True, timeout=120)
  fixed = run(env)
  assert fixed.returncode == 0, fixed.stderr[-2000:]
  assert fixed.stdout.split() == ["cpu", "cpu"]
  assert "TPU" not in fixed.stderr, fixed.stderr
  # Left to JAX, libtpu is loaded, finds no TPU and says so on stderr.
  left = run(dict(env, JAX_PLATFORMS=""))
  assert left.returncode == 0, left.stderr[-2000:]
  assert left.stdout.split() == ["None", "cpu"]
  assert "TPU" in left.stderr


def test_process_rows_and_data_shards():
  m = _mesh(2, 2, 2)
  rules = sharding_lib.rules_for("fsdp_tp", m)
  np.testing.assert_array_equal(global_batch.process_rows(m, rules, 8), np.arange(8))
  assert shards_lib.shards_for_rows(np.arange(8), 8, 2) == [0, 1]
  assert shards_lib.shards_for_rows(np.arange(4, 8), 8, 2) == [1]
  with pytest.raises(ValueError, match="do not line up with 4 data shards"):
    shards_lib.shards_for_rows(np.arange(3, 6), 8, 4)
  with pytest.raises(ValueError, match="not divisible by the 3 data shards"):
    shards_lib.shards_for_rows(np.arange(8), 8, 3)
  keys = ml_collections.ConfigDict(dict(batch_size=8, data_shards=0))
  assert loop.feed_for(keys, m, rules).num_shards == 1  # One process: one shard.
  keys.data_shards = 4
  assert loop.feed_for(keys, m, rules).num_shards == 4


def test_data_shards_follow_a_torus_row_order():
  # The row owners of a simulated v5litepod-16 (4 hosts): the fewest shards that each
  # belong to one host are 8 (2 rows each), where contiguous hosts would give 4.
  torus = [0, 0, 1, 1, 1, 1, 0, 2, 3, 3, 3, 3, 2, 2, 2, 0]
  assert shards_lib.count_for([frozenset([p]) for p in torus]) == 16
  pairs = [0, 0, 1, 1, 1, 1, 0, 0, 3, 3, 3, 3, 2, 2, 2, 2]
  assert shards_lib.count_for([frozenset([p]) for p in pairs]) == 8
  assert shards_lib.count_for([frozenset([p]) for p in np.repeat(np.arange(4), 4)]) == 4
  # Rows every process feeds (batch not split across them) make one shard.
  assert shards_lib.count_for([frozenset([0, 1])] * 8) == 1


# ------------------------------------------------------------- sharded state, preset parity


@pytest.fixture(scope="module")
def run_setup(data_dir):
  # What the loop runs in `test_checkpoint_restores_on_other_meshes`, step by step.
  # Dropout stays on: the RNG must not depend on the sharding.
  cfg = tiny_config(data_dir, tasks={"mlm": 1}, **_LOOP)
  data = PairData(cfg, Feed.whole(cfg.batch_size))
  make_model = functools.partial(UniterForPretraining,
                                 data_setup.model_config_for(cfg, data.tokenizer))
  tx, schedule = optim.make_optimizer(cfg.optimizer, cfg.total_steps)
  it = data.train_iterator(lambda i: "mlm")
  batches = [next(it) for _ in range(5)]
  it.close()
  step_fn = functools.partial(step_lib.make_train_step, loss_fn=make_loss_fn("mlm"), tx=tx,
                              schedule=schedule)
  return dict(cfg=cfg, make_model=make_model, tx=tx, batches=batches, step_fn=step_fn)


def _train(setup, mesh, preset, state=None):
  """Five steps; `state` None: created sharded on `mesh`, else host values put there."""
  rules = sharding_lib.rules_for(preset, mesh)
  with logical.activate(mesh, rules):
    init = None
    if state is None:
      graphdef, state, state_sh = create_train_state(
          setup["make_model"], setup["tx"], seed=setup["cfg"].seed, mesh=mesh, rules=rules,
          sharding_name=preset)
      init = jax.device_get(state)
    else:
      graphdef, state_sh = state_shardings(setup["make_model"], setup["tx"], mesh=mesh,
                                           rules=rules, sharding_name=preset)
      state = jax.device_put(state, state_sh)
    batch_sh = sharding_lib.batch_shardings(setup["batches"][0], mesh, rules)
    jitted = step_lib.jit_train_step(setup["step_fn"](graphdef), state_sh, batch_sh, mesh)
    to_global = functools.partial(global_batch.host_to_global, mesh=mesh, rules=rules)
    compiled = jitted.lower(state, to_global(setup["batches"][0])).compile()
    losses = []
    for i, b in enumerate(setup["batches"]):
      previous = state
      state, metrics = compiled(state, to_global(b))
      losses.append(float(metrics["loss"]))
      if i == 1:  # Donated: the step reuses the state's buffers for its output.
        assert all(x.is_deleted() for x in jax.tree.leaves(previous))
  return dict(losses=losses, state=state, state_sh=state_sh, compiled=compiled, init=init)


@pytest.fixture(scope="module")
def one_device(run_setup):
  m = _mesh(1)
  with logical.activate(m, sharding_lib.rules_for("dp", m)):
    _, state, _ = create_train_state(run_setup["make_model"], run_setup["tx"],
                                     seed=run_setup["cfg"].seed, mesh=m,
                                     rules=sharding_lib.rules_for("dp", m))
  init = jax.device_get(state)
  return dict(_train(run_setup, m, "dp", init), init=init)  # Same values as `state`.


def test_sharded_state_and_step_shardings(run_setup, one_device):
  """fsdp_tp on data=2, fsdp=2, tensor=2: the state is born sharded, equal to the
  one-device init, keeps its shardings through the step, and trains the same."""
  mesh = _mesh(2, 2, 2)
  r = _train(run_setup, mesh, "fsdp_tp")
  sh = r["state_sh"]
  enc = ("uniter", "encoder", 0)
  assert _spec(sh.params, *enc, "intermediate", "dense", "kernel") == P("fsdp", "tensor")
  assert _spec(sh.params, *enc, "output", "dense", "kernel") == P("tensor", "fsdp")
  assert _spec(sh.params, *enc, "attention", "self", "query", "kernel") == P("fsdp", "tensor")
  # vocab (365) does not divide over tensor=2: only embed is split.
  assert _spec(sh.params, "uniter", "embeddings", "word_embeddings", "embedding") == P(None,
                                                                                       "fsdp")
  # Adam's moments mirror the parameters; every other optax leaf (the counts) is
  # replicated over the whole mesh, not committed to one device.
  adam = r["state_sh"].opt_state[1][0]
  assert jax.tree.leaves(adam.mu) == jax.tree.leaves(sh.params)
  assert jax.tree.leaves(adam.nu) == jax.tree.leaves(sh.params)
  counts = [adam.count, r["state_sh"].opt_state[1][2].count]
  assert all(c == NamedSharding(mesh, P()) for c in counts)
  for leaf in jax.tree.leaves(sh):
    assert isinstance(leaf, NamedSharding) and leaf.mesh.shape == mesh.shape

  # The compiled step takes and returns exactly these shardings.
  in_state_sh = r["compiled"].input_shardings[0][0]
  out_state_sh = r["compiled"].output_shardings[0]
  for want, got_in, got_out, arr in zip(jax.tree.leaves(sh), jax.tree.leaves(in_state_sh),
                                        jax.tree.leaves(out_state_sh),
                                        jax.tree.leaves(r["state"])):
    assert got_in.is_equivalent_to(want, arr.ndim), (got_in, want)
    assert got_out.is_equivalent_to(want, arr.ndim), (got_out, want)
    assert arr.sharding.is_equivalent_to(want, arr.ndim)

  # Born sharded, yet the same numbers as on one device (partitionable threefry).
  for a, b in zip(jax.tree.leaves(r["init"]), jax.tree.leaves(one_device["init"])):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(r["losses"], one_device["losses"], rtol=RTOL)


def test_dp_matches_one_device(run_setup, one_device):
  r = _train(run_setup, _mesh(8), "dp", one_device["init"])
  np.testing.assert_allclose(r["losses"], one_device["losses"], rtol=RTOL)
  assert r["losses"][0] != r["losses"][-1]  # It trains.


# --------------------------------------------------------------- checkpoints across meshes


def _losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      r = json.loads(line)
      out[r["step"]] = r[f"loss/{r['task']}"]
  return out


@pytest.mark.slow
def test_checkpoint_restores_on_other_meshes(data_dir, tmp_path, monkeypatch, one_device):
  """The loop under fsdp on (data 4, fsdp 2) matches one device; its step-3
  checkpoint resumes on (2, 2) and on one device with the same losses."""
  overrides = dict(_LOOP, tasks={"mlm": 1}, sharding="fsdp")
  ref_dir = tmp_path / "ref"
  loop.train_and_evaluate(tiny_config(data_dir, mesh={"data": 4, "fsdp": 2, "tensor": 1},
                                      **overrides), str(ref_dir))
  ref = _losses(ref_dir)
  assert sorted(ref) == [1, 2, 3, 4, 5, 6]
  # The fsdp preset on 8 devices, through the whole loop, trains like one device.
  np.testing.assert_allclose([ref[s] for s in range(1, 6)], one_device["losses"], rtol=RTOL)

  def no_init(*a, **k):
    raise AssertionError("a resumed run must restore straight into the target shardings")
  monkeypatch.setattr(loop, "create_train_state", no_init)
  for mesh, n in (({"data": 2, "fsdp": 2, "tensor": 1}, 4),
                  ({"data": 1, "fsdp": 1, "tensor": 1}, 1)):
    workdir = tmp_path / f"resume{n}"
    shutil.copytree(ref_dir / "checkpoints" / "3", workdir / "checkpoints" / "3")
    loop.train_and_evaluate(tiny_config(data_dir, mesh=mesh, **overrides), str(workdir),
                            devices=jax.devices()[:n])
    got = _losses(workdir)
    assert sorted(got) == [4, 5, 6], n
    np.testing.assert_allclose([got[s] for s in (4, 5, 6)], [ref[s] for s in (4, 5, 6)],
                               rtol=RTOL, err_msg=f"{n} devices")


def test_an_axis_that_cannot_divide_is_named(caplog):
  # A 1001-word vocabulary over a tensor axis of 4: left unsplit, with the parameter
  # named in a warning, or refused in strict mode.
  from vlp.models.pretraining import UniterForPretraining
  from vlp.models.uniter_config import model_config
  from vlp.train.state import split_abstract
  cfg = model_config("tiny", vocab_size=1001, img_dim=64, num_region_classes=8)
  _, abstract = split_abstract(functools.partial(UniterForPretraining, cfg))
  m = _mesh(1, 2, 4)
  rules = sharding_lib.rules_for("fsdp_tp", m)
  with caplog.at_level("WARNING"):
    out = sharding_lib.param_shardings(abstract, m, rules)
  emb = out["uniter"]["embeddings"]["word_embeddings"]["embedding"]
  assert emb.spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert "uniter/embeddings/word_embeddings/embedding (1001, 128): dim 0 (vocab)" in caplog.text
  assert "region_classifier" not in caplog.text  # 8 classes divide by 4.
  with pytest.raises(ValueError, match=r"leaves 2 parameter dimension.*\n  cls/bias"):
    sharding_lib.param_shardings(abstract, m, rules, strict=True)
