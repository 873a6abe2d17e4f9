"""Grounding accuracy: IoU conventions, region picking, per-split aggregation."""

import numpy as np
import pytest

from vlp.evaluators import grounding as g


@pytest.mark.parametrize("a,b,want", [
    ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
    ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),      # half-overlap side by side
    ([0, 0, 10, 10], [0, 0, 5, 10], 0.5),            # contained half
    ([0, 0, 10, 10], [2, 2, 4, 4], 4 / 100),
    ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),          # touching edges
    ([0, 0, 10, 10], [20, 20, 30, 30], 0.0),
    ([0, 0, 4, 6], [2, 3, 8, 9], 6 / (24 + 36 - 6)),
])
def test_iou_by_hand(a, b, want):
  assert g.box_iou(a, b) == pytest.approx(want)
  assert g.box_iou(b, a) == pytest.approx(want)


def uniter_compute_iou(box1, box2):
  """UNITER's inclusive-pixel IoU on [x, y, w, h] boxes, written out from its definition."""
  ix1, iy1 = max(box1[0], box2[0]), max(box1[1], box2[1])
  ix2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
  iy2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
  inter = (ix2 - ix1 + 1) * (iy2 - iy1 + 1) if ix1 < ix2 and iy1 < iy2 else 0
  return inter / (box1[2] * box1[3] + box2[2] * box2[3] - inter)


def test_uniter_pixel_convention_matches_definition():
  rng = np.random.default_rng(0)
  xywh = np.concatenate([rng.integers(0, 20, (500, 2)), rng.integers(1, 15, (500, 2))], 1)
  xywh2 = np.concatenate([rng.integers(0, 20, (500, 2)), rng.integers(1, 15, (500, 2))], 1)
  to_xyxy = lambda b: np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1).astype(float)
  got = g.box_iou(to_xyxy(xywh), to_xyxy(xywh2), convention="uniter_pixel")
  want = [uniter_compute_iou(a, b) for a, b in zip(xywh.tolist(), xywh2.tolist())]
  np.testing.assert_allclose(got, want, rtol=1e-12)
  # It differs from the continuous IoU only on overlaps of at most one pixel.
  cont = g.box_iou(to_xyxy(xywh), to_xyxy(xywh2))
  differ = ~np.isclose(got, cont)
  assert differ.any()
  assert np.all(got[differ] == 0)
  one_px = g.box_iou([0, 0, 10, 10], [9, 0, 19, 10], convention="uniter_pixel")
  assert one_px == 0.0 and g.box_iou([0, 0, 10, 10], [9, 0, 19, 10]) == pytest.approx(10 / 190)


def test_accuracy_threshold_and_strictness():
  gt = np.array([[0, 0, 10, 10]] * 4, float)
  pred = np.array([[0, 0, 10, 10],     # IoU 1
                   [0, 0, 5, 10],      # IoU exactly 0.5
                   [5, 0, 15, 10],     # IoU 1/3
                   [0, 0, 6, 10]])     # IoU 0.6
  assert g.grounding_accuracy(pred, gt) == 75.0
  assert g.grounding_accuracy(pred, gt, strict=True) == 50.0   # UNITER's "> 0.5"
  assert g.grounding_accuracy(pred, gt, threshold=0.3) == 100.0
  with pytest.raises(ValueError, match="must both be"):
    g.grounding_accuracy(pred[:3], gt)
  with pytest.raises(ValueError, match="last axis of 4"):
    g.grounding_accuracy(pred[:, :3], gt[:, :3])


