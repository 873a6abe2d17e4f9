r"""UNITER-large pretraining (reference `pretrain-alldata-large-16gpu.json`), set up
for a pod: bfloat16 compute, and parameters and optimizer state split over every
chip of a slice (`fsdp` sharding on an fsdp axis of all the devices, the batch
split over the same chips).

  # Will it fit? XLA's TPU compiler on any machine (libtpu, no TPU needed):
  python -m vlp.tools.aot --config=configs/uniter_large.py --topology=v5e:8x8
  # A v5e-64 slice (Cloud TPU VM; /mnt/shared mounted on every worker):
  ZONE=us-west4-a ACCELERATOR=v5litepod-64 launch/tpu_vm.sh up vlp-large -- \
      --config=configs/uniter_large.py --config.data=coco_karpathy \
      --config.data_dir=/mnt/shared/tfds --workdir=/mnt/shared/runs/large
  # Several slices (multislice): --config.mesh.dcn=<slices> puts the dcn axis
  # across them, fsdp stays inside each slice.

Arguments after the colon: `data=...`. The schedule and the global batch (2048
examples per update) are the reference's. Compiled for v5e by vlp.tools.aot, the
largest step (MLM) needs 5.5 GiB of the 16 GiB per chip on a v5e-64 slice (32
rows per chip) and 2.4 GiB on a v5e-256 slice (8 rows per chip; README,
"Scale-out"; docs/experiments.md, "Compile-time memory per chip"), measured with 36
region slots; the reference's 100 (configs/base.py) make sequences of 162 instead of
98 positions, so expect more (re-run vlp.tools.aot).
"""

import os

from vlp import config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="vlp_scenes")
  here = os.path.dirname(os.path.abspath(__file__))
  c = config_lib.load_config_file(f"{here}/uniter_base.py:size=base,data={arg.data}")
  c.model.size = "large"
  c.total_steps = 500_000
  c.batch_size = 2048
  c.optimizer.learning_rate = 5e-5
  c.optimizer.warmup_steps = 10_000
  c.optimizer.clip_scale = 16 * 4  # The reference's 16 GPUs x 4 accumulation steps.
  c.compute_dtype = "bfloat16"
  # fsdp over the whole slice (ZeRO-3): 340M float32 parameters with AdamW's two
  # moments are 3.8 GiB, 63 MiB per chip on 64 chips. With mesh.fsdp=1 (base.py's
  # default) the fsdp preset would be plain data parallelism.
  c.sharding = "fsdp"
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
