"""Throughput and memory of `score_matrix` on synthetic gallery states.

`run(name, images=..., texts=..., ...)` scores `images` x `texts` random
Gaussian states ([N, R, D] regions, [N, L, D] tokens; each item's real length
drawn between half and all of its slots) with the named similarity, after one
warm-up block (compilation), and reports pairs per second, the block shape, the
devices, XLA's memory analysis of one compiled block, the peak device memory where
the backend reports it (`memory_stats`; CPU does not) and a bound from the block
size. `python -m vlp.bench --similarity_bench=...` is the command.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from vlp.matching import score_matrix as score_matrix_lib, similarities

FLOAT = 4  # Bytes of a float32.
COCO_5K_PAIRS = 5000 * 25000


def synthetic_states(num: int, slots: int, dim: int, rng: np.random.Generator):
  """([num, slots, dim] float32 states, [num, slots] mask with 1/2..1 of slots real)."""
  states = rng.standard_normal((num, slots, dim), np.float32)
  lengths = rng.integers(max(1, slots // 2), slots + 1, num)
  return states, np.arange(slots)[None, :] < lengths[:, None]


def compiled_block_memory(tile, block_args) -> dict[str, int | None]:
  """XLA's memory analysis of one compiled block (bytes per device), where the
  backend gives one."""
  analysis = tile.lower(*block_args).compile().memory_analysis()
  fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
  return {f: (int(getattr(analysis, f)) if analysis is not None else None) for f in fields}


def memory_bound(*, chunk_images: int, chunk_texts: int, texts: int, regions: int,
                 tokens: int, dim: int, shards: int, block_temp: int) -> dict[str, int]:
  """Bytes per device that `score_matrix` needs: the texts (replicated), an image
  block, two rows of scores and one block's working set (`block_temp`, XLA's, or
  the [bi, bt, R, L] alignment tensor when there is none). None of it grows with
  the number of images."""
  per_device_images = chunk_images // shards
  alignment = per_device_images * chunk_texts * regions * tokens * FLOAT
  parts = {
      "texts": math.ceil(texts / chunk_texts) * chunk_texts * tokens * (dim * FLOAT + 1),
      "image_block": per_device_images * regions * (dim * FLOAT + 1),
      "score_rows": 2 * chunk_images * math.ceil(texts / chunk_texts) * chunk_texts * FLOAT,
      "block_working_set": block_temp or alignment,
  }
  return dict(parts, alignment_tensor=alignment, total=sum(parts.values()))


def run(name: str, *, images: int, texts: int, regions: int, tokens: int, dim: int,
        chunk_images: int, chunk_texts: int, mesh: Mesh | None = None, rules: Any = None,
        hyper: dict | None = None, seed: int = 0) -> dict:
  """One timed `score_matrix` of `name` over images x texts synthetic states."""
  hyper = dict(hyper or {})
  sim = similarities.get_similarity(name, **hyper)
  rng = np.random.default_rng(seed)
  img, img_mask = synthetic_states(images, regions, dim, rng)
  txt, txt_mask = synthetic_states(texts, tokens, dim, rng)
  params = similarities.init_params(name, dim, jax.random.key(seed), **hyper) or None
  params = jax.tree.map(np.asarray, params)  # Host arrays, placed as score_matrix does.
  shards, _, _ = score_matrix_lib.block_shardings(mesh, rules)
  chunk_images = min(chunk_images, shards * math.ceil(images / shards))
  chunk_texts = min(chunk_texts, texts)
  tile = score_matrix_lib.tile_function(sim, mesh=mesh, rules=rules, params=params)
  score = lambda i, t: score_matrix_lib.score_matrix(
      sim, img[:i], img_mask[:i], txt[:t], txt_mask[:t], chunk_images=chunk_images,
      chunk_texts=chunk_texts, mesh=mesh, rules=rules, params=params, tile=tile)

  start = time.perf_counter()
  score(chunk_images, chunk_texts)  # One block: compiles it.
  compile_seconds = time.perf_counter() - start
  start = time.perf_counter()
  scores = score(images, texts)
  seconds = time.perf_counter() - start
  assert scores.shape == (images, texts) and np.isfinite(scores).all()

  block_args = (img[:chunk_images], img_mask[:chunk_images], txt[:chunk_texts],
                txt_mask[:chunk_texts], params)
  block = compiled_block_memory(tile, block_args)
  device = jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  pairs_per_s = images * texts / seconds
  return {
      "similarity": name, "hyper": hyper, "images": images, "texts": texts,
      "regions": regions, "tokens": tokens, "dim": dim,
      "block": [chunk_images, chunk_texts], "image_shards": shards,
      "devices": f"{jax.device_count()} x {device.device_kind} ({jax.default_backend()})",
      "compile_seconds": round(compile_seconds, 2), "seconds": seconds,
      "pairs_per_s": round(pairs_per_s), "coco5k_seconds": round(COCO_5K_PAIRS / pairs_per_s, 1),
      "block_memory": block,
      "memory_bound": memory_bound(
          chunk_images=chunk_images, chunk_texts=chunk_texts, texts=texts, regions=regions,
          tokens=tokens, dim=dim, shards=shards, block_temp=block["temp_size_in_bytes"] or 0),
      "peak_memory_bytes": (stats or {}).get("peak_bytes_in_use"),
  }
