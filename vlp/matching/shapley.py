"""Shapley values of regions, Monte-Carlo and exact, and LOUPE's use of them
(APPROXIMATE, toy scale).

LOUPE (Li et al., NeurIPS 2022) treats tokens as players of a cooperative game
whose value is the image-text similarity, and learns fine-grained alignment from
Shapley interactions I([S]) = phi([S]) - sum_{i in S} phi(i) (the coalition S
played as one player, minus its members alone). Its uncertainty-aware learned
estimator is not reproduced. Here:

* `exact_shapley(value, n)` enumerates the 2^n coalitions (toy games, n <= ~12);
* `shapley_interaction(value, n, coalition)` is I([S]) from exact values;
* `monte_carlo_shapley(values_of_masks, n, key, num_permutations)`: the mean
  marginal contribution of each player over random orderings (unbiased); jittable;
* `shapley_alignment_loss`: the regulariser. For each matched pair of the batch,
  the value of a set of regions is the cosine of their mean state with the
  caption's mean state; Monte-Carlo Shapley values of the regions (no gradient)
  become a target distribution softmax(phi / tau) over the real regions, and the
  region-caption alignment softmax(cos(region, caption) / tau) is pulled towards
  it (KL). Padded regions are null players (phi = 0) and are excluded.
"""

from __future__ import annotations

import itertools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vlp.matching.masked import NEG, l2_normalize, masked_mean, zero_padding


def exact_shapley(value: Callable[[frozenset], float], n: int) -> np.ndarray:
  """phi_i = sum_{S not containing i} |S|! (n-|S|-1)! / n! (v(S + i) - v(S))."""
  phi = np.zeros(n)
  for i in range(n):
    others = [j for j in range(n) if j != i]
    for size in range(n):
      weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
      for s in itertools.combinations(others, size):
        s = frozenset(s)
        phi[i] += weight * (value(s | {i}) - value(s))
  return phi


def shapley_interaction(value: Callable[[frozenset], float], n: int,
                        coalition: Sequence[int]) -> float:
  """I([S]) = phi([S]) in the game where S plays as one player, minus sum of phi(i)."""
  members = sorted(set(coalition))
  rest = [j for j in range(n) if j not in members]
  # Merged game: player 0 is [S], players 1.. are the others.
  def merged(s: frozenset) -> float:
    real = set()
    for p in s:
      real |= set(members) if p == 0 else {rest[p - 1]}
    return value(frozenset(real))
  phi_merged = exact_shapley(merged, len(rest) + 1)[0]
  return float(phi_merged - exact_shapley(value, n)[members].sum())


def monte_carlo_shapley(values_of_masks: Callable[[jax.Array], jax.Array], n: int,
                        key: jax.Array, num_permutations: int) -> jax.Array:
  """[n] estimate; `values_of_masks([M, n] bool) -> [M]` values of coalitions."""
  perms = jax.vmap(lambda k: jax.random.permutation(k, n))(
      jax.random.split(key, num_permutations))  # [P, n]
  # rank[p, i]: position of player i in ordering p; prefix j holds ranks < j.
  rank = jnp.argsort(perms, axis=1)
  prefixes = rank[:, None, :] < jnp.arange(n + 1)[None, :, None]  # [P, n+1, n]
  values = values_of_masks(prefixes.reshape(-1, n)).reshape(num_permutations, n + 1)
  # Player i joins at step rank[p, i]: v(prefix rank+1) - v(prefix rank).
  after = jnp.take_along_axis(values, rank + 1, axis=1)
  before = jnp.take_along_axis(values, rank, axis=1)
  return jnp.mean(after - before, axis=0)


def _cos(a, b):
  return jnp.sum(l2_normalize(a) * l2_normalize(b), -1)


def region_shapley(regions, region_mask, text_vec, key, num_permutations: int) -> jax.Array:
  """[B, R] Monte-Carlo Shapley values of each row's regions for its caption vector."""
  def one(r, m, t, k):
    def values(masks):
      w = (masks & m[None]).astype(jnp.float32)
      mean = (w @ r) / jnp.maximum(jnp.sum(w, -1, keepdims=True), 1.0)
      return _cos(mean, t[None])
    return monte_carlo_shapley(values, r.shape[0], k, num_permutations)
  keys = jax.random.split(key, regions.shape[0])
  return jax.vmap(one)(regions.astype(jnp.float32), region_mask.astype(bool),
                       text_vec.astype(jnp.float32), keys)


def shapley_alignment_loss(regions, region_mask, tokens, token_mask, key, *,
                           num_permutations: int = 4, temperature: float = 0.1,
                           example_mask=None) -> jax.Array:
  """Mean over matched rows of KL(softmax(phi/tau) || softmax(cos(region, caption)/tau))."""
  text = masked_mean(zero_padding(tokens, token_mask), token_mask[..., None], axis=1)
  mask = region_mask.astype(bool)
  phi = jax.lax.stop_gradient(region_shapley(regions, mask, text, key, num_permutations))
  neg = NEG
  target = jax.nn.softmax(jnp.where(mask, phi / temperature, neg), -1)
  logits = jnp.where(mask, _cos(regions.astype(jnp.float32), text[:, None]) / temperature, neg)
  log_pred = jax.nn.log_softmax(logits, -1)
  kl = jnp.sum(jnp.where(mask, target * (jnp.log(jnp.maximum(target, 1e-30)) - log_pred), 0.0),
               -1)
  rows = (jnp.ones(kl.shape, bool) if example_mask is None
          else example_mask.astype(bool)) & jnp.any(mask, -1)
  return jnp.sum(jnp.where(rows, kl, 0.0)) / jnp.maximum(jnp.sum(rows), 1)
