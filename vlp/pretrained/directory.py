"""Pretrained directories: what `vlp.export` and `vlp.tools.import_uniter` write.

Layout of a directory ``DIR`` (the package docstring has it in full):
``checkpoint/`` (orbax, parameters only), ``model.safetensors`` (reference torch
names), ``config.json`` and the tokenizer file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
from etils import epath
from flax import nnx

from vlp import checkpoint as ckpt_lib
from vlp import storage
from vlp.data.tokenizer import open_tokenizer, tokenizer_type
from vlp.models.uniter_config import UniterConfig
from vlp.pretrained.heads import head_options, heads_of, model_factory
from vlp.pretrained.trees import abstract_params, check_shapes, torch_state_dict

FORMAT = 'vlp-pretrained'
FORMAT_VERSION = 1
CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'model.safetensors'
CHECKPOINT_DIR = 'checkpoint'
TOKENIZER_FILES = {'sentencepiece': 'spm.model', 'wordpiece': 'vocab.txt'}


def is_pretrained_dir(path: str) -> bool:
  """Whether `path` holds a pretrained directory's config.json."""
  return (epath.Path(path) / CONFIG_FILE).exists()


def save_pretrained(out_dir: str, params: Mapping, cfg: UniterConfig, *,
                    tokenizer: str | None = None, lowercase: bool = False,
                    source: Mapping[str, Any] | None = None) -> dict:
  """Writes `params` (a model's pure parameter dict) as a pretrained directory.

  Args:
    out_dir: created if needed; must not already hold a checkpoint.
    params: nested dict of arrays with the tree of the model class of its heads.
    cfg: the model configuration.
    tokenizer: a sentencepiece model or BERT ``vocab.txt`` to copy in, or None.
    lowercase: WordPiece only: whether the vocabulary is uncased.
    source: JSON-able provenance recorded in config.json.

  Returns:
    The config.json contents.
  """
  from safetensors.numpy import save  # To bytes: its save_file writes local files only.
  heads = heads_of(params)
  options = head_options(params)
  check_shapes(abstract_params(model_factory(cfg, heads, options)), params,
               'parameter tree')
  out_dir = storage.absolute(out_dir)
  out = epath.Path(out_dir)
  if (out / CHECKPOINT_DIR).exists():
    raise FileExistsError(f'{out_dir} already holds a checkpoint; choose an empty --out')
  out.mkdir(parents=True, exist_ok=True)
  tok = None
  if tokenizer:
    kind = tokenizer_type(tokenizer)
    vocab = open_tokenizer(tokenizer, lowercase=lowercase).vocab_size
    if vocab > cfg.vocab_size:
      raise ValueError(f'tokenizer {tokenizer} has {vocab} ids but the model only '
                       f'{cfg.vocab_size} word embeddings')
    tok = dict(type=kind, file=TOKENIZER_FILES[kind], lowercase=bool(lowercase),
               vocab_size=vocab)
    storage.copy_file(tokenizer, out / tok['file'])
  config = dict(format=FORMAT, format_version=FORMAT_VERSION,
                model_config=dataclasses.asdict(cfg), heads=list(heads),
                head_options=options, tokenizer=tok, source=dict(source or {}))
  host = jax.tree.map(np.asarray, dict(params))
  ckpt = ckpt_lib.Checkpointer(storage.join(out_dir, CHECKPOINT_DIR), save_every=1, keep=1,
                               async_save=False)
  ckpt.save(0, host, config, force=True)
  ckpt.close()
  (out / SAFETENSORS_FILE).write_bytes(
      save(torch_state_dict(host, cfg.num_layers, heads),
           metadata={'format': 'pt', 'vlp_heads': ','.join(heads)}))
  (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
  return config


def config_from_dict(fields: Mapping[str, Any], **overrides) -> UniterConfig:
  """`UniterConfig` from stored fields; unknown fields are an error."""
  known = {f.name for f in dataclasses.fields(UniterConfig)}
  unknown = sorted((set(fields) | set(overrides)) - known)
  if unknown:
    raise ValueError(f'unknown UniterConfig field(s) {unknown}')
  return UniterConfig(**{**fields, **overrides})


def read_config(directory: str) -> dict:
  """config.json of a pretrained directory (checked to be one)."""
  path = epath.Path(directory) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{directory} is not a pretrained directory: no {CONFIG_FILE} '
                            '(write one with python -m vlp.export or vlp.tools.import_uniter)')
  config = json.loads(path.read_text())
  if config.get('format') != FORMAT or config.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{path}: format {config.get("format")!r} version '
                     f'{config.get("format_version")!r}; expected {FORMAT!r} {FORMAT_VERSION}')
  return config


def load_pretrained(directory: str, *, sharding: jax.sharding.Sharding | None = None,
                    **overrides):
  """(model, tokenizer) from a directory written by `vlp.export` or `import_uniter`.

  Args:
    directory: the pretrained directory.
    sharding: where every parameter goes (default: the first local device).
    **overrides: `UniterConfig` fields to change, e.g. ``dtype='bfloat16'`` or
      ``hidden_dropout=0.0``; shape-changing ones fail with the mismatching leaves.

  Returns:
    The model (class chosen by the heads; see the module docstring) with the
    stored parameters, and its tokenizer (`Tokenizer`, `WordPieceTokenizer`, or
    None when the directory has none).
  """
  directory = storage.absolute(directory)
  config = read_config(directory)
  cfg = config_from_dict(config['model_config'], **overrides)
  make = model_factory(cfg, config['heads'], config.get('head_options'))
  params, _, _ = ckpt_lib.restore_params(storage.join(directory, CHECKPOINT_DIR), 0,
                                         sharding=sharding)
  model = nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0)))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  target = nnx.to_pure_dict(state)
  check_shapes(target, params, f'checkpoint of {directory}')
  nnx.replace_by_pure_dict(state,
                           jax.tree.map(lambda t, x: x.astype(t.dtype), target, params))
  model = nnx.merge(graphdef, state, rest)
  tok = config.get('tokenizer')
  tokenizer = (open_tokenizer(storage.join(directory, tok['file']),
                              lowercase=tok.get('lowercase', False)) if tok else None)
  return model, tokenizer
