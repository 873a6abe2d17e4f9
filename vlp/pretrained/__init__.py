"""Pretrained model directories: write, load, and initialise fine-tuning from them.

A pretrained directory (``DIR``) is what `python -m vlp.export` writes from a
training workdir and `python -m vlp.tools.import_uniter` writes from a released
PyTorch UNITER checkpoint:

* ``checkpoint/``: an orbax checkpoint (`vlp.checkpoint.Checkpointer`, step 0)
  whose ``state`` item is the parameter tree alone (no optimizer state) and whose
  ``meta`` item repeats ``config.json``;
* ``model.safetensors``: the same parameters under the reference PyTorch names
  (`vlp.models.torch_names.torch_name_table`, Linear weights as ``(out, in)``, plus the
  tied duplicates of `TIED_TORCH_KEYS`), readable without JAX, e.g. with
  ``safetensors.numpy.load_file``;
* ``config.json``: ``model_config`` (every `UniterConfig` field), ``heads`` (torch
  head names, see `torch_name_table`), ``head_options`` (``num_answers``,
  ``dual_dim``), ``tokenizer`` (``type`` sentencepiece | wordpiece, ``file``,
  ``lowercase``) and ``source`` (where the parameters came from);
* the tokenizer file, ``spm.model`` or ``vocab.txt`` (absent if none was given).

The heads decide the model class `load_pretrained` builds: the four pre-training
heads -> `UniterForPretraining`; none -> `UniterEncoder` (the backbone alone);
``vqa_output`` -> `UniterForVqa`; ``re_output`` / ``re_output_mlp2`` ->
`UniterForGrounding`; ``itm_output`` + ``rank_output`` (+ ``dual_output``) ->
`UniterForRetrieval`. Every one has ``encode(batch)``.

Modules: `directory` (write and load a directory), `workdir` (training
checkpoints: model config, export), `init` (fine-tuning initialisation, sharded),
`heads` (heads and model classes), `trees` (nested parameter dicts).
"""

from vlp.models.downstream import UniterEncoder
from vlp.data.tokenizer import open_tokenizer, tokenizer_type
from vlp.pretrained.directory import (CHECKPOINT_DIR, CONFIG_FILE, FORMAT, FORMAT_VERSION,
                                      SAFETENSORS_FILE, TOKENIZER_FILES, config_from_dict,
                                      is_pretrained_dir, load_pretrained, read_config,
                                      save_pretrained)
from vlp.pretrained.heads import HEAD_ORDER, head_options, heads_of, model_factory
from vlp.pretrained.init import (BACKBONE_FIELDS, init_params_from, load_params_for_init,
                                 merge_params, tokenizer_of)
from vlp.pretrained.trees import (abstract_params, check_shapes, flatten, torch_state_dict,
                                  unflatten)
from vlp.pretrained.workdir import export_workdir, model_config_from_meta, workdir_checkpoints
