r"""VQA fine-tuning: answer head, soft-score BCE x answers, official accuracy.

  python -m vlp.finetune --config=configs/finetune_vqa.py \
      --config.init_from=workdir/pretrain --workdir=workdir/ft_vqa

Arguments after the colon: `size` (base | tiny) and `data` (vqa_v2 | vlp_scenes).
Base follows the reference `config/train-vqa-base-4gpu.json`: lr 8e-5 with 10x for
the answer head, 6000 updates, warm-up 600.
"""

import os

from vlp import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="base", data="vqa_v2")
  here = os.path.dirname(os.path.abspath(__file__))
  common = config_lib.load_module(f"{here}/finetune_common.py")
  c = common.finetune_config(arg.size, arg.data, job="vqa", tasks=dict(vqa=1),
                             eval_split="val", lr=8e-5, steps=6000, warmup=600,
                             batch_size=512)
  c.head_lr_mult = 10.0  # Learning-rate factor of the answer head `vqa_output`.
  return c
