r"""VQA fine-tuning: answer head, soft-score BCE x answers, official accuracy.

  python -m vlp.finetune --config=configs/finetune_vqa.py \
      --config.init_from=workdir/pretrain --workdir=workdir/ft_vqa
  # Answer labels in the order of the reference's ans2label.json (3,129 answers), so
  # that an imported UNITER VQA head lines up with them:
  python -m vlp.finetune --config=configs/finetune_vqa.py \
      --config.answer_vocab=$UNITER/utils/ans2label.json ...

Arguments after the colon: `size` (base | tiny) and `data` (vqa_v2 | vlp_scenes).
Base follows the reference `config/train-vqa-base-4gpu.json`: lr 8e-5 with 10x for
the answer head, 6000 updates, warm-up 600, clip 2.0 on the gradient summed over
its 4 GPUs x 5 accumulation steps. With `data=vqa_v2` it trains, as the reference,
on VQA v2 train + val minus its held-out `devval` (`restval`) + Visual Genome QA
(`vg_qa`, prepared under the same data_dir), read as one list of questions, and
keeps the step with the best `devval` accuracy (docs/reference.md, "VQA"). Without
a VG-QA build: `--config.data=vqa_v2:train+restval`.
"""

import os

from vlp import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="base", data="vqa_v2")
  here = os.path.dirname(os.path.abspath(__file__))
  common = config_lib.load_module(f"{here}/finetune_common.py")
  reference = arg.data == "vqa_v2"
  c = common.finetune_config(arg.size, arg.data, job="vqa", tasks=dict(vqa=1),
                             eval_split="devval" if reference else "val", lr=8e-5,
                             steps=6000, warmup=600, batch_size=512, clip_scale=4 * 5,
                             eval_every=1000, best_metric="vqa_acc")
  if reference:  # The reference's train + trainval + vg text databases.
    c.data = "vqa_v2:train+restval,vg_qa:train"
  c.head_lr_mult = 10.0  # Learning-rate factor of the answer head `vqa_output`.
  # A JSON file giving the answer labels: {answer: label} (the reference's
  # ans2label.json) or a list (label = position); the training targets are
  # recomputed over it from the human answers. "" = the list stored with the data.
  c.answer_vocab = ""
  return c
