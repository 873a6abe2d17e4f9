"""Fine-tuning jobs (see vlp.train.job): `config.task` picks one."""

from __future__ import annotations

import ml_collections

from vlp.train.job import JobFactory


def job_factory(config: ml_collections.ConfigDict) -> JobFactory:
  """The job factory for `config.task` ('retrieval' | 'vqa' | 'grounding')."""
  # Imported lazily: each job pulls in its own data and evaluator modules.
  if config.task == "retrieval":
    from vlp.downstream.retrieval import make_retrieval_job
    return make_retrieval_job
  if config.task == "vqa":
    from vlp.downstream.vqa import make_vqa_job
    return make_vqa_job
  if config.task == "grounding":
    from vlp.downstream.grounding import make_grounding_job
    return make_grounding_job
  raise ValueError(f"config.task={config.task!r}; expected 'retrieval', 'vqa' or 'grounding'")
