r"""Referring-expression grounding fine-tuning (RefCOCO, RefCOCO+, RefCOCOg).

  python -m vlp.finetune --config=configs/finetune_refcoco.py:data=refcoco_plus \
      --config.init_from=workdir/pretrain --workdir=workdir/ft_refcoco_plus

Arguments after the colon: `size` (base | tiny) and `data` (refcoco | refcoco_plus
| refcocog | vlp_scenes). Accuracy at IoU >= 0.5 on each of `eval_splits`.
"""

import os

import ml_collections

from vlp import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="base", data="refcoco_plus")
  here = os.path.dirname(os.path.abspath(__file__))
  common = config_lib.load_module(f"{here}/finetune_common.py")
  c = common.finetune_config(arg.size, arg.data, job="grounding",
                             tasks=dict(grounding=1), eval_split="val", lr=8e-5,
                             steps=5000, warmup=500, batch_size=256)
  scenes = arg.data == "vlp_scenes"
  c.eval_splits = (["val", "test"] if scenes else
                   ["val", "test"] if arg.data == "refcocog" else ["val", "testA", "testB"])
  c.max_regions = max(c.max_regions, 10 if scenes else 100)  # Every candidate region.
  # A second build of `data` from detector features (the "det" evaluation setting);
  # empty: only the setting of the main build (see vlp/jobs/grounding.py).
  c.det_data_dir = ""
  # Ref-NMS's query-aware proposal filter (vlp/matching/proposals.py): keep > 0
  # trains a relatedness head (BCE x weight) and also evaluates the grounding head
  # on the `keep` proposals left by NMS at IoU `iou` after re-scoring.
  c.proposal_filter = ml_collections.ConfigDict(dict(keep=0, iou=0.3, weight=1.0))
  return c
