"""Training workdirs as sources of parameters: their checkpoints and model configs."""

from __future__ import annotations

from typing import Mapping

from etils import epath

from vlp import checkpoint as ckpt_lib
from vlp import storage
from vlp.models.uniter_config import UniterConfig, model_config
from vlp.pretrained.directory import config_from_dict, save_pretrained


def workdir_checkpoints(path: str) -> str | None:
  """The Checkpointer directory of a workdir (or the path itself), if it has steps."""
  for d in (epath.Path(path) / 'checkpoints', epath.Path(path)):
    if d.is_dir() and any(p.name.isdigit() for p in d.iterdir()):
      return storage.absolute(d)
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
  ckpt_dir = workdir_checkpoints(workdir)
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
  if not epath.Path(tokenizer).exists():
    raise FileNotFoundError(f'tokenizer {tokenizer} (named by the checkpoint) does not '
                            'exist here; pass --tokenizer=PATH')
  return save_pretrained(out_dir, params, cfg, tokenizer=tokenizer, lowercase=lowercase,
                         source=dict(kind='export', workdir=storage.absolute(workdir),
                                     step=int(step)))
