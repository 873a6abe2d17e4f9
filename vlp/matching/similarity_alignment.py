"""Image-text similarities built from pooled or best-matching fragments.

Every function here has the similarity signature of `vlp.matching.similarities`:

    sim(regions [Bi, R, D], region_mask [Bi, R] bool,
        tokens [Bt, L, D], token_mask [Bt, L] bool, **hyper) -> scores [Bi, Bt] f32

and scores every image against every text. Masks are True on real fragments;
padded fragments never change a score (they are zeroed first, then left out of
every max, sum, mean and softmax), and an image or text with no real fragment
scores 0 against everything.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from vlp.matching.masked import (l2_normalize, masked_max, masked_mean, masked_softmax,
                                 pool, zero_padding)


def global_embedding(fragments: jax.Array, mask: jax.Array) -> jax.Array:
  """The unit-length mean of the real fragments: [B, N, D], [B, N] -> [B, D].

  The one-vector-per-item embedding behind `cosine_global`, for dual-encoder
  search (index these, then one matrix product scores every pair).
  """
  return l2_normalize(masked_mean(zero_padding(fragments, mask), mask[..., None], axis=1))


def cosine_global(regions, region_mask, tokens, token_mask) -> jax.Array:
  """VSE++ similarity: cosine of the mean-pooled region and token vectors.

  s(i, t) = <g_i, g_t> with g = normalize(mean of the real fragments). It is
  decomposable: each side is embedded alone, so it serves dual-encoder search.
  """
  return global_embedding(regions, region_mask) @ global_embedding(tokens, token_mask).T


def fragment_cosines(regions, region_mask, tokens, token_mask) -> jax.Array:
  """cos(v_r, t_l) for every image, text, region and token: [Bi, Bt, R, L]
  (0 where either fragment is padding)."""
  v = l2_normalize(zero_padding(regions, region_mask))
  t = l2_normalize(zero_padding(tokens, token_mask))
  return jnp.einsum("ard,bld->abrl", v, t)


def fragment_dots(regions, region_mask, tokens, token_mask) -> jax.Array:
  """<v_r, t_l> on the raw features: [Bi, Bt, R, L] (0 on padding)."""
  return jnp.einsum("ard,bld->abrl", zero_padding(regions, region_mask),
                    zero_padding(tokens, token_mask))


def pair_masks(region_mask, token_mask) -> tuple[jax.Array, jax.Array]:
  """The masks broadcast onto [Bi, Bt, R, L]: (regions, tokens)."""
  return region_mask[:, None, :, None], token_mask[None, :, None, :]


def max_sum(regions, region_mask, tokens, token_mask, *, normalize: bool = True,
            reduce: str = "sum") -> jax.Array:
  """Region-word max alignment (DVSA; ALADIN's "MrSw").

  Each word is matched to its best region and the matches are added up:

      s(i, t) = sum_{l in t} max_{r in i} <v_r, t_l>

  normalize=True compares unit vectors (cosine, as ALADIN); False uses the raw
  inner product (DVSA). reduce='mean' divides by the number of real words, so
  long captions are not favoured.
  """
  if reduce not in ("sum", "mean"):
    raise ValueError(f"max_sum: reduce must be 'sum' or 'mean', got {reduce!r}")
  sims = (fragment_cosines if normalize else fragment_dots)(
      regions, region_mask, tokens, token_mask)
  rmask, tmask = pair_masks(region_mask, token_mask)
  best = masked_max(sims, rmask, axis=2)  # [Bi, Bt, L]
  return pool(best, token_mask[None, :, :], axis=2, how=reduce)


def token_flow(regions, region_mask, tokens, token_mask, *, tau: float = 0.05) -> jax.Array:
  """TokenFlow: fragment cosines weighted by an independent "flow" between tokens.

  Each region is weighted by how close it is to the text's global vector, each
  word by how close it is to the image's global vector:

      w_r = softmax_r(<v_r, g_t> / tau),  w_l = softmax_l(<t_l, g_v> / tau)
      s(i, t) = sum_{r, l} w_r w_l <v_r, t_l> = <sum_r w_r v_r, sum_l w_l t_l>

  with unit fragments and g the normalised mean of the other side's unit fragments. The
  flow w_r w_l is the transport plan restricted to independent couplings, so the
  score factors into two weighted poolings and costs O(R + L) per pair.
  """
  v = l2_normalize(zero_padding(regions, region_mask))
  t = l2_normalize(zero_padding(tokens, token_mask))
  g_v = l2_normalize(masked_mean(v, region_mask[..., None], axis=1))  # [Bi, D]
  g_t = l2_normalize(masked_mean(t, token_mask[..., None], axis=1))  # [Bt, D]
  w_v = masked_softmax(jnp.einsum("ard,bd->abr", v, g_t) / tau,
                       region_mask[:, None, :], axis=2)
  w_t = masked_softmax(jnp.einsum("bld,ad->abl", t, g_v) / tau,
                       token_mask[None, :, :], axis=2)
  pooled_v = jnp.einsum("abr,ard->abd", w_v, v)
  pooled_t = jnp.einsum("abl,bld->abd", w_t, t)
  return jnp.sum(pooled_v * pooled_t, axis=-1)


def aligned_local(regions, region_mask, tokens, token_mask, *, tau: float = 10.0,
                  direction: str = "both") -> jax.Array:
  """LocOv's localized word-region matching (the negated "aligned local" distance).

  With local scores a_rl = <v_r, t_l> / tau (tau = 10 suits raw inner products),
  each word attends over the regions and each region over the words:

      word side:   s_w = mean_{l} sum_r softmax_r(a_rl) a_rl
      region side: s_r = mean_{r} sum_l softmax_l(a_rl) a_rl

  direction 'word' or 'region' returns one side, 'both' their mean. Training
  LocOv-style is a batch cross-entropy on these scores (`info_nce`, tau = 1).
  """
  if direction not in ("word", "region", "both"):
    raise ValueError(f"aligned_local: direction must be 'word', 'region' or 'both', "
                     f"got {direction!r}")
  local = fragment_dots(regions, region_mask, tokens, token_mask) / tau
  rmask, tmask = pair_masks(region_mask, token_mask)
  word_att = masked_softmax(local, rmask, axis=2)  # over regions, per word
  word_side = masked_mean(jnp.sum(word_att * local, axis=2), token_mask[None], axis=2)
  region_att = masked_softmax(local, tmask, axis=3)  # over words, per region
  region_side = masked_mean(jnp.sum(region_att * local, axis=3), region_mask[:, None],
                            axis=2)
  if direction == "word":
    return word_side
  if direction == "region":
    return region_side
  return 0.5 * (word_side + region_side)
