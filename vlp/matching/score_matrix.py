"""All-pairs scoring of N_i images against N_t texts in bounded memory.

A fine-grained similarity builds a [Bi, Bt, R, L] alignment tensor, so a 1K x 5K
(or 5K x 25K) evaluation cannot be one call. `score_matrix` tiles the pairs into
blocks of `chunk_images` x `chunk_texts`, pads the last block of each axis with
empty items (all-False masks; their scores are cut off), so every block has one
static shape and the similarity compiles once. With a mesh, each image block is
split over the mesh's batch axes (the `dp` rule table of `vlp.parallel.sharding`,
or the given rules), texts and host params are replicated (params already sharded
over the mesh stay so). A block computes its images' rows on their devices with
no communication (a collective inside every queued block can stall CPU devices
that share few threads); each row of blocks is then gathered to every process, so
every process gets the full matrix.

Device memory, whatever N_i: the texts (once, replicated), one image block, two
rows of scores (2 x chunk_images x N_t floats) and one block's working set, about
(chunk_images / shards) x chunk_texts x R x L floats for a fine-grained
similarity (`vlp.matching.score_bench` measures it).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vlp.parallel import global_batch, sharding


def check_inputs(regions, region_mask, tokens, token_mask) -> None:
  """Shapes [Ni, R, D], [Ni, R], [Nt, L, D], [Nt, L] with one D, or a clear error."""
  problems = []
  if np.ndim(regions) != 3 or np.shape(region_mask) != np.shape(regions)[:2]:
    problems.append(f"regions {np.shape(regions)} / region_mask {np.shape(region_mask)} "
                    "must be [Ni, R, D] / [Ni, R]")
  if np.ndim(tokens) != 3 or np.shape(token_mask) != np.shape(tokens)[:2]:
    problems.append(f"tokens {np.shape(tokens)} / token_mask {np.shape(token_mask)} "
                    "must be [Nt, L, D] / [Nt, L]")
  if not problems and np.shape(regions)[2] != np.shape(tokens)[2]:
    problems.append(f"regions are {np.shape(regions)[2]}-d but tokens "
                    f"{np.shape(tokens)[2]}-d")
  if problems:
    raise ValueError("score_matrix: " + "; ".join(problems))


def pad_items(x: np.ndarray, size: int) -> np.ndarray:
  """x with zero items appended along axis 0 up to `size` (masks pad with False)."""
  if size <= len(x):
    return x
  return np.concatenate([x, np.zeros((size - len(x),) + x.shape[1:], x.dtype)])


def place(x: np.ndarray, target: NamedSharding | None) -> jax.Array:
  """A host array as a device array with `target` sharding; every process passes
  the same full array and contributes the pieces its devices hold."""
  if target is None:
    return jax.device_put(x)
  return jax.make_array_from_callback(x.shape, target, lambda index: x[index])


def block_shardings(mesh: Mesh | None, rules: Any = None):
  """(image shards, sharding of an [n, ...] image block by ndim, replicated sharding)
  for tiles on `mesh` (None: one device)."""
  if mesh is None:
    return 1, lambda ndim: None, None
  rules = sharding.rules_for("dp" if rules is None else rules, mesh)
  return (sharding.batch_shard_count(mesh, rules),
          lambda ndim: NamedSharding(mesh, sharding.batch_spec(mesh, rules, ndim)),
          NamedSharding(mesh, P()))


def params_shardings(params: Any, mesh: Mesh):
  """Each leaf of `params`: its own sharding when it already lives on `mesh` (e.g.
  a train state sharded over it, which may span processes; a leaf the similarity
  does not read costs nothing, one it reads is gathered in every block, so
  replicate those first), else replicated."""
  replicated = NamedSharding(mesh, P())
  def keep(x):
    held = getattr(x, "sharding", None)
    return held if isinstance(held, NamedSharding) and held.mesh == mesh else replicated
  return jax.tree.map(keep, params)


def tile_function(sim: Callable[..., jax.Array], *, mesh: Mesh | None = None,
                  rules: Any = None, params: Any = None) -> Callable:
  """The jitted block `tile(r, rm, t, tm, params) -> [bi, bt]` that `score_matrix`
  runs: with a mesh, images and their scores split over its batch axes, texts
  replicated, `params` as `params_shardings` places them. One compilation per
  block shape; keep it (e.g. in an `EvalContext.compiled`) to reuse it."""
  def block(r, rm, t, tm, p):
    return sim(r, rm, t, tm) if p is None else sim(r, rm, t, tm, params=p)

  if mesh is None:
    return jax.jit(block)
  _, image_sharding, replicated = block_shardings(mesh, rules)
  return jax.jit(
      block, out_shardings=image_sharding(2),
      in_shardings=(image_sharding(3), image_sharding(2), replicated, replicated,
                    None if params is None else params_shardings(params, mesh)))


def score_matrix(sim: Callable[..., jax.Array], regions, region_mask, tokens, token_mask,
                 *, chunk_images: int, chunk_texts: int, mesh: Mesh | None = None,
                 rules: Any = None, params: Any = None, tile: Callable | None = None
                 ) -> np.ndarray:
  """scores [Ni, Nt] float32 (host numpy): sim of every image against every text.

  Args:
    sim: a similarity with its hyper-parameters bound
      (`vlp.matching.similarities.get_similarity`).
    regions, region_mask, tokens, token_mask: host arrays, [Ni, R, D], [Ni, R],
      [Nt, L, D], [Nt, L] (the same full arrays on every process).
    chunk_images, chunk_texts: block size; memory per block is about
      chunk_images x chunk_texts x R x L floats (per device: divided by the
      image shards). With a mesh, chunk_images must divide by the number of
      image shards.
    mesh: shard each image block over the mesh's batch axes (None: default device).
    rules: the logical rule table whose `batch` entry names those axes (default:
      the `dp` preset: every data-like axis of the mesh).
    params: the similarity's `params` pytree, if it has one (passed as an argument,
      so it is not baked into the compiled program). Host arrays are replicated;
      arrays already sharded over `mesh` stay as they are.
    tile: `tile_function(sim, mesh=mesh, rules=rules, params=params)` compiled
      earlier, to reuse its compilations (None: made here).
  """
  check_inputs(regions, region_mask, tokens, token_mask)
  if chunk_images <= 0 or chunk_texts <= 0:
    raise ValueError(f"score_matrix: chunk_images and chunk_texts must be positive, got "
                     f"{chunk_images} and {chunk_texts}")
  regions, tokens = np.asarray(regions), np.asarray(tokens)
  region_mask = np.asarray(region_mask, bool)
  token_mask = np.asarray(token_mask, bool)
  num_images, num_texts = len(regions), len(tokens)
  if num_images == 0 or num_texts == 0:
    return np.zeros((num_images, num_texts), np.float32)

  shards, image_sharding, replicated = block_shardings(mesh, rules)
  if chunk_images % shards:
    raise ValueError(f"score_matrix: chunk_images={chunk_images} must be a multiple of "
                     f"the {shards} image shards of mesh {dict(mesh.shape)}")
  # A block never needs to be larger than the (shard-rounded) whole axis.
  chunk_images = min(chunk_images, shards * math.ceil(num_images / shards))
  chunk_texts = min(chunk_texts, num_texts)
  padded_images = chunk_images * math.ceil(num_images / chunk_images)
  padded_texts = chunk_texts * math.ceil(num_texts / chunk_texts)
  regions, region_mask = pad_items(regions, padded_images), pad_items(region_mask,
                                                                      padded_images)
  tokens, token_mask = pad_items(tokens, padded_texts), pad_items(token_mask, padded_texts)

  if tile is None:
    tile = tile_function(sim, mesh=mesh, rules=rules, params=params)
  if mesh is not None and params is not None:
    params = jax.tree.map(lambda x, s: x if getattr(x, "sharding", None) == s
                          else place(np.asarray(x), s), params, params_shardings(params, mesh))

  # The texts go to the devices once; images one block at a time. Blocks are
  # dispatched asynchronously; a row of blocks is read back once the next row is
  # queued, so the devices hold the texts, one image block and two rows of scores.
  text_blocks = [(place(tokens[j:j + chunk_texts], replicated),
                  place(token_mask[j:j + chunk_texts], replicated))
                 for j in range(0, padded_texts, chunk_texts)]
  rows, pending = [], None
  for i in range(0, padded_images, chunk_images):
    r = place(regions[i:i + chunk_images], image_sharding(3))
    rm = place(region_mask[i:i + chunk_images], image_sharding(2))
    row = [tile(r, rm, t, tm, params) for t, tm in text_blocks]
    if pending is not None:
      rows.append(np.concatenate([global_batch.to_host(b) for b in pending], axis=1))
    pending = row
  rows.append(np.concatenate([global_batch.to_host(b) for b in pending], axis=1))
  return np.concatenate(rows)[:num_images, :num_texts].astype(np.float32)
