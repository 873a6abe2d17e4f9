"""The image-text similarities of `vlp.matching`, under one signature.

A similarity is a pure, jittable, masked function

    sim(regions [Bi, R, D], region_mask [Bi, R] bool,
        tokens [Bt, L, D], token_mask [Bt, L] bool, **hyper) -> scores [Bi, Bt] float32

that scores every image against every text (masks True on real fragments; padded
fragments change nothing; an image or text with no real fragment scores 0).
`get_similarity(name, **hyper)` binds the hyper-parameters and returns a function
of the four arrays; `is_decomposable(name)` says whether the scores are inner
products of per-item embeddings (then dual-encoder search applies, and
`global_embedding` gives the embeddings).

Registered names (hyper-parameters, defaults in brackets):
  cosine_global     VSE++: cosine of mean-pooled vectors (decomposable)
  max_sum           DVSA / ALADIN: sum over words of the best region (normalize [True],
                    reduce ['sum'] | 'mean')
  scan_t2i          SCAN text-to-image (lambda_softmax [9], agg ['mean'] | 'lse' | 'max'
                    | 'sum', lambda_lse [6], clip ['leaky_relu'] | 'relu')
  scan_i2t          SCAN image-to-text (lambda_softmax [4], agg, lambda_lse [5], clip)
  ensemble          mean of member score matrices (members: ((name, {hyper}), ...),
                    weights [equal]); SCAN's best is t2i AVG + i2t LSE
  token_flow        TokenFlow (tau [0.05])
  aligned_local     LocOv (tau [10], direction ['both'] | 'word' | 'region')
  damsm_word        AttnGAN DAMSM word relevance (gamma1 [4], gamma2 [5])
  cross_attention   SCAN-style attention with a chosen score function (score
                    ['cosine'], activation, lambda_softmax, agg, lambda_lse, params)
  hgan_3level       HGAN-style (approximate): local + mid + global levels (weights
                    [equal], lambda_softmax [9])

Similarities with parameters take them as the keyword argument `params` (a pytree
from `init_params(name, dim, key, **hyper)`); pass it at call time
(`sim(r, rm, t, tm, params=p)`) so that jit sees it as an argument, not a constant.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Mapping, Sequence

import jax

from vlp.matching import attention_scores
from vlp.matching.similarity_alignment import (aligned_local, cosine_global,
                                               global_embedding, max_sum, token_flow)
from vlp.matching.similarity_attention import (cross_attention, damsm_word, scan_i2t,
                                               scan_t2i)
from vlp.matching.similarity_hierarchical import hgan_3level

Similarity = Callable[..., jax.Array]


def ensemble(regions, region_mask, tokens, token_mask, *,
             members: Sequence[tuple[str, Mapping[str, Any]]],
             weights: Sequence[float] | None = None) -> jax.Array:
  """Weighted mean of member similarities' score matrices (equal weights by
  default). SCAN's published best averages t2i (AVG) and i2t (LSE) matrices:
  members=(('scan_t2i', {'agg': 'mean'}), ('scan_i2t', {'agg': 'lse'}))."""
  if not members:
    raise ValueError("ensemble: members is empty; give ((name, {hyper}), ...)")
  weights = [1.0] * len(members) if weights is None else list(weights)
  if len(weights) != len(members):
    raise ValueError(f"ensemble: {len(weights)} weights for {len(members)} members")
  total = 0.0
  for (name, hyper), weight in zip(members, weights):
    if name == "ensemble" or needs_params(name, **dict(hyper)):
      raise ValueError(f"ensemble member {name!r} {dict(hyper)}: members must be "
                       "parameter-free, non-ensemble similarities")
    sim = get_similarity(name, **dict(hyper))
    total = total + weight * sim(regions, region_mask, tokens, token_mask)
  return total / sum(weights)


SIMILARITIES: dict[str, Similarity] = {
    "cosine_global": cosine_global,
    "max_sum": max_sum,
    "scan_t2i": scan_t2i,
    "scan_i2t": scan_i2t,
    "ensemble": ensemble,
    "token_flow": token_flow,
    "aligned_local": aligned_local,
    "damsm_word": damsm_word,
    "cross_attention": cross_attention,
    "hgan_3level": hgan_3level,
}

DECOMPOSABLE = ("cosine_global",)


def check_name(name: str) -> None:
  if name not in SIMILARITIES:
    raise ValueError(f"unknown similarity {name!r}; expected one of {sorted(SIMILARITIES)}")


def get_similarity(name: str, **hyper: Any) -> Similarity:
  """The similarity `name` with its hyper-parameters bound.

  Unknown hyper-parameter names are an error naming the accepted ones. `params`
  is not bound here: pass it to the returned function.
  """
  check_name(name)
  fn = SIMILARITIES[name]
  accepted = [p for p in list(inspect.signature(fn).parameters)[4:] if p != "params"]
  unknown = sorted(set(hyper) - set(accepted))
  if unknown:
    raise ValueError(f"similarity {name!r} has no hyper-parameter(s) {unknown}; "
                     f"accepted: {accepted}")
  bound = functools.partial(fn, **hyper)
  functools.update_wrapper(bound, fn)
  return bound


def is_decomposable(name: str) -> bool:
  """True when s(i, t) = <f(i), g(t)> (one embedding per item, dual-encoder
  search); False for the fine-grained similarities that score pairs jointly."""
  check_name(name)
  return name in DECOMPOSABLE


def needs_params(name: str, **hyper: Any) -> bool:
  """Whether the similarity (with these hyper-parameters) reads `params`."""
  check_name(name)
  return (name == "cross_attention"
          and hyper.get("score", "cosine") in attention_scores.PARAMETRISED)


def init_params(name: str, dim: int, key: jax.Array, **hyper: Any) -> dict[str, jax.Array]:
  """Initial `params` for a parametrised similarity ({} when it has none).

  For 'cross_attention' give `score=` (and `hidden=` for the additive score's
  width, default dim).
  """
  check_name(name)
  if name != "cross_attention":
    return {}
  return attention_scores.init_score_params(hyper.get("score", "cosine"), dim, key,
                                            hidden=hyper.get("hidden"))


__all__ = ["SIMILARITIES", "DECOMPOSABLE", "Similarity", "get_similarity", "global_embedding",
           "init_params", "is_decomposable", "needs_params"]
