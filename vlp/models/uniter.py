"""UNITER backbone (torch `UniterModel`): text + image embedders, BERT encoder, pooler.

Sequence layout is fixed ``[text T | regions K]``; text positions use ids 0..T-1. The
reference packs each example's regions right after its own text instead. Real tokens'
outputs do not depend on where padding sits, because regions have no position ids and
padded keys get -10000 (docs/reference.md, "Model and embeddings").

Parameter tree and torch state-dict names
-----------------------------------------
Paths are relative to `UniterForPretraining` (the backbone alone is the ``uniter``
subtree); ``<i>`` runs over 0..num_layers-1. Leaf renames by torch module kind:

====================  ===============  ==============  =========
kind                  torch leaf       nnx leaf        transform
====================  ===============  ==============  =========
Linear (L)            weight (out,in)  kernel (in,out) transpose
Linear (L)            bias             bias            identity
LayerNorm (N)         weight           scale           identity
LayerNorm (N)         bias             bias            identity
Embedding (E)         weight           embedding       identity
Parameter (P)         (itself)         (itself)        identity
====================  ===============  ==============  =========

Module renames (torch module path -> nnx module path, kind):

=================================================== ============================================= =
torch                                               nnx                                           k
=================================================== ============================================= =
uniter.embeddings.word_embeddings                   uniter/embeddings/word_embeddings             E
uniter.embeddings.position_embeddings               uniter/embeddings/position_embeddings         E
uniter.embeddings.token_type_embeddings             uniter/embeddings/token_type_embeddings       E
uniter.embeddings.LayerNorm                         uniter/embeddings/LayerNorm                   N
uniter.img_embeddings.img_linear                    uniter/img_embeddings/img_linear              L
uniter.img_embeddings.img_layer_norm                uniter/img_embeddings/img_layer_norm          N
uniter.img_embeddings.pos_linear                    uniter/img_embeddings/pos_linear              L
uniter.img_embeddings.pos_layer_norm                uniter/img_embeddings/pos_layer_norm          N
uniter.img_embeddings.mask_embedding                uniter/img_embeddings/mask_embedding          E
uniter.img_embeddings.LayerNorm                     uniter/img_embeddings/LayerNorm               N
uniter.encoder.layer.<i>.attention.self.query       uniter/encoder/<i>/attention/self/query       L
uniter.encoder.layer.<i>.attention.self.key         uniter/encoder/<i>/attention/self/key         L
uniter.encoder.layer.<i>.attention.self.value       uniter/encoder/<i>/attention/self/value       L
uniter.encoder.layer.<i>.attention.output.dense     uniter/encoder/<i>/attention/output/dense     L
uniter.encoder.layer.<i>.attention.output.LayerNorm uniter/encoder/<i>/attention/output/LayerNorm N
uniter.encoder.layer.<i>.intermediate.dense         uniter/encoder/<i>/intermediate/dense         L
uniter.encoder.layer.<i>.output.dense               uniter/encoder/<i>/output/dense               L
uniter.encoder.layer.<i>.output.LayerNorm           uniter/encoder/<i>/output/LayerNorm           N
uniter.pooler.dense                                 uniter/pooler/dense                           L
cls.predictions.transform.dense                     cls/transform/dense                           L
cls.predictions.transform.LayerNorm                 cls/transform/LayerNorm                       N
cls.predictions.bias                                cls/bias                                      P
feat_regress.net.0                                  feat_regress/net/0                            L
feat_regress.net.2                                  feat_regress/net/2                            N
feat_regress.bias                                   feat_regress/bias                             P
region_classifier.net.0                             region_classifier/net/0                       L
region_classifier.net.2                             region_classifier/net/2                       N
region_classifier.net.3                             region_classifier/net/3                       L
itm_output                                          itm_output                                    L
rank_output                                         rank_output                                   L
vqa_output.0                                        vqa_output/0                                  L
vqa_output.2                                        vqa_output/2                                  N
vqa_output.3                                        vqa_output/3                                  L
re_output                                           re_output                                     L
re_output.0                                         re_output/0                                   L
re_output.2                                         re_output/2                                   N
re_output.3                                         re_output/3                                   L
dual_output.encoder.layer.<j>.*                     dual_output/encoder/<j>/*                     *
dual_output.proj                                    dual_output/proj                              L
=================================================== ============================================= =

(The encoder list index ``<i>`` is an int path entry; torch has an extra ``layer``.
``*``: the leaves of a backbone layer, with its transforms; ``<j>`` runs over
0..DUAL_LAYERS-1.)

The rows after ``uniter.*`` are per head; `torch_name_table(num_layers, heads)` emits
the backbone plus the heads named in ``heads`` (default `PRETRAINING_HEADS`, the four
pre-training heads). Fine-tuning models (`vlp.models.downstream`) name theirs in
their ``torch_heads`` property: ``rank_output`` (retrieval, next to ``itm_output``),
``vqa_output`` (``.0``/``.2``/``.3``), ``re_output`` (a single Linear, the reference's
``mlp=1``) or ``re_output_mlp2`` (``re_output.{0,2,3}``, ``mlp=2``), and
``dual_output``, the dual-encoder head (`DUAL_LAYERS` encoder layers, named as
the backbone's, and the projection ``proj``), which has no reference counterpart
(its torch-style names only serve a round trip through our own exports).

Tied torch keys with no parameter of their own here (`TIED_TORCH_KEYS`):
``cls.predictions.decoder.weight`` is the word-embedding table (the MLM decoder
uses ``word_embeddings.embedding`` directly), ``feat_regress.weight`` is
``img_linear.weight`` (the MRFR head uses ``img_linear.kernel.T``); some HF exports
also carry ``cls.predictions.decoder.bias``, equal to ``cls.predictions.bias``.
`torch_name_table` lists exactly the rows above, expanded, so a converter is a loop.
"""

