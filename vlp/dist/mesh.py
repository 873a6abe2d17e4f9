"""Device mesh from config.

`config.mesh` maps axis names to sizes, e.g. ``{'data': -1, 'fsdp': 1, 'tensor': 1}``;
one axis may be -1 ("all remaining devices"). Axes are built with explicit
`AxisType.Auto` (the compiler propagates shardings from in/out_shardings and
logical constraints) over one canonical device order, so data, parameters and
evaluators all agree on which device holds what. An optional outer ``dcn`` axis
spans TPU slices (multislice).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

AXIS_ORDER = ("dcn", "data", "fsdp", "tensor")


def resolve_axis_sizes(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """Fills a -1 axis and checks that the sizes multiply to the device count."""
  sizes = {k: int(v) for k, v in dict(mesh_cfg).items()}
  unknown = [k for k in sizes if k not in AXIS_ORDER]
  if unknown:
    raise ValueError(f"config.mesh names unknown axes {unknown}; known axes: {list(AXIS_ORDER)}")
  fill = [k for k, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {fill}")
  bad = {k: v for k, v in sizes.items() if v == 0 or v < -1}
  if bad:
    raise ValueError(f"config.mesh: axis sizes must be positive or -1, got {bad}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(
          f"config.mesh {sizes} does not divide the {num_devices} devices: the fixed "
          f"axes multiply to {fixed}, and {num_devices} is not a multiple of {fixed}")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"config.mesh {sizes} needs {fixed} devices but {num_devices} are available")
  return {k: sizes.get(k, 1) for k in AXIS_ORDER if k in sizes or k != "dcn"}


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_axis_sizes(mesh_cfg, len(devices))
  names = tuple(sizes)
  shape = tuple(sizes[n] for n in names)
  dcn = sizes.get("dcn", 1)
  if dcn > 1:
    # Multislice: the dcn axis crosses slices, every other axis stays inside one.
    ici_shape = tuple(1 if n == "dcn" else s for n, s in zip(names, shape))
    dcn_shape = tuple(dcn if n == "dcn" else 1 for n in names)
    grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices)
  else:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))
