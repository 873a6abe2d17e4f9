"""Referring-expression grounding accuracy (RefCOCO, RefCOCO+, RefCOCOg).

Boxes are pixel `(x1, y1, x2, y2)` with `x2 = x + w`, `y2 = y + h` (as the
`refcoco` builders store them). An expression is grounded correctly when the IoU
of the predicted box with the ground-truth box is at least `threshold` (0.5).

Convention (a documented choice):
continuous IoU (area = w * h, intersection = overlap width * height) and a hit at
IoU >= 0.5 (the usual REC definition). UNITER's `inf_re.py` differs in two
corners only, both available here:
* `strict=True`: a hit needs IoU > threshold;
* `convention="uniter_pixel"`: UNITER's inclusive-pixel IoU. On boxes with
  x2 = x + w its areas and intersection equal the continuous ones, except that an
  overlap of at most one pixel along either axis counts as no overlap.

The predicted box of an expression is the box of the candidate region with the
highest score; padded / masked regions are never chosen and ties go to the first
region. Results are reported per split (val, testA, testB; RefCOCOg: val, test)
and per candidate setting: "gt" (ground-truth COCO boxes as regions) and "det"
(detected proposals).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

SPLITS = ("val", "testA", "testB", "test")
SETTINGS = ("gt", "det")
CONVENTIONS = ("continuous", "uniter_pixel")


def _boxes(boxes, name: str) -> np.ndarray:
  boxes = np.asarray(boxes, np.float64)
  if boxes.ndim == 0 or boxes.shape[-1] != 4:
    raise ValueError(f"{name} must have a last axis of 4 (x1, y1, x2, y2), got shape "
                     f"{boxes.shape}")
  if not np.all(np.isfinite(boxes)):
    raise ValueError(f"{name} holds non-finite coordinates")
  return boxes


def box_iou(boxes_a, boxes_b, *, convention: str = "continuous") -> np.ndarray:
  """IoU of matching boxes (broadcast over leading axes) -> [...]."""
  if convention not in CONVENTIONS:
    raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
  a, b = _boxes(boxes_a, "boxes_a"), _boxes(boxes_b, "boxes_b")
  iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0])
  ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1])
  # uniter_pixel: inclusive corners x2 - 1 must lie strictly right of x1: overlap > 1.
  min_overlap = 1.0 if convention == "uniter_pixel" else 0.0
  overlaps = (iw > min_overlap) & (ih > min_overlap)
  inter = np.where(overlaps, np.clip(iw, 0, None) * np.clip(ih, 0, None), 0.0)

  def area(x):
    return np.clip(x[..., 2] - x[..., 0], 0, None) * np.clip(x[..., 3] - x[..., 1], 0, None)

  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def grounding_hits(pred_boxes, gt_boxes, threshold: float = 0.5, *, strict: bool = False,
                   convention: str = "continuous") -> np.ndarray:
  """[N] bool: IoU(pred, gt) >= threshold (> with strict)."""
  pred, gt = _boxes(pred_boxes, "pred_boxes"), _boxes(gt_boxes, "gt_boxes")
  if pred.shape != gt.shape or pred.ndim != 2:
    raise ValueError(f"pred_boxes {pred.shape} and gt_boxes {gt.shape} must both be [N, 4]")
  return _is_hit(box_iou(pred, gt, convention=convention), threshold, strict)


def _is_hit(iou: np.ndarray, threshold: float, strict: bool) -> np.ndarray:
  return iou > threshold if strict else iou >= threshold


def grounding_accuracy(pred_boxes, gt_boxes, threshold: float = 0.5, *, strict: bool = False,
                       convention: str = "continuous") -> float:
  """Percent of expressions whose predicted box has IoU >= threshold with the GT box."""
  hits = grounding_hits(pred_boxes, gt_boxes, threshold, strict=strict, convention=convention)
  if hits.size == 0:
    raise ValueError("grounding_accuracy: no expressions to evaluate")
  return 100.0 * float(hits.mean())


def random_choice_hits(region_boxes, gt_boxes, region_mask, threshold: float = 0.5, *,
                       strict: bool = False, convention: str = "continuous") -> np.ndarray:
  """[B] probability that a uniformly random unmasked region is a hit (the chance level).

  region_boxes [B, K, 4], gt_boxes [B, 4], region_mask [B, K] bool. A row without
  an unmasked region scores 0.
  """
  boxes, gt = _boxes(region_boxes, "region_boxes"), _boxes(gt_boxes, "gt_boxes")
  mask = np.asarray(region_mask, bool)
  if boxes.ndim != 3 or gt.shape != (boxes.shape[0], 4) or mask.shape != boxes.shape[:2]:
    raise ValueError(f"expected region_boxes [B, K, 4], gt_boxes [B, 4] and region_mask "
                     f"[B, K]; got {boxes.shape}, {gt.shape} and {mask.shape}")
  hit = _is_hit(box_iou(boxes, gt[:, None, :], convention=convention), threshold,
                strict) & mask
  return hit.sum(1) / np.maximum(mask.sum(1), 1)


def pick_regions(region_scores, region_mask=None) -> np.ndarray:
  """[B] index of the highest-scoring unmasked region (ties: the first)."""
  scores = np.asarray(region_scores, np.float64)
  if scores.ndim != 2:
    raise ValueError(f"region_scores must be [B, K], got shape {scores.shape}")
  mask = np.ones(scores.shape, bool) if region_mask is None else np.asarray(region_mask)
  if mask.shape != scores.shape or mask.dtype != bool:
    raise ValueError(f"region_mask must be a bool array of shape {scores.shape}, got "
                     f"{mask.dtype} {mask.shape}")
  if np.isnan(scores[mask]).any():
    raise ValueError("region_scores holds NaN at unmasked regions")
  empty = np.flatnonzero(~mask.any(axis=1))
  if empty.size:
    raise ValueError(f"rows {empty[:10].tolist()} have no unmasked region to choose from")
  masked = np.where(mask, scores, -np.inf)
  best = masked.max(axis=1, keepdims=True)
  # First unmasked region reaching the maximum (an unmasked -inf row picks its first).
  return np.argmax(mask & (masked == best), axis=1)


def pick_boxes(region_scores, region_boxes, region_mask=None) -> np.ndarray:
  """[B, 4] box of the highest-scoring unmasked region of each row."""
  boxes = _boxes(region_boxes, "region_boxes")
  scores = np.asarray(region_scores)
  if boxes.ndim != 3 or boxes.shape[:2] != scores.shape:
    raise ValueError(f"region_boxes must be [B, K, 4] matching region_scores {scores.shape}, "
                     f"got {boxes.shape}")
  idx = pick_regions(scores, region_mask)
  return boxes[np.arange(len(idx)), idx]


class GroundingAggregator:
  """Counts hits per (setting, split) over batches; `report()` gives percentages.

  >>> agg = GroundingAggregator()
  >>> agg.add("gt", "val", pred_boxes, gt_boxes)        # any number of batches
  >>> agg.report()   # {"gt": {"val": 91.6, ...}, "det": {...}, "counts": {...}}
  """

  def __init__(self, threshold: float = 0.5, *, strict: bool = False,
               convention: str = "continuous"):
    if convention not in CONVENTIONS:
      raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
    self.threshold, self.strict, self.convention = threshold, strict, convention
    self._hits: dict[tuple[str, str], int] = {}
    self._total: dict[tuple[str, str], int] = {}
    self._chance: dict[tuple[str, str], float] = {}  # Sum of per-expression odds.

  def add(self, setting: str, split: str, pred_boxes, gt_boxes, example_mask=None) -> None:
    """Adds a batch; rows with example_mask False (eval padding) are ignored."""
    if setting not in SETTINGS:
      raise ValueError(f"setting must be one of {SETTINGS} (ground-truth or detected "
                       f"regions), got {setting!r}")
    if split not in SPLITS:
      raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    hits = grounding_hits(pred_boxes, gt_boxes, self.threshold, strict=self.strict,
                          convention=self.convention)
    if example_mask is not None:
      keep = np.asarray(example_mask)
      if keep.shape != hits.shape or keep.dtype != bool:
        raise ValueError(f"example_mask must be bool of shape {hits.shape}, got "
                         f"{keep.dtype} {keep.shape}")
      hits = hits[keep]
    key = (setting, split)
    self._hits[key] = self._hits.get(key, 0) + int(hits.sum())
    self._total[key] = self._total.get(key, 0) + int(hits.size)

  def add_scores(self, setting: str, split: str, region_scores, region_boxes, gt_boxes,
                 region_mask=None, example_mask=None) -> np.ndarray:
    """Adds a batch of per-region scores: the argmax unmasked region is the prediction.

    Returns the predicted boxes [B, 4] (those of padding rows are meaningless).
    """
    scores = np.asarray(region_scores)
    if example_mask is not None and region_mask is not None:
      # Padding rows may have no real region; give them one so that picking works.
      region_mask = np.asarray(region_mask).copy()
      region_mask[~np.asarray(example_mask, bool), 0] = True
    pred = pick_boxes(scores, region_boxes, region_mask)
    self.add(setting, split, pred, gt_boxes, example_mask)
    return pred

  def add_chance(self, setting: str, split: str, region_boxes, gt_boxes, region_mask,
                 example_mask=None) -> None:
    """Adds the accuracy of a uniformly random choice among the unmasked regions.

    Call it with the same rows as `add`; `report` gives it under "chance".
    """
    hits = random_choice_hits(region_boxes, gt_boxes, region_mask, self.threshold,
                              strict=self.strict, convention=self.convention)
    if example_mask is not None:
      hits = hits[np.asarray(example_mask, bool)]
    key = (setting, split)
    self._chance[key] = self._chance.get(key, 0.0) + float(hits.sum())

  def report(self) -> dict[str, Mapping]:
    """{setting: {split: accuracy %}} for the pairs seen, plus "counts" (expressions)
    and, where `add_chance` was called, "chance" ({setting: {split: %}})."""
    out: dict[str, dict] = {}
    counts: dict[str, dict] = {}
    chance: dict[str, dict] = {}
    for setting in SETTINGS:
      for split in SPLITS:
        key = (setting, split)
        total = self._total.get(key, 0)
        if total:
          out.setdefault(setting, {})[split] = 100.0 * self._hits[key] / total
          counts.setdefault(setting, {})[split] = total
          if key in self._chance:
            chance.setdefault(setting, {})[split] = 100.0 * self._chance[key] / total
    out["counts"] = counts
    if chance:
      out["chance"] = chance
    return out
