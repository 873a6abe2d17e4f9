r"""Evaluate the latest checkpoint of a workdir with the config's evaluators.

  python -m vlp.evaluate --config=configs/finetune_vqa.py --workdir=workdir/ft_vqa \
      --config.eval_split=test

Writes WORKDIR/eval_<split>.json (pretraining configs: WORKDIR/eval.json).
"""

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from vlp import config_lib
from vlp.parallel import runtime  # Defines the multi-host flags.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding checkpoints/.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  runtime.initialize_from_flags(cpu_devices=_CONFIG.value.cpu_devices)
  from vlp.train import loop
  out = loop.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value)
  print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
  config_lib.check_overrides(sys.argv)
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
