"""Torch state-dict names of vlp's parameter trees (the UNITER reference layout).

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

from vlp.models.uniter import DUAL_LAYERS

Transform = Literal['identity', 'transpose']

# Torch keys that alias another tensor: key -> (nnx path it equals, transform).
TIED_TORCH_KEYS: dict[str, tuple[tuple, Transform]] = {
    'cls.predictions.decoder.weight':
        (('uniter', 'embeddings', 'word_embeddings', 'embedding'), 'identity'),
    'feat_regress.weight':
        (('uniter', 'img_embeddings', 'img_linear', 'kernel'), 'transpose'),
}


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
