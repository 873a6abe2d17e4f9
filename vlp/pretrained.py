"""Pretrained model directories: write, load, and initialise fine-tuning from them.

A pretrained directory (``DIR``) is what `python -m vlp.export` writes from a
training workdir and `python -m vlp.tools.import_uniter` writes from a released
PyTorch UNITER checkpoint:

* ``checkpoint/``: an orbax checkpoint (`vlp.checkpoint.Checkpointer`, step 0)
  whose ``state`` item is the parameter tree alone (no optimizer state) and whose
  ``meta`` item repeats ``config.json``;
* ``model.safetensors``: the same parameters under the reference PyTorch names
  (`vlp.models.uniter.torch_name_table`, Linear weights as ``(out, in)``, plus the
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
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
from flax import nnx

from vlp import checkpoint as ckpt_lib
from vlp.models.uniter import (FINETUNING_HEADS, PRETRAINING_HEADS, TIED_TORCH_KEYS,
                               Uniter, torch_name_table)
from vlp.models.uniter_config import UniterConfig, model_config

FORMAT = 'vlp-pretrained'
FORMAT_VERSION = 1
CONFIG_FILE = 'config.json'
SAFETENSORS_FILE = 'model.safetensors'
CHECKPOINT_DIR = 'checkpoint'
TOKENIZER_FILES = {'sentencepiece': 'spm.model', 'wordpiece': 'vocab.txt'}
HEAD_ORDER = PRETRAINING_HEADS + FINETUNING_HEADS
# The fields that fix the backbone's parameter shapes (plus num_heads, which does not
# show in any shape but changes what the weights mean).
BACKBONE_FIELDS = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads',
                   'intermediate_size', 'max_position_embeddings', 'type_vocab_size',
                   'img_dim', 'img_pos_dim')


class UniterEncoder(nnx.Module):
  """The backbone alone, for checkpoints without heads; `encode` as the task models'."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.uniter = Uniter(cfg, rngs=rngs)

  @property
  def torch_heads(self) -> tuple[str, ...]:
    return ()

  def encode(self, batch: dict, *, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """dict(sequence [B, T+K, H], pooled [B, H]) in the compute dtype."""
    sequence, pooled = self.uniter(
        batch['input_ids'], batch['txt_mask'], batch['img_feat'], batch['img_pos'],
        batch['img_mask'], batch.get('img_masked'), rngs=rngs)
    return dict(sequence=sequence, pooled=pooled)


# ---------------------------------------------------------------------------------
# Parameter trees, heads and model classes.

def flatten(tree: Mapping) -> dict[tuple, Any]:
  """Nested dict -> {path tuple: leaf}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update({(k,) + p: x for p, x in flatten(v).items()})
    else:
      out[(k,)] = v
  return out


def unflatten(flat: Mapping[tuple, Any]) -> dict:
  """{path tuple: leaf} -> nested dict."""
  out: dict = {}
  for path, v in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def heads_of(params: Mapping) -> tuple[str, ...]:
  """The torch head names (`torch_name_table`) of a parameter tree, in table order."""
  heads = []
  for key in params:
    if key == 'uniter':
      continue
    if key == 're_output':
      heads.append('re_output' if 'kernel' in params[key] else 're_output_mlp2')
    elif key in HEAD_ORDER:
      heads.append(key)
    else:
      raise ValueError(f'parameter tree has an unknown top-level entry {key!r}; known: '
                       f"'uniter' and the heads {list(HEAD_ORDER)}")
  if 'uniter' not in params:
    raise ValueError(f'parameter tree has no backbone (uniter); top level: {list(params)}')
  return tuple(sorted(heads, key=HEAD_ORDER.index))


def head_options(params: Mapping) -> dict[str, int]:
  """Head sizes a model class needs that the config does not hold."""
  opts = {}
  if 'vqa_output' in params:
    opts['num_answers'] = int(params['vqa_output'][3]['kernel'].shape[-1])
  if 'dual_output' in params:
    if 'proj' not in params['dual_output']:
      raise ValueError('dual_output is a single Linear (written by vlp before the dual head '
                       'became a 2-layer matching head) and cannot be loaded; fine-tune the '
                       'dual stage again (configs/finetune_retrieval.py:stage=dual)')
    opts['dual_dim'] = int(params['dual_output']['proj']['kernel'].shape[-1])
  return opts


def model_factory(cfg: UniterConfig, heads, options: Mapping[str, int] | None = None):
  """`make_model(rngs=...)` for the model class that has exactly `heads`."""
  from vlp.models import downstream
  from vlp.models.pretraining import UniterForPretraining
  options = dict(options or {})
  hs = frozenset(heads)

  def make(cls, **kwargs):
    return lambda rngs: cls(cfg, rngs=rngs, **kwargs)

  if hs == frozenset(PRETRAINING_HEADS):
    return make(UniterForPretraining)
  if not hs:
    return make(UniterEncoder)
  if hs == {'vqa_output'}:
    return make(downstream.UniterForVqa,
                num_answers=options.get('num_answers', downstream.VQA_NUM_ANSWERS))
  if hs in ({'re_output'}, {'re_output_mlp2'}):
    return make(downstream.UniterForGrounding, mlp=1 if 're_output' in hs else 2)
  if hs in ({'itm_output', 'rank_output'}, {'itm_output', 'rank_output', 'dual_output'}):
    return make(downstream.UniterForRetrieval, dual_dim=options.get('dual_dim'))
  raise ValueError(
      f'no vlp model has exactly the heads {sorted(hs)}; supported sets: '
      f'{list(PRETRAINING_HEADS)} (UniterForPretraining), [] (UniterEncoder), '
      "['vqa_output'], ['re_output'] or ['re_output_mlp2'], "
      "['itm_output', 'rank_output'(, 'dual_output')]")


def abstract_params(make_model) -> dict:
  """Nested dict of ShapeDtypeStructs of a model's parameters (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: make_model(rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def check_shapes(expected: Mapping, got: Mapping, what: str) -> None:
  """Raises one ValueError listing missing, unexpected and mis-shaped leaves."""
  exp = {p: tuple(v.shape) for p, v in flatten(expected).items()}
  have = {p: tuple(np.shape(v)) for p, v in flatten(got).items()}
  name = lambda p: '/'.join(map(str, p))
  missing = sorted(name(p) for p in exp.keys() - have.keys())
  unexpected = sorted(name(p) for p in have.keys() - exp.keys())
  shapes = sorted(f'{name(p)}: expected {exp[p]}, got {have[p]}'
                  for p in exp.keys() & have.keys() if exp[p] != have[p])
  if missing or unexpected or shapes:
    lines = [f'{what} does not match the model:']
    for title, items in (('missing', missing), ('unexpected', unexpected),
                         ('mis-shaped', shapes)):
      if items:
        lines.append(f'  {title} ({len(items)}): ' + ', '.join(items))
    raise ValueError('\n'.join(lines))


def torch_state_dict(params: Mapping, num_layers: int, heads=None, *,
                     tied: bool = True) -> dict[str, np.ndarray]:
  """Flat reference-named numpy arrays (Linear weights transposed to (out, in)).

  With `tied`, the tied duplicates (`TIED_TORCH_KEYS`) whose source exists are
  added, so the dict loads strictly into the reference torch model.
  """
  heads = heads_of(params) if heads is None else heads
  flat = flatten(params)
  fix = lambda a, how: np.ascontiguousarray(a.T if how == 'transpose' else a)
  out = {key: fix(np.asarray(flat[path]), how)
         for key, path, how in torch_name_table(num_layers, heads)}
  if tied:
    for key, (path, how) in TIED_TORCH_KEYS.items():
      if key.split('.')[0] in heads:
        out[key] = fix(np.asarray(flat[path]), how)
  return out


# ---------------------------------------------------------------------------------
# Tokenizers.

def tokenizer_type(path: str) -> str:
  """'wordpiece' for a BERT ``*.txt`` vocabulary, else 'sentencepiece'."""
  return 'wordpiece' if os.fspath(path).endswith('.txt') else 'sentencepiece'


def open_tokenizer(path: str, *, lowercase: bool = False):
  """`Tokenizer` (sentencepiece) or `WordPieceTokenizer` (``*.txt``) for a file."""
  if tokenizer_type(path) == 'wordpiece':
    from vlp.data.wordpiece import WordPieceTokenizer
    return WordPieceTokenizer(path, lowercase=lowercase)
  from vlp.data.tokenizer import Tokenizer
  return Tokenizer(path)


# ---------------------------------------------------------------------------------
# Writing and reading a directory.

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
  from safetensors.numpy import save_file
  heads = heads_of(params)
  options = head_options(params)
  check_shapes(abstract_params(model_factory(cfg, heads, options)), params,
               'parameter tree')
  out_dir = os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, CHECKPOINT_DIR)):
    raise FileExistsError(f'{out_dir} already holds a checkpoint; choose an empty --out')
  os.makedirs(out_dir, exist_ok=True)
  tok = None
  if tokenizer:
    kind = tokenizer_type(tokenizer)
    vocab = open_tokenizer(tokenizer, lowercase=lowercase).vocab_size
    if vocab > cfg.vocab_size:
      raise ValueError(f'tokenizer {tokenizer} has {vocab} ids but the model only '
                       f'{cfg.vocab_size} word embeddings')
    tok = dict(type=kind, file=TOKENIZER_FILES[kind], lowercase=bool(lowercase),
               vocab_size=vocab)
    shutil.copyfile(tokenizer, os.path.join(out_dir, tok['file']))
  config = dict(format=FORMAT, format_version=FORMAT_VERSION,
                model_config=dataclasses.asdict(cfg), heads=list(heads),
                head_options=options, tokenizer=tok, source=dict(source or {}))
  host = jax.tree.map(np.asarray, dict(params))
  ckpt = ckpt_lib.Checkpointer(os.path.join(out_dir, CHECKPOINT_DIR), save_every=1, keep=1,
                               async_save=False)
  ckpt.save(0, host, config, force=True)
  ckpt.close()
  save_file(torch_state_dict(host, cfg.num_layers, heads),
            os.path.join(out_dir, SAFETENSORS_FILE),
            metadata={'format': 'pt', 'vlp_heads': ','.join(heads)})
  with open(os.path.join(out_dir, CONFIG_FILE), 'w') as f:
    json.dump(config, f, indent=2)
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
  path = os.path.join(directory, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{directory} is not a pretrained directory: no {CONFIG_FILE} '
                            '(write one with python -m vlp.export or vlp.tools.import_uniter)')
  with open(path) as f:
    config = json.load(f)
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
  directory = os.path.abspath(directory)
  config = read_config(directory)
  cfg = config_from_dict(config['model_config'], **overrides)
  make = model_factory(cfg, config['heads'], config.get('head_options'))
  params, _, _ = ckpt_lib.restore_params(os.path.join(directory, CHECKPOINT_DIR), 0,
                                         sharding=sharding)
  model = nnx.eval_shape(lambda: make(rngs=nnx.Rngs(0)))
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  target = nnx.to_pure_dict(state)
  check_shapes(target, params, f'checkpoint of {directory}')
  nnx.replace_by_pure_dict(state,
                           jax.tree.map(lambda t, x: x.astype(t.dtype), target, params))
  model = nnx.merge(graphdef, state, rest)
  tok = config.get('tokenizer')
  tokenizer = (open_tokenizer(os.path.join(directory, tok['file']),
                              lowercase=tok.get('lowercase', False)) if tok else None)
  return model, tokenizer


