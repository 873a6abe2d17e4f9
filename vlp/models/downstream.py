"""UNITER fine-tuning models: VQA, referring expressions (grounding), retrieval.

Each model holds the backbone as ``uniter`` (the same subtree as
`UniterForPretraining`, so a pre-trained backbone state drops in) plus the head of
the reference's fine-tuning model (`model/{vqa,re,itm}.py`), under the reference's
parameter name so that `vlp.models.torch_names.torch_name_table(num_layers,
model.torch_heads)` maps the whole tree:

* `UniterForVqa`: ``vqa_output`` = [Linear H->2H, GELU, LN(2H), Linear 2H->A] on
  the pooled output; indices 0/2/3 as the torch Sequential. The head
  trains with a 10x learning rate in the reference (the VQA job's optimizer
  gives it `config.head_lr_mult`).
* `UniterForGrounding`: ``re_output`` scores every region hidden state, either a
  single Linear H->1 (``mlp=1``, RefCOCO/RefCOCOg) or [Linear H->H, GELU, LN,
  Linear H->1] (``mlp=2``, RefCOCO+); padded regions get `PADDED_REGION_SCORE`
  (-1e4) as in the reference.
* `UniterForRetrieval`: ``rank_output`` = Linear H->1 on the pooled output (the
  ranking score), initialised from the ITM head's "match" row; ``itm_output``
  stays in the tree, as in the reference, so that a pre-training checkpoint loads
  and `init_rank_from_itm` can copy it. Optionally ``dual_output``:
  the dual-encoder head of the ALADIN-style two-stage mode (see below).

Dual-encoder (single-modality) encodings
----------------------------------------
The dual encoder embeds captions and images independently, so that a gallery can
be searched by a dot product. ``dual_output`` is ALADIN's matching head: a
`DUAL_LAYERS`-layer transformer (the backbone's layer, width and heads) shared by
both modalities, whose first-token output goes through a Linear H->E and is
L2-normalised in float32: e = W h_0 / ||W h_0||.

It reads the backbone's *embedding* output (`Uniter(..., num_layers=0)`), not its
last layer. ALADIN taps the last layer of a backbone trained disentangled; a
single-stream backbone only ever saw ``[text | regions]`` together, and run on one
modality its last layer collapses (the demo's fine-tuned cross-encoder, text only:
token-token cosine 0.995 at layer 3, 0.29 at the embeddings; a head on the last
layer stayed at chance). The inputs are

* text-only: ``[text T]``, i.e. the batch's text with zero regions (the image
  slice is ``[:, :0]``). This equals the joint sequence with every region masked
  out (``img_mask`` all False) up to the exp(-10000) = 0 of the attention mask.
* image-only: ``[[CLS] | regions K]``: only the first text token ([CLS], whose
  output is read) is kept, every word is dropped. [CLS] contributes the same
  input embedding to every image, so the encoding depends on the image only.

All head outputs are float32 (bf16 compute elsewhere, as in `UniterForPretraining`).
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.models.layers import Dense, Gelu, LayerNorm, attention_bias
from vlp.models.uniter import DUAL_LAYERS, BertLayer, Uniter
from vlp.models.uniter_config import UniterConfig

# The reference's masked_fill value for padded regions' RE scores.
PADDED_REGION_SCORE = -1e4
# Size of the reference VQA answer vocabulary (`utils/ans2label.json`).
VQA_NUM_ANSWERS = 3129


def _mlp_head(in_features: int, hidden: int, out_features: int, cfg: UniterConfig, *,
              hidden_name: str | None, out_name: str | None,
              rngs: nnx.Rngs) -> nnx.List:
  """[Linear in->hidden, GELU, LN(hidden), Linear hidden->out] (torch Sequential indices)."""
  return nnx.List([
      Dense(in_features, hidden, cfg, names=('embed', hidden_name), rngs=rngs), Gelu(),
      LayerNorm(hidden, cfg, names=(hidden_name,)),
      Dense(hidden, out_features, cfg, names=(hidden_name, out_name), rngs=rngs)])


def _apply_mlp_head(net: nnx.List, x: jax.Array) -> jax.Array:
  """Runs `_mlp_head` in the compute dtype with a float32 output."""
  for layer in net[:-1]:
    x = layer(x)
  return net[-1](x, out_dtype=jnp.float32)


def _backbone(model: Any, batch: Mapping[str, jax.Array],
              rngs: nnx.Rngs | None) -> tuple[jax.Array, jax.Array]:
  return model.uniter(batch['input_ids'], batch['txt_mask'], batch['img_feat'],
                      batch['img_pos'], batch['img_mask'], batch.get('img_masked'),
                      rngs=rngs)


class UniterForVqa(nnx.Module):
  """Backbone `uniter` + VQA classifier `vqa_output` over `num_answers` answers."""

  def __init__(self, cfg: UniterConfig, *, num_answers: int = VQA_NUM_ANSWERS,
               rngs: nnx.Rngs):
    if num_answers <= 0:
      raise ValueError(f'num_answers must be positive, got {num_answers}')
    self.cfg = cfg
    self.num_answers = num_answers
    self.uniter = Uniter(cfg, rngs=rngs)
    h = cfg.hidden_size
    self.vqa_output = _mlp_head(h, 2 * h, num_answers, cfg, hidden_name='mlp',
                                out_name='classes', rngs=rngs)

  @property
  def torch_heads(self) -> tuple[str, ...]:
    return ('vqa_output',)

  def vqa_logits(self, pooled: jax.Array) -> jax.Array:
    """[B, H] -> [B, num_answers] float32."""
    return _apply_mlp_head(self.vqa_output, pooled)

  def encode(self, batch: dict, *, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """dict(sequence [B, T+K, H], pooled [B, H], vqa_logits [B, A] float32)."""
    sequence, pooled = _backbone(self, batch, rngs)
    return dict(sequence=sequence, pooled=pooled, vqa_logits=self.vqa_logits(pooled))


class UniterForGrounding(nnx.Module):
  """Backbone `uniter` + per-region score `re_output` (referring expressions)."""

  def __init__(self, cfg: UniterConfig, *, mlp: int = 1, rngs: nnx.Rngs):
    if mlp not in (1, 2):
      raise ValueError(f'mlp must be 1 or 2, got {mlp!r}')
    self.cfg = cfg
    self.mlp = mlp
    self.uniter = Uniter(cfg, rngs=rngs)
    h = cfg.hidden_size
    if mlp == 1:
      self.re_output = Dense(h, 1, cfg, names=('embed', None), rngs=rngs)
    else:
      self.re_output = _mlp_head(h, h, 1, cfg, hidden_name=None, out_name=None,
                                 rngs=rngs)

  @property
  def torch_heads(self) -> tuple[str, ...]:
    return ('re_output',) if self.mlp == 1 else ('re_output_mlp2',)

  def region_scores(self, regions: jax.Array, img_mask: jax.Array) -> jax.Array:
    """Region states [B, K, H] -> [B, K] float32; padded regions -> -1e4."""
    if self.mlp == 1:
      scores = self.re_output(regions, out_dtype=jnp.float32)
    else:
      scores = _apply_mlp_head(self.re_output, regions)
    return jnp.where(img_mask.astype(bool), scores[..., 0], PADDED_REGION_SCORE)

  def encode(self, batch: dict, *, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """dict(sequence, pooled, region_scores [B, K] float32)."""
    sequence, pooled = _backbone(self, batch, rngs)
    num_text = batch['input_ids'].shape[1]
    scores = self.region_scores(sequence[:, num_text:], batch['img_mask'])
    return dict(sequence=sequence, pooled=pooled, region_scores=scores)


class DualEncoderHead(nnx.Module):
  """ALADIN's matching head: `DUAL_LAYERS` transformer layers, first token, Linear H->E."""

  def __init__(self, cfg: UniterConfig, dual_dim: int, *, rngs: nnx.Rngs):
    self.encoder = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(DUAL_LAYERS)])
    self.proj = Dense(cfg.hidden_size, dual_dim, cfg, names=('embed', None), rngs=rngs)

  def __call__(self, x: jax.Array, mask: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    """Embedded tokens [B, L, H] (mask [B, L]) -> [B, E] float32 unit vectors."""
    bias = attention_bias(mask)
    for layer in self.encoder:
      x = layer(x, bias, rngs=rngs)
    e = self.proj(x[:, 0], out_dtype=jnp.float32)
    return e * jax.lax.rsqrt(jnp.maximum(jnp.sum(e * e, -1, keepdims=True), 1e-12))


class UniterForRetrieval(nnx.Module):
  """Cross-encoder ranking head `rank_output` (+ `itm_output`), optional dual encoder.

  Args:
    cfg: backbone configuration.
    dual_dim: E, the size of the dual-encoder embeddings; None builds no
      `dual_output` (cross-encoder only).
    rngs: parameter initialisation.
  """

  def __init__(self, cfg: UniterConfig, *, dual_dim: int | None = None, rngs: nnx.Rngs):
    if dual_dim is not None and dual_dim <= 0:
      raise ValueError(f'dual_dim must be positive or None, got {dual_dim}')
    self.cfg = cfg
    self.dual_dim = dual_dim
    self.uniter = Uniter(cfg, rngs=rngs)
    h = cfg.hidden_size
    self.itm_output = Dense(h, 2, cfg, names=('embed', None), rngs=rngs)
    self.rank_output = Dense(h, 1, cfg, names=('embed', None), rngs=rngs)
    self.dual_output = (DualEncoderHead(cfg, dual_dim, rngs=rngs)
                        if dual_dim is not None else None)
    self.init_rank_from_itm()

  @property
  def torch_heads(self) -> tuple[str, ...]:
    dual = ('dual_output',) if self.dual_output is not None else ()
    return ('itm_output', 'rank_output') + dual

  def init_rank_from_itm(self) -> None:
    """rank_output <- the ITM "match" row (kernel column 1, bias[1]), as UNITER does.

    Call again after loading pre-trained weights into `itm_output`; at that point
    the ranking score equals the pre-trained ITM match logit (zero-shot retrieval).
    """
    self.rank_output.kernel[...] = self.itm_output.kernel[...][:, 1:2]
    self.rank_output.bias[...] = self.itm_output.bias[...][1:2]

  def rank_scores(self, pooled: jax.Array) -> jax.Array:
    """[B, H] -> [B] float32 raw ranking logits s (the loss uses sigmoid(s))."""
    return self.rank_output(pooled, out_dtype=jnp.float32)[:, 0]

  def encode(self, batch: dict, *, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """Cross-encodes matched rows: dict(sequence, pooled, rank_scores [B] float32)."""
    sequence, pooled = _backbone(self, batch, rngs)
    return dict(sequence=sequence, pooled=pooled, rank_scores=self.rank_scores(pooled))

  def _dual(self, tokens: jax.Array, mask: jax.Array, rngs: nnx.Rngs | None) -> jax.Array:
    if self.dual_output is None:
      raise ValueError('this UniterForRetrieval has no dual-encoder head (dual_dim=None)')
    return self.dual_output(tokens, mask.astype(bool), rngs=rngs)

  def encode_text(self, batch: Mapping[str, jax.Array], *,
                  rngs: nnx.Rngs | None = None) -> jax.Array:
    """Text-only encoding [B, E] float32, unit norm (`[text T]`, no regions)."""
    tokens, _ = self.uniter(batch['input_ids'], batch['txt_mask'], batch['img_feat'][:, :0],
                            batch['img_pos'][:, :0], batch['img_mask'][:, :0], rngs=rngs,
                            num_layers=0)
    return self._dual(tokens, batch['txt_mask'], rngs)

  def encode_image(self, batch: Mapping[str, jax.Array], *,
                   rngs: nnx.Rngs | None = None) -> jax.Array:
    """Image-only encoding [B, E] float32, unit norm (`[[CLS] | regions K]`)."""
    input_ids = batch['input_ids'][:, :1]
    txt_mask = jnp.ones(input_ids.shape, bool)
    tokens, _ = self.uniter(input_ids, txt_mask, batch['img_feat'], batch['img_pos'],
                            batch['img_mask'], rngs=rngs, num_layers=0)
    return self._dual(tokens, jnp.concatenate([txt_mask, batch['img_mask'].astype(bool)], 1),
                      rngs)


class UniterEncoder(nnx.Module):
  """The backbone alone, for checkpoints without heads; `encode` as the task models'."""

  def __init__(self, cfg: UniterConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.uniter = Uniter(cfg, rngs=rngs)

  @property
  def torch_heads(self) -> tuple[str, ...]:
    return ()

  def encode(self, batch: dict, *, rngs: nnx.Rngs | None = None) -> dict[str, jax.Array]:
    """dict(sequence [B, T+K, H], pooled [B, H]) in the compute dtype."""
    sequence, pooled = _backbone(self, batch, rngs)
    return dict(sequence=sequence, pooled=pooled)
