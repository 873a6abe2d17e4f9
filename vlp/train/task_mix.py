"""Which task runs at which step: a pure function of (seed, step).

UNITER draws one task per optimizer update from a pool where each task appears
`mix_ratio` times. Drawing from a generator seeded by (seed, step) alone means
every host picks the same task without any communication, and a resumed run
picks the same tasks as an uninterrupted one.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np


class TaskMix:

  def __init__(self, ratios: Mapping[str, float], seed: int):
    items = [(k, float(v)) for k, v in dict(ratios).items() if float(v) > 0]
    if not items:
      raise ValueError(f"config.tasks has no task with a positive ratio: {dict(ratios)}")
    self.names = [k for k, _ in items]
    weights = np.array([w for _, w in items])
    self.cdf = np.cumsum(weights / weights.sum())
    self.seed = int(seed)

  def task(self, step: int) -> str:
    u = np.random.default_rng([self.seed, 0x7A5C, int(step)]).random()
    return self.names[min(int(np.searchsorted(self.cdf, u, side="right")), len(self.names) - 1)]


class BatchKinds:
  """Batch index -> batch kind ('mlm' | 'mrm' | 'itm') for the input pipeline.

  A picklable callable (grain worker processes receive it), so the pipeline can
  build each step's task batch without knowing anything about tasks.
  """

  def __init__(self, mix: TaskMix, kinds: Mapping[str, str]):
    self.mix = mix
    self.kinds = dict(kinds)

  def __call__(self, index: int) -> str:
    return self.kinds[self.mix.task(index)]


def task_kwargs(config, name: str) -> dict:
  """Hyper-parameters each pretraining objective takes from its config subtree (the
  rest of `config.itm` and `config.mlm` / `config.mrm` shape the batches)."""
  if name == "itm":
    itm = config.itm
    return dict(wra_weight=itm.wra_weight, ot_beta=itm.ot.beta,
                ot_iterations=itm.ot.iterations, ot_k=itm.ot.k, negatives=itm.negatives,
                hard_similarity=itm.hard_similarity)
  return {}


def loss_weights(config, names, known) -> dict[str, float]:
  """Per-task multipliers of the loss (and so of the gradient); 1 where unset.

  With one AdamW state shared by all tasks, a task whose gradients are much smaller
  than the others' moves the weights little: the second-moment estimate is set by
  the large ones. ITM near its chance plateau is such a task on the tiny model
  (gradient norm ~0.05 against ~1-2 for MLM), so the tiny config weights it up.
  """
  weights = dict(config["loss_weights"])
  unknown = sorted(set(weights) - set(known))
  if unknown:
    raise ValueError(f"config.loss_weights names unknown task(s) {unknown}; "
                     f"known: {sorted(known)}")
  bad = {k: v for k, v in weights.items() if not float(v) > 0}
  if bad:
    raise ValueError(f"config.loss_weights must be positive, got {bad}")
  return {n: float(weights.get(n, 1.0)) for n in names}


def weighted(loss_fn: Callable, weight: float) -> Callable:
  """`loss_fn` with its loss scaled by `weight`; its metrics are left unscaled."""
  if weight == 1.0:
    return loss_fn

  def scaled(model, batch, rng):
    loss, metrics = loss_fn(model, batch, rng)
    return loss * weight, metrics

  return scaled
