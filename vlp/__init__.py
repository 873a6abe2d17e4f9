"""vlp: UNITER-style vision-language pretraining in JAX/Flax NNX."""

__version__ = "0.1.0"
