r"""UNITER-base pretraining (and its CPU-sized `tiny` variant).

Commands:
  # Laptop / CI: tiny model on the embedded synthetic dataset (built on first use).
  python -m vlp.pretrain --config=configs/uniter_base.py:tiny --workdir=workdir/tiny

  # UNITER-base on prepared COCO + VG features, one host with 8 GPUs, bf16.
  python -m vlp.pretrain --config=configs/uniter_base.py \
      --config.data=coco_karpathy --config.data_dir=$TFDS_DATA_DIR \
      --config.compute_dtype=bfloat16 --workdir=$WORKDIR

Arguments after the colon: a size (`base`, `tiny`) or `size=...,data=...`.
Numbers follow the UNITER reference `config/pretrain-alldata-base-8gpu.json` (task
mix, optimizer and schedule; docs/reference.md) unless marked as a vlp choice.
"""

import ml_collections

from vlp import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="base", data="vlp_scenes")
  tiny = arg.size == "tiny"
  c = ml_collections.ConfigDict()

  c.job = "pretrain"  # vlp.jobs: what this run trains and evaluates.
  c.seed = 42
  # Tiny: 64-row batches give twice the updates of 128 rows at about the same CPU time
  # per example, and ITM learns from the number of updates (docs/experiments.md,
  # "The tiny demo").
  c.total_steps = 4000 if tiny else 200_000
  c.batch_size = 64 if tiny else 3072  # Examples per optimizer update, global.
  c.grad_accum = 1
  c.log_every = 50 if tiny else 100
  c.eval_every = 4000 if tiny else 5000  # Tiny: once, at the end (CPU time).
  c.checkpoint_every = 1000 if tiny else 5000
  c.keep_checkpoints = 2

  # Data. `data` names a tfds builder; vlp_scenes is generated locally.
  c.data = arg.data
  c.data_dir = "workdir/data"
  c.data_size = "demo"  # vlp_scenes split sizes: demo | small.
  c.feature_dim = 64 if tiny else 2048
  # Text tokens incl. [CLS]/[SEP] (static); vlp_scenes captions need at most 19.
  c.max_text_len = 20 if tiny else 62
  c.max_regions = 10 if tiny else 36   # Region slots (static).
  c.num_region_classes = 9 if tiny else 1601  # vlp_scenes: 8 shapes + background.
  c.tokenizer = ""  # Empty: the sentencepiece model stored with the dataset.
  c.data_workers = 0  # grain worker processes per host.
  # Slices of the global batch with their own shuffle and masking streams (0: the
  # fewest that line up with the rows each process feeds: one per process where
  # they are contiguous, more on a TPU torus). Fix it (e.g. to the number of batch
  # pieces of the largest mesh you will use) to get the same batches on any number
  # of hosts.
  c.data_shards = 0

  # Model: a named size plus field overrides (vlp.models.uniter_config).
  c.model = ml_collections.ConfigDict()
  c.model.size = "tiny" if tiny else "base"
  # Field overrides of the named size (None: the size's default).
  # Tiny (vlp choice): width 64 costs half of the named size's 128 per step, which
  # buys the CPU demo the ITM steps it needs; 3 layers at intermediate 128 cost the
  # FLOPs of 2 at 256, and the third layer lets a word bind to its neighbours before
  # [CLS] reads the match (colour-object binding; docs/experiments.md, "The tiny demo").
  c.model.hidden_size = ml_collections.FieldReference(64 if tiny else None, field_type=int)
  c.model.num_layers = ml_collections.FieldReference(3 if tiny else None, field_type=int)
  c.model.num_heads = ml_collections.FieldReference(None, field_type=int)
  c.model.intermediate_size = ml_collections.FieldReference(
      128 if tiny else None, field_type=int)
  # Tiny (vlp choice, measured on the demo): a from-scratch model with BERT's 0.02 init
  # and dropout 0.1 barely uses the image in 1000 CPU steps (held-out MLM accuracy
  # 0.645; grounding fine-tuned from it 33.8 %), while init 0.1 without dropout gives
  # 0.70 and 78.6 %. Larger sizes keep the reference's values.
  c.model.initializer_range = ml_collections.FieldReference(
      0.1 if tiny else None, field_type=float)
  c.model.hidden_dropout = 0.0 if tiny else 0.1
  c.model.attention_dropout = 0.0 if tiny else 0.1
  c.model.remat = False
  # None lets JAX choose; "cudnn" forces the fused GPU kernel (used when attention
  # dropout is 0), "xla" the portable one.
  c.model.attention_impl = ml_collections.FieldReference(None, field_type=str)
  c.compute_dtype = "float32"  # `bfloat16` on accelerators.

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
  c.mlm_prob = 0.15
  c.mrm_prob = 0.15
  c.itm_neg_prob = 0.5
  # ITM negatives: "random" is the reference's sampler; "balanced" (vlp) shows every
  # caption and image of an ITM batch once matched and once not, which cancels the
  # single-modality gradient noise (vlp.data.masking.make_itm_batch). Tiny needs it
  # to leave the ITM plateau within a CPU demo.
  c.itm_negatives = "balanced" if tiny else "random"
  c.max_mlm_predictions = 8 if tiny else 12
  c.max_mrm_predictions = 4 if tiny else 10
  c.wra_weight = 0.1
  c.ot_beta = 0.5
  c.ot_iterations = 50
  c.ot_k = 1

  # Optimiser (the reference's): AdamW (0.9, 0.98), eps 1e-6, wd 0.01, clip 5.0,
  # linear warm-up then linear decay.
  c.optimizer = ml_collections.ConfigDict()
  # Tiny: 7e-4 over 4000 steps (1e-3 left two of three seeds below 10x chance;
  # docs/experiments.md, "Seeds").
  c.optimizer.learning_rate = 7e-4 if tiny else 5e-5
  c.optimizer.warmup_steps = 100 if tiny else 10_000
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip = 5.0
  # Top-level modules left untrained, comma-separated (e.g. "uniter,itm_output,
  # rank_output" to train only a retrieval model's dual-encoder head, as ALADIN does).
  c.optimizer.frozen = ""

  # Evaluation (held-out MLM/ITM accuracy + zero-shot retrieval by ITM score).
  c.eval_batches = 4 if tiny else 20
  c.eval_gallery_images = 100
  c.eval_batch_size = 500 if tiny else 256  # Pairs per scoring call.

  # Scale-out: mesh axes (-1 = all remaining devices; an optional outer `dcn` axis
  # spans TPU slices or GPU hosts) and a sharding: a preset (dp | fsdp | fsdp_tp)
  # or a rule table such as "embed=fsdp,mlp=tensor,batch=data+fsdp" or
  # "fsdp_tp,vocab=none" (vlp/parallel/sharding.py). E.g. on 8 devices:
  #   --config.mesh.data=2 --config.mesh.fsdp=2 --config.mesh.tensor=2 --config.sharding=fsdp_tp
  c.mesh = ml_collections.ConfigDict(dict(dcn=1, data=-1, fsdp=1, tensor=1))
  c.sharding = "dp"
  # On the CPU platform only: split the host into this many devices (0 = JAX's one).
  # Tiny: data-parallel over 2 per-core devices trains ~1.5x faster on 2 cores than
  # one device (vlp/parallel/runtime.py). XLA_FLAGS or JAX_NUM_CPU_DEVICES, if set, win.
  c.cpu_devices = 2 if tiny else 0
  return c
