"""The fine-tuning keys shared by configs/finetune_*.py (loaded by path).

Each fine-tuning config starts from the shared keys of its size (configs/base.py),
so data, model, mesh and sharding keys mean what they mean in pretraining, then
sets the job, its objective mix, schedule and evaluation split; the pretraining
objectives' keys (`mlm`, `mrm`, `itm`, `loss_weights`, `eval_batches`) are not
there. For the base size the numbers are the UNITER reference's fine-tuning
configs (docs/reference.md, "Fine-tuning"); `tiny` sizes are vlp's CPU demo.
"""

import os

import ml_collections

from vlp import config_lib


def finetune_config(size: str, data: str, *, job: str, tasks: dict, eval_split: str,
                    lr: float, steps: int, warmup: int, batch_size: int,
                    clip_scale: float = 1.0, eval_every: int = 0, best_metric: str = ""
                    ) -> ml_collections.ConfigDict:
  """The shared fine-tuning keys; the schedule arguments are the base size's.

  `clip_scale`: the reference's GPUs x accumulation steps (vlp/train/optim.py);
  `eval_every`: 0 = at the end only; `best_metric`: the validation metric whose best
  step is kept (`vlp.evaluate --step=best`). Tiny keeps scale 1 and one evaluation.
  """
  tiny = size == "tiny"
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.load_config_file(f"{here}/base.py:size={size},data={data}")
  c.job = job  # vlp.jobs: what this run trains and evaluates.
  # A pretraining workdir, a `vlp.export` directory or a `vlp.tools.import_uniter`
  # directory; empty = train from scratch.
  c.init_from = ""
  c.tasks = ml_collections.ConfigDict(tasks)
  c.eval_split = eval_split
  c.total_steps = 200 if tiny else steps
  c.batch_size = 64 if tiny else batch_size
  # At the end (and through `python -m vlp.evaluate`), and every `eval_every` steps
  # where a validation metric picks the best step.
  c.eval_every = eval_every if eval_every and not tiny else c.total_steps
  c.best_metric = best_metric
  c.checkpoint_every = c.total_steps if tiny else 1000
  c.log_every = 20 if tiny else 100
  c.optimizer.learning_rate = 5e-4 if tiny else lr
  c.optimizer.warmup_steps = 20 if tiny else warmup
  c.optimizer.grad_clip = 2.0  # The reference clips at 2.0 in every fine-tuning config.
  c.optimizer.clip_scale = 1.0 if tiny else clip_scale
  return c
