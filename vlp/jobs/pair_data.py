"""Image-caption pair data of one process: pretraining and retrieval fine-tuning.

Hands out the train iterator of this process's data shards (`vlp.data.shards`)
over the datasets and splits `config.data` mixes (`vlp.data.mixture`), fixed
validation batches per batch kind, and the retrieval gallery (these two from the
first dataset of the mixture).
"""

from __future__ import annotations

import functools

import ml_collections

from vlp.data import pipeline, shards as shards_lib
from vlp.data.batching import BatchSpec
from vlp.jobs import data_setup
from vlp.jobs.base import Feed


class PairData:
  """Train iterator, validation batches and retrieval gallery for one process.

  `feed` says which rows of the global batch this process feeds and into how
  many data shards the batch is cut; the rows decide which shards it builds.
  `masked`: batches of the kinds 'mlm', 'mrm' and 'itm' as the pretraining
  config's objectives set them up (`config.mlm`, `config.mrm`, `config.itm`);
  False (the retrieval job) serves matched pairs only. `init_from`: the model
  (`config.init_from`) whose tokenizer the run uses (`data_setup.resolve_tokenizer`).
  """

  def __init__(self, config: ml_collections.ConfigDict, feed: Feed, *, masked: bool = True,
               init_from: str = ""):
    self.config = config
    self.num_shards = feed.num_shards
    self.shards = shards_lib.shards_for_rows(feed.rows, config.batch_size, self.num_shards)
    self.parts = data_setup.open_mixture(config)
    self.builder = self.parts[0][1]  # validation and the gallery: the first dataset's
    self.tokenizer = data_setup.open_tokenizer(config, self.builder, init_from=init_from)
    self.spec = BatchSpec.from_config(config, config.batch_size // self.num_shards,
                                      masked=masked)
    # What the stream reads, as resolved (builds and weights), kept in its state.
    self.name = ",".join(f"{b.info.name}/{b.builder_config.name}:{'+'.join(p.splits)}"
                         f"={p.weight:g}" for p, b in self.parts)

  def lacking(self, field: str) -> list[str]:
    """The datasets and splits of the train data whose records lack `field`
    (e.g. `soft_labels`, the detector class distributions of MRC / MRC-kl)."""
    return [f"{b.info.full_name}:{'+'.join(p.splits)} ({b.data_dir})" for p, b in self.parts
            if field not in b.info.features]

  def train_iterator(self, kind_for_index, start_index: int = 0):
    its = [pipeline.make_mixture_iterator(
        [(b, p.splits, p.weight) for p, b in self.parts], self.spec,
        tokenizer=self.tokenizer, kind_for_index=kind_for_index, seed=self.config.seed,
        process_index=shard, process_count=self.num_shards, start_index=start_index,
        worker_count=self.config.data_workers, name=self.name)
           for shard in self.shards]
    return its[0] if len(its) == 1 else shards_lib.ShardedIterator(its)

  @functools.lru_cache(maxsize=None)
  def eval_batches(self, kind: str) -> list[dict]:
    """The first `config.eval_batches` validation batches of `kind` (fixed masks).

    Every shard has the same number of batches (short ones are padded with
    `example_mask` False), so every process runs the same number of eval steps.
    """
    ds = pipeline.make_eval_dataset(
        self.builder, self.spec, tokenizer=self.tokenizer, split="val", unit="pairs",
        kind=kind, seed=self.config.seed + 1, shards=self.shards, num_shards=self.num_shards)
    # `example_index` is a host field; validation losses send every key to the devices.
    return [{k: v for k, v in ds[i].items() if k != "example_index"}
            for i in range(min(len(ds), self.config.eval_batches))]

  @functools.lru_cache(maxsize=None)
  def gallery(self) -> dict:
    return pipeline.load_retrieval_gallery(
        self.builder, self.spec, tokenizer=self.tokenizer, split=self.config.eval_split,
        max_images=self.config.eval_gallery_images or None)
