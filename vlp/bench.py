r"""Benchmark the jitted train step of each task; prints one JSON line.

  python -m vlp.bench --config=configs/uniter_base.py --config.compute_dtype=bfloat16
  python -m vlp.bench --config=configs/uniter_base.py:tiny --batch=32 --steps=5
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from vlp import config_lib
from vlp.dist import runtime  # Defines the multi-host flags.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_TASKS = flags.DEFINE_list("tasks", ["mlm", "mrfr", "mrc", "mrckl", "itm"], "Tasks to time.")
_BATCH = flags.DEFINE_integer("batch", 128, "Global batch (examples per step).")
_TEXT_LEN = flags.DEFINE_integer("text_len", 40, "Text tokens per example, incl. specials.")
_REGIONS = flags.DEFINE_integer("regions", 36, "Regions per example.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps per task.")
_WARMUP = flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
_VOCAB = flags.DEFINE_integer("vocab_size", 0, "Vocabulary size (0: the size's default).")


def main(argv):
  del argv
  runtime.initialize_from_flags()  # Before anything touches the devices.
  from vlp.train import bench
  report = bench.run(_CONFIG.value, tasks=_TASKS.value, batch=_BATCH.value,
                     text_len=_TEXT_LEN.value, regions=_REGIONS.value, steps=_STEPS.value,
                     warmup=_WARMUP.value, vocab_size=_VOCAB.value or None)
  print(json.dumps(report), flush=True)


if __name__ == "__main__":
  config_lib.check_overrides(sys.argv)
  flags.mark_flags_as_required(["config"])
  app.run(main)
