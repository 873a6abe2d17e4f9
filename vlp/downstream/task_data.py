"""Train and eval data of the VQA and grounding jobs (one process's share).

Wraps `vlp.data.downstream_batches` the way `vlp.train.pretrain_data` wraps the
pretraining pipeline: the global batch is cut into data shards, a process builds
the shards its devices hold, and the resumable position is the batch index.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from vlp.data import downstream_batches, scenes
from vlp.downstream import common
from vlp.train import pretrain_data


class TaskData:
  """`task` is 'vqa' or 're' (the batch kinds of vlp.data.downstream_batches)."""

  def __init__(self, config: ml_collections.ConfigDict, rows: np.ndarray, task: str):
    self.config, self.task = config, task
    self.num_shards = int(config.get("data_shards") or jax.process_count())
    self.shards = pretrain_data.shards_for_rows(rows, config.batch_size, self.num_shards)
    self.builder, self.tokenizer = common.open_data(config)
    self.answers = scenes.answer_vocab(self.builder) if task == "vqa" else None
    self.spec = common.batch_spec(config, config.batch_size // self.num_shards)

  def train_iterator(self, kind_for_index=None, start_index: int = 0):
    del kind_for_index  # One batch kind per fine-tuning job.
    its = [downstream_batches.make_task_train_iterator(
        self.builder, self.spec, task=self.task, tokenizer=self.tokenizer,
        seed=self.config.seed, process_index=shard, process_count=self.num_shards,
        start_index=start_index, answers=self.answers, worker_count=self.config.data_workers)
           for shard in self.shards]
    return its[0] if len(its) == 1 else pretrain_data.ShardedIterator(its)

  def eval_dataset(self, split: str, local_batch: int):
    return downstream_batches.make_task_eval_dataset(
        self.builder, common.batch_spec(self.config, local_batch), task=self.task,
        tokenizer=self.tokenizer, split=split, process_index=jax.process_index(),
        process_count=jax.process_count(), answers=self.answers)
