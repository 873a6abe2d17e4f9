r"""UNITER-base pretraining (and its CPU-sized `tiny` variant).

Commands:
  # Laptop / CI: tiny model on the embedded synthetic dataset (built on first use).
  python -m vlp.pretrain --config=configs/uniter_base.py:tiny --workdir=workdir/tiny

  # UNITER-base on prepared COCO + VG features, one host with 8 GPUs, bf16.
  python -m vlp.pretrain --config=configs/uniter_base.py \
      --config.data=coco_karpathy --config.data_dir=$TFDS_DATA_DIR \
      --config.compute_dtype=bfloat16 --workdir=$WORKDIR

Arguments after the colon: a size (`base`, `tiny`) or `size=...,data=...`.
The shared keys come from configs/base.py; this file adds the schedule and the
pretraining objectives, one subtree of settings per objective (`mlm`, `mrm` for
the three region tasks, `itm`). Numbers follow the UNITER reference
`config/pretrain-alldata-base-8gpu.json` (task mix, optimizer and schedule;
docs/reference.md) unless marked as a vlp choice.
"""

import os

import ml_collections

from vlp import config_lib
from vlp.data import masking


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="base", data="vlp_scenes")
  tiny = arg.size == "tiny"
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.load_config_file(f"{here}/base.py:size={arg.size},data={arg.data}")
  c.job = "pretrain"  # vlp.jobs: what this run trains and evaluates.
  # Parameters to start from (the reference starts from BERT: a directory written by
  # `python -m vlp.tools.import_uniter --checkpoint=bert-base-cased/`, or any pretrained
  # directory or workdir); the tokenizer follows it. Empty = from scratch.
  c.init_from = ""

  # Tiny: 64-row batches give twice the updates of 128 rows at about the same CPU time
  # per example, and ITM learns from the number of updates (docs/experiments.md,
  # "The tiny demo").
  c.total_steps = 4000 if tiny else 200_000
  c.batch_size = 64 if tiny else 3072  # Examples per optimizer update, global.
  c.log_every = 50 if tiny else 100
  c.eval_every = 4000 if tiny else 5000  # Tiny: once, at the end (CPU time).
  c.checkpoint_every = 1000 if tiny else 5000
  # Tiny: 7e-4 over 4000 steps (1e-3 left two of three seeds below 10x chance;
  # docs/experiments.md, "Seeds").
  c.optimizer.learning_rate = 7e-4 if tiny else 5e-5
  c.optimizer.warmup_steps = 100 if tiny else 10_000
  c.optimizer.grad_clip = 5.0
  # The reference clips the gradient summed over 8 GPUs x 6 accumulation steps
  # (vlp/train/optim.py). Tiny (vlp): the mean, as its demo was measured.
  c.optimizer.clip_scale = 1.0 if tiny else 8 * 6

  # Task mix (one task per update, sampled from (seed, step)). The reference
  # all-data config uses itm/mlm/mrfr/mrckl = 27/36/18/18 %; vlp adds hard MRC.
  # Tiny gives ITM 75 % of the steps: it is the objective that needs the most
  # updates to learn cross-modal matching from scratch.
  c.tasks = ml_collections.ConfigDict(
      dict(mlm=2, mrfr=1, mrc=1, mrckl=1, itm=15) if tiny else
      dict(mlm=4, mrfr=2, mrckl=2, itm=3))
  # Loss multipliers (vlp; the reference has none). One AdamW state serves every
  # task, so a task with much smaller gradients barely moves the weights; tiny ITM
  # near its plateau has ~1/20 of MLM's gradient norm (vlp.train.task_mix). Tiny MLM
  # at weight 1 still pulls the shared weights away from ITM (docs/experiments.md).
  c.loss_weights = ml_collections.ConfigDict(
      dict(mlm=0.5 if tiny else 1.0, mrfr=1.0, mrc=1.0, mrckl=1.0,
           itm=20.0 if tiny else 1.0))
  # Masked language modelling: masking probability and prediction slots per example.
  c.mlm = ml_collections.ConfigDict(dict(prob=0.15, max_predictions=8 if tiny else 12))
  # Masked region modelling, shared by the mrfr, mrc and mrckl tasks. The reference
  # masks every selected region; base sizes the slots from the region count so that a
  # full image overflows them with probability <= 1e-4 (100 regions: 30 slots; set
  # again if you change max_regions). Overflows are counted (`mrm_capped`).
  c.mrm = ml_collections.ConfigDict(dict(
      prob=0.15, max_predictions=4 if tiny else masking.prediction_slots(c.max_regions, 0.15)))
  # Image-text matching. Negatives: "random" is the reference's sampler (each example
  # with probability `neg_prob`); "balanced" (vlp) shows every caption and image of
  # an ITM batch once matched and once not, which cancels the single-modality
  # gradient noise (vlp.data.masking.make_itm_batch). Tiny needs it to leave the ITM
  # plateau within a CPU demo. "hardest" (after MVPTR) pairs half the batch with the
  # hardest in-batch negatives of the other half, ranked by the vlp.matching
  # similarity `hard_similarity` on single-modality backbone states (vlp.tasks.itm).
  # WRA: `wra_weight` times the optimal-transport word-region alignment, solved by
  # IPOT with step `ot.beta`, `ot.iterations` outer and `ot.k` inner iterations.
  c.itm = ml_collections.ConfigDict(dict(
      negatives="balanced" if tiny else "random", neg_prob=0.5,
      hard_similarity="cosine_global", wra_weight=0.1,
      ot=dict(beta=0.5, iterations=50, k=1)))

  # Evaluation: held-out MLM/ITM accuracy on `eval_batches` fixed batches, and
  # zero-shot retrieval by ITM score over `eval_gallery_images` test images.
  c.eval_batches = 4 if tiny else 20
  c.eval_gallery_images = 100
  return c
