"""Small NNX building blocks for the UNITER encoder and heads.

Every parameter carries logical axis names (``out_sharding`` metadata set through
`nnx.with_partitioning`); `vlp.parallel` maps those names to mesh axes. Parameters are
stored in ``cfg.param_dtype``; matmuls run in ``cfg.dtype`` (the compute dtype).
Numerically sensitive parts (LayerNorm statistics, softmax) always run in float32.

Initialisation follows the reference ``init_weights``: Dense/Embed weights
N(0, initializer_range), biases 0, LayerNorm scale 1 and bias 0.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.parallel.logical import constrain
from vlp.models.uniter_config import UniterConfig

Names = Sequence[str | None]

# The reference adds (1 - mask) * -10000 to the scores of padded keys.
MASK_BIAS = -10000.0


def make_param(init, names: Names, shape: Sequence[int], dtype: Any,
           key: jax.Array | None = None) -> nnx.Param:
  """A Param whose initial value comes from `init` and which carries `names`."""
  return nnx.Param(nnx.with_partitioning(init, tuple(names))(key, tuple(shape), dtype))


def _normal(cfg: UniterConfig):
  return nnx.initializers.normal(cfg.initializer_range)


class Dense(nnx.Module):
  """y = x @ kernel + bias, kernel laid out [in, out] as in flax."""

  def __init__(self, in_features: int, out_features: int, cfg: UniterConfig, *,
               names: Names, use_bias: bool = True, rngs: nnx.Rngs):
    self.kernel = make_param(_normal(cfg), names, (in_features, out_features),
                         cfg.weight_dtype, rngs.params())
    self.bias = (make_param(nnx.initializers.zeros_init(), (names[1],), (out_features,),
                        cfg.weight_dtype) if use_bias else None)
    self.dtype = cfg.compute_dtype

  def __call__(self, x: jax.Array, *, out_dtype: Any = None) -> jax.Array:
    """Applies the layer in the compute dtype; `out_dtype` widens the accumulator."""
    y = jnp.matmul(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                   preferred_element_type=out_dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    return y


class LayerNorm(nnx.Module):
  """LayerNorm over the last axis; statistics in float32, output in compute dtype."""

  def __init__(self, features: int, cfg: UniterConfig, *, names: Names = ('embed',)):
    self.scale = make_param(nnx.initializers.ones_init(), names, (features,), cfg.weight_dtype)
    self.bias = make_param(nnx.initializers.zeros_init(), names, (features,), cfg.weight_dtype)
    self.eps = cfg.layer_norm_eps
    self.dtype = cfg.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(self.dtype)


class Embed(nnx.Module):
  """Embedding table [num_embeddings, features]."""

  def __init__(self, num_embeddings: int, features: int, cfg: UniterConfig, *,
               names: Names, rngs: nnx.Rngs):
    self.embedding = make_param(_normal(cfg), names, (num_embeddings, features),
                            cfg.weight_dtype, rngs.params())
    self.dtype = cfg.compute_dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    """Row lookup, returned in float32 so that sums before a LayerNorm stay exact."""
    return jnp.take(self.embedding[...], ids, axis=0).astype(jnp.float32)

  def attend(self, x: jax.Array) -> jax.Array:
    """x @ table.T in the compute dtype with a float32 result (tied decoders)."""
    table = self.embedding[...].astype(self.dtype)
    return jnp.einsum('...h,vh->...v', x.astype(self.dtype), table,
                      preferred_element_type=jnp.float32)


def gelu(x: jax.Array) -> jax.Array:
  """Exact erf GELU, x * 0.5 * (1 + erf(x / sqrt(2))), as in the reference."""
  return jax.nn.gelu(x, approximate=False)


class Gelu(nnx.Module):
  """Parameter-free GELU module, so head stacks keep torch's Sequential indices."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return gelu(x)


def dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
  """Inverted dropout from the `dropout` stream; identity when rngs is None or rate 0."""
  if rngs is None or rate == 0.0:
    return x
  # Bits are drawn as [lead, rest] and reshaped: same distribution, while XLA:CPU
  # compiles threefry on high-rank shapes very slowly.
  lead = x.shape[0] if x.ndim > 1 else 1
  keep = jax.random.bernoulli(rngs.dropout(), 1.0 - rate, (lead, x.size // max(lead, 1)))
  keep = keep.reshape(x.shape)
  return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


def attention_bias(mask: jax.Array) -> jax.Array:
  """[B, L] bool key mask -> additive float32 bias [B, 1, 1, L] (0 real, -10000 pad)."""
  return jnp.where(mask.astype(bool), 0.0, MASK_BIAS).astype(jnp.float32)[:, None, None, :]


def einsum_attention(query: jax.Array, key: jax.Array, value: jax.Array, bias: jax.Array,
                     *, dropout_rate: float = 0.0,
                     rngs: nnx.Rngs | None = None) -> jax.Array:
  """Explicit attention over [B, T, N, D] heads with dropout on the probabilities."""
  logits = jnp.einsum('btnd,bsnd->bnts', query, key, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / query.shape[-1] ** 0.5) + bias.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  probs = dropout(probs, dropout_rate, rngs).astype(value.dtype)
  return jnp.einsum('bnts,bsnd->btnd', probs, value)


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                          bias: jax.Array, *, dropout_rate: float = 0.0,
                          rngs: nnx.Rngs | None = None,
                          implementation: str | None = None) -> jax.Array:
  """softmax(q k^T / sqrt(d) + bias) v over [B, T, N, D] heads.

  Without dropout this is `jax.nn.dot_product_attention` (fused kernels possible);
  with attention-probability dropout it is `einsum_attention`, since the fused API
  has no dropout. Both compute the softmax in float32.
  """
  if rngs is not None and dropout_rate > 0.0:
    return einsum_attention(query, key, value, bias, dropout_rate=dropout_rate, rngs=rngs)
  if implementation != 'xla':
    # cuDNN wants the bias to span the query axis too; XLA fuses the broadcast.
    b, t = query.shape[:2]
    bias = jnp.broadcast_to(bias, (b, bias.shape[1], t, bias.shape[-1]))
  return jax.nn.dot_product_attention(query, key, value, bias=bias.astype(query.dtype),
                                      implementation=implementation)


class MultiHeadSelfAttention(nnx.Module):
  """BERT self-attention (torch `BertSelfAttention`): q/k/v projections + attention.

  Returns the concatenated head outputs [B, T, H]; the output projection lives in
  the caller (torch `BertSelfOutput`). Head h uses feature slice [h*d, (h+1)*d).
  """

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.query = Dense(h, h, cfg, names=('embed', 'heads'), rngs=rngs)
    self.key = Dense(h, h, cfg, names=('embed', 'heads'), rngs=rngs)
    self.value = Dense(h, h, cfg, names=('embed', 'heads'), rngs=rngs)
    self.num_heads = cfg.num_heads
    self.dropout_rate = cfg.attention_dropout
    self.implementation = cfg.attention_impl

  def __call__(self, x: jax.Array, bias: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    b, t, h = x.shape
    split = lambda y: constrain(y, ('batch', 'length', 'heads')).reshape(
        b, t, self.num_heads, h // self.num_heads)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    ctx = dot_product_attention(q, k, v, bias, dropout_rate=self.dropout_rate, rngs=rngs,
                                implementation=self.implementation)
    return constrain(ctx.reshape(b, t, h), ('batch', 'length', 'heads'))
