"""Runs jobs through `vlp.train.loop` with the device order of a TPU torus.

  python tests/torus_driver.py SPEC.json

On a TPU slice JAX lists devices in physical-torus order, so the rows of the
global batch that one host feeds are not contiguous (a v5litepod-16 gives row
owners 0,0,1,1,1,1,0,2,...). CPU devices come in process order, which hides any
code that assumes contiguous rows. This driver replaces the mesh's device grid by
`SPEC["order"]`: positions into the job's devices sorted by (process, id). Run it
as one process (all devices local) or under `launch/local_multiprocess.sh`.

SPEC: {"order": [int, ...], "runs": [{"config": "configs/x.py:arg",
       "workdir": str, "overrides": {dotted key: value}}, ...]}
Each run's evaluation goes to its workdir as the loop writes it.
"""

import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(spec_path: str) -> None:
  with open(spec_path) as f:
    spec = json.load(f)
  from vlp.parallel import runtime
  env = os.environ
  runtime.initialize(
      coordinator_address=env.get("VLP_COORDINATOR_ADDRESS") or None,
      num_processes=int(env.get("VLP_NUM_PROCESSES", "1")),
      process_id=int(env["VLP_PROCESS_ID"]) if "VLP_PROCESS_ID" in env else None,
      timeout=120)
  import jax
  from jax.experimental import mesh_utils

  order = spec["order"]

  def torus_grid(shape, devices, **_):
    devices = sorted(devices, key=lambda d: (d.process_index, d.id))
    if len(devices) != len(order):
      raise ValueError(f"order names {len(order)} devices, the mesh has {len(devices)}")
    return np.asarray([devices[i] for i in order], dtype=object).reshape(shape)

  mesh_utils.create_device_mesh = torus_grid
  from vlp import config_lib
  from vlp.train import loop
  for run in spec["runs"]:
    config = config_lib.load_config_file(os.path.join(REPO, run["config"]))
    config = config_lib.set_values(config, run["overrides"])
    loop.train_and_evaluate(config, run["workdir"])
  print(f"process {jax.process_index()}: done", flush=True)


if __name__ == "__main__":
  main(sys.argv[1])
