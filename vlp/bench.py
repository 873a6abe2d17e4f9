r"""Benchmark the jitted train step of each task, or the input pipeline alone.

  python -m vlp.bench --config=configs/uniter_base.py --config.compute_dtype=bfloat16
  python -m vlp.bench --config=configs/uniter_base.py:tiny --batch=32 --steps=5
  python -m vlp.bench --input_only            # masked base-shaped batches per second

Each run prints one JSON line.
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from vlp import config_lib
from vlp.parallel import runtime  # Defines the multi-host flags.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_TASKS = flags.DEFINE_list("tasks", ["mlm", "mrfr", "mrc", "mrckl", "itm"], "Tasks to time.")
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch (examples per step).")
_TEXT_LEN = flags.DEFINE_integer("text_len", 40, "Text tokens per example, incl. specials.")
_REGIONS = flags.DEFINE_integer("regions", 36, "Regions per example.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per task.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the size's default).")
_INPUT_ONLY = flags.DEFINE_bool("input_only", False, "Time the input pipeline only: reading, "
                                "tokenising, padding and masking base-shaped batches.")
_INPUT_DIR = flags.DEFINE_string("input_data_dir", "/tmp/vlp_input_bench",
                                 "Where --input_only builds its fixture dataset (once).")
_INPUT_SECONDS = flags.DEFINE_float("input_seconds", 10.0, "Timed seconds (--input_only).")
_WORKERS = flags.DEFINE_integer("data_workers", 0, "grain worker processes (--input_only).")


def _input_only() -> dict:
  from vlp.data import input_bench
  from vlp.data.batching import BatchSpec
  builder, tokenizer = input_bench.make_fixture(_INPUT_DIR.value, regions=_REGIONS.value)
  spec = BatchSpec(batch_size=_BATCH.value, max_text_len=_TEXT_LEN.value,
                   max_regions=_REGIONS.value, feature_dim=2048)
  return input_bench.measure(builder, spec, tokenizer, seconds=_INPUT_SECONDS.value,
                             worker_count=_WORKERS.value)


def main(argv):
  del argv
  if _INPUT_ONLY.value:
    print(json.dumps(_input_only()), flush=True)
    return
  if _CONFIG.value is None:
    raise app.UsageError("--config is required (except with --input_only)")
  runtime.initialize_from_flags()  # Before anything touches the devices.
  from vlp.train import bench
  report = bench.run(_CONFIG.value, tasks=_TASKS.value, batch=_BATCH.value,
                     text_len=_TEXT_LEN.value, regions=_REGIONS.value, steps=_STEPS.value,
                     warmup=_WARMUP.value, vocab_size=_VOCAB.value or None)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  config_lib.check_overrides(sys.argv)
  app.run(main)
