"""Jobs: what a run trains and evaluates, chosen by `config.job`.

| job       | data                  | model                | evaluation                      |
|-----------|-----------------------|----------------------|---------------------------------|
| pretrain  | image-caption pairs   | UniterForPretraining | MLM/ITM accuracy, zero-shot R@K |
| retrieval | image-caption pairs   | UniterForRetrieval   | full, dual and two-stage R@K    |
| vqa       | questions per image   | UniterForVqa         | official VQA accuracy           |
| grounding | expressions per image | UniterForGrounding   | accuracy at IoU >= 0.5          |
| matching  | image-caption pairs   | MatchingModel        | full, dual and two-stage R@K    |

Every job follows `vlp.jobs.base.Job`; the loop (`vlp.train.loop`) runs any of
them the same way. The dual-encoder distillation (ALADIN's second stage) is the
retrieval job with the `distill` objective and a frozen backbone
(configs/finetune_retrieval.py:stage=dual).
"""

from __future__ import annotations

import importlib

import ml_collections

from vlp.jobs.base import JobFactory

# job name -> (module, factory); imported on use: each pulls in its own data and
# evaluator modules.
JOBS = {
    "pretrain": ("vlp.jobs.pretrain", "make_pretrain_job"),
    "retrieval": ("vlp.jobs.retrieval", "make_retrieval_job"),
    "vqa": ("vlp.jobs.vqa", "make_vqa_job"),
    "grounding": ("vlp.jobs.grounding", "make_grounding_job"),
    "matching": ("vlp.jobs.matching", "make_matching_job"),
}


def job_factory(config: ml_collections.ConfigDict) -> JobFactory:
  """The factory of the job `config.job` names."""
  if config.job not in JOBS:
    raise ValueError(f"config.job={config.job!r}; expected one of {sorted(JOBS)}")
  module, name = JOBS[config.job]
  return getattr(importlib.import_module(module), name)