# ---------------------------------------------------------------------------------
# Training workdirs: export and fine-tuning initialisation.

def _workdir_checkpoints(path: str) -> str | None:
  """The Checkpointer directory of a workdir (or the path itself), if it has steps."""
  for d in (os.path.join(path, 'checkpoints'), path):
    if os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d)):
      return d
  return None


def model_config_from_meta(meta: Mapping, params: Mapping) -> UniterConfig:
  """The model config of a training checkpoint.

  Uses ``meta['model_info']['model_config']`` (the loop stores the job's
  `model_info`); for older checkpoints it rebuilds it from the run's config
  (``meta['config']``: size, model fields, compute dtype) and the parameter
  shapes (vocabulary, features, classes).
  """
  info = meta.get('model_info') or {}
  if info.get('model_config'):
    return config_from_dict(info['model_config'])
  run = meta.get('config')
  if not run or 'model' not in run:
    raise ValueError('checkpoint meta holds neither model_config nor the run config; '
                     'cannot tell the model architecture')
  fields = {k: v for k, v in run['model'].items() if k != 'size' and v is not None}
  emb = params['uniter']['embeddings']
  fields.update(vocab_size=int(emb['word_embeddings']['embedding'].shape[0]),
                img_dim=int(params['uniter']['img_embeddings']['img_linear']['kernel'].shape[0]))
  if 'region_classifier' in params:
    fields['num_region_classes'] = int(params['region_classifier']['net'][3]['kernel'].shape[1])
  if run.get('compute_dtype'):
    fields['dtype'] = run['compute_dtype']
  return model_config(run['model'].get('size', 'base'), **fields)


