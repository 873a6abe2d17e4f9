"""Alignment score functions for cross-attention (the attention-score study).

A score function rates how well query token q (a word) fits key k (a region);
its softmax over the keys is the attention. Each takes words [Bt, L, D] and
regions [Bi, R, D] and returns e [Bi, Bt, R, L]:

    dot         q . k
    scaled_dot  q . k / sqrt(D)
    cosine      q . k / (|q| |k|)
    general     q^T W k
    biased      q^T (W k + b)
    activated   f(q^T (W k + b)),  f in {tanh, relu, leaky_relu}
    additive    u^T tanh(W1 k + W2 q)

The parametrised ones read a params pytree made by `init_params`:
general {'w' [D, D]}, biased / activated {'w', 'b' [D]}, additive
{'w_key' [D, H], 'w_query' [D, H], 'u' [H]}. (q^T W k and k^T W q are the same
family up to transposing W, so one `general` covers both variants.)
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from vlp.matching.masked import l2_normalize

SCORE_FUNCTIONS = ("dot", "scaled_dot", "cosine", "general", "biased", "activated",
                   "additive")
PARAMETRISED = ("general", "biased", "activated", "additive")
ACTIVATIONS = {"tanh": jnp.tanh, "relu": jax.nn.relu,
               "leaky_relu": lambda x: jax.nn.leaky_relu(x, 0.01)}


def check_score(score: str, activation: str = "tanh") -> None:
  if score not in SCORE_FUNCTIONS:
    raise ValueError(f"unknown attention score {score!r}; expected one of {SCORE_FUNCTIONS}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; expected one of "
                     f"{sorted(ACTIVATIONS)}")


def init_score_params(score: str, dim: int, key: jax.Array, *,
                      hidden: int | None = None) -> dict[str, jax.Array]:
  """Parameters of one score function ({} for the parameter-free ones).

  W matrices start as lecun-normal, biases at zero; the additive score's hidden
  width defaults to `dim`.
  """
  check_score(score)
  if score not in PARAMETRISED:
    return {}
  init = jax.nn.initializers.lecun_normal()
  k1, k2, k3 = jax.random.split(key, 3)
  if score == "additive":
    hidden = dim if hidden is None else hidden
    return {"w_key": init(k1, (dim, hidden), jnp.float32),
            "w_query": init(k2, (dim, hidden), jnp.float32),
            "u": init(k3, (hidden, 1), jnp.float32)[:, 0]}
  params = {"w": init(k1, (dim, dim), jnp.float32)}
  if score in ("biased", "activated"):
    params["b"] = jnp.zeros((dim,), jnp.float32)
  return params


def check_params(score: str, params: Any) -> None:
  """A clear error when a parametrised score gets no (or the wrong) params."""
  needed = set(init_score_params(score, 1, jax.random.key(0)))
  have = set(params) if isinstance(params, dict) else set()
  if needed - have:
    raise ValueError(f"attention score {score!r} needs params with keys {sorted(needed)} "
                     f"(make them with vlp.matching.similarities.init_params); got "
                     f"{None if params is None else sorted(have)}")


def alignment_scores(words: jax.Array, regions: jax.Array, *, score: str,
                     activation: str = "tanh", params: Any = None) -> jax.Array:
  """e[i, t, r, l]: the score of word l of text t against region r of image i.

  `words` [Bt, L, D] and `regions` [Bi, R, D] are float32 with padding zeroed.
  """
  check_score(score, activation)
  if score in PARAMETRISED:
    check_params(score, params)
  if score == "cosine":
    words, regions = l2_normalize(words), l2_normalize(regions)
  if score in ("dot", "scaled_dot", "cosine"):
    e = jnp.einsum("ard,bld->abrl", regions, words)
    return e / jnp.sqrt(words.shape[-1]) if score == "scaled_dot" else e
  if score == "additive":
    keys = regions @ params["w_key"]  # [Bi, R, H]
    queries = words @ params["w_query"]  # [Bt, L, H]
    hidden = jnp.tanh(keys[:, None, :, None, :] + queries[None, :, None, :, :])
    return hidden @ params["u"]
  keys = jnp.einsum("ij,arj->ari", params["w"], regions)  # W k
  if score != "general":
    keys = keys + params["b"]
  e = jnp.einsum("ard,bld->abrl", keys, words)
  return ACTIVATIONS[activation](e) if score == "activated" else e
