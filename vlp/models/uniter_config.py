"""UNITER model configuration.

`UniterConfig` is a frozen dataclass holding every architectural number of the
encoder and its pre-training heads (the reference sizes are
`config/uniter-{base,large}.json`). `model_config(size, **overrides)`
returns one of the named sizes with fields replaced; every field is validated so a
bad experiment config fails at construction, naming the offending field.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import jax.numpy as jnp

_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
_ATTENTION_IMPLS = (None, 'xla', 'cudnn')


@dataclasses.dataclass(frozen=True)
class UniterConfig:
  """Architecture of the UNITER backbone and heads (names follow design.md)."""
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  img_dim: int = 2048
  img_pos_dim: int = 7
  num_region_classes: int = 1601
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  layer_norm_eps: float = 1e-12
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  attention_impl: str | None = None
  remat: bool = False

  def __post_init__(self):
    positive = ('vocab_size', 'hidden_size', 'num_layers', 'num_heads',
                'intermediate_size', 'max_position_embeddings', 'img_dim',
                'img_pos_dim', 'num_region_classes')
    for name in positive:
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f'UniterConfig.{name} must be a positive int, got {value!r}')
    # The image tokens use row 1 of the shared token-type table.
    if (isinstance(self.type_vocab_size, bool)
        or not isinstance(self.type_vocab_size, numbers.Integral)
        or self.type_vocab_size < 2):
      raise ValueError(
          f'UniterConfig.type_vocab_size must be an int >= 2, got {self.type_vocab_size!r}')
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f'UniterConfig.hidden_size ({self.hidden_size}) must be divisible by '
          f'num_heads ({self.num_heads})')
    for name in ('hidden_dropout', 'attention_dropout'):
      value = getattr(self, name)
      if not 0.0 <= value < 1.0:
        raise ValueError(f'UniterConfig.{name} must be in [0, 1), got {value!r}')
    for name in ('initializer_range', 'layer_norm_eps'):
      if not getattr(self, name) > 0:
        raise ValueError(f'UniterConfig.{name} must be > 0, got {getattr(self, name)!r}')
    for name in ('dtype', 'param_dtype'):
      if getattr(self, name) not in _DTYPES:
        raise ValueError(f'UniterConfig.{name} must be one of {sorted(_DTYPES)}, '
                         f'got {getattr(self, name)!r}')
    if self.attention_impl not in _ATTENTION_IMPLS:
      raise ValueError(f'UniterConfig.attention_impl must be one of {_ATTENTION_IMPLS}, '
                       f'got {self.attention_impl!r}')

  @property
  def compute_dtype(self) -> Any:
    """jnp dtype of activations and matmul inputs."""
    return _DTYPES[self.dtype]

  @property
  def weight_dtype(self) -> Any:
    """jnp dtype the parameters are stored in."""
    return _DTYPES[self.param_dtype]


_SIZES: dict[str, dict[str, Any]] = {
    'base': dict(vocab_size=28996, hidden_size=768, num_layers=12, num_heads=12,
                 intermediate_size=3072),
    'large': dict(vocab_size=28996, hidden_size=1024, num_layers=24, num_heads=16,
                  intermediate_size=4096),
    # Test / demo size; configs normally override vocab_size from the tokenizer.
    'tiny': dict(vocab_size=1000, hidden_size=128, num_layers=2, num_heads=4,
                 intermediate_size=512, img_dim=64, num_region_classes=17),
}


def model_config(size: str, **overrides: Any) -> UniterConfig:
  """Returns the named size (`tiny`, `base`, `large`) with `overrides` applied."""
  if size not in _SIZES:
    raise ValueError(f'unknown model size {size!r}; expected one of {sorted(_SIZES)}')
  known = {f.name for f in dataclasses.fields(UniterConfig)}
  unknown = sorted(set(overrides) - known)
  if unknown:
    raise ValueError(f'unknown UniterConfig field(s): {", ".join(unknown)}')
  return UniterConfig(**{**_SIZES[size], **overrides})
