r"""Fine-tune for retrieval, VQA or referring-expression grounding.

  python -m vlp.finetune --config=configs/finetune_retrieval.py:data=flickr30k_karpathy \
      --config.init_from=workdir/pretrain --workdir=workdir/ft_flickr
  python -m vlp.finetune --config=configs/finetune_vqa.py --workdir=workdir/ft_vqa
  python -m vlp.finetune --config=configs/finetune_refcoco.py:data=refcoco_plus ...

Same loop as pretraining (vlp.train.loop): sharding, checkpoints, resume,
metrics.jsonl, progress; `config.job` picks the job and `config.init_from` names
a pretraining workdir, an exported directory (vlp.export) or an imported UNITER
checkpoint (vlp.tools.import_uniter).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from vlp import config_lib
from vlp.parallel import runtime  # Defines the multi-host flags.

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (path[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/finetune", "Checkpoints, metrics, eval.")


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
