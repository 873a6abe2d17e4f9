"""Helpers shared by the config files and the entry points.

Config files are loaded by path (ml_collections `config_flags`), not imported: the
repo root need not be on `sys.path`. So a config file reaches the files it builds
on (configs/base.py, configs/finetune_common.py) through `load_config_file` and
`load_module` here.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any, Mapping, Sequence

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses a config-file argument such as ``tiny`` or ``size=tiny,data=coco``.

  A bare word sets the first default (by convention ``size``). Values are parsed
  as Python literals when possible and take the type of their default.
  """
  out = dict(defaults)
  if arg:
    first = next(iter(defaults)) if defaults else None
    for part in arg.split(","):
      part = part.strip()
      if not part:
        continue
      if "=" in part:
        key, value = part.split("=", 1)
      elif first is not None:
        key, value = first, part
      else:
        raise ValueError(f"config argument {part!r} needs the form key=value")
      key = key.strip()
      if key not in defaults:
        raise ValueError(
            f"unknown config argument {key!r}; known: {sorted(defaults)}")
      out[key] = _coerce(value.strip(), defaults[key])
  return ml_collections.ConfigDict(out)


def _coerce(value: str, default: Any) -> Any:
  if isinstance(default, str) or default is None:
    return value
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value
  if isinstance(default, bool):
    return value.lower() in ("1", "true", "yes") if isinstance(parsed, str) else bool(parsed)
  return type(default)(parsed)


def load_module(path: str) -> ModuleType:
  """Executes the Python file at `path` as a fresh module (a config file or a helper
  of config files) and returns it."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  spec = importlib.util.spec_from_file_location("_vlp_config_" + str(abs(hash(path))), path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_config_file(path_and_arg: str) -> ml_collections.ConfigDict:
  """Loads ``path[:arg]`` the way `config_flags.DEFINE_config_file` does."""
  path, _, arg = path_and_arg.partition(":")
  module = load_module(path)
  return module.get_config(arg or None) if arg else module.get_config()


def set_values(cfg: ml_collections.ConfigDict, values: Mapping[str, Any]
               ) -> ml_collections.ConfigDict:
  """Sets dotted keys (``"model.hidden_size"``) in place, as overrides would; returns cfg.

  A key the config does not have is an error, like an unknown override.
  """
  for dotted, value in values.items():
    if not _has_key(cfg, dotted):
      raise KeyError(f"unknown config key {dotted!r}")
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
      node = node[part]
    node[last] = value
  return cfg


def _has_key(cfg: Any, dotted: str) -> bool:
  node = cfg
  for part in dotted.split("."):
    if isinstance(node, (ml_collections.ConfigDict, dict)) and part in node:
      node = node[part]
    else:
      return False
  return True


def valid_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    name = f"{prefix}{k}"
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(valid_keys(v, name + "."))
    else:
      keys.append(name)
  return keys


def check_overrides(argv: Sequence[str], flag: str = "config") -> None:
  """Exits with a clear flag error if an override names an unknown config key.

  `config_flags` otherwise dies with a raw ``AttributeError`` traceback for
  ``--config.no_such_key=1``; a locked config should read like any other bad flag.
  """
  path = None
  overrides = []
  args = list(argv[1:])
  for i, a in enumerate(args):
    if a.startswith(f"--{flag}="):
      path = a.split("=", 1)[1]
    elif a == f"--{flag}" and i + 1 < len(args):
      path = args[i + 1]
    elif a.startswith(f"--{flag}."):
      overrides.append(a[len(flag) + 3:].split("=", 1)[0])
  if not overrides or path is None:
    return
  try:
    cfg = load_config_file(path)
  except Exception:  # The flag parser reports a broken config file itself.
    return
  bad = [k for k in overrides if not _has_key(cfg, k)]
  if bad:
    keys = ", ".join(valid_keys(cfg))
    sys.stderr.write(
        f"FATAL Flags parsing error: unknown config key(s) {', '.join(bad)} in "
        f"{path}.\nValid keys: {keys}\n")
    sys.exit(2)
