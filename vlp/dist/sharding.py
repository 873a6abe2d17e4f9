"""Rule tables (presets) and shardings for parameters, state and batches.

Presets map logical names to mesh axes:
  * ``dp``: parameters replicated, batch split over every data-like axis.
  * ``fsdp``: parameters (and so optimizer state) split along ``embed`` over the
    ``fsdp`` axis (ZeRO-3 style); the batch is split over ``data`` and ``fsdp``.
  * ``fsdp_tp``: as ``fsdp`` plus Megatron-style tensor parallelism: ``heads``,
    ``mlp``, ``vocab`` and ``classes`` over the ``tensor`` axis.
A custom table (a list of ``(logical, mesh_axes)`` pairs) can be given instead.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlp.dist import logical

BATCH_AXES = ("dcn", "data", "fsdp")

PRESETS: dict[str, list[tuple[str, Any]]] = {
    "dp": [("batch", BATCH_AXES)],
    "fsdp": [("batch", BATCH_AXES), ("embed", "fsdp")],
    "fsdp_tp": [
        ("batch", BATCH_AXES), ("embed", "fsdp"), ("heads", "tensor"),
        ("mlp", "tensor"), ("vocab", "tensor"), ("classes", "tensor"),
    ],
}

# Which logical names a preset promises to shard; used by `check_sufficiently_sharded`.
_SHARDS_PARAMS = {"dp": False, "fsdp": True, "fsdp_tp": True}


def rules_for(sharding: str | Sequence, mesh: Mesh) -> list[tuple[str, Any]]:
  """Returns the rule table for a preset name or a custom table, validated."""
  if isinstance(sharding, str):
    if sharding not in PRESETS:
      raise ValueError(f"config.sharding={sharding!r} is not a preset; choose one of "
                       f"{sorted(PRESETS)} or give a list of (logical, mesh_axes) rules")
    rules = PRESETS[sharding]
  else:
    rules = [tuple(r) for r in sharding]
  for name, axes in rules:
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes or ())
    for a in axes_t:
      if a not in mesh.axis_names and a not in BATCH_AXES:
        raise ValueError(f"sharding rule ({name!r} -> {axes!r}) names mesh axis {a!r}, "
                         f"but the mesh has axes {list(mesh.axis_names)}")
  return rules


def param_shardings(abstract_state: Any, mesh: Mesh, rules) -> dict:
  """NamedShardings for an nnx.State's leaves, as a pure nested dict.

  The logical names come from each Variable's ``out_sharding`` metadata; the
  result mirrors ``abstract_state.to_pure_dict()``.
  """
  out: dict = {}
  for path, var in nnx.to_flat_state(abstract_state):
    names = var.get_metadata().get("out_sharding")
    spec = logical.logical_to_spec(names, rules, mesh) if names else P()
    spec = _fit_spec(spec, var.value.shape, mesh)
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = NamedSharding(mesh, spec)
  return out


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops axes that do not divide a dimension (e.g. a vocab of 1000 over 3)."""
  out = []
  for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None or i >= len(shape):
      out.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    size = int(np.prod([mesh.shape[a] for a in axes_t]))
    out.append(axes if shape[i] % size == 0 else None)
  return P(*out[:len(shape)])


def batch_spec(mesh: Mesh, rules, ndim: int) -> P:
  return logical.logical_to_spec(("batch",) + (None,) * (ndim - 1), rules, mesh)


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh, rules) -> dict:
  return {k: NamedSharding(mesh, batch_spec(mesh, rules, np.ndim(v))) for k, v in batch.items()}


def check_sufficiently_sharded(abstract_params: Any, shardings: Any, sharding: Any,
                               mesh: Mesh, min_bytes: int = 4 * 2**20) -> None:
  """Refuses a preset that promises sharding but leaves a large parameter replicated."""
  if not isinstance(sharding, str) or not _SHARDS_PARAMS.get(sharding):
    return
  if mesh.shape.get("fsdp", 1) * mesh.shape.get("tensor", 1) == 1:
    return  # Nothing to shard over; the preset degenerates to dp.
  leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
  sh = jax.tree_util.tree_leaves(shardings)
  bad = []
  for (path, leaf), s in zip(leaves, sh):
    nbytes = int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    if nbytes > min_bytes and all(a is None for a in s.spec):
      bad.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} ({nbytes / 2**20:.1f} MiB)")
  if bad:
    raise ValueError(f"sharding preset {sharding!r} leaves parameters over "
                     f"{min_bytes / 2**20:.0f} MiB replicated: " + "; ".join(bad))
