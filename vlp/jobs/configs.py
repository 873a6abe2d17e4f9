"""Fine-tuning config keys shared by configs/finetune_*.py.

Each fine-tuning config starts from the pretraining config of the same size
(configs/uniter_base.py), so data, model, mesh and sharding keys mean the same,
then sets the task, its objective mix, evaluation and optimizer. For the base size
the numbers are the UNITER reference's fine-tuning configs (docs/reference.md,
"Fine-tuning"); `tiny` sizes are vlp's CPU demo.
"""

from __future__ import annotations

import ml_collections


def add_finetune_keys(c: ml_collections.ConfigDict, *, task: str, tiny: bool,
                      tasks: dict, eval_split: str, lr: float, steps: int, warmup: int,
                      batch_size: int) -> ml_collections.ConfigDict:
  c.job = task
  # A pretraining workdir, a `vlp.export` directory or a `vlp.tools.import_uniter`
  # directory; empty = train from scratch.
  c.init_from = ""
  c.tasks = ml_collections.ConfigDict(tasks)
  c.eval_split = eval_split
  c.total_steps = 200 if tiny else steps
  c.batch_size = 64 if tiny else batch_size
  c.eval_every = c.total_steps  # At the end (and through `python -m vlp.evaluate`).
  c.checkpoint_every = c.total_steps if tiny else 1000
  c.log_every = 20 if tiny else 100
  c.optimizer.learning_rate = 5e-4 if tiny else lr
  c.optimizer.warmup_steps = 20 if tiny else warmup
  c.optimizer.grad_clip = 2.0  # The reference clips at 2.0 in every fine-tuning config.
  return c
