"""Rule tables (presets) and shardings for parameters, state and batches.

Presets map logical names to mesh axes:
  * ``dp``: parameters replicated, batch split over every data-like axis.
  * ``fsdp``: parameters (and so optimizer state) split along ``embed`` over the
    ``fsdp`` axis (ZeRO-3 style); the batch is split over ``data`` and ``fsdp``.
  * ``fsdp_tp``: as ``fsdp`` plus Megatron-style tensor parallelism: ``heads``,
    ``mlp``, ``vocab`` and ``classes`` over the ``tensor`` axis.

`config.sharding` names a preset or gives a custom table, either as a string
(what the command line can carry) or, in a config file, as a list of
``(logical, mesh_axes)`` pairs or a dict. The string is comma-separated items:
``logical=axes`` with several mesh axes joined by ``+`` (``none`` or nothing for
replicated), and optionally one preset name whose rules come after the explicit
ones (the first rule for a name wins). For example:
  --config.sharding=fsdp
  --config.sharding="embed=fsdp,mlp=tensor,heads=tensor,batch=data+fsdp"
  --config.sharding="fsdp_tp,vocab=none"      # fsdp_tp, but keep vocab unsplit
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlp.parallel import logical
from vlp.parallel.mesh import AXIS_ORDER

BATCH_AXES = ("dcn", "data", "fsdp")

PRESETS: dict[str, list[tuple[str, Any]]] = {
    "dp": [("batch", BATCH_AXES)],
    "fsdp": [("batch", BATCH_AXES), ("embed", "fsdp")],
    "fsdp_tp": [
        ("batch", BATCH_AXES), ("embed", "fsdp"), ("heads", "tensor"),
        ("mlp", "tensor"), ("vocab", "tensor"), ("classes", "tensor"),
    ],
}

# Logical names the model uses (design.md): on parameters, and activation-only.
PARAM_NAMES = ("vocab", "embed", "heads", "mlp", "region_feat", "classes", "pos", "type",
               "box")
ACTIVATION_NAMES = ("batch", "length")


def parse_rules(sharding: str | Sequence | Mapping) -> list[tuple[str, Any]]:
  """A preset name, a rule string, a list of pairs or a dict -> list of rules."""
  if isinstance(sharding, Mapping):
    return [(str(k), v) for k, v in sharding.items()]
  if not isinstance(sharding, str):
    return [tuple(r) for r in sharding]
  explicit, presets = [], []
  for item in (x.strip() for x in sharding.split(",")):
    if not item:
      continue
    if "=" not in item:
      if item not in PRESETS:
        raise ValueError(f"config.sharding: {item!r} is not a preset; choose one of "
                         f"{sorted(PRESETS)} or give rules like 'embed=fsdp,batch=data+fsdp'")
      presets.append(item)
      continue
    name, axes = (x.strip() for x in item.split("=", 1))
    axes_t = tuple(a.strip() for a in axes.split("+") if a.strip())
    if axes_t in ((), ("none",), ("None",)):
      explicit.append((name, None))
    else:
      explicit.append((name, axes_t[0] if len(axes_t) == 1 else axes_t))
  if len(presets) > 1:
    raise ValueError(f"config.sharding={sharding!r} names several presets {presets}")
  if not explicit and not presets:
    raise ValueError("config.sharding is empty; give a preset name or rules")
  return explicit + (list(PRESETS[presets[0]]) if presets else [])


def rules_for(sharding: str | Sequence | Mapping, mesh: Mesh) -> list[tuple[str, Any]]:
  """Returns the rule table for a preset name or a custom table, validated."""
  rules = parse_rules(sharding)
  known = PARAM_NAMES + ACTIVATION_NAMES
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"sharding rule {rule!r} is not a (logical, mesh_axes) pair")
    name, axes = rule
    if name not in known:
      raise ValueError(f"sharding rule ({name!r} -> {axes!r}) names an unknown logical "
                       f"axis; known: {list(known)}")
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
    for a in axes_t:
      if a not in mesh.axis_names and a not in AXIS_ORDER:
        raise ValueError(f"sharding rule ({name!r} -> {axes!r}) names mesh axis {a!r}, "
                         f"but the mesh has axes {list(mesh.axis_names)}")
  return [tuple(r) for r in rules]


def param_shardings(abstract_state: Any, mesh: Mesh, rules, *, strict: bool = False) -> dict:
  """NamedShardings for an nnx.State's leaves, as a pure nested dict.

  The logical names come from each Variable's ``out_sharding`` metadata; the
  result mirrors ``abstract_state.to_pure_dict()``. A mesh axis that does not
  divide the dimension it is mapped to is dropped there, with a warning naming
  the parameter (e.g. a vocabulary of 28996 over a tensor axis of 8); with
  `strict` (`config.strict_sharding`) it is an error listing every such case.
  """
  out: dict = {}
  dropped: list[str] = []
  for path, var in nnx.to_flat_state(abstract_state):
    names = var.get_metadata().get("out_sharding")
    spec = logical.logical_to_spec(names, rules, mesh) if names else P()
    shape = var.get_value().shape
    spec, lost = _fit_spec(spec, shape, mesh)
    dropped += [f"{'/'.join(map(str, path))} {tuple(shape)}: dim {i} ({names[i]}) is not "
                f"divisible by mesh axes {axes} of size {size}" for i, axes, size in lost]
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = NamedSharding(mesh, spec)
  if dropped:
    msg = (f"config.sharding leaves {len(dropped)} parameter dimension(s) unsplit on mesh "
           f"{dict(mesh.shape)}:\n  " + "\n  ".join(dropped))
    if strict:
      raise ValueError(msg + "\n(config.strict_sharding=True; change the mesh, the rules "
                       "or the model size, or turn strict_sharding off)")
    logging.warning(msg)
  return out


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> tuple[P, list]:
  """Drops axes that do not divide a dimension; returns (spec, [(dim, axes, size)])."""
  out, lost = [], []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None or i >= len(shape):
      out.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    size = int(np.prod([mesh.shape[a] for a in axes_t]))
    if shape[i] % size == 0:
      out.append(axes)
    else:
      out.append(None)
      lost.append((i, axes, size))
  return P(*out[:len(shape)]), lost


def batch_spec(mesh: Mesh, rules, ndim: int) -> P:
  return logical.logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)


def batch_shard_count(mesh: Mesh, rules) -> int:
  """Into how many pieces the batch axis is split (batch sizes must divide by it)."""
  spec = batch_spec(mesh, rules, 1)[0]
  axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
  return int(np.prod([mesh.shape[a] for a in axes]))


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules) -> dict:
  return {k: NamedSharding(mesh, batch_spec(mesh, rules, np.ndim(v))) for k, v in batch.items()}


def promises_param_sharding(rules, mesh: Mesh) -> bool:
  """Whether the table maps some parameter axis onto a mesh axis of size > 1."""
  for name, axes in logical.rules_dict(rules).items():
    if name in PARAM_NAMES and axes is not None:
      axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
      if any(mesh.shape.get(a, 1) > 1 for a in axes_t):
        return True
  return False


def check_sufficiently_sharded(abstract_params: Any, shardings: Any, sharding: Any,
                               mesh: Mesh, rules=None, *, min_bytes: int = 4 * 2**20) -> None:
  """Refuses a table that promises parameter sharding (e.g. the ``fsdp`` preset on
  a mesh with ``fsdp > 1``) but leaves a parameter over `min_bytes` replicated."""
  rules = rules_for(sharding, mesh) if rules is None else rules
  if not promises_param_sharding(rules, mesh):
    return  # dp, or nothing to shard over: replication is what was asked for.
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
  sh = jax.tree_util.tree_leaves(shardings)
  bad = []
  for (path, leaf), s in zip(leaves, sh):
    nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    if nbytes > min_bytes and all(a is None for a in s.spec):
      bad.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} ({nbytes / 2**20:.1f} MiB)")
  if bad:
    raise ValueError(f"sharding {sharding!r} on mesh {dict(mesh.shape)} leaves parameters "
                     f"over {min_bytes / 2**20:.0f} MiB replicated: " + "; ".join(bad))
