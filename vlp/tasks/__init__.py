"""Pre-training and fine-tuning objectives and their registry.

Every task exposes `loss_fn(model, batch, rng) -> (loss, metrics)` (see
docs/design.md) and names the batch kind it consumes. Hyper-parameters are
keyword arguments of the loss functions; `make_loss_fn` binds them from a
config.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable

from vlp.tasks.distill import distill_loss
from vlp.tasks.grounding import grounding_loss
from vlp.tasks.itm import itm_loss
from vlp.tasks.mlm import mlm_loss
from vlp.tasks.mrm import mrc_loss, mrckl_loss, mrfr_loss
from vlp.tasks.retrieval_ft import retrieval_ft_loss
from vlp.tasks.vqa import vqa_loss

LossFn = Callable[..., tuple[Any, dict[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Task:
  """A pre-training or fine-tuning objective.

  Attributes:
    name: task key (also the suffix of its `loss/<name>` metric).
    batch_kind: the batch kind it consumes (a `vlp.data.masking` kind, or
      `vqa` / `re` (`vlp.data.downstream`) or `retrieval` for fine-tuning).
    loss_fn: `loss_fn(model, batch, rng, **hyper_parameters)`.
    record_fields: record fields its targets come from, beyond text and regions
      (MRC and MRC-kl: the detector's `soft_labels`); a job checks its data has them.
  """
  name: str
  batch_kind: str
  loss_fn: LossFn
  record_fields: tuple[str, ...] = ()


TASKS: dict[str, Task] = {
    "mlm": Task("mlm", "mlm", mlm_loss),
    "mrfr": Task("mrfr", "mrm", mrfr_loss),
    "mrc": Task("mrc", "mrm", mrc_loss, record_fields=("soft_labels",)),
    "mrckl": Task("mrckl", "mrm", mrckl_loss, record_fields=("soft_labels",)),
    "itm": Task("itm", "itm", itm_loss),
    # Fine-tuning (docs/design.md "Fine-tuning objectives"); batch kinds name the
    # downstream batches, not `vlp.data.masking` kinds.
    "vqa": Task("vqa", "vqa", vqa_loss),
    "grounding": Task("grounding", "re", grounding_loss),
    "retrieval_ft": Task("retrieval_ft", "retrieval", retrieval_ft_loss),
    "distill": Task("distill", "retrieval", distill_loss),
}

PRETRAINING_TASKS = ("mlm", "mrfr", "mrc", "mrckl", "itm")
FINETUNING_TASKS = ("vqa", "grounding", "retrieval_ft", "distill")


def make_loss_fn(name: str, **task_kwargs: Any) -> LossFn:
  """`TASKS[name].loss_fn` with hyper-parameters bound.

  Args:
    name: a key of `TASKS`.
    **task_kwargs: keyword hyper-parameters of that loss (e.g. `wra_weight`).

  Returns:
    `loss_fn(model, batch, rng) -> (loss, metrics)`.

  Raises:
    KeyError: unknown task.
    TypeError: a keyword the loss does not take (checked here, not at step 1).
  """
  if name not in TASKS:
    raise KeyError(f"unknown task {name!r}; known: {sorted(TASKS)}")
  fn = TASKS[name].loss_fn
  if not task_kwargs:
    return fn
  known = [k for k, p in inspect.signature(fn).parameters.items()
           if p.kind == inspect.Parameter.KEYWORD_ONLY]
  unknown = [k for k in task_kwargs if k not in known]
  if unknown:
    raise TypeError(f"task {name!r} takes no hyper-parameter(s) {unknown}; "
                    f"known: {known}")
  return functools.partial(fn, **task_kwargs)
