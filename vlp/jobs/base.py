"""The one protocol every job follows, and what the loop hands it.

`vlp.train.loop.train_and_evaluate` owns everything every run shares: the mesh,
sharded init or restore, jitted steps, the task per step from (seed, step),
checkpoints, pre-emption, metrics and progress. A `Job` supplies the rest: the
data, the model, the objectives, the initialisation and the evaluation.
Pretraining and each fine-tuning task are jobs (`vlp.jobs`, chosen by
`config.job`), so fine-tuning gets the same sharding, resume and logging as
pretraining, and the loop never asks which job it runs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping, Protocol

import ml_collections
import numpy as np
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class Feed:
  """What one process feeds of every global train batch.

  Attributes:
    rows: its rows of the global batch, sorted (`global_batch.process_rows`).
    num_shards: into how many data shards the global batch is cut
      (`vlp.data.shards`); the rows decide which shards the process builds.
  """
  rows: np.ndarray
  num_shards: int

  @classmethod
  def whole(cls, batch_size: int) -> "Feed":
    """One process feeding the whole batch as one shard (tests, single host)."""
    return cls(np.arange(batch_size), 1)


class TrainIterator(Protocol):
  """Host batches of one process, resumable to the batch."""

  def __next__(self) -> dict: ...
  def get_state(self) -> dict: ...
  def set_state(self, state: dict) -> None: ...


class JobData(Protocol):
  tokenizer: Any

  def train_iterator(self, kind_for_index: Callable[[int], str | None],
                     start_index: int = 0) -> TrainIterator: ...


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What an evaluator needs from the running loop.

  `jit(key, make)` returns `make()` compiled once per run (keyed by `key`): the
  cache lives as long as the run, not the process. Every eval batch goes through
  `to_global`, on every process in the same order; in a training run it raises
  `vlp.parallel.preemption.Preempted` there after a SIGTERM, so evaluators must
  let exceptions through (no broad `except`).
  """
  step: int
  config: ml_collections.ConfigDict
  workdir: str
  graphdef: Any
  mesh: Mesh
  rules: Any
  to_global: Callable[[dict], dict]  # Host rows of a global batch -> global arrays.
  loss_fns: Mapping[str, Callable]
  compiled: dict = dataclasses.field(default_factory=dict)

  def jit(self, key: Any, make: Callable[[], Callable]) -> Callable:
    if key not in self.compiled:
      self.compiled[key] = make()
    return self.compiled[key]


@dataclasses.dataclass(frozen=True)
class Job:
  """The parts of a run that differ between jobs.

  Attributes:
    data: the train data of this process (`JobData`).
    make_model: `make_model(rngs=...) -> nnx.Module` (stateless: Params only).
    loss_fns: task name -> `loss_fn(model, batch, rng) -> (loss, metrics)`.
    batch_kinds: task name -> the batch kind the input pipeline builds for it.
    evaluate: `evaluate(params, ctx) -> dict` of JSON-able metrics.
    init_params: optional `init_params(params) -> params` applied to freshly
      created (sharded) parameters, not on resume, e.g. loading `config.init_from`.
    eval_file: name of the JSON file in the workdir that gets the last evaluation.
    model_info: JSON-able facts stored with every checkpoint (model config,
      tokenizer path, heads) so that `vlp.export` can rebuild the model.
    lr_multipliers: top-level module name -> learning-rate factor (e.g. the
      VQA head's 10x).
    flops_per_example: task name -> model FLOPs of one training example
      (`vlp.train.flops`), for the MFU in the logs; a task left out gets none.
  """
  data: JobData
  make_model: Callable[..., Any]
  loss_fns: Mapping[str, Callable]
  batch_kinds: Mapping[str, str | None]
  evaluate: Callable[[Any, EvalContext], dict]
  init_params: Callable[[Any], Any] | None = None
  eval_file: str = "eval.json"
  model_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  lr_multipliers: Mapping[str, float] = dataclasses.field(default_factory=dict)
  flops_per_example: Mapping[str, float] = dataclasses.field(default_factory=dict)


# A job factory: (config, what this process feeds) -> Job.
JobFactory = Callable[[ml_collections.ConfigDict, Feed], Job]


def init_params_fn(config: ml_collections.ConfigDict, model_cfg,
                   after: Callable[[dict, dict], dict] | None = None):
  """`Job.init_params` loading `config.init_from` (None when it is empty) straight
  into the shardings of the fresh parameters.

  `after(params, report)` may fix up heads, e.g. the retrieval head copied from
  the pre-trained ITM head when the checkpoint has no retrieval head; it runs
  under jit into the same shardings, so it works on arrays that span processes.
  """
  if not config.init_from:
    return None

  def init(params):
    import jax
    from vlp import pretrained  # Only when needed: it pulls in orbax.
    merged, report = pretrained.init_params_from(params, config.init_from, model_cfg)
    if after is None:
      return merged
    shardings = jax.tree.map(lambda x: x.sharding, params)
    return jax.jit(lambda p: after(p, report), out_shardings=shardings)(merged)
  return init


def model_info(model_cls, model_cfg, tokenizer, **heads: Any) -> dict:
  """`Job.model_info` of a model class, its config, tokenizer and head options.

  The tokenizer's file and case handling are what `init_from` of a later run (and
  `vlp.export`) read back, so the tokenizer follows the checkpoint."""
  return {"model_class": model_cls.__name__, "model_config": dataclasses.asdict(model_cfg),
          "tokenizer": tokenizer.path, "tokenizer_lowercase": tokenizer.lowercase, **heads}