def export_workdir(workdir: str, out_dir: str, *, step: int | None = None,
                   tokenizer: str | None = None, lowercase: bool = False) -> dict:
  """Writes the parameters of a training workdir's checkpoint as a pretrained dir.

  Args:
    workdir: a pretraining or fine-tuning workdir (its ``checkpoints/``).
    out_dir: the pretrained directory to write.
    step: the checkpoint step (default: the latest).
    tokenizer: tokenizer file; default: ``meta['model_info']['tokenizer']`` (or
      the run config's ``tokenizer``).
    lowercase: WordPiece only: the vocabulary is uncased (default: the meta's
      ``model_info['tokenizer_lowercase']``, else False).

  Returns:
    The config.json contents.
  """
  ckpt_dir = _workdir_checkpoints(workdir)
  if ckpt_dir is None:
    raise FileNotFoundError(f'no checkpoints under {workdir} (expected {workdir}/checkpoints)')
  params, meta, step = ckpt_lib.restore_params(ckpt_dir, step)
  cfg = model_config_from_meta(meta, params)
  info = meta.get('model_info') or {}
  if not tokenizer:
    tokenizer = info.get('tokenizer') or (meta.get('config') or {}).get('tokenizer')
    lowercase = bool(info.get('tokenizer_lowercase', lowercase))
  if not tokenizer:
    raise ValueError(f'the checkpoint in {ckpt_dir} does not name its tokenizer; '
                     'pass --tokenizer=PATH')
  if not os.path.exists(tokenizer):
    raise FileNotFoundError(f'tokenizer {tokenizer} (named by the checkpoint) does not '
                            'exist here; pass --tokenizer=PATH')
  return save_pretrained(out_dir, params, cfg, tokenizer=tokenizer, lowercase=lowercase,
                         source=dict(kind='export', workdir=os.path.abspath(workdir),
                                     step=int(step)))


