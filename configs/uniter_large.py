r"""UNITER-large pretraining (reference `pretrain-alldata-large-16gpu.json`).

  python -m vlp.pretrain --config=configs/uniter_large.py \
      --config.data=coco_karpathy --config.data_dir=$TFDS_DATA_DIR \
      --config.compute_dtype=bfloat16 --config.sharding=fsdp --workdir=$WORKDIR
"""

from vlp import config_lib


def get_config(arg=None):
  base = config_lib.load_config_file(
      __file__.replace("uniter_large.py", "uniter_base.py") + ":base")
  c = base
  c.model.size = "large"
  c.total_steps = 500_000
  c.batch_size = 2048
  c.optimizer.learning_rate = 5e-5
  c.optimizer.warmup_steps = 10_000
  c.sharding = "fsdp"
  del arg
  return c
