r"""Fine-tune for retrieval, VQA or referring-expression grounding.

  python -m vlp.finetune --config=configs/finetune_retrieval.py:data=flickr30k_karpathy \
      --config.init_from=workdir/pretrain --workdir=workdir/ft_flickr
  python -m vlp.finetune --config=configs/finetune_vqa.py --workdir=workdir/ft_vqa
  python -m vlp.finetune --config=configs/finetune_refcoco.py:data=refcoco_plus ...

Same loop as pretraining (vlp.train.loop): sharding, checkpoints, resume,
metrics.jsonl, progress; `config.job` picks the job and `config.init_from` names
a pretraining workdir, an exported directory (vlp.export) or an imported UNITER
checkpoint (vlp.tools.import_uniter).
"""

from absl import flags

from vlp import entry

_CONFIG = entry.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", "workdir/finetune", "Checkpoints, metrics, eval.")


def main(config):
  from vlp.train import loop
  loop.train_and_evaluate(config, _WORKDIR.value)


if __name__ == "__main__":
  entry.run(main, config=_CONFIG)
