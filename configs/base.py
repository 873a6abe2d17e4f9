r"""Keys every job reads: data, model, compute, optimizer, mesh and evaluation batches.

Not a runnable config on its own: the job overlays load it by path and add the
job's keys, `job`, `tasks` and the schedule (total_steps, batch_size, log_every,
eval_every, checkpoint_every, optimizer.learning_rate / warmup_steps / grad_clip):
configs/uniter_base.py (pretraining) and configs/finetune_common.py (fine-tuning).

Arguments after the colon: a size (`base`, `tiny`) or `size=...,data=...`.
"""

import ml_collections

from vlp import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="base", data="vlp_scenes")
  tiny = arg.size == "tiny"
  c = ml_collections.ConfigDict()

  c.seed = 42
  c.grad_accum = 1  # Micro-batches per optimizer update (inside the jitted step).
  c.keep_checkpoints = 2
  # A metric of the job's evaluation (e.g. "vqa_acc"): the evaluated step with its
  # highest value is kept beside the latest ones (`vlp.evaluate --step=best`); "" = none.
  c.best_metric = ""

  # Data. `data` names a tfds builder; vlp_scenes is generated locally.
  c.data = arg.data
  c.data_dir = "workdir/data"  # Local, or an object store (gs://...): staged to local disk.
  c.data_cache_dir = ""  # Where a data_dir on an object store is staged; "": $TMPDIR/vlp_data.
  c.data_size = "demo"  # vlp_scenes split sizes: demo | small.
  c.feature_dim = 64 if tiny else 2048
  # Text tokens incl. [CLS]/[SEP] (static); vlp_scenes captions need at most 19.
  c.max_text_len = 20 if tiny else 62
  # Region slots (static). Base: the reference's rule keeps the 10-100 most confident
  # regions (confidence > 0.2) of an image, so 100 slots hold every region it feeds.
  c.max_regions = 10 if tiny else 100
  c.num_region_classes = 9 if tiny else 1601  # vlp_scenes: 8 shapes + background.
  # A sentencepiece model or a BERT vocab.txt. Empty: the one `init_from` was trained
  # with, else the sentencepiece model stored with the dataset. Naming another than
  # init_from's is an error (its word embeddings index that vocabulary).
  c.tokenizer = ""
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

  # Optimiser (the UNITER reference's): AdamW (0.9, 0.98), eps 1e-6, wd 0.01, linear warm-up then
  # linear decay; the job sets learning_rate, warmup_steps and grad_clip.
  c.optimizer = ml_collections.ConfigDict()
  # The gradient is multiplied by this before clipping and AdamW (vlp/train/optim.py):
  # 1 clips vlp's mean gradient; the reference clips the sum over its GPUs x
  # accumulation steps, so the base configs set that product to clip as it does.
  c.optimizer.clip_scale = 1.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.01
  # Top-level modules left untrained, comma-separated (e.g. "uniter,itm_output,
  # rank_output" to train only a retrieval model's dual-encoder head, as ALADIN does).
  c.optimizer.frozen = ""

  # Evaluation: the split evaluated (pretraining: its retrieval gallery) and the
  # pairs or examples per scoring call.
  c.eval_split = "test"
  c.eval_batch_size = 500 if tiny else 256

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
  # A sharding rule that cannot split a parameter dimension (e.g. a vocabulary not
  # divisible by the tensor axis) leaves it unsplit with a warning naming it; True
  # makes that an error.
  c.strict_sharding = False

  # Cluster ergonomics. A persistent XLA compilation cache, so that a restarted job
  # does not recompile every task's step ("" = JAX's default: off, or the directory
  # in JAX_COMPILATION_CACHE_DIR, which the launchers set).
  c.compilation_cache_dir = ""
  # Trace steps START:STOP-1 (e.g. "100:105") to WORKDIR/profile for TensorBoard's
  # profile plugin or Perfetto; "" = off.
  c.profile_steps = ""
  # TensorBoard event files beside metrics.jsonl (`tensorboard --logdir WORKDIR`).
  c.tensorboard = True
  return c
