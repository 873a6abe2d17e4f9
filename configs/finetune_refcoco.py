r"""Referring-expression grounding fine-tuning (RefCOCO, RefCOCO+, RefCOCOg).

  python -m vlp.finetune --config=configs/finetune_refcoco.py:data=refcoco_plus \
      --config.init_from=workdir/pretrain --workdir=workdir/ft_refcoco_plus

Arguments after the colon: `size` (base | tiny) and `data` (refcoco | refcoco_plus
| refcocog | vlp_scenes). Accuracy at IoU >= 0.5 on each of `eval_splits`.
Base follows the reference's config of each dataset (`config/train-refcoco-base-1gpu.json`,
`train-refcoco+-base-1gpu.json`, `train-refcocog-base-1gpu.json`): 128 expressions
per update on one GPU, the loss summed over them, seed 24, and per dataset:

  data          lr     steps   warm-up  head
  refcoco       1e-4   24,000  1,500    mlp=1 (one Linear)
  refcoco_plus  6e-5   10,000  1,000    mlp=2 (Linear, GELU, LayerNorm, Linear)
  refcocog      1e-4   24,000  1,500    mlp=1
"""

import os

import ml_collections

from vlp import config_lib

# data -> (learning rate, steps, warm-up, grounding head layers): the reference's.
RECIPES = {"refcoco": (1e-4, 24_000, 1_500, 1), "refcoco_plus": (6e-5, 10_000, 1_000, 2),
           "refcocog": (1e-4, 24_000, 1_500, 1), "vlp_scenes": (1e-4, 24_000, 1_500, 1)}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="base", data="refcoco_plus")
  if arg.data not in RECIPES:
    raise ValueError(f"finetune_refcoco.py: data must be one of {sorted(RECIPES)}, "
                     f"got {arg.data!r}")
  lr, steps, warmup, mlp = RECIPES[arg.data]
  here = os.path.dirname(os.path.abspath(__file__))
  common = config_lib.load_module(f"{here}/finetune_common.py")
  # One GPU and no accumulation, and vlp sums the loss over the batch as the
  # reference does: the clipped gradient is the reference's (clip_scale 1).
  c = common.finetune_config(arg.size, arg.data, job="grounding",
                             tasks=dict(grounding=1), eval_split="val", lr=lr,
                             steps=steps, warmup=warmup, batch_size=128, clip_scale=1.0,
                             eval_every=1000, best_metric="grounding_acc")
  scenes = arg.data == "vlp_scenes"
  if arg.size != "tiny":
    c.seed = 24
  # Layers of the region-scoring head `re_output` (the reference's `mlp`).
  c.grounding_mlp = mlp
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
