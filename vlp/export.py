r"""Export the parameters of a training workdir as a pretrained directory.

  python -m vlp.export --workdir=workdir/demo --out=exported/demo
  python -m vlp.export --workdir=... --out=... --step=1000 --tokenizer=spm.model

Reads the latest (or `--step`) checkpoint of a pretraining or fine-tuning workdir
and writes parameters only: an orbax checkpoint, ``model.safetensors`` under the
reference PyTorch names, ``config.json`` and the tokenizer file (see
`vlp.pretrained`). Load the result with `vlp.load_pretrained(DIR)`.
"""

from absl import flags, logging

from vlp import entry

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (holds checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Pretrained directory to write.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "Tokenizer file (default: the one the checkpoint names).")
_LOWERCASE = flags.DEFINE_bool("lowercase", False, "A WordPiece --tokenizer is uncased.")


def main(config):
  del config  # The checkpoint's own record describes the model.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every restore and save at INFO.
  from vlp import pretrained
  config = pretrained.export_workdir(_WORKDIR.value, _OUT.value, step=_STEP.value,
                                     tokenizer=_TOKENIZER.value, lowercase=_LOWERCASE.value)
  cfg = config["model_config"]
  print(f"exported step {config['source']['step']} of {config['source']['workdir']} -> "
        f"{_OUT.value}: {cfg['num_layers']} layers, hidden {cfg['hidden_size']}, "
        f"vocab {cfg['vocab_size']}, heads {', '.join(config['heads']) or 'none'}, "
        f"tokenizer {config['tokenizer']['file']}")


if __name__ == "__main__":
  entry.run(main, required=["workdir", "out"])
