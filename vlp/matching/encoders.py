"""The two streams of the dual-stream matching model.

* `RegionEncoder`: LN(LN(W_f f) + LN(W_b b)) for each region (detector feature f,
  7-d box geometry b, as UNITER's image embedder), then optionally transformer
  layers over the regions of one image.
* `TextTransformer`: word + position embeddings, LN, transformer layers.
* `BiGruTextEncoder`: word embeddings through a bidirectional GRU; each word's
  state is the mean of its forward and backward states, as in SCAN.

Every parameter carries logical axis names (`vlp.models.layers`); the
transformer layers are the backbone's (`vlp.models.uniter.BertLayer`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.models.layers import Dense, Embed, LayerNorm, attention_bias
from vlp.models.uniter import BertLayer
from vlp.models.uniter_config import UniterConfig


def run_layers(layers, x: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
  bias = attention_bias(mask)
  for layer in layers:
    x = layer(x, bias, rngs=rngs)
  return x


class RegionEncoder(nnx.Module):

  def __init__(self, cfg: UniterConfig, num_layers: int, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.feat_linear = Dense(cfg.img_dim, h, cfg, names=('region_feat', 'embed'), rngs=rngs)
    self.feat_norm = LayerNorm(h, cfg)
    self.box_linear = Dense(cfg.img_pos_dim, h, cfg, names=('box', 'embed'), rngs=rngs)
    self.box_norm = LayerNorm(h, cfg)
    self.norm = LayerNorm(h, cfg)
    self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(num_layers)])

  def __call__(self, img_feat, img_pos, img_mask, *, rngs: nnx.Rngs | None = None):
    """[B, K, F], [B, K, 7], [B, K] -> [B, K, H] region states."""
    f = self.feat_norm(self.feat_linear(img_feat.astype(jnp.float32)))
    b = self.box_norm(self.box_linear(img_pos.astype(jnp.float32)))
    x = self.norm(f.astype(jnp.float32) + b.astype(jnp.float32))
    return run_layers(self.layers, x, img_mask, rngs)


class TextTransformer(nnx.Module):

  def __init__(self, cfg: UniterConfig, num_layers: int, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.word_embeddings = Embed(cfg.vocab_size, h, cfg, names=('vocab', 'embed'), rngs=rngs)
    self.position_embeddings = Embed(cfg.max_position_embeddings, h, cfg,
                                     names=('pos', 'embed'), rngs=rngs)
    self.norm = LayerNorm(h, cfg)
    self.layers = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(num_layers)])

  def __call__(self, input_ids, txt_mask, *, rngs: nnx.Rngs | None = None):
    """[B, T] ids, [B, T] mask -> [B, T, H] token states."""
    t = input_ids.shape[1]
    x = self.norm(self.word_embeddings(input_ids) + self.position_embeddings(jnp.arange(t))[None])
    return run_layers(self.layers, x, txt_mask, rngs)


class GruDirection(nnx.Module):
  """One GRU direction (PyTorch's gate equations); padded steps keep the state."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    h = cfg.hidden_size
    self.input_gates = Dense(h, 3 * h, cfg, names=('embed', 'mlp'), rngs=rngs)
    self.hidden_gates = Dense(h, 3 * h, cfg, names=('embed', 'mlp'), rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, *, reverse: bool) -> jax.Array:
    """[B, T, H], [B, T] -> [B, T, H] states (zeros where masked)."""
    gates_x = self.input_gates(x, out_dtype=jnp.float32)  # all steps at once
    w_h, b_h = self.hidden_gates.kernel[...], self.hidden_gates.bias[...]

    def step(h, inputs):
      gx, m = inputs
      gh = h @ w_h.astype(jnp.float32) + b_h.astype(jnp.float32)
      xr, xz, xn = jnp.split(gx, 3, -1)
      hr, hz, hn = jnp.split(gh, 3, -1)
      r, z = jax.nn.sigmoid(xr + hr), jax.nn.sigmoid(xz + hz)
      new = (1.0 - z) * jnp.tanh(xn + r * hn) + z * h
      h = jnp.where(m[:, None], new, h)
      return h, jnp.where(m[:, None], h, 0.0)

    h0 = jnp.zeros((x.shape[0], x.shape[-1]), jnp.float32)
    _, out = jax.lax.scan(step, h0, (gates_x.swapaxes(0, 1), mask.astype(bool).T),
                          reverse=reverse)
    return out.swapaxes(0, 1)


class BiGruTextEncoder(nnx.Module):

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.word_embeddings = Embed(cfg.vocab_size, cfg.hidden_size, cfg,
                                 names=('vocab', 'embed'), rngs=rngs)
    self.forward_gru = GruDirection(cfg, rngs=rngs)
    self.backward_gru = GruDirection(cfg, rngs=rngs)

  def __call__(self, input_ids, txt_mask, *, rngs: nnx.Rngs | None = None):
    del rngs  # No dropout inside the recurrence.
    x = self.word_embeddings(input_ids)
    return 0.5 * (self.forward_gru(x, txt_mask, reverse=False)
                  + self.backward_gru(x, txt_mask, reverse=True))
