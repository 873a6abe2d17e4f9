"""The matching model: two independent streams, then a pluggable scorer.

`MatchingModel(cfg, spec, rngs=...)` encodes images and captions separately and
scores every (image, caption) pair of two batches as a `[Bi, Bt]` matrix:

* streams (`spec.encoder`):
  - "dual_stream": `RegionEncoder` (detector features + 7-d box geometry, then
    `region_layers` transformer layers) and a text encoder, `TextTransformer`
    (`text_layers`) or `BiGruTextEncoder` (`spec.text_encoder`);
  - "uniter": the UNITER backbone (`uniter`, loadable from `config.init_from`)
    run on each modality alone: text-only `[text T]` and image-only
    `[[CLS] | regions K]` (the [CLS] output dropped), all its layers.
* optional per-stream blocks: `graph_layers` of HGAN-style graph reasoning
  (one graph module per modality, `vlp.matching.graph`) and COOKIE's
  `shared_layers`: transformer layers whose *one* set of weights processes both
  streams (the same modules are called on regions and on words).
* scorer (`spec.scorer`): "similarity" (`vlp.matching.similarities`'
  `spec.similarity` with `spec.similarity_args`), "comma"
  (`AlternatingCrossAttention`, `scorer_layers`) or "slan"
  (`TextConditionedRegionFilter`, `filter_k`).

`global_vectors` (masked mean, L2-normalised) is the dual-encoder embedding the
two-stage evaluation searches with.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from vlp.matching import similarities
from vlp.matching.blocks import AlternatingCrossAttention, TextConditionedRegionFilter
from vlp.matching.encoders import BiGruTextEncoder, RegionEncoder, TextTransformer, run_layers
from vlp.matching.graph import GraphReasoning
from vlp.matching.similarity_alignment import global_embedding
from vlp.models.layers import make_param
from vlp.models.uniter import BertLayer, Uniter
from vlp.models.uniter_config import UniterConfig

ENCODERS = ("dual_stream", "uniter")
TEXT_ENCODERS = ("transformer", "bigru")
SCORERS = ("similarity", "comma", "slan")


@dataclasses.dataclass(frozen=True)
class MatchingSpec:
  """The mechanism: streams, blocks and scorer (config `matching.*`)."""
  encoder: str = "dual_stream"
  text_encoder: str = "transformer"
  region_layers: int = 1
  text_layers: int = 2
  shared_layers: int = 0
  graph_layers: int = 0
  scorer: str = "similarity"
  scorer_layers: int = 1
  filter_k: int = 4
  similarity: str = "cosine_global"
  similarity_args: str = ""

  def __post_init__(self):
    for field, allowed in (("encoder", ENCODERS), ("text_encoder", TEXT_ENCODERS),
                           ("scorer", SCORERS)):
      if getattr(self, field) not in allowed:
        raise ValueError(f"matching.{field}={getattr(self, field)!r}; expected one of "
                         f"{allowed}")

  @property
  def encodes_apart(self) -> bool:
    """True when every image and caption is encoded without the other side up to
    the similarity (so gallery states can be cached and searched in two stages);
    the similarity itself may still score pairs jointly (SCAN, max-sum)."""
    return self.scorer == "similarity"

  @classmethod
  def from_config(cls, matching: Mapping[str, Any]) -> "MatchingSpec":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(matching).items() if k in names})


def parse_args(text: str, key: str) -> dict:
  """'a=1,b=x' -> {'a': 1, 'b': 'x'} (values as Python literals where they parse)."""
  import ast
  out = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    if "=" not in part:
      raise ValueError(f"{key}={text!r}: expected comma-separated name=value pairs")
    name, value = (s.strip() for s in part.split("=", 1))
    try:
      out[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[name] = value
  return out


class MatchingModel(nnx.Module):

  def __init__(self, cfg: UniterConfig, spec: MatchingSpec, *, rngs: nnx.Rngs):
    self.cfg, self.spec = cfg, spec
    if spec.encoder == "uniter":
      self.uniter = Uniter(cfg, rngs=rngs)
    else:
      self.region_encoder = RegionEncoder(cfg, spec.region_layers, rngs=rngs)
      self.text_encoder = (BiGruTextEncoder(cfg, rngs=rngs) if spec.text_encoder == "bigru"
                           else TextTransformer(cfg, spec.text_layers, rngs=rngs))
    if spec.graph_layers:
      self.image_graph = GraphReasoning(cfg, spec.graph_layers, rngs=rngs)
      self.text_graph = GraphReasoning(cfg, spec.graph_layers, rngs=rngs)
    self.shared_top = nnx.List([BertLayer(cfg, rngs=rngs) for _ in range(spec.shared_layers)])
    if spec.scorer == "comma":
      self.scorer = AlternatingCrossAttention(cfg, spec.scorer_layers, rngs=rngs)
    elif spec.scorer == "slan":
      self.scorer = TextConditionedRegionFilter(cfg, spec.filter_k, rngs=rngs)
    else:
      hyper = parse_args(spec.similarity_args, "matching.similarity_args")
      self.similarity = similarities.get_similarity(spec.similarity, **hyper)
      params = similarities.init_params(spec.similarity, cfg.hidden_size, rngs.params(), **hyper)
      # Parameterised similarities: each leaf a replicated Param, the tree kept aside.
      leaves, self.similarity_tree = jax.tree.flatten(params)
      self.similarity_params = nnx.List([
          make_param(lambda key, shape, dtype, v=v: v, (None,) * v.ndim, v.shape, v.dtype)
          for v in leaves])

  def _finish(self, x, mask, graph, rngs):
    if self.spec.graph_layers:
      x = graph(x, mask)
    return run_layers(self.shared_top, x, mask, rngs).astype(jnp.float32)

  def encode_image(self, batch: Mapping[str, jax.Array], *, rngs: nnx.Rngs | None = None):
    """([B, K, H] float32 region states, [B, K] bool mask)."""
    mask = batch["img_mask"].astype(bool)
    if self.spec.encoder == "uniter":
      cls = batch["input_ids"][:, :1]
      seq, _ = self.uniter(cls, jnp.ones(cls.shape, bool), batch["img_feat"], batch["img_pos"],
                           mask, rngs=rngs)
      x = seq[:, 1:]
    else:
      x = self.region_encoder(batch["img_feat"], batch["img_pos"], mask, rngs=rngs)
    return self._finish(x, mask, getattr(self, "image_graph", None), rngs), mask

  def encode_text(self, batch: Mapping[str, jax.Array], *, rngs: nnx.Rngs | None = None):
    """([B, T, H] float32 token states, [B, T] bool mask)."""
    mask = batch["txt_mask"].astype(bool)
    if self.spec.encoder == "uniter":
      x, _ = self.uniter(batch["input_ids"], mask, batch["img_feat"][:, :0],
                         batch["img_pos"][:, :0], batch["img_mask"][:, :0], rngs=rngs)
    else:
      x = self.text_encoder(batch["input_ids"], mask, rngs=rngs)
    return self._finish(x, mask, getattr(self, "text_graph", None), rngs), mask

  def scores(self, regions, region_mask, tokens, token_mask, *,
             rngs: nnx.Rngs | None = None) -> jax.Array:
    """[Bi, Bt] float32 score of every (image, text) pair."""
    if self.spec.scorer != "similarity":
      return self.scorer(regions, region_mask, tokens, token_mask, rngs=rngs)
    if self.similarity_params:
      params = jax.tree.unflatten(self.similarity_tree, [p[...] for p in self.similarity_params])
      return self.similarity(regions, region_mask, tokens, token_mask, params=params)
    return self.similarity(regions, region_mask, tokens, token_mask)

  @staticmethod
  def global_vectors(states: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, N, H] -> [B, H] unit vectors: the dual-encoder embedding."""
    return global_embedding(states, mask)
