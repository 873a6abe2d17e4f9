"""vlp: UNITER-style vision-language pretraining in JAX/Flax NNX.

`vlp.load_pretrained(DIR)` and `vlp.load_params_for_init(init_from, model_cfg)`
(from `vlp.pretrained`) are imported on first use, so `import vlp` stays light.
"""

__version__ = "0.1.0"

_LAZY = {"load_pretrained": "vlp.pretrained", "load_params_for_init": "vlp.pretrained"}


def __getattr__(name):
  if name in _LAZY:
    import importlib
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'vlp' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY))
