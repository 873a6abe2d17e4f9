r"""Benchmark the jitted train step of each task, or the input pipeline alone.

  python -m vlp.bench --config=configs/uniter_base.py --config.compute_dtype=bfloat16 \
      --config.batch_size=128 --config.max_text_len=40
  python -m vlp.bench --config=configs/uniter_base.py:tiny --config.batch_size=32 --steps=5
  # Masked batches of the config's shapes per second (read, tokenise, pad, mask).
  python -m vlp.bench --config=configs/uniter_base.py --config.batch_size=128 \
      --config.max_text_len=40 --input_only [--input_mixture] [--input_soft_labels]
  # All-pairs scoring of a matching config's gallery (default COCO-5K: 5000 images x
  # 25000 captions, 36 regions, 32 tokens, D = the model width), blocks of
  # config.matching.eval_chunk on config.mesh; one JSON line per similarity.
  python -m vlp.bench --config=configs/matching.py:size=base --similarity_bench=scan_t2i,max_sum
  python -m vlp.bench --config=configs/matching.py --similarity_bench=scan_t2i \
      --bench_images=1000 --bench_texts=5000   # a slice, on CPU

Shapes (batch, text length, regions, feature size, prediction slots), model, mesh
and sharding come from the pretraining config, as in `vlp.pretrain`. Each run
prints one JSON line. The similarity benchmark is `vlp.matching.score_bench`.
"""

import json
import os

from absl import app, flags

from vlp import entry

_CONFIG = entry.config_flag()
_TASKS = flags.DEFINE_list("tasks", None, "Tasks to time (default: those of config.tasks).")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per task.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the size's default).")
_INPUT_ONLY = flags.DEFINE_bool("input_only", False, "Time the input pipeline only: reading, "
                                "tokenising, padding and masking batches of the config.")
_INPUT_DIR = flags.DEFINE_string("input_data_dir", "/tmp/vlp_input_bench",
                                 "Where --input_only builds its fixture datasets (once per "
                                 "region count, feature size and soft-label classes).")
_INPUT_SECONDS = flags.DEFINE_float("input_seconds", 10.0, "Timed seconds (--input_only).")
_INPUT_MIXTURE = flags.DEFINE_bool("input_mixture", False, "With --input_only: read a 1:1 "
                                   "mixture of two datasets (coco_karpathy and "
                                   "flickr30k_karpathy fixtures) instead of one.")
_INPUT_SOFT_LABELS = flags.DEFINE_bool("input_soft_labels", False, "With --input_only: "
                                       "records carry config.num_region_classes soft labels "
                                       "(as UNITER's image DBs), not none (as BUTD TSVs).")

_SIM_BENCH = flags.DEFINE_list("similarity_bench", None, "Similarities to time "
                               "(vlp.matching.similarities names) with a matching config: "
                               "score_matrix over --bench_images x --bench_texts pairs. The "
                               "config's matching.similarity takes its similarity_args; "
                               "others their defaults.")
_BENCH_IMAGES = flags.DEFINE_integer("bench_images", 5000, "Gallery images (COCO-5K: 5000).")
_BENCH_TEXTS = flags.DEFINE_integer("bench_texts", 25000, "Gallery captions (COCO-5K: 25000).")
_BENCH_REGIONS = flags.DEFINE_integer("bench_regions", 36, "Regions per image.")
_BENCH_TOKENS = flags.DEFINE_integer("bench_tokens", 32, "Tokens per caption.")
_BENCH_DIM = flags.DEFINE_integer("bench_dim", 0, "State width (0: the config's model width).")


def _similarity_bench(config) -> list[dict]:
  from vlp.matching import score_bench
  from vlp.matching.model import parse_args
  from vlp.models.uniter_config import model_config
  from vlp.parallel.mesh import make_mesh
  dim = (_BENCH_DIM.value or config.model.hidden_size
         or model_config(config.model.size).hidden_size)
  mesh = make_mesh(config.mesh)
  chunk = int(config.matching.eval_chunk)
  reports = []
  for name in _SIM_BENCH.value:
    hyper = (parse_args(config.matching.similarity_args, "matching.similarity_args")
             if name == config.matching.similarity else {})
    reports.append(score_bench.run(
        name, hyper=hyper, images=_BENCH_IMAGES.value, texts=_BENCH_TEXTS.value,
        regions=_BENCH_REGIONS.value, tokens=_BENCH_TOKENS.value, dim=dim,
        chunk_images=chunk, chunk_texts=chunk, mesh=mesh, rules=config.sharding))
    print(json.dumps(reports[-1]), flush=True)
  return reports


def _input_only(config) -> dict:
  from vlp.data import input_bench
  from vlp.data.batching import BatchSpec
  regions, dim = config.max_regions, config.feature_dim
  make = input_bench.make_mixture_fixture if _INPUT_MIXTURE.value else input_bench.make_fixture
  classes = config.num_region_classes if _INPUT_SOFT_LABELS.value else 0
  data, tokenizer = make(os.path.join(_INPUT_DIR.value, f"{regions}x{dim}x{classes}"),
                         regions=regions, feature_dim=dim, soft_label_dim=classes)
  spec = BatchSpec.from_config(config, config.batch_size, masked=True)
  return input_bench.measure(data, spec, tokenizer, seconds=_INPUT_SECONDS.value,
                             worker_count=config.data_workers)


def main(config):
  if _SIM_BENCH.value:
    if config.job != "matching":
      raise app.UsageError(f"--similarity_bench needs a matching config (job 'matching'); "
                           f"--config has job {config.job!r}")
    _similarity_bench(config)
    return
  if config.job != "pretrain":
    raise app.UsageError(f"--config has job {config.job!r}; vlp.bench times the "
                         f"pretraining tasks of a pretraining config (job 'pretrain')")
  if _INPUT_ONLY.value:
    print(json.dumps(_input_only(config)), flush=True)
    return
  from vlp.train import bench
  report = bench.run(config, tasks=_TASKS.value, steps=_STEPS.value, warmup=_WARMUP.value,
                     vocab_size=_VOCAB.value or None)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  entry.run(main, config=_CONFIG)
