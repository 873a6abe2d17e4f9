"""UNITER encoder, heads and optimal transport.

Parameters carry *logical* axis names as NNX ``out_sharding`` metadata; vlp.parallel maps
them to mesh axes. Eager sharding is switched off so that creating a model never
needs a mesh.
"""

from flax import nnx as _nnx

_nnx.use_eager_sharding(False)
