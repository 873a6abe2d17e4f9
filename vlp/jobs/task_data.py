"""Train and eval data of the VQA and grounding jobs (one process's share).

Wraps `vlp.data.downstream` (which reads either record layout: the
image-level `vlp_scenes` records with `questions` / `refexps`, or the
per-example records of `vqa_v2` and `refcoco` / `refcoco_plus` / `refcocog`) the
way `vlp.jobs.pair_data` wraps the pair pipeline: the global batch is cut into
data shards (`vlp.data.shards`), a process builds the shards its devices hold,
and the resumable position is the batch index. The tokenizer is resolved by
`vlp.jobs.data_setup.tokenizer_path`.

VQA `config.data` may list several splits and datasets of per-example records,
`NAME[/BUILD][:SPLIT+SPLIT],...` (the `vlp.data.mixture` syntax without weights),
e.g. `vqa_v2:train+restval,vg_qa:train`: their questions are read as one list, as
the reference concatenates its VQA training sets; validation, the answer
vocabulary and the tokenizer come from the first dataset.
"""

from __future__ import annotations

import functools
import os

import ml_collections

from vlp.data import downstream, shards as shards_lib, staging, vqa_targets
from vlp.data.batching import BatchSpec
from vlp.jobs import data_setup
from vlp.jobs.base import Feed


class TaskData:
  """`task` is 'vqa' or 're' (the batch kinds of vlp.data.downstream).

  Attributes:
    builder, tokenizer, answers (VQA answer list, label = position; None for RE).
    layout: 'images' (vlp_scenes) or 'examples' (vqa_v2, refcoco builders).
  """

  def __init__(self, config: ml_collections.ConfigDict, feed: Feed, task: str):
    self.config, self.task = config, task
    self.num_shards = feed.num_shards
    self.shards = shards_lib.shards_for_rows(feed.rows, config.batch_size, self.num_shards)
    if task == "vqa":  # VQA trains on a list of splits and datasets; RE on one split.
      self.parts = _vqa_parts(config)
      self.builder = self.parts[0][1]  # validation, answers and tokenizer: the first's
    else:
      self.builder = data_setup.open_builder(config)
      self.parts = [(data_setup.single_part(config), self.builder)]
    self.tokenizer = data_setup.open_tokenizer(config, self.builder,
                                                init_from=config.init_from)
    self.layout = downstream.layout(self.builder, task)
    self.answers = self._answers() if task == "vqa" else None
    self.spec = BatchSpec.from_config(config, config.batch_size // self.num_shards)
    self._eval: dict = {}

  def _answers(self) -> list[str]:
    """`config.answer_vocab` (e.g. UNITER's ans2label.json) or the data's own list."""
    path = self.config.answer_vocab  # A VQA key: only that job asks.
    if not path:
      return downstream.answer_vocab(self.builder)
    try:
      return vqa_targets.read_answer_vocab(path)
    except (OSError, ValueError) as e:
      raise ValueError(f"config.answer_vocab={path!r}: {e}") from e

  def train_iterator(self, kind_for_index=None, start_index: int = 0):
    del kind_for_index  # One batch kind per fine-tuning job.
    if self.task == "vqa" and self.layout == "examples":
      name = ",".join(f"{b.info.name}/{b.builder_config.name}:{'+'.join(p.splits)}"
                      for p, b in self.parts)
      its = [downstream.make_task_mixture_iterator(
          [(b, p.splits) for p, b in self.parts], self.spec, task=self.task,
          tokenizer=self.tokenizer, seed=self.config.seed, process_index=shard,
          process_count=self.num_shards, start_index=start_index, answers=self.answers,
          worker_count=self.config.data_workers, name=name)
             for shard in self.shards]
      return its[0] if len(its) == 1 else shards_lib.ShardedIterator(its)
    if len(self.parts) > 1 or self.parts[0][0].splits != ("train",):
      raise ValueError(f"config.data={self.config.data!r}: {self.builder.info.full_name} "
                       "(image-level records) trains on its 'train' split alone")
    its = [downstream.make_task_train_iterator(
        self.builder, self.spec, task=self.task, tokenizer=self.tokenizer,
        seed=self.config.seed, process_index=shard, process_count=self.num_shards,
        start_index=start_index, answers=self.answers, worker_count=self.config.data_workers)
           for shard in self.shards]
    return its[0] if len(its) == 1 else shards_lib.ShardedIterator(its)

  def eval_dataset(self, split: str, rows, builder=None):
    """The eval batches of `split` (of `builder`, default the main data) that this
    process feeds: `rows` (`eval_batches.EvalRows`) cuts each global eval batch into one
    data shard per batch piece, so the batches do not depend on the process count
    or the device order. Indexed once, then reused by every evaluation."""
    builder = builder or self.builder
    key = (os.fspath(builder.data_dir), split, rows.size, tuple(rows.rows))
    if key not in self._eval:
      shards = shards_lib.shards_for_rows(rows.rows, rows.size, rows.pieces)
      self._eval[key] = downstream.make_task_eval_dataset(
          builder, BatchSpec.from_config(self.config, rows.size // rows.pieces),
          task=self.task, tokenizer=self.tokenizer, split=split, shards=shards,
          num_shards=rows.pieces, answers=self.answers)
    return self._eval[key]

  @functools.cached_property
  def det_builder(self):
    """The build named by `config.det_data_dir` (the same dataset with detector
    regions, for the RefCOCO "det" setting), or None."""
    det_dir = self.config.det_data_dir  # A grounding key: only that job asks.
    if not det_dir:
      return None
    if self.layout != "examples":
      raise ValueError(f"config.det_data_dir is for the refcoco builders; config.data="
                       f"{self.config.data!r} has no detected-region build")
    return staging.stage(
        lambda d: data_setup.prepared_builder(self.config, d, "det_data_dir", any_build=True),
        det_dir, self.config.data_cache_dir)


def _vqa_parts(config: ml_collections.ConfigDict):
  """`[(part, builder)]` of the VQA training data (module doc); weights are refused,
  since the parts are read as one list of questions."""
  parts = data_setup.open_mixture(config)
  weighted = [p.name for p, _ in parts if p.weight != 1]
  if weighted:
    raise ValueError(f"config.data={config.data!r}: the VQA job reads its datasets as one "
                     f"list of questions (each once per epoch, as the reference); drop the "
                     f"weights of {weighted}")
  return parts
