"""UNITER backbone (torch `UniterModel`): text + image embedders, BERT encoder, pooler.

Sequence layout is fixed ``[text T | regions K]``; text positions use ids 0..T-1. The
reference packs each example's regions right after its own text instead. Real tokens'
outputs do not depend on where padding sits, because regions have no position ids and
padded keys get -10000 (docs/reference.md, "Model and embeddings").

Torch state-dict names of these parameters: `vlp.models.torch_names`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.parallel.logical import constrain
from vlp.models.layers import (Dense, Embed, LayerNorm, MultiHeadSelfAttention,
                               attention_bias, dropout, gelu)
from vlp.models.uniter_config import UniterConfig

_HIDDEN = ('batch', 'length', 'embed')
# Transformer layers of the dual-encoder (matching) head, as ALADIN's.
DUAL_LAYERS = 2


class UniterTextEmbeddings(nnx.Module):
  """LN(E_word[w] + E_pos[0..T-1] + E_type[0]) followed by dropout."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.word_embeddings = Embed(cfg.vocab_size, h, cfg, names=('vocab', 'embed'), rngs=rngs)
    self.position_embeddings = Embed(cfg.max_position_embeddings, h, cfg,
                                     names=('pos', 'embed'), rngs=rngs)
    self.token_type_embeddings = Embed(cfg.type_vocab_size, h, cfg, names=('type', 'embed'),
                                       rngs=rngs)
    self.LayerNorm = LayerNorm(h, cfg)
    self.dropout_rate = cfg.hidden_dropout

  def __call__(self, input_ids: jax.Array, *, rngs: nnx.Rngs | None = None) -> jax.Array:
    t = input_ids.shape[1]
    if t > self.position_embeddings.embedding.shape[0]:
      raise ValueError(f'text length {t} exceeds max_position_embeddings '
                       f'{self.position_embeddings.embedding.shape[0]}')
    x = (self.word_embeddings(input_ids)
         + self.position_embeddings(jnp.arange(t))[None]
         + self.token_type_embeddings(jnp.zeros((), jnp.int32)))
    return dropout(self.LayerNorm(x), self.dropout_rate, rngs)


