r"""Pretrain UNITER.

  python -m vlp.pretrain --config=configs/uniter_base.py:tiny --workdir=workdir/tiny
  python -m vlp.pretrain --config=configs/uniter_base.py --config.total_steps=1000 ...

Flags and devices (vlp.entry), then one call into `vlp.train.loop`.
"""

from absl import flags

from vlp import entry

_CONFIG = entry.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", "workdir/pretrain", "Checkpoints, metrics, eval.")


def main(config):
  from vlp.train import loop
  loop.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  entry.run(main, config=_CONFIG)
