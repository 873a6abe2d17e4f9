"""Region geometry: the 7-d box feature of UNITER (reference `data/data.py`)."""

from __future__ import annotations

import numpy as np


def box_features(boxes_xyxy: np.ndarray, image_w: float, image_h: float) -> np.ndarray:
  """Returns the 7-d UNITER box feature for pixel boxes.

  Args:
    boxes_xyxy: [K, 4] pixel boxes ``(x1, y1, x2, y2)``.
    image_w: image width in pixels.
    image_h: image height in pixels.

  Returns:
    [K, 7] float32 ``[x1/W, y1/H, x2/W, y2/H, w/W, h/H, (w/W)(h/H)]``.
  """
  boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
  if image_w <= 0 or image_h <= 0:
    raise ValueError(f'image size must be positive, got {image_w}x{image_h}')
  scale = np.array([image_w, image_h, image_w, image_h], np.float64)
  norm = boxes / scale
  w = norm[:, 2] - norm[:, 0]
  h = norm[:, 3] - norm[:, 1]
  out = np.concatenate([norm, w[:, None], h[:, None], (w * h)[:, None]], axis=1)
  return out.astype(np.float32)