class UniterImageEmbeddings(nnx.Module):
  """LN(LN_f(W_f (f + m v_mask)) + LN_b(W_b b) + E_type[1]) followed by dropout."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.img_linear = Dense(cfg.img_dim, h, cfg, names=('region_feat', 'embed'), rngs=rngs)
    self.img_layer_norm = LayerNorm(h, cfg)
    self.pos_linear = Dense(cfg.img_pos_dim, h, cfg, names=('box', 'embed'), rngs=rngs)
    self.pos_layer_norm = LayerNorm(h, cfg)
    # Row 1 is v_mask; row 0 is never used (the reference zeroes it), kept for parity.
    self.mask_embedding = Embed(2, cfg.img_dim, cfg, names=(None, 'region_feat'), rngs=rngs)
    self.LayerNorm = LayerNorm(h, cfg)
    self.dropout_rate = cfg.hidden_dropout

  def __call__(self, img_feat: jax.Array, img_pos: jax.Array, type_embedding: jax.Array,
               img_masked: jax.Array | None = None, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    feat = img_feat.astype(jnp.float32)
    if img_masked is not None:
      v_mask = self.mask_embedding.embedding[1].astype(jnp.float32)
      feat = jnp.where(img_masked.astype(bool)[..., None], feat + v_mask, feat)
    f = self.img_layer_norm(self.img_linear(feat))
    b = self.pos_layer_norm(self.pos_linear(img_pos))
    x = f.astype(jnp.float32) + b.astype(jnp.float32) + type_embedding.astype(jnp.float32)
    return dropout(self.LayerNorm(x), self.dropout_rate, rngs)


class BertSelfOutput(nnx.Module):
  """LN(dropout(dense(ctx)) + residual); also torch `BertOutput` with in = mlp."""

  def __init__(self, in_features: int, cfg: UniterConfig, *, in_name: str,
               rngs: nnx.Rngs):
    self.dense = Dense(in_features, cfg.hidden_size, cfg, names=(in_name, 'embed'),
                       rngs=rngs)
    self.LayerNorm = LayerNorm(cfg.hidden_size, cfg)
    self.dropout_rate = cfg.hidden_dropout

  def __call__(self, x: jax.Array, residual: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    y = dropout(self.dense(x), self.dropout_rate, rngs)
    # The residual sum runs in float32 so that bf16 compute loses no bits here.
    return self.LayerNorm(y.astype(jnp.float32) + residual.astype(jnp.float32))


class BertAttention(nnx.Module):
  """torch `BertAttention`: `self` (q/k/v + attention) and `output` (dense + LN)."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.self = MultiHeadSelfAttention(cfg, rngs=rngs)
    self.output = BertSelfOutput(cfg.hidden_size, cfg, in_name='heads', rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    return self.output(self.self(x, bias, rngs=rngs), x, rngs=rngs)


class BertIntermediate(nnx.Module):
  """GELU(x W_i + b_i)."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.dense = Dense(cfg.hidden_size, cfg.intermediate_size, cfg, names=('embed', 'mlp'),
                       rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return constrain(gelu(self.dense(x)), ('batch', 'length', 'mlp'))


class BertLayer(nnx.Module):
  """Post-LN transformer layer (BERT's, as the reference `model/layer.py`)."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.attention = BertAttention(cfg, rngs=rngs)
    self.intermediate = BertIntermediate(cfg, rngs=rngs)
    self.output = BertSelfOutput(cfg.intermediate_size, cfg, in_name='mlp', rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    a = self.attention(x, bias, rngs=rngs)
    return constrain(self.output(self.intermediate(a), a, rngs=rngs), _HIDDEN)


class BertPooler(nnx.Module):
  """tanh(W_p h_0 + c_p) on position 0 ([CLS])."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.dense = Dense(cfg.hidden_size, cfg.hidden_size, cfg, names=('embed', None),
                       rngs=rngs)

  def __call__(self, sequence: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(sequence[:, 0]))


def _apply_layer(layer: BertLayer, x: jax.Array, bias: jax.Array,
                 rngs: nnx.Rngs | None) -> jax.Array:
  return layer(x, bias, rngs=rngs)


_apply_layer_remat = nnx.remat(_apply_layer)


class Uniter(nnx.Module):
  """The UNITER backbone; see the module docstring for the parameter tree."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embeddings = UniterTextEmbeddings(cfg, rngs=rngs)
    self.img_embeddings = UniterImageEmbeddings(cfg, rngs=rngs)
    self.encoder = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
    self.pooler = BertPooler(cfg, rngs=rngs)

  def __call__(self, input_ids: jax.Array, txt_mask: jax.Array, img_feat: jax.Array,
               img_pos: jax.Array, img_mask: jax.Array, img_masked: jax.Array | None = None,
               *, rngs: nnx.Rngs | None = None, num_layers: int | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """Encodes `[text T | regions K]`.

    Args:
      input_ids: [B, T] int token ids.
      txt_mask: [B, T] bool, True on real text tokens.
      img_feat: [B, K, img_dim] float16/float32 region features.
      img_pos: [B, K, img_pos_dim] float32 box features.
      img_mask: [B, K] bool, True on real regions.
      img_masked: optional [B, K] bool, MRM-masked regions (v_mask is added there).
      rngs: `nnx.Rngs` with a `dropout` stream, or None for deterministic.
      num_layers: run only the first this many encoder layers (0: the embedding
        output, which the dual-encoder head reads); None runs all.

    Returns:
      (sequence [B, T+K, H], pooled [B, H]), both in the compute dtype.
    """
    txt = self.embeddings(input_ids, rngs=rngs)
    image_type = self.embeddings.token_type_embeddings(jnp.ones((), jnp.int32))
    img = self.img_embeddings(img_feat, img_pos, image_type, img_masked, rngs=rngs)
    x = constrain(jnp.concatenate([txt, img], axis=1), _HIDDEN)
    bias = attention_bias(jnp.concatenate([txt_mask.astype(bool), img_mask.astype(bool)], 1))
    apply = _apply_layer_remat if self.cfg.remat else _apply_layer
    for layer in list(self.encoder)[:num_layers]:  # [:None] is every layer.
      x = apply(layer, x, bias, rngs)
    return x, self.pooler(x)