from __future__ import annotations

from typing import Literal, Sequence

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

Transform = Literal['identity', 'transpose']

# Torch keys that alias another tensor: key -> (nnx path it equals, transform).
TIED_TORCH_KEYS: dict[str, tuple[tuple, Transform]] = {
    'cls.predictions.decoder.weight':
        (('uniter', 'embeddings', 'word_embeddings', 'embedding'), 'identity'),
    'feat_regress.weight':
        (('uniter', 'img_embeddings', 'img_linear', 'kernel'), 'transpose'),
}


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


PRETRAINING_HEADS = ('cls', 'feat_regress', 'region_classifier', 'itm_output')
FINETUNING_HEADS = ('rank_output', 'vqa_output', 're_output', 're_output_mlp2',
                    'dual_output')


def torch_name_table(num_layers: int, heads: Sequence[str] = PRETRAINING_HEADS
                     ) -> list[tuple[str, tuple, Transform]]:
  """(torch state-dict key, nnx path, transform) rows for a model's parameters.

  Each parameter of the tree appears exactly once; tied torch duplicates are in
  `TIED_TORCH_KEYS`. 'transpose' means torch (out, in) -> flax kernel (in, out).

  Args:
    num_layers: encoder depth.
    heads: which heads follow the backbone rows, from `PRETRAINING_HEADS` and
      `FINETUNING_HEADS`; the default describes `UniterForPretraining`.
  """
  unknown = [h for h in heads if h not in PRETRAINING_HEADS + FINETUNING_HEADS]
  if unknown:
    raise ValueError(f'unknown head(s) {unknown}; known: '
                     f'{list(PRETRAINING_HEADS + FINETUNING_HEADS)}')
  rows: list[tuple[str, tuple, Transform]] = []

  def linear(torch: str, path: tuple) -> None:
    rows.append((f'{torch}.weight', path + ('kernel',), 'transpose'))
    rows.append((f'{torch}.bias', path + ('bias',), 'identity'))

  def norm(torch: str, path: tuple) -> None:
    rows.append((f'{torch}.weight', path + ('scale',), 'identity'))
    rows.append((f'{torch}.bias', path + ('bias',), 'identity'))

  def embed(torch: str, path: tuple) -> None:
    rows.append((f'{torch}.weight', path + ('embedding',), 'identity'))

  emb = ('uniter', 'embeddings')
  for name in ('word_embeddings', 'position_embeddings', 'token_type_embeddings'):
    embed(f'uniter.embeddings.{name}', emb + (name,))
  norm('uniter.embeddings.LayerNorm', emb + ('LayerNorm',))
  img = ('uniter', 'img_embeddings')
  linear('uniter.img_embeddings.img_linear', img + ('img_linear',))
  norm('uniter.img_embeddings.img_layer_norm', img + ('img_layer_norm',))
  linear('uniter.img_embeddings.pos_linear', img + ('pos_linear',))
  norm('uniter.img_embeddings.pos_layer_norm', img + ('pos_layer_norm',))
  embed('uniter.img_embeddings.mask_embedding', img + ('mask_embedding',))
  norm('uniter.img_embeddings.LayerNorm', img + ('LayerNorm',))
  def layer(t: str, p: tuple) -> None:
    for name in ('query', 'key', 'value'):
      linear(f'{t}.attention.self.{name}', p + ('attention', 'self', name))
    linear(f'{t}.attention.output.dense', p + ('attention', 'output', 'dense'))
    norm(f'{t}.attention.output.LayerNorm', p + ('attention', 'output', 'LayerNorm'))
    linear(f'{t}.intermediate.dense', p + ('intermediate', 'dense'))
    linear(f'{t}.output.dense', p + ('output', 'dense'))
    norm(f'{t}.output.LayerNorm', p + ('output', 'LayerNorm'))

  for i in range(num_layers):
    layer(f'uniter.encoder.layer.{i}', ('uniter', 'encoder', i))
  linear('uniter.pooler.dense', ('uniter', 'pooler', 'dense'))
  for head in heads:
    if head == 'cls':
      linear('cls.predictions.transform.dense', ('cls', 'transform', 'dense'))
      norm('cls.predictions.transform.LayerNorm', ('cls', 'transform', 'LayerNorm'))
      rows.append(('cls.predictions.bias', ('cls', 'bias'), 'identity'))
    elif head == 'feat_regress':
      linear('feat_regress.net.0', ('feat_regress', 'net', 0))
      norm('feat_regress.net.2', ('feat_regress', 'net', 2))
      rows.append(('feat_regress.bias', ('feat_regress', 'bias'), 'identity'))
    elif head == 'region_classifier':
      linear('region_classifier.net.0', ('region_classifier', 'net', 0))
      norm('region_classifier.net.2', ('region_classifier', 'net', 2))
      linear('region_classifier.net.3', ('region_classifier', 'net', 3))
    elif head in ('vqa_output', 're_output_mlp2'):
      # Sequential [Linear, GELU, LN, Linear]; GELU (index 1) has no parameters.
      name = head.removesuffix('_mlp2')
      linear(f'{name}.0', (name, 0))
      norm(f'{name}.2', (name, 2))
      linear(f'{name}.3', (name, 3))
    elif head == 'dual_output':  # DualEncoderHead: DUAL_LAYERS layers + Linear
      for i in range(DUAL_LAYERS):
        layer(f'dual_output.encoder.layer.{i}', ('dual_output', 'encoder', i))
      linear('dual_output.proj', ('dual_output', 'proj'))
    else:  # itm_output, rank_output, re_output: one Linear
      linear(head, (head,))
  return rows
