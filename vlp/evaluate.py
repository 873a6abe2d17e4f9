r"""Evaluate the latest checkpoint of a workdir with the config's evaluators.

  python -m vlp.evaluate --config=configs/finetune_vqa.py --workdir=workdir/ft_vqa \
      --config.eval_split=test

Writes WORKDIR/eval_<split>.json (pretraining configs: WORKDIR/eval.json).
"""

import json

from absl import flags

from vlp import entry

_CONFIG = entry.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding checkpoints/.")


def main(config):
  from vlp.train import loop
  out = loop.evaluate_checkpoint(config, _WORKDIR.value)
  print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
  entry.run(main, config=_CONFIG, required=["workdir"])