def load_params_for_init(init_from: str, model_cfg: UniterConfig, *,
                         sharding: jax.sharding.Sharding | None = None) -> dict:
  """Pre-trained parameters for initialising a (fine-tuning) model.

  Args:
    init_from: a training workdir (its latest checkpoint; a ``checkpoints/``
      directory itself also works), or a pretrained directory written by
      `python -m vlp.export` or `python -m vlp.tools.import_uniter`.
    model_cfg: the configuration of the model being initialised. Its backbone
      fields (`BACKBONE_FIELDS`) must equal the stored ones; dtypes, dropout and
      the like may differ.
    sharding: where the loaded arrays go (default: the first local device);
      `merge_params` moves them to the target model's shardings anyway.

  Returns:
    A pure nested dict (list indices as ints) holding ``uniter`` (the backbone)
    and every head the source has, under the model's attribute names, e.g.
    ``{'uniter': ..., 'cls': ..., 'itm_output': ...}`` for a pre-training run. It
    is meant for `merge_params`: the fine-tuning model keeps its own fresh
    parameters for heads the source lacks (e.g. ``vqa_output``) and ignores
    source heads it does not have (e.g. ``cls``). A retrieval model whose
    ``rank_output`` stayed fresh should then call ``init_rank_from_itm()``.

  Raises:
    ValueError: the stored backbone differs from `model_cfg` (the offending
      fields, or the missing / mis-shaped leaves, are listed).
  """
  ckpt_dir = _workdir_checkpoints(init_from)
  if os.path.exists(os.path.join(init_from, CONFIG_FILE)):
    stored = config_from_dict(read_config(init_from)['model_config'])
    params, _, _ = ckpt_lib.restore_params(os.path.join(init_from, CHECKPOINT_DIR), 0,
                                           sharding=sharding)
  elif ckpt_dir is not None:
    params, meta, _ = ckpt_lib.restore_params(ckpt_dir, sharding=sharding)
    stored = model_config_from_meta(meta, params)
  else:
    raise FileNotFoundError(f'init_from={init_from!r} is neither a training workdir '
                            f'(with checkpoints/) nor a pretrained directory (with {CONFIG_FILE})')
  diff = [f'{f}: stored {getattr(stored, f)!r}, requested {getattr(model_cfg, f)!r}'
          for f in BACKBONE_FIELDS if getattr(stored, f) != getattr(model_cfg, f)]
  if diff:
    raise ValueError(f'{init_from} holds a different backbone: ' + '; '.join(diff))
  backbone = abstract_params(lambda rngs: UniterEncoder(model_cfg, rngs=rngs))['uniter']
  check_shapes({'uniter': backbone}, {'uniter': params['uniter']}, f'backbone of {init_from}')
  heads_of(params)  # Refuses unknown top-level entries.
  return dict(params)


