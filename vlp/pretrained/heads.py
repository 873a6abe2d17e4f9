"""Which heads a parameter tree has, and the model class that has exactly those."""

from __future__ import annotations

from typing import Mapping

from vlp.models.torch_names import FINETUNING_HEADS, PRETRAINING_HEADS
from vlp.models.uniter_config import UniterConfig

HEAD_ORDER = PRETRAINING_HEADS + FINETUNING_HEADS


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
    return make(downstream.UniterEncoder)
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
