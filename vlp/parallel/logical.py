"""Logical axis names -> mesh axes.

Parameters and key activations are annotated with *logical* names (``batch``,
``embed``, ``heads`` ...). One rule table maps each logical name to a mesh axis (or
a tuple of mesh axes, or ``None`` for replicated). The table is data (it lives in
the config), so the model code never names a mesh axis.

Activation constraints go through :func:`constrain`, which is a no-op unless the
caller has activated a mesh and a rule table with :func:`activate`. That keeps the
model usable eagerly, in tests and on one device without any sharding set-up.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_ACTIVE: contextvars.ContextVar[tuple[Mesh, dict] | None] = contextvars.ContextVar(
    "vlp_logical_rules", default=None)


def rules_dict(rules: LogicalRules | Mapping) -> dict:
  """Normalises a rule table (list of pairs or mapping) to a dict; first rule wins."""
  items = rules.items() if isinstance(rules, Mapping) else rules
  out: dict = {}
  for name, axes in items:
    if isinstance(axes, list):
      axes = tuple(axes)
    out.setdefault(name, axes)
  return out


def logical_to_spec(names: Sequence[str | None] | None, rules: LogicalRules | Mapping,
                    mesh: Mesh | None = None) -> P:
  """Maps a tuple of logical names to a PartitionSpec.

  A mesh axis is used at most once per spec (later dimensions that would reuse it
  stay replicated), and mesh axes of size 1 are dropped so specs stay readable.
  """
  if names is None:
    return P()
  table = rules_dict(rules)
  used: set[str] = set()
  spec = []
  for name in names:
    axes = table.get(name) if name is not None else None
    if axes is None:
      spec.append(None)
      continue
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    if mesh is not None:
      axes_t = tuple(a for a in axes_t if mesh.shape.get(a, 1) > 1)
    axes_t = tuple(a for a in axes_t if a not in used)
    used.update(axes_t)
    if not axes_t:
      spec.append(None)
    elif len(axes_t) == 1:
      spec.append(axes_t[0])
    else:
      spec.append(axes_t)
  return P(*spec)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: LogicalRules | Mapping) -> Iterator[None]:
  """Makes `constrain` effective while tracing under this context."""
  token = _ACTIVE.set((mesh, rules_dict(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names (no-op when inactive)."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  if mesh.size == 1:
    return x
  spec = logical_to_spec(names, rules, mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