def merge_params(params: Mapping, loaded: Mapping, *,
                 strict_heads: bool = True) -> tuple[dict, dict[str, list[str]]]:
  """Replaces the top-level entries of `params` that `loaded` has.

  Args:
    params: the target model's pure parameter dict (e.g. `TrainState.params`);
      each loaded leaf takes the dtype and sharding of the leaf it replaces.
    loaded: from `load_params_for_init`.
    strict_heads: a head present on both sides with different shapes (e.g. a
      different answer vocabulary) is an error; with False it stays fresh and is
      reported under ``mismatched``.

  Returns:
    (merged params, report) with report keys ``loaded`` (entries taken from
    `loaded`), ``fresh`` (entries kept as initialised), ``unused`` (entries of
    `loaded` the model has no place for) and ``mismatched``.
  """
  merged, report = dict(params), dict(loaded=[], fresh=[], unused=[], mismatched=[])
  for key in params:
    if key not in loaded:
      report['fresh'].append(key)
      continue
    try:
      check_shapes({key: params[key]}, {key: loaded[key]}, f'loaded {key!r}')
    except ValueError:
      if strict_heads or key == 'uniter':
        raise
      report['mismatched'].append(key)
      continue
    merged[key] = jax.tree.map(_put_like, params[key], loaded[key])
    report['loaded'].append(key)
  report['unused'] = sorted(k for k in loaded if k not in params)
  if jax.process_index() == 0:
    print('init from pre-trained parameters: ' + '; '.join(
        f"{k} {', '.join(v)}" for k, v in report.items() if v), flush=True)
  return merged, report


def _put_like(target, x):
  """`x` with the dtype and (if it has one) the sharding of `target`."""
  x = jax.numpy.asarray(x).astype(target.dtype)
  sharding = getattr(target, 'sharding', None)
  return jax.device_put(x, sharding) if sharding is not None else x
