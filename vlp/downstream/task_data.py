"""Train and eval data of the VQA and grounding jobs (one process's share).

Wraps `vlp.data.downstream_records` (which reads either record layout: the
image-level `vlp_scenes` records with `questions` / `refexps`, or the
per-example records of `vqa_v2` and `refcoco` / `refcoco_plus` / `refcocog`) the
way `vlp.train.pretrain_data` wraps the pretraining pipeline: the global batch
is cut into data shards, a process builds the shards its devices hold, and the
resumable position is the batch index.

Tokenizer: `config.tokenizer`, else the `spm.model` stored with the data
(vlp_scenes, Karpathy builds), else the one the `config.init_from` model was
trained with (a pretrained directory's tokenizer file, or the `model_info` of a
training workdir's checkpoint). The real VQA / RefCOCO builds store none.
"""

from __future__ import annotations

import functools
import os

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from vlp.data import downstream_records, scenes
from vlp.data.batching import BatchSpec
from vlp.data.tokenizer import Tokenizer
from vlp.train import pretrain_data


def tokenizer_path(config: ml_collections.ConfigDict, builder) -> str:
  """The sentencepiece model for `config` (module doc: where it is looked for)."""
  if config.tokenizer:
    return config.tokenizer
  if config.data == "vlp_scenes":
    return scenes.tokenizer_path(builder)
  stored = os.path.join(os.fspath(builder.data_dir), "spm.model")
  if os.path.exists(stored):
    return stored
  from vlp import pretrained  # Only when needed: it pulls in orbax.
  from_init = pretrained.tokenizer_of(config.init_from) if config.init_from else None
  if from_init:
    return from_init
  raise FileNotFoundError(
      f"config.data={config.data!r} ({builder.data_dir}) stores no tokenizer (spm.model)"
      + (f" and config.init_from={config.init_from!r} names none"
         if config.init_from else " and config.init_from is empty")
      + "; set config.tokenizer to the sentencepiece model the backbone was pretrained "
      "with (e.g. the spm.model of the coco_karpathy build)")


class TaskData:
  """`task` is 'vqa' or 're' (the batch kinds of vlp.data.downstream_batches).

  Attributes:
    builder, tokenizer, answers (VQA answer list, label = position; None for RE).
    layout: 'images' (vlp_scenes) or 'examples' (vqa_v2, refcoco builders).
  """

  def __init__(self, config: ml_collections.ConfigDict, rows: np.ndarray, task: str):
    self.config, self.task = config, task
    self.num_shards = int(config.get("data_shards") or jax.process_count())
    self.shards = pretrain_data.shards_for_rows(rows, config.batch_size, self.num_shards)
    self.builder = pretrain_data.open_builder(config)
    self.tokenizer = Tokenizer(tokenizer_path(config, self.builder))
    self.layout = downstream_records.layout(self.builder, task)
    self.answers = None
    if task == "vqa":
      self.answers = (scenes.answer_vocab(self.builder) if self.layout == "images"
                      else downstream_records.answer_vocab(self.builder))
    self.spec = BatchSpec.from_config(config, config.batch_size // self.num_shards)
    self._eval: dict = {}

  def train_iterator(self, kind_for_index=None, start_index: int = 0):
    del kind_for_index  # One batch kind per fine-tuning job.
    its = [downstream_records.make_task_train_iterator(
        self.builder, self.spec, task=self.task, tokenizer=self.tokenizer,
        seed=self.config.seed, process_index=shard, process_count=self.num_shards,
        start_index=start_index, answers=self.answers, worker_count=self.config.data_workers)
           for shard in self.shards]
    return its[0] if len(its) == 1 else pretrain_data.ShardedIterator(its)

  def eval_dataset(self, split: str, rows, builder=None):
    """The eval batches of `split` (of `builder`, default the main data) that this
    process feeds: `rows` (`common.EvalRows`) cuts each global eval batch into one
    data shard per batch piece, so the batches do not depend on the process count
    or the device order. Indexed once, then reused by every evaluation."""
    builder = builder or self.builder
    key = (os.fspath(builder.data_dir), split, rows.size, tuple(rows.rows))
    if key not in self._eval:
      shards = pretrain_data.shards_for_rows(rows.rows, rows.size, rows.pieces)
      self._eval[key] = downstream_records.make_task_eval_dataset(
          builder, BatchSpec.from_config(self.config, rows.size // rows.pieces),
          task=self.task, tokenizer=self.tokenizer, split=split, shards=shards,
          num_shards=rows.pieces, answers=self.answers)
    return self._eval[key]

  @functools.cached_property
  def det_builder(self):
    """The build named by `config.det_data_dir` (the same dataset with detector
    regions, for the RefCOCO "det" setting), or None."""
    det_dir = self.config.get("det_data_dir", "")
    if not det_dir:
      return None
    if self.layout != "examples":
      raise ValueError(f"config.det_data_dir is for the refcoco builders; config.data="
                       f"{self.config.data!r} has no detected-region build")
    try:
      builder = tfds.builder(self.config.data, data_dir=det_dir)
    except Exception as e:  # tfds raises several types for unknown names.
      raise ValueError(f"config.det_data_dir={det_dir!r}: no {self.config.data!r} build there "
                       f"({e})") from e
    if not builder.is_prepared():
      raise FileNotFoundError(f"config.det_data_dir={det_dir!r}: {self.config.data!r} is not "
                              "prepared there (build it with `python -m vlp.data.prepare` "
                              "from detector features)")
    return builder
