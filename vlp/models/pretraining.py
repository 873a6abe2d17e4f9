"""UNITER with its pre-training heads (torch `UniterForPretraining`).

Heads, as in the reference's `model/pretrain.py`: MLM (`cls`, decoder tied to the
word-embedding table), MRFR (`feat_regress`, projection transpose-tied to the image
embedder's `img_linear`), MRC / MRC-kl (`region_classifier`) and ITM (`itm_output`,
index 1 = match). The tasks in `vlp.tasks` gather the positions they need from
`encode`'s sequence and call the head methods; every head returns float32.

The head stacks `feat_regress.net` and `region_classifier.net` are `nnx.List`s with
a parameter-free GELU at index 1, so their indices match the torch Sequentials
(net.0 Linear, net.2 LayerNorm, net.3 Linear); see `vlp.models.uniter` for the
full name table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.models.layers import Dense, Embed, Gelu, LayerNorm, make_param, gelu
from vlp.models.uniter import Uniter
from vlp.models.uniter_config import UniterConfig


class MlmTransform(nnx.Module):
  """LN(GELU(dense(x))) (torch `BertPredictionHeadTransform`)."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.dense = Dense(h, h, cfg, names=('embed', None), rngs=rngs)
    self.LayerNorm = LayerNorm(h, cfg)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.LayerNorm(gelu(self.dense(x)))


class MlmHead(nnx.Module):
  """logits = transform(x) @ word_embeddings.T + bias; the decoder is the tied table."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.transform = MlmTransform(cfg, rngs=rngs)
    self.bias = make_param(nnx.initializers.zeros_init(), ('vocab',), (cfg.vocab_size,),
                       cfg.weight_dtype)

  def __call__(self, hidden: jax.Array, word_embeddings: Embed) -> jax.Array:
    logits = word_embeddings.attend(self.transform(hidden))
    return logits + self.bias[...].astype(jnp.float32)


class RegionFeatureRegression(nnx.Module):
  """net = [Linear H->H, GELU, LN]; out = net(x) @ img_linear.kernel.T + bias."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.net = nnx.List([Dense(h, h, cfg, names=('embed', None), rngs=rngs), Gelu(),
                         LayerNorm(h, cfg)])
    self.bias = make_param(nnx.initializers.zeros_init(), ('region_feat',), (cfg.img_dim,),
                       cfg.weight_dtype)
    self.dtype = cfg.compute_dtype

  def __call__(self, hidden: jax.Array, img_linear: Dense) -> jax.Array:
    x = hidden
    for layer in self.net:
      x = layer(x)
    # img_linear.kernel is [img_dim, H]: using its transpose maps H -> img_dim.
    kernel = img_linear.kernel[...].astype(self.dtype)
    out = jnp.einsum('...h,dh->...d', x.astype(self.dtype), kernel,
                     preferred_element_type=jnp.float32)
    return out + self.bias[...].astype(jnp.float32)


class RegionClassification(nnx.Module):
  """net = [Linear H->H, GELU, LN, Linear H->num_region_classes]."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.net = nnx.List([
        Dense(h, h, cfg, names=('embed', None), rngs=rngs), Gelu(), LayerNorm(h, cfg),
        Dense(h, cfg.num_region_classes, cfg, names=('embed', 'classes'), rngs=rngs)])

  def __call__(self, hidden: jax.Array) -> jax.Array:
    x = hidden
    for layer in self.net[:-1]:
      x = layer(x)
    return self.net[-1](x, out_dtype=jnp.float32)


class UniterForPretraining(nnx.Module):
  """Backbone `uniter` plus heads `cls`, `feat_regress`, `region_classifier`, `itm_output`."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.uniter = Uniter(cfg, rngs=rngs)
    self.cls = MlmHead(cfg, rngs=rngs)
    self.feat_regress = RegionFeatureRegression(cfg, rngs=rngs)
    self.region_classifier = RegionClassification(cfg, rngs=rngs)
    self.itm_output = Dense(cfg.hidden_size, 2, cfg, names=('embed', None), rngs=rngs)

  def encode(self, batch: dict, *, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Runs the backbone on a batch dict (design.md "Batches").

    Returns:
      dict(sequence [B, T+K, H], pooled [B, H]) in the compute dtype, and
      itm_logits [B, 2] in float32.
    """
    sequence, pooled = self.uniter(
        batch['input_ids'], batch['txt_mask'], batch['img_feat'], batch['img_pos'],
        batch['img_mask'], batch.get('img_masked'), rngs=rngs)
    return dict(sequence=sequence, pooled=pooled, itm_logits=self.itm_logits(pooled))

  def mlm_logits(self, hidden: jax.Array) -> jax.Array:
    """[..., H] -> [..., vocab] float32 (decoder tied to the word embeddings)."""
    return self.cls(hidden, self.uniter.embeddings.word_embeddings)

  def mrfr_prediction(self, hidden: jax.Array) -> jax.Array:
    """[..., H] -> [..., img_dim] float32 (transpose-tied to img_linear)."""
    return self.feat_regress(hidden, self.uniter.img_embeddings.img_linear)

  def mrc_logits(self, hidden: jax.Array) -> jax.Array:
    """[..., H] -> [..., num_region_classes] float32."""
    return self.region_classifier(hidden)

  def itm_logits(self, pooled: jax.Array) -> jax.Array:
    """[B, H] -> [B, 2] float32; index 1 = match."""
    return self.itm_output(pooled, out_dtype=jnp.float32)
