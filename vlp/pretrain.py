r"""Pretrain UNITER.

  python -m vlp.pretrain --config=configs/uniter_base.py:tiny --workdir=workdir/tiny
  python -m vlp.pretrain --config=configs/uniter_base.py --config.total_steps=1000 ...

Flags, distributed initialisation, one call into `vlp.train.loop`.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from vlp import config_lib
from vlp.parallel import runtime  # Defines the multi-host flags.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/pretrain", "Checkpoints, metrics, eval.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before anything touches the devices.
  runtime.initialize_from_flags(cpu_devices=_CONFIG.value.cpu_devices)
  from vlp.train import loop
  loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  config_lib.check_overrides(sys.argv)
  flags.mark_flags_as_required(["config"])
  app.run(main)