def test_pick_never_chooses_masked_regions():
  scores = np.array([[0.1, 9.0, 0.5, 0.5],
                     [3.0, 3.0, 1.0, 7.0],
                     [-np.inf, -np.inf, 2.0, 2.0]])
  mask = np.array([[True, False, True, True],    # 9.0 is padding; 0.5 tie -> region 2
                   [True, True, True, False],    # 7.0 is padding; 3.0 tie -> region 0
                   [True, True, False, False]])  # only -inf left -> first unmasked
  assert g.pick_regions(scores, mask).tolist() == [2, 0, 0]
  assert g.pick_regions(scores).tolist() == [1, 3, 2]
  boxes = np.arange(3 * 4 * 4, dtype=float).reshape(3, 4, 4)
  np.testing.assert_array_equal(g.pick_boxes(scores, boxes, mask),
                                boxes[[0, 1, 2], [2, 0, 0]])
  with pytest.raises(ValueError, match=r"rows \[1\] have no unmasked region"):
    g.pick_regions(scores, np.array([[True] * 4, [False] * 4, [True] * 4]))
  with pytest.raises(ValueError, match="bool array of shape"):
    g.pick_regions(scores, mask.astype(int))


def test_aggregator_per_split_and_setting():
  agg = g.GroundingAggregator()
  gt = np.array([[0, 0, 10, 10]] * 3, float)
  hit, miss = [0, 0, 10, 10], [50, 50, 60, 60]
  agg.add("gt", "val", np.array([hit, hit, miss], float), gt)          # 2 / 3
  agg.add("gt", "val", np.array([miss, hit, hit], float), gt,
          example_mask=np.array([True, True, False]))                  # + 1 / 2 -> 3 / 5
  agg.add("gt", "testA", np.array([hit, hit, hit], float), gt)         # 3 / 3
  agg.add("det", "testB", np.array([miss, miss, hit], float), gt)      # 1 / 3
  # Scores path: region 1 (a hit box) wins unless masked, then region 0 (a miss).
  region_boxes = np.array([[miss, hit]] * 3, float)
  scores = np.array([[0.0, 1.0]] * 3)
  agg.add_scores("det", "val", scores, region_boxes, gt,
                 region_mask=np.array([[True, True], [True, False], [False, False]]),
                 example_mask=np.array([True, True, False]))            # 1 / 2
  r = agg.report()
  assert r["gt"] == pytest.approx({"val": 60.0, "testA": 100.0})
  assert r["det"] == pytest.approx({"val": 50.0, "testB": 100 / 3})
  assert r["counts"] == {"gt": {"val": 5, "testA": 3}, "det": {"val": 2, "testB": 3}}
  with pytest.raises(ValueError, match="split must be one of"):
    agg.add("gt", "train", gt, gt)
  with pytest.raises(ValueError, match="setting must be one of"):
    agg.add("proposals", "val", gt, gt)


def test_aggregator_uniter_convention():
  agg = g.GroundingAggregator(strict=True, convention="uniter_pixel")
  gt = np.array([[0, 0, 10, 10]] * 2, float)
  agg.add("gt", "val", np.array([[0, 0, 5, 10], [0, 0, 6, 10]], float), gt)
  assert agg.report()["gt"]["val"] == 50.0   # IoU 0.5 is not > 0.5


def test_random_choice_chance_by_hand():
  gt = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
  regions = np.array([
      # Row 0: exact hit, IoU 0.5 (hit at >=), far miss, padding that would hit.
      [[0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60], [0, 0, 10, 10]],
      # Row 1: one miss (IoU 0.25), three real regions, none a hit but padding.
      [[0, 0, 5, 5], [20, 20, 30, 30], [40, 40, 50, 50], [0, 0, 10, 10]]], float)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], bool)
  np.testing.assert_allclose(g.random_choice_hits(regions, gt, mask), [2 / 3, 0.0])
  np.testing.assert_allclose(g.random_choice_hits(regions, gt, mask, strict=True), [1 / 3, 0])
  agg = g.GroundingAggregator()
  agg.add_chance("gt", "val", regions, gt, mask, example_mask=np.array([True, False]))
  agg.add("gt", "val", regions[:, 0], gt, np.array([True, False]))
  report = agg.report()
  assert report["chance"]["gt"]["val"] == pytest.approx(100 * 2 / 3)
  assert report["gt"]["val"] == 100.0
  with pytest.raises(ValueError, match="region_mask"):
    g.random_choice_hits(regions, gt, mask[:, :3])
