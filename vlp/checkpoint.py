"""The one module that talks to orbax.

A checkpoint step holds two items: ``state`` (the train state pytree, sharded
arrays) and ``meta`` (JSON: the data-iterator position, the config, the task mix
...). Saves are asynchronous; the save policy is "every N steps, plus whenever
the caller forces one" (end of training, pre-emption). A fine-tuning run may
also keep its best step: saves made right after an evaluation carry that
evaluation's metric, and the step with the highest one is kept beside the latest
`keep` (`best_metric`). Restores always go into an
abstract target whose leaves carry the *current* shardings, which is what lets a
checkpoint written on one mesh load on another (or on a single CPU). Directories
may be on an object store (orbax reaches gs:// through tensorstore and epath).
"""

from __future__ import annotations

from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from vlp import storage


def best_step(step_metrics: dict[int, dict | None], metric: str) -> int | None:
  """The step whose metrics have the highest `metric` (ties: the latest, as orbax's
  `BestN` keeps), or None. Steps without a number for `metric` do not compete.
  """
  scored = [(value, step) for step, m in step_metrics.items()
            if isinstance(value := (m or {}).get(metric), (int, float))]
  return max(scored)[1] if scored else None


class Checkpointer:
  """Periodic, asynchronous checkpoints of (state, meta) under `directory`.

  `best_metric` (e.g. "vqa_acc"; "" = none): besides the latest `keep` steps,
  the step saved with the highest value of that metric (`save(metrics=...)`)
  is kept.
  """

  def __init__(self, directory: str, *, save_every: int, keep: int = 2,
               async_save: bool = True, best_metric: str = ""):
    self.best_metric = best_metric
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.StandardSave, ocp.StandardCheckpointHandler)
    registry.add("state", ocp.args.StandardRestore, ocp.StandardCheckpointHandler)
    registry.add("meta", ocp.args.JsonSave, ocp.JsonCheckpointHandler)
    registry.add("meta", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=checkpoint_managers.FixedIntervalPolicy(max(1, save_every)),
        preservation_policy=checkpoint_managers.AnyPreservationPolicy([
            checkpoint_managers.LatestN(max(1, keep)),
            checkpoint_managers.BestN(get_metric_fn=self._metric, n=1,
                                      keep_checkpoints_without_metrics=False)])
        if best_metric else checkpoint_managers.LatestN(max(1, keep)),
        # With a best_fn orbax writes each step's metrics and reads them back on a
        # restart (the policy above decides what is kept).
        best_fn=self._metric if best_metric else None, best_mode="max",
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self.directory = storage.absolute(directory)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       handler_registry=registry)

  def _metric(self, metrics: dict) -> float:
    """The ranking value of a step's metrics (a step saved under another
    `best_metric` ranks last rather than failing)."""
    value = metrics.get(self.best_metric)
    return float(value) if isinstance(value, (int, float)) else float("-inf")

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._mngr.all_steps())

  def save(self, step: int, state: Any, meta: dict, *, force: bool = False,
           metrics: dict | None = None) -> bool:
    """Saves if the policy says so (or `force`); returns whether a save started.

    `metrics` ({best_metric: number}) makes the step compete for the best one.
    """
    return self._mngr.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        force=force, metrics=metrics)

  def best_step(self) -> int | None:
    """The kept step with the highest `best_metric` (None without one)."""
    if not self.best_metric:
      return None
    return best_step({s: self._mngr.metrics(s) for s in self._mngr.all_steps()},
                     self.best_metric)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restores `step` into `abstract_state` (ShapeDtypeStructs with shardings)."""
    out = self._mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                      meta=ocp.args.JsonRestore()))
    return out["state"], dict(out["meta"] or {})

  def restore_meta(self, step: int) -> dict:
    out = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out["meta"] or {})

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()


def _params_manager(directory: str) -> ocp.CheckpointManager:
  registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
  registry.add("state", ocp.args.PyTreeRestore, ocp.PyTreeCheckpointHandler)
  registry.add("meta", ocp.args.JsonRestore, ocp.JsonCheckpointHandler)
  return ocp.CheckpointManager(storage.absolute(directory), handler_registry=registry,
                               options=ocp.CheckpointManagerOptions(create=False))


def _checked_step(mngr: ocp.CheckpointManager, directory: str, step: int | None) -> int:
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise FileNotFoundError(f"no checkpoint step {'' if step is None else step} in "
                            f"{directory} (steps: {list(mngr.all_steps())})")
  return step


def _stored(mngr: ocp.CheckpointManager, step: int) -> tuple[dict, bool]:
  """(parameter shapes as a nested dict of ShapeDtypeStructs, is a train state)."""
  tree = mngr.item_metadata(step)["state"].tree
  train_state = "params" in tree and "opt_state" in tree

  def shapes(node):
    if isinstance(node, dict):
      return {(int(k) if k.isdigit() else k): shapes(v) for k, v in node.items()}
    return jax.ShapeDtypeStruct(node.shape, node.dtype)
  return shapes(tree["params"] if train_state else tree), train_state


def stored_params(directory: str, step: int | None = None) -> tuple[dict, dict, int]:
  """(parameter shapes, meta, step) of a step of a `Checkpointer` directory; reads
  no array. The shapes are a nested dict of ShapeDtypeStructs (list indices as ints)."""
  mngr = _params_manager(directory)
  try:
    step = _checked_step(mngr, directory, step)
    shapes, _ = _stored(mngr, step)
    meta = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    mngr.close()
  return shapes, dict(meta or {}), step


def restore_params(directory: str, step: int | None = None, *, target: Any = None,
                   sharding: jax.sharding.Sharding | None = None) -> tuple[Any, dict, int]:
  """Restores only the parameters of a step of a `Checkpointer` directory.

  The step's ``state`` item is either a train state (only its ``params`` field is
  read; the optimizer state is never loaded) or a parameter tree on its own (the
  params-only checkpoints of `vlp.pretrained`).

  Args:
    directory: the Checkpointer directory.
    step: default the latest.
    target: a nested dict of ShapeDtypeStructs carrying shardings for some of the
      stored top-level entries: those entries are read straight into those
      shardings and dtypes (on every process, each reading its own shards), the
      others are not read. Default: every entry, with the stored shapes and
      dtypes, on `sharding` (default: the first local device; single process).
    sharding: see `target`.

  Returns:
    (params as a nested dict, list indices as ints; the step's meta; the step).
  """
  mngr = _params_manager(directory)
  try:
    step = _checked_step(mngr, directory, step)
    stored, train_state = _stored(mngr, step)
    if target is None:
      where = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where),
                            stored)
    unknown = sorted(set(target) - set(stored))
    if unknown:
      raise KeyError(f"{directory} step {step} has no parameters {unknown}; "
                     f"it has {sorted(stored)}")
    item = {"params": target} if train_state else target
    args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(
        sharding=s.sharding, global_shape=s.shape, dtype=s.dtype), item)
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item, restore_args=args, partial_restore=True),
        meta=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  state = out["state"]
  return (state["params"] if train_state else state), dict(out["meta"] or {}), step
