"""What a training run is made of, apart from the loop itself.

`vlp.train.loop.train_and_evaluate` owns everything every run shares: the mesh,
sharded init or restore, jitted steps, the task per step from (seed, step),
checkpoints, pre-emption, metrics and progress. A :class:`Job` supplies the rest:
the data, the model, the objectives and the evaluation. Pretraining
(`vlp.train.pretrain_job`) and each fine-tuning task (`vlp.downstream`) are jobs,
so fine-tuning gets the same sharding, resume and logging as pretraining.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import ml_collections
import numpy as np
from jax.sharding import Mesh


@dataclasses.dataclass(frozen=True)
class EvalContext:
  """What an evaluator needs from the running loop."""
  step: int
  config: ml_collections.ConfigDict
  workdir: str
  graphdef: Any
  mesh: Mesh
  rules: Any
  to_global: Callable[[dict], dict]  # Host rows of a global batch -> global arrays.
  loss_fns: Mapping[str, Callable]


@dataclasses.dataclass
class Job:
  """The parts of a run that differ between pretraining and fine-tuning.

  Attributes:
    data: has `train_iterator(kind_for_index, start_index)` returning an iterator
      of host batches with `get_state()` / `set_state()`, and `tokenizer`.
    make_model: `make_model(rngs=...) -> nnx.Module` (stateless: Params only).
    loss_fns: task name -> `loss_fn(model, batch, rng) -> (loss, metrics)`.
    batch_kinds: task name -> the batch kind the input pipeline builds for it.
    evaluate: `evaluate(params, ctx) -> dict` of JSON-able metrics.
    init_params: optional `init_params(params) -> params` applied to freshly
      created parameters (not on resume), e.g. loading `config.init_from`.
    eval_file: name of the JSON file in the workdir that gets the last evaluation.
    model_info: JSON-able facts stored with every checkpoint (model config,
      tokenizer path, heads) so that `vlp.export` can rebuild the model.
    lr_multipliers: top-level module name -> learning-rate factor (e.g. the
      VQA head's 10x).
  """
  data: Any
  make_model: Callable[..., Any]
  loss_fns: Mapping[str, Callable]
  batch_kinds: Mapping[str, str]
  evaluate: Callable[[Any, EvalContext], dict]
  init_params: Callable[[Any], Any] | None = None
  eval_file: str = "eval.json"
  model_info: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  lr_multipliers: Mapping[str, float] = dataclasses.field(default_factory=dict)


# A job factory: (config, rows this process feeds) -> Job.
JobFactory = Callable[[ml_collections.ConfigDict, np.ndarray], Job]
