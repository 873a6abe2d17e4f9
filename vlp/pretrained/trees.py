"""Parameter trees as nested dicts: flatten, compare shapes, torch state dicts."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from flax import nnx

from vlp.models.torch_names import TIED_TORCH_KEYS, torch_name_table


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


def abstract_params(make_model) -> dict:
  """Nested dict of ShapeDtypeStructs of a model's parameters (nothing allocated)."""
  abstract = nnx.eval_shape(lambda: make_model(rngs=nnx.Rngs(0)))
  return nnx.to_pure_dict(nnx.state(abstract, nnx.Param))


def shape_mismatches(expected: Mapping, got: Mapping) -> list[str]:
  """Lines naming the missing, unexpected and mis-shaped leaves of `got` (none: [])."""
  exp = {p: tuple(v.shape) for p, v in flatten(expected).items()}
  have = {p: tuple(np.shape(v)) for p, v in flatten(got).items()}
  name = lambda p: '/'.join(map(str, p))
  missing = sorted(name(p) for p in exp.keys() - have.keys())
  unexpected = sorted(name(p) for p in have.keys() - exp.keys())
  shapes = sorted(f'{name(p)}: expected {exp[p]}, got {have[p]}'
                  for p in exp.keys() & have.keys() if exp[p] != have[p])
  return [f'  {title} ({len(items)}): ' + ', '.join(items)
          for title, items in (('missing', missing), ('unexpected', unexpected),
                               ('mis-shaped', shapes)) if items]


def check_shapes(expected: Mapping, got: Mapping, what: str) -> None:
  """Raises one ValueError listing missing, unexpected and mis-shaped leaves."""
  lines = shape_mismatches(expected, got)
  if lines:
    raise ValueError('\n'.join([f'{what} does not match the model:'] + lines))


def torch_state_dict(params: Mapping, num_layers: int, heads, *,
                     tied: bool = True) -> dict[str, np.ndarray]:
  """Flat reference-named numpy arrays (Linear weights transposed to (out, in)).

  With `tied`, the tied duplicates (`TIED_TORCH_KEYS`) whose source exists are
  added, so the dict loads strictly into the reference torch model.
  """
  flat = flatten(params)
  fix = lambda a, how: np.ascontiguousarray(a.T if how == 'transpose' else a)
  out = {key: fix(np.asarray(flat[path]), how)
         for key, path, how in torch_name_table(num_layers, heads)}
  if tied:
    for key, (path, how) in TIED_TORCH_KEYS.items():
      if key.split('.')[0] in heads:
        out[key] = fix(np.asarray(flat[path]), how)
  return out
