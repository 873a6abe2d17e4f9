r"""Evaluate a checkpoint of a workdir (default the latest) with the config's evaluators.

  python -m vlp.evaluate --config=configs/finetune_vqa.py --workdir=workdir/ft_vqa \
      --config.eval_split=test
  # The step kept for the best validation `config.best_metric`, or step 3000:
  python -m vlp.evaluate --config=configs/finetune_vqa.py --workdir=workdir/ft_vqa --step=best
  python -m vlp.evaluate --config=configs/finetune_vqa.py --workdir=workdir/ft_vqa --step=3000

Writes WORKDIR/eval_<split>.json (pretraining configs: WORKDIR/eval.json).
"""

import json

from absl import flags

from vlp import entry

_CONFIG = entry.config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir holding checkpoints/.")
_STEP = flags.DEFINE_string("step", "", "Checkpoint step: empty = the latest, a number, or "
                            "'best' (highest config.best_metric).")


def main(config):
  from vlp.train import loop
  step = _STEP.value or None
  if step not in (None, "best") and not step.isdigit():
    raise SystemExit(f"--step must be empty, a step number or 'best', got {step!r}")
  out = loop.evaluate_checkpoint(config, _WORKDIR.value,
                                 step=int(step) if step and step.isdigit() else step)
  print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}))


if __name__ == "__main__":
  entry.run(main, config=_CONFIG, required=["workdir"])
