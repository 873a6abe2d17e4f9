"""Scoring a gallery stays within one compiled block's memory, whatever its size,
and the benchmark's figures are consistent.

* One compiled block (`tile_function`) scores a 9 x 7 and a 33 x 29 gallery: one
  trace, so one program and one working set for both; the 33 x 29 scores equal
  the similarity on the whole gallery in one call.
* XLA's memory analysis of a SCAN block: its working set is a few [bi, bt, R, L]
  alignment tensors, below what the [bi, bt, L, D] attended vectors (which SCAN
  never builds) would take with D >> R, and grows with the block's area.
* `score_bench.run` on a few pairs: the block shape it clamps to, pairs/s against
  its own time, the COCO-5K extrapolation and the bound's sum.
"""

import numpy as np
import pytest

from vlp.matching import score_bench, score_matrix as score_matrix_lib, similarities

R, L, D = 4, 5, 6


def gallery(num_images, num_texts, seed=0):
  rng = np.random.default_rng(seed)
  img, img_mask = score_bench.synthetic_states(num_images, R, D, rng)
  txt, txt_mask = score_bench.synthetic_states(num_texts, L, D, rng)
  return img, img_mask, txt, txt_mask


def test_one_compiled_block_scores_any_gallery_size():
  sim = similarities.get_similarity("scan_t2i")
  traces = []
  def counted(*args):
    traces.append(1)
    return sim(*args)
  tile = score_matrix_lib.tile_function(counted)
  for num_images, num_texts in ((9, 7), (33, 29)):
    inputs = gallery(num_images, num_texts, seed=num_images)
    tiled = score_matrix_lib.score_matrix(counted, *inputs, chunk_images=4, chunk_texts=4,
                                          tile=tile)
    assert tiled.shape == (num_images, num_texts)
  assert len(traces) == 1  # 3 x 2 and 9 x 8 blocks: the same program.
  np.testing.assert_allclose(tiled, np.asarray(sim(*inputs)), rtol=1e-5, atol=1e-6)



def test_block_working_set_is_a_few_alignment_tensors():
  # R, L = 8 and D = 128: the attended vectors would be 16 alignment tensors.
  tile = score_matrix_lib.tile_function(similarities.get_similarity("scan_t2i"))
  rng = np.random.default_rng(0)
  temps = {}
  for block in (32, 64):
    img, img_mask = score_bench.synthetic_states(block, 8, 128, rng)
    txt, txt_mask = score_bench.synthetic_states(block, 8, 128, rng)
    memory = score_bench.compiled_block_memory(tile, (img, img_mask, txt, txt_mask, None))
    alignment = block * block * 8 * 8 * score_bench.FLOAT
    assert memory["output_size_in_bytes"] == block * block * score_bench.FLOAT
    assert alignment <= memory["temp_size_in_bytes"] <= 8 * alignment, (block, memory)
    temps[block] = memory["temp_size_in_bytes"]
  assert temps[64] / temps[32] == pytest.approx(4, rel=0.1)  # Grows with the block area.


def test_bench_report_is_consistent():
  report = score_bench.run("max_sum", images=10, texts=12, regions=R, tokens=L, dim=D,
                           chunk_images=16, chunk_texts=5)
  assert report["block"] == [10, 5]  # Images clamp to the gallery; texts: 3 blocks.
  assert report["pairs_per_s"] == pytest.approx(120 / report["seconds"], rel=1e-3)
  assert report["coco5k_seconds"] == pytest.approx(5000 * 25000 / report["pairs_per_s"],
                                                   rel=1e-3)
  bound = report["memory_bound"]
  assert bound["total"] == sum(bound[k] for k in ("texts", "image_block", "score_rows",
                                                  "block_working_set"))
  assert bound["score_rows"] == 2 * 10 * 15 * score_bench.FLOAT  # 12 texts padded to 15.
  assert bound["alignment_tensor"] == 10 * 5 * R * L * score_bench.FLOAT
