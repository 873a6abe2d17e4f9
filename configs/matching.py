r"""Image-text matching with a dual-stream model and a pluggable similarity / loss.

  python -m vlp.finetune --config=configs/matching.py:size=tiny,data=vlp_scenes \
      --config.data_dir=workdir/data --workdir=workdir/matching
  # Every mechanism under one budget and seed, one table (docs/matching.md):
  python -m vlp.tools.matching_protocol --config=configs/matching.py:size=tiny,data=vlp_scenes \
      --config.data_dir=workdir/data --workdir=workdir/matching_protocol

Arguments after the colon: `size` (tiny | base) and `data` (vlp_scenes |
flickr30k_karpathy | coco_karpathy). `matching.*` names the mechanism
(vlp/matching/model.py): the streams (`encoder` dual_stream | uniter,
`text_encoder` transformer | bigru, `region_layers`, `text_layers`), COOKIE's
`shared_layers`, HGAN-style `graph_layers`, the `scorer` (similarity | comma |
slan, with `scorer_layers` / `filter_k`), `similarity` (vlp.matching.similarities) and
`loss` with their arguments as "name=value,..." strings, `mean_warmup_steps`
(hinge_hardest after that many steps of hinge_sum), and LOUPE's `shapley_weight`.
The model widths are `model.*` (configs/base.py).
"""

import os

import ml_collections

from vlp import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", data="vlp_scenes")
  tiny = arg.size == "tiny"
  here = os.path.dirname(os.path.abspath(__file__))
  common = config_lib.load_module(f"{here}/finetune_common.py")
  # Base: SCAN's Flickr30K schedule (batch 128, lr 2e-4, 30 epochs of 145k captions).
  c = common.finetune_config(arg.size, arg.data, job="matching", tasks=dict(matching=1),
                             eval_split="test", lr=2e-4, steps=34000, warmup=1000,
                             batch_size=128)
  if tiny:  # CPU: measured on vlp_scenes (docs/matching.md).
    c.total_steps, c.batch_size, c.log_every = 300, 64, 50
    c.eval_every = c.checkpoint_every = c.total_steps
    c.optimizer.learning_rate = 1e-3
  c.matching = ml_collections.ConfigDict(dict(
      encoder="dual_stream", text_encoder="transformer", region_layers=1, text_layers=2,
      shared_layers=0, graph_layers=0,
      scorer="similarity", scorer_layers=1, filter_k=4,
      similarity="cosine_global", similarity_args="",
      # InfoNCE: VSE++'s hardest-negative hinge alone collapses from scratch on
      # vlp_scenes; it needs its summed-hinge warm-up first (docs/matching.md).
      loss="info_nce", loss_args="temperature=0.05",
      # hinge_hardest only: hinge_sum for this many steps first (VSE-infinity's warm-up).
      mean_warmup_steps=0,
      shapley_weight=0.0, shapley_permutations=4,
      eval_chunk=64 if tiny else 256))  # Images (and captions) per scoring block.
  # Two-stage: candidates per query from the global vectors, re-ranked by the score.
  c.two_stage_ks = (10, 20) if tiny else (16, 64, 128)
  # 0 = the whole split (vlp_scenes test: 300 images; F30K / COCO: 1000 / 5000).
  c.eval_gallery_images = 0
  return c
