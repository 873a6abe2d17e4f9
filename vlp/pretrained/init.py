"""Initialising a model from `config.init_from`, straight into its shardings.

`init_from` names a training workdir (its latest checkpoint; a ``checkpoints/``
directory itself also works) or a pretrained directory (`vlp.export`,
`vlp.tools.import_uniter`). All three hold orbax checkpoints, so the parameters
are read straight into the target model's shardings and dtypes: every process
reads only its own shards, no host holds the whole tree, and nothing crosses
hosts (`init_params_from`). Which top-level entries are loaded is decided from
the stored shapes before any array is read.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax

from vlp import checkpoint as ckpt_lib
from vlp import storage
from vlp.models.downstream import UniterEncoder
from vlp.models.uniter_config import UniterConfig
from vlp.pretrained.directory import (CHECKPOINT_DIR, config_from_dict, is_pretrained_dir,
                                      read_config)
from vlp.pretrained.heads import heads_of
from vlp.pretrained.trees import abstract_params, check_shapes, shape_mismatches
from vlp.pretrained.workdir import model_config_from_meta, workdir_checkpoints

# The fields that fix the backbone's parameter shapes (plus num_heads, which does not
# show in any shape but changes what the weights mean).
BACKBONE_FIELDS = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads',
                   'intermediate_size', 'max_position_embeddings', 'type_vocab_size',
                   'img_dim', 'img_pos_dim')


@dataclasses.dataclass(frozen=True)
class InitSource:
  """Where `init_from` keeps its parameters, read from metadata only.

  Attributes:
    checkpoints: the orbax Checkpointer directory; step: the step to read.
    shapes: the stored parameter tree as ShapeDtypeStructs.
    model_config: the stored model's configuration.
    meta: the step's meta (training workdirs) or config.json (pretrained dirs).
  """
  checkpoints: str
  step: int
  shapes: dict
  model_config: UniterConfig
  meta: dict


def locate(init_from: str) -> InitSource:
  """The checkpoint `init_from` names (see the module docstring)."""
  if is_pretrained_dir(init_from):
    config = read_config(init_from)
    directory = storage.join(init_from, CHECKPOINT_DIR)
    shapes, _, step = ckpt_lib.stored_params(directory, 0)
    return InitSource(directory, step, shapes, config_from_dict(config['model_config']),
                      config)
  directory = workdir_checkpoints(init_from)
  if directory is None:
    raise FileNotFoundError(f'init_from={init_from!r} is neither a training workdir (with '
                            'checkpoints/) nor a pretrained directory (with config.json)')
  shapes, meta, step = ckpt_lib.stored_params(directory)
  return InitSource(directory, step, shapes, model_config_from_meta(meta, shapes), meta)


def _checked(init_from: str, model_cfg: UniterConfig) -> InitSource:
  """`locate`, then checks that the stored backbone is the one `model_cfg` builds."""
  source = locate(init_from)
  stored = source.model_config
  diff = [f'{f}: stored {getattr(stored, f)!r}, requested {getattr(model_cfg, f)!r}'
          for f in BACKBONE_FIELDS if getattr(stored, f) != getattr(model_cfg, f)]
  if diff:
    raise ValueError(f'{init_from} holds a different backbone: ' + '; '.join(diff))
  backbone = abstract_params(lambda rngs: UniterEncoder(model_cfg, rngs=rngs))['uniter']
  check_shapes({'uniter': backbone}, {'uniter': source.shapes['uniter']},
               f'backbone of {init_from}')
  heads_of(source.shapes)  # Refuses unknown top-level entries.
  return source


def load_params_for_init(init_from: str, model_cfg: UniterConfig, *,
                         sharding: jax.sharding.Sharding | None = None) -> dict:
  """Every stored entry of `init_from` (backbone ``uniter`` and each head, under the
  model's attribute names), on `sharding` (default: the first local device).

  For inspecting a source in one process; training initialises through
  `init_params_from`, which reads only what the model takes, into its shardings.

  Raises:
    ValueError: the stored backbone differs from `model_cfg` (the offending
      fields, or the missing / mis-shaped leaves, are listed).
  """
  source = _checked(init_from, model_cfg)
  params, _, _ = ckpt_lib.restore_params(source.checkpoints, source.step, sharding=sharding)
  return dict(params)


def plan(params: Mapping, stored: Mapping, *, strict_heads: bool,
         what: str = 'loaded') -> dict[str, list[str]]:
  """Which top-level entries of `params` to take from `stored` (shapes suffice).

  Returns the report: ``loaded`` (entries to take), ``fresh`` (kept as
  initialised: `stored` lacks them), ``mismatched`` (present with other shapes,
  kept fresh; only without `strict_heads`) and ``unused`` (stored entries the
  model has no place for).

  Raises:
    ValueError: the backbone, or with `strict_heads` any head, has other shapes.
  """
  report: dict[str, list[str]] = dict(loaded=[], fresh=[], unused=[], mismatched=[])
  for key in params:
    if key not in stored:
      report['fresh'].append(key)
      continue
    lines = shape_mismatches({key: params[key]}, {key: stored[key]})
    if lines:
      if strict_heads or key == 'uniter':
        raise ValueError('\n'.join([f'{what} {key!r} does not match the model:'] + lines))
      report['mismatched'].append(key)
    else:
      report['loaded'].append(key)
  report['unused'] = sorted(k for k in stored if k not in params)
  return report


def _log(report: Mapping[str, list[str]]) -> None:
  if jax.process_index() == 0:
    print('init from pre-trained parameters: ' + '; '.join(
        f"{k} {', '.join(v)}" for k, v in report.items() if v), flush=True)


def merge_params(params: Mapping, loaded: Mapping, *,
                 strict_heads: bool = True) -> tuple[dict, dict[str, list[str]]]:
  """Replaces the top-level entries of `params` that `loaded` has (in memory).

  Each loaded leaf takes the dtype (and, where it has one, the sharding) of the
  leaf it replaces; `plan` says which entries are taken and returns the report.
  Single-process: a host or one-device `loaded` cannot be placed on a sharding
  that spans processes; training uses `init_params_from`.
  """
  report = plan(params, loaded, strict_heads=strict_heads)
  merged = dict(params)
  for key in report['loaded']:
    merged[key] = jax.tree.map(_put_like, params[key], loaded[key])
  _log(report)
  return merged, report


def _put_like(target, x):
  x = jax.numpy.asarray(x).astype(target.dtype)
  sharding = getattr(target, 'sharding', None)
  return jax.device_put(x, sharding) if sharding is not None else x


def init_params_from(params: Mapping, init_from: str, model_cfg: UniterConfig, *,
                     strict_heads: bool = False) -> tuple[dict, dict[str, list[str]]]:
  """`params` (sharded jax.Arrays, e.g. a fresh `TrainState.params`) with every
  entry `init_from` has read from it, straight into the same shardings and dtypes.

  Works with any number of processes: each reads its own shards. Returns
  (params, report) as `merge_params`.
  """
  source = _checked(init_from, model_cfg)
  report = plan(params, source.shapes, strict_heads=strict_heads)
  target = {k: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params[k])
            for k in report['loaded']}
  loaded, _, _ = ckpt_lib.restore_params(source.checkpoints, source.step, target=target)
  _log(report)
  return {**dict(params), **{k: loaded[k] for k in report['loaded']}}, report


def tokenizer_of(init_from: str) -> tuple[str, bool] | None:
  """(file, lowercase) of the tokenizer `init_from` was trained with, or None when it
  names none. The file may be missing (a training workdir records a path on the
  machine that trained it); the caller says what to do then. `lowercase` is
  whether a WordPiece vocabulary is uncased."""
  if is_pretrained_dir(init_from):
    tok = read_config(init_from).get('tokenizer') or {}
    if not tok.get('file'):
      return None
    return (storage.absolute(storage.join(init_from, tok['file'])),
            bool(tok.get('lowercase', False)))
  directory = workdir_checkpoints(init_from)
  if directory is None:
    return None
  _, meta, _ = ckpt_lib.stored_params(directory)
  info = meta.get('model_info') or {}
  path = info.get('tokenizer') or (meta.get('config') or {}).get('tokenizer')
  return (path, bool(info.get('tokenizer_lowercase', False))) if path else None
