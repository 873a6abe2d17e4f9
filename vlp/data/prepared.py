"""Which build of a dataset a run reads: the builder config prepared under data_dir.

`vlp.data.prepare` names each build after its storage choices (`float16`,
`float16_c1601` with soft labels, ...; vlp.data.builders.region_base), while
`tfds.builder(NAME)` opens the builder's default config whether or not that one
was built. `open_prepared(NAME)` opens the one build there is; with several it
lists them and the exact `--config.data=NAME/CONFIG` to choose one.
"""

from __future__ import annotations

import os

from etils import epath
import tensorflow_datasets as tfds

from vlp.data import builders  # registers the real-dataset builders


def prepared_configs(name: str, data_dir: str) -> list[str]:
  """The builder configs of `name` with a finished build under `data_dir`
  (`<data_dir>/<name>/<config>/<version>/dataset_info.json`; local or an object
  store), sorted."""
  root = epath.Path(os.fspath(data_dir)) / name
  if not root.is_dir():
    return []
  return sorted(c.name for c in root.iterdir()
                if c.is_dir() and any((v / 'dataset_info.json').exists()
                                      for v in c.iterdir() if v.is_dir()))


def open_prepared(name: str, config: str, data_dir: str, *, key: str = 'data_dir'):
  """The prepared builder of dataset `name`, build `config` ('' = the only one);
  `data_dir` is `config.<key>` in errors."""
  where = f'config.{key}={os.fspath(data_dir)!r}'
  prepare = f'python -m vlp.data.prepare --dataset={name} --data_dir=... ...'
  if name not in builders.BUILDERS and not prepared_configs(name, data_dir):
    raise ValueError(f'config.data names {name!r}: no such dataset (known: vlp_scenes, '
                     f'{", ".join(sorted(builders.BUILDERS))}) and nothing of '
                     f'that name under {where}')
  builds = prepared_configs(name, data_dir)
  if not config:
    if not builds:
      raise FileNotFoundError(f'dataset {name!r} is not prepared under {where}; run `{prepare}`'
                              ' first')
    if len(builds) > 1:
      flags = ' or '.join(f'--config.data={name}/{b}' for b in builds)
      raise ValueError(f'dataset {name!r} has {len(builds)} prepared builds under {where}: '
                       f'{", ".join(builds)}; choose one with {flags}')
    config = builds[0]
  elif config not in builds:
    raise FileNotFoundError(
        f'build {name}/{config} is not prepared under {where}; prepared builds of {name!r}: '
        f'{", ".join(builds) or "none"}' + (f' (use --config.data={name}/{builds[0]})'
                                            if len(builds) == 1 else ''))
  return tfds.builder(f'{name}/{config}', data_dir=os.fspath(data_dir))
