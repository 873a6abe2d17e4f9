"""The training loop shared by every entry point.

Order of business (each step is a small function below):
  mesh and rules -> data and tokenizer -> model config -> optimizer ->
  restore-or-init (sharded) -> per-task jitted steps (compiled lazily) ->
  loop: task from (seed, step), host batch -> global batch -> step ->
  log (interval means) / pre-emption / evaluate / checkpoint -> final checkpoint.
A restart with the same workdir resumes from the latest checkpoint: step,
parameters, optimizer state, RNG and data position, on any mesh or number of
hosts (the restore target carries the current shardings; nothing is
initialised first).

Multi-host: every process runs this same function. Each feeds only its rows of
the global batch (`global_batch.process_rows`), all pick the same task from
(seed, step), only process 0 writes logs and metrics, and SIGTERM on any host
stops all of them at the same point, after a train step or before an eval batch
(`PreemptionWatch`): they write a checkpoint and raise `Preempted`, which the
entry points turn into exit status `EXIT_PREEMPTED` (requeue me). An evaluation
cut short is marked in the checkpoint and runs first on resume.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from vlp import checkpoint as ckpt_lib
from vlp import storage
from vlp import jobs
from vlp.data import shards as shards_lib
from vlp.jobs.base import EvalContext, Feed, JobFactory
from vlp.parallel import global_batch, mesh as mesh_lib, sharding as sharding_lib
from vlp.parallel import logical, preemption as preemption_lib
from vlp.train import flops as flops_lib, log_interval, metrics as metrics_lib, optim
from vlp.train import profiling, step as step_lib
from vlp.train.state import abstract_state, create_train_state, state_shardings
from vlp.train.task_mix import BatchKinds, TaskMix


# SIGTERM -> a checkpoint and a clean exit, at the same step on every host.
Preemption = preemption_lib.PreemptionWatch


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Sequence[jax.Device] | None = None,
                       job_factory: JobFactory | None = None) -> dict[str, Any]:
  """Trains per `config` in `workdir`; returns the last evaluation.

  `job_factory` (default: the job `config.job` names, `vlp.jobs`) supplies data,
  model, objectives and evaluation. `devices` (default: all) lets a single-process
  run use a subset, e.g. a one-device reference inside an 8-device test process.
  Raises `preemption.Preempted` after a SIGTERM, once its checkpoint is written.
  """
  epath.Path(storage.absolute(workdir)).mkdir(parents=True, exist_ok=True)
  if config.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", config.compilation_cache_dir)
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.rules_for(config.sharding, mesh)
  metrics_lib.log(f"process {jax.process_index()}/{jax.process_count()}, "
                  f"{jax.device_count()} devices, mesh {dict(mesh.shape)}, sharding {config.sharding}")

  feed = feed_for(config, mesh, rules)
  job = (job_factory or jobs.job_factory(config))(config, feed)
  make_model = job.make_model
  tx, schedule = optim.make_optimizer(config.optimizer, config.total_steps,
                                      lr_multipliers=job.lr_multipliers)
  best_metric = config.best_metric
  ckpt = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"),
                               save_every=config.checkpoint_every, keep=config.keep_checkpoints,
                               best_metric=best_metric)

  start_step, data_state, eval_pending = 0, None, False
  latest = ckpt.latest_step()
  if latest is not None:
    # Straight into the current shardings: no throw-away init, whatever mesh wrote it.
    graphdef, state_sh = state_shardings(make_model, tx, mesh=mesh, rules=rules,
                                         sharding_name=config.sharding,
                                         strict=config.strict_sharding)
    state, meta = ckpt.restore(latest, abstract_state(state_sh, make_model, tx))
    start_step, data_state = int(state.step), meta.get("data_state")
    eval_pending = bool(meta.get("eval_pending"))  # Absent in older checkpoints.
    metrics_lib.log(f"resumed from {ckpt.directory} at step {start_step}")
    if job.init_params is not None:
      metrics_lib.log("resuming: config.init_from is not reloaded")
  else:
    with logical.activate(mesh, rules):
      graphdef, state, state_sh = create_train_state(
          make_model, tx, seed=config.seed, mesh=mesh, rules=rules,
          sharding_name=config.sharding,
          strict=config.strict_sharding)
    if job.init_params is not None:
      # Read straight into the shardings the fresh parameters have.
      state = state.replace(params=job.init_params(state.params))

  mix = TaskMix(config.tasks, config.seed)
  loss_fns = job.loss_fns
  train_iter = job.data.train_iterator(
      kind_for_index=BatchKinds(mix, {n: job.batch_kinds[n] for n in mix.names}),
      start_index=start_step)
  if data_state is not None:
    train_iter.set_state(data_state)
  if jax.process_count() > 1:
    # Hosts that disagree here would deadlock in the first collective instead.
    multihost_utils.assert_equal(
        np.array([start_step, len(feed.rows)] + [mix.names.index(mix.task(start_step + i))
                                            for i in range(8)]),
        "processes disagree on the resume step, local batch or task order; do they all "
        "see the same workdir and config?")

  to_global = _to_global(config, mesh, rules, feed)
  compiled: dict[str, Any] = {}
  eval_compiled: dict = {}  # The evaluators' jits, kept for this run only.

  def step_for(task: str, host_batch: dict):
    if task not in compiled:
      fn = step_lib.make_train_step(graphdef, loss_fns[task], tx, schedule,
                                    grad_accum=config.grad_accum)
      compiled[task] = step_lib.jit_train_step(
          fn, state_sh, sharding_lib.batch_shardings(host_batch, mesh, rules), mesh)
    return compiled[task]

  def save(step: int, force: bool = False, eval_pending: bool = False,
           metrics: dict | None = None):
    # eval_pending: this step's evaluation was due but cut short; a resume runs it first.
    # metrics: an evaluated step's `best_metric`, so that the best step is kept.
    meta = {"step": step, "data_state": train_iter.get_state(),
            "config": json.loads(config.to_json_best_effort()),
            "model_info": dict(job.model_info), "eval_pending": eval_pending}
    with interval.timed("checkpoint"):
      ckpt.save(step, state, meta, force=force, metrics=metrics)

  def evaluate(params, step: int) -> dict[str, Any]:
    def to_global_or_stop(host_batch: dict) -> dict:
      # Every eval batch passes here on every process in the same order: the point
      # where a SIGTERM during evaluation is noticed.
      if preemption.should_stop():
        raise preemption_lib.Preempted(step, "evaluation")
      return to_global(host_batch)

    ctx = EvalContext(step=step, config=config, workdir=workdir, graphdef=graphdef,
                      mesh=mesh, rules=rules, to_global=to_global_or_stop, loss_fns=loss_fns,
                      compiled=eval_compiled)
    with interval.timed("eval"):
      out = job.evaluate(params, ctx)
    metrics_lib.write_json(storage.join(workdir, job.eval_file), out)
    eval_writer.write(out)
    metrics_lib.log("eval step {}: ".format(step) + ", ".join(
        f"{k}={v:.2f}" for k, v in out.items() if isinstance(v, float)))
    return out

  def stop(step: int, why: preemption_lib.Preempted, eval_pending: bool):
    if ckpt.latest_step() != step:  # A resumed evaluation stops at a saved step.
      save(step, force=True, eval_pending=eval_pending)
    ckpt.close()
    if jax.process_count() > 1:
      # No process exits (and so no launcher kills the others) before all have saved.
      multihost_utils.sync_global_devices("vlp: pre-emption checkpoint written")
    metrics_lib.log(f"{why}; exiting")
    raise why

  def evaluate_or_stop(step: int) -> dict[str, Any]:
    # A SIGTERM during the evaluation stops the run with this evaluation pending.
    try:
      return evaluate(state.params, step=step)
    except preemption_lib.Preempted as why:
      stop(step, why, eval_pending=True)

  eval_on = config.eval_every > 0  # eval_every <= 0 turns evaluation off.

  def eval_due(step: int) -> bool:
    return eval_on and (step % config.eval_every == 0 or step == config.total_steps)

  writer = metrics_lib.MetricWriter(workdir, tensorboard=config.tensorboard)
  eval_writer = metrics_lib.MetricWriter(workdir, "eval_history.jsonl",
                                         tensorboard=config.tensorboard, tag_prefix="eval/")
  profiler = profiling.StepProfiler(config.profile_steps, workdir)
  peak = flops_lib.peak_flops(mesh.devices.flat[0])
  interval = log_interval.LogInterval(
      batch_size=config.batch_size, total_steps=config.total_steps, start_step=start_step,
      flops_per_example=job.flops_per_example,
      peak_flops=peak * mesh.devices.size if peak else None)
  preemption = Preemption()
  last_eval: dict[str, Any] = {}
  step = start_step
  with (logical.activate(mesh, rules), contextlib.closing(preemption),
        contextlib.closing(profiler), contextlib.closing(writer),
        contextlib.closing(eval_writer)):
    if eval_pending and eval_due(step):
      last_eval = evaluate_or_stop(step)
    while step < config.total_steps:
      task = mix.task(step)
      with interval.timed("data"):
        host_batch = next(train_iter)
        batch = to_global(host_batch)
      profiler.before(step + 1)
      state, metrics = step_for(task, host_batch)(state, batch)
      step += 1
      interval.add_step(task, metrics)  # Device arrays: read at the log step only.
      profiler.after(step, state)
      if step % config.log_every == 0 or step == config.total_steps:
        record = interval.report(step)
        metrics_lib.check_finite(record, step)
        writer.write(record)
        metrics_lib.log(log_interval.progress_line(record, config.total_steps))
      if preemption.should_stop():
        stop(step, preemption_lib.Preempted(step, "training"), eval_pending=eval_due(step))
      evaluated = eval_due(step)
      if evaluated:
        last_eval = evaluate_or_stop(step)
      # After the evaluation: a checkpoint at an eval step means that evaluation ran. An
      # evaluated step with a `best_metric` is saved with it: it may be the best.
      scored = best_score(last_eval, best_metric) if evaluated else None
      if scored is not None:
        save(step, force=True, metrics=scored)
      elif step % config.checkpoint_every == 0 and step != config.total_steps:
        save(step)
    if ckpt.latest_step() != step:
      save(step, force=True)
  if best_metric:
    ckpt.wait()  # The last save is asynchronous: its metrics are readable once written.
    metrics_lib.log(f"best {best_metric}: step {ckpt.best_step()} "
                    "(python -m vlp.evaluate --step=best)")
  ckpt.close()
  return last_eval


def best_score(evaluation: dict[str, Any], metric: str) -> dict[str, float] | None:
  """{metric: value} when `metric` is set and the evaluation has a number for it."""
  value = evaluation.get(metric) if metric else None
  if isinstance(value, (int, float)) and np.isfinite(value):
    return {metric: float(value)}
  return None


def feed_for(config: ml_collections.ConfigDict, mesh, rules) -> Feed:
  """This process's rows of the global batch (from the batch sharding) and the data
  shards (`config.data_shards`, or with 0 the fewest that line up with the rows)."""
  rows = global_batch.process_rows(mesh, rules, config.batch_size)
  shards = int(config.data_shards) or shards_lib.count_for(
      global_batch.row_owners(mesh, rules, config.batch_size))
  return Feed(rows, shards)


def _to_global(config, mesh, rules, feed: Feed):
  def to_global(host_batch: dict) -> dict:
    # Every host feeds the same fraction of each global batch (train, eval, pairs).
    local = len(next(iter(host_batch.values())))
    return global_batch.host_to_global(
        host_batch, mesh, rules, global_size=local * config.batch_size // len(feed.rows))
  return to_global


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: int | str | None = None,
                        job_factory: JobFactory | None = None,
                        devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Restores a checkpoint of `workdir` and runs only the job's evaluation.

  `step`: None (the latest), a step number, or "best" (the step kept for the
  highest `config.best_metric`). The result goes to `WORKDIR/<job.eval_file>`
  (for fine-tuning jobs `eval_<config.eval_split>.json`).
  """
  mesh = mesh_lib.make_mesh(config.mesh, devices)
  rules = sharding_lib.rules_for(config.sharding, mesh)
  feed = feed_for(config, mesh, rules)
  job = (job_factory or jobs.job_factory(config))(config, feed)
  tx, _ = optim.make_optimizer(config.optimizer, config.total_steps,
                               lr_multipliers=job.lr_multipliers)
  ckpt = ckpt_lib.Checkpointer(storage.join(workdir, "checkpoints"),
                               save_every=config.checkpoint_every, keep=config.keep_checkpoints,
                               best_metric=config.best_metric)
  chosen = checkpoint_step(ckpt, step, config.best_metric)
  graphdef, state_sh = state_shardings(job.make_model, tx, mesh=mesh, rules=rules,
                                       sharding_name=config.sharding,
                                       strict=config.strict_sharding)
  state, _ = ckpt.restore(chosen, abstract_state(state_sh, job.make_model, tx))
  ckpt.close()

  ctx = EvalContext(step=int(state.step), config=config, workdir=workdir, graphdef=graphdef,
                    mesh=mesh, rules=rules, to_global=_to_global(config, mesh, rules, feed),
                    loss_fns=job.loss_fns)
  with logical.activate(mesh, rules):
    out = job.evaluate(state.params, ctx)
  metrics_lib.write_json(storage.join(workdir, job.eval_file), out)
  metrics_lib.log(f"evaluated step {ctx.step} -> {storage.join(workdir, job.eval_file)}")
  return out


def checkpoint_step(ckpt: ckpt_lib.Checkpointer, step: int | str | None,
                    best_metric: str) -> int:
  """The step `evaluate_checkpoint` restores: the latest, a number, or "best"."""
  steps = ckpt.all_steps()
  if not steps:
    raise FileNotFoundError(f"no checkpoint under {ckpt.directory}; train first "
                            "(python -m vlp.pretrain / vlp.finetune with this --workdir)")
  if step is None:
    return ckpt.latest_step()
  if step == "best":
    best = ckpt.best_step()
    if best is None:
      raise ValueError(f"--step=best: no checkpoint under {ckpt.directory} was saved with "
                       f"config.best_metric={best_metric!r} (steps: {steps}); set "
                       "best_metric when fine-tuning, or pass a step number")
    return best
  if int(step) not in steps:
    raise ValueError(f"--step={step}: {ckpt.directory} holds steps {steps}")
  return int(step)
