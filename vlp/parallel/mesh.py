"""Device mesh from config.

`config.mesh` maps axis names to sizes, e.g. ``{'data': -1, 'fsdp': 1, 'tensor': 1}``;
one axis may be -1 ("all remaining devices"). Axes are built with explicit
`AxisType.Auto` (the compiler propagates shardings from in/out_shardings and
logical constraints) over one canonical device order, so data, parameters and
evaluators all agree on which device holds what. An optional outer ``dcn`` axis
spans TPU slices (multislice) or GPU hosts; it is left out when its size is 1, and
one that cannot be laid over the slices or processes is an error.
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
  # `dcn` only exists when it spans something; the other axes always exist.
  return {k: sizes.get(k, 1) for k in AXIS_ORDER if k != "dcn" or sizes.get(k, 1) > 1}


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The mesh over `devices` (default: all devices of all processes).

  A subset of devices (e.g. ``jax.devices()[:1]`` for a single-device reference
  run inside an 8-device test process) must be passed explicitly; the sizes in
  `mesh_cfg` must then multiply to ``len(devices)``.
  """
  devices = list(devices if devices is not None else jax.devices())
  sizes = resolve_axis_sizes(mesh_cfg, len(devices))
  names = tuple(sizes)
  shape = tuple(sizes[n] for n in names)
  dcn = sizes.get("dcn", 1)
  grid = None
  if dcn > 1:
    # Multislice: the dcn axis crosses slices (TPU) or processes (GPU hosts), every
    # other axis stays inside one, where the links are fast.
    ici_shape = tuple(1 if n == "dcn" else s for n, s in zip(names, shape))
    dcn_shape = tuple(dcn if n == "dcn" else 1 for n in names)
    by_process = getattr(devices[0], "slice_index", None) is None
    granules = len({d.process_index if by_process else d.slice_index for d in devices})
    try:
      grid = mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                  process_is_granule=by_process)
    except (ValueError, NotImplementedError, AssertionError) as e:
      # A flat order would put the fast axes across the slow links: refuse it.
      raise ValueError(
          f"config.mesh {sizes}: the dcn axis of size {dcn} must span {dcn} "
          f"{'processes' if by_process else 'TPU slices'} with equal devices, but the "
          f"{len(devices)} devices are in {granules} ({e}); set config.mesh.dcn to the "
          f"number of {'processes' if by_process else 'slices'} or to 1") from e
  if grid is None:
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      # Shapes the physical topology cannot honour: keep the canonical order.
      grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))
