"""A deterministic synthetic image world for the `vlp_scenes` dataset.

Each image is a set of 3-10 objects laid out on a coarse grid of a 320x240 canvas.
An object has a shape, a colour, a size and a pixel box. A fake detector turns the
objects into what UNITER consumes: region features (a fixed random projection of
the attributes plus noise), a soft class distribution over `1 + len(SHAPES)` classes
(0 = background, like the BUTD detector's 1601) and a confidence per region.
Five templated captions describe objects, attributes, counts and spatial relations.

Everything is a pure function of `(world seed, image_id)`: each image draws from its
own random streams, so images can be generated in any order, in any process, and
the builder, the tests and later task generators (VQA, referring expressions) see
the same world. Task generators should be functions of a :class:`Scene` (the
per-object ground truth stored in every record; see :func:`scene_from_record`)
built on the relation helpers below, as the caption templates are.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import numpy as np

from vlp.data.boxes import box_features

SHAPES = ('cube', 'sphere', 'cylinder', 'cone', 'pyramid', 'star', 'ring', 'heart')
COLORS = ('red', 'blue', 'green', 'yellow', 'purple', 'orange', 'white', 'black')
SIZES = ('small', 'large')
NUM_CLASSES = 1 + len(SHAPES)  # class 0 = background
NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven',
                'eight', 'nine', 'ten')
IMAGE_W, IMAGE_H = 320, 240
GRID_COLS, GRID_ROWS = 4, 3  # 80x80 cells: boxes never overlap
MIN_OBJECTS, MAX_OBJECTS = 3, 10
NUM_CAPTIONS = 5
# Centres closer than this (pixels) are "same column/row": no relation is claimed.
RELATION_MARGIN = 40.0
# Attribute code projected into feature space: shape, colour, size, 3x3 position.
_CODE_DIM = len(SHAPES) + len(COLORS) + len(SIZES) + 9
# Per-image random streams; distinct so captions never depend on feature_dim.
_LAYOUT, _DETECT, _FEATURES, _CAPTIONS = 1, 2, 3, 4


@dataclasses.dataclass(frozen=True)
class Scene:
  """Per-object ground truth of one image (object i is region i of the record)."""
  image_id: int
  shape: np.ndarray  # [n] int32 index into SHAPES
  color: np.ndarray  # [n] int32 index into COLORS
  size: np.ndarray  # [n] int32 index into SIZES
  boxes: np.ndarray  # [n, 4] float32 pixel (x1, y1, x2, y2)
  image_w: int = IMAGE_W
  image_h: int = IMAGE_H

  @property
  def num_objects(self) -> int:
    return int(self.shape.shape[0])

  @property
  def centers(self) -> np.ndarray:
    return np.stack([(self.boxes[:, 0] + self.boxes[:, 2]) / 2,
                     (self.boxes[:, 1] + self.boxes[:, 3]) / 2], axis=1)

  def reordered(self, order: np.ndarray) -> 'Scene':
    return dataclasses.replace(self, shape=self.shape[order], color=self.color[order],
                               size=self.size[order], boxes=self.boxes[order])


def scene_from_record(record: Mapping[str, np.ndarray]) -> Scene:
  """Rebuilds the ground truth from a `vlp_scenes` record (for task generators)."""
  return Scene(image_id=int(record['image_id']),
               shape=np.asarray(record['obj_shape'], np.int32),
               color=np.asarray(record['obj_color'], np.int32),
               size=np.asarray(record['obj_size'], np.int32),
               boxes=np.asarray(record['boxes'], np.float32),
               image_w=int(record['image_w']), image_h=int(record['image_h']))


# ----------------------------------------------------------------- relations & words
def left_of_matrix(scene: Scene) -> np.ndarray:
  """[n, n] bool: entry (i, j) says object i is clearly left of object j."""
  x = scene.centers[:, 0]
  return x[None, :] - x[:, None] > RELATION_MARGIN


def above_matrix(scene: Scene) -> np.ndarray:
  """[n, n] bool: object i is clearly above object j (image y grows downwards)."""
  y = scene.centers[:, 1]
  return y[None, :] - y[:, None] > RELATION_MARGIN


def relation_pairs(scene: Scene, matrix_fn: Callable[[Scene], np.ndarray]) -> np.ndarray:
  """[m, 2] index pairs (i, j) for which the relation holds."""
  return np.argwhere(matrix_fn(scene))


def plural(shape_name: str) -> str:
  return shape_name + 's'


def count_phrase(count: int, noun: str) -> str:
  return f'{NUMBER_WORDS[count]} {noun if count == 1 else plural(noun)}'


def _article(words: str) -> str:
  return ('an ' if words[0] in 'aeiou' else 'a ') + words


def describe(scene: Scene, i: int, *, with_size: bool = True,
             with_color: bool = True) -> str:
  """Noun phrase for object i, e.g. 'a large red cube'."""
  words = [SHAPES[scene.shape[i]]]
  if with_color:
    words.insert(0, COLORS[scene.color[i]])
  if with_size:
    words.insert(0, SIZES[scene.size[i]])
  return _article(' '.join(words))


# ----------------------------------------------------------------- caption templates
def _caption_horizontal(scene, rng):
  pairs = relation_pairs(scene, left_of_matrix)
  if not len(pairs):
    return None
  i, j = pairs[rng.integers(len(pairs))]
  a = describe(scene, i, with_size=rng.random() < 0.7)
  b = describe(scene, j, with_size=rng.random() < 0.7)
  return f'{a} to the left of {b}' if rng.random() < 0.5 else f'{b} to the right of {a}'


def _caption_vertical(scene, rng):
  pairs = relation_pairs(scene, above_matrix)
  if not len(pairs):
    return None
  i, j = pairs[rng.integers(len(pairs))]
  a = describe(scene, i, with_size=rng.random() < 0.7)
  b = describe(scene, j, with_size=rng.random() < 0.7)
  return f'{a} above {b}' if rng.random() < 0.5 else f'{b} below {a}'


def _caption_count(scene, rng):
  n = scene.num_objects
  color = scene.color[rng.integers(n)]
  k = int(np.sum(scene.color == color))
  tail = 'is' if k == 1 else 'are'
  return (f'there are {NUMBER_WORDS[n]} objects and {NUMBER_WORDS[k]} of them {tail} '
          f'{COLORS[color]}')


def _caption_list(scene, rng):
  picks = rng.permutation(scene.num_objects)[:3]
  phrases = [describe(scene, i, with_size=rng.random() < 0.3) for i in picks]
  listed = ' , '.join(phrases[:-1]) + ' and ' + phrases[-1]
  prefix = ('', 'a picture of ', 'an image with ')[rng.integers(3)]
  return prefix + listed


def _caption_existence(scene, rng):
  present = np.unique(scene.shape)
  shape = present[rng.integers(len(present))]
  count = int(np.sum(scene.shape == shape))
  verb = 'is' if count == 1 else 'are'
  text = f'there {verb} {count_phrase(count, SHAPES[shape])}'
  absent = np.setdiff1d(np.arange(len(SHAPES)), present)
  if len(absent):
    text += f' but no {plural(SHAPES[absent[rng.integers(len(absent))]])}'
  return text


# Order fixed so that the five slots always mix relations, counts and attributes.
_TEMPLATES = (_caption_horizontal, _caption_count, _caption_list, _caption_vertical,
              _caption_existence)


def make_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
  """Five captions of a scene; a template that does not apply falls back to the next."""
  out = []
  for slot in range(NUM_CAPTIONS):
    for k in range(len(_TEMPLATES)):
      text = _TEMPLATES[(slot + k) % len(_TEMPLATES)](scene, rng)
      if text is not None:
        out.append(text)
        break
  return out


# ----------------------------------------------------------------- the world
class SceneWorld:
  """Generates images of the synthetic world; a pure function of (seed, image_id).

  Args:
    seed: world seed (fixes the feature projection and every image).
    feature_dim: region feature size (64 for tiny models, 2048 for base).
    noise: std of the Gaussian noise added to the projected features.
  """

  def __init__(self, seed: int = 0, feature_dim: int = 64, *, noise: float = 0.3):
    self.seed = int(seed)
    self.feature_dim = int(feature_dim)
    self.noise = float(noise)
    proj_rng = np.random.default_rng([self.seed, 0, self.feature_dim])
    # Four active code entries per object: scale so each feature has std ~1.
    self.projection = (proj_rng.standard_normal((_CODE_DIM, self.feature_dim)) * 0.5
                       ).astype(np.float32)

  def _rng(self, image_id: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([self.seed, int(image_id), stream])

  def layout(self, image_id: int) -> Scene:
    """Objects in generation order (before the detector sorts them)."""
    rng = self._rng(image_id, _LAYOUT)
    n = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    cells = rng.choice(GRID_COLS * GRID_ROWS, size=n, replace=False)
    cell_w, cell_h = IMAGE_W / GRID_COLS, IMAGE_H / GRID_ROWS
    size = rng.integers(0, len(SIZES), n).astype(np.int32)
    side = np.where(size == 1, rng.uniform(40, 56, n), rng.uniform(18, 28, n))
    aspect = rng.uniform(0.8, 1.25, n)
    w, h = side * np.sqrt(aspect), side / np.sqrt(aspect)
    # Jitter keeps every box inside its own cell, so relations stay unambiguous.
    cx = (cells % GRID_COLS + 0.5) * cell_w + rng.uniform(-1, 1, n) * (cell_w - w) / 2
    cy = (cells // GRID_COLS + 0.5) * cell_h + rng.uniform(-1, 1, n) * (cell_h - h) / 2
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    return Scene(image_id=int(image_id),
                 shape=rng.integers(0, len(SHAPES), n).astype(np.int32),
                 color=rng.integers(0, len(COLORS), n).astype(np.int32),
                 size=size, boxes=boxes.astype(np.float32))

  def captions(self, image_id: int) -> list[str]:
    """The five captions of an image (cheap: no features are computed)."""
    return make_captions(self.layout(image_id), self._rng(image_id, _CAPTIONS))

  def _detect(self, scene: Scene, image_id: int):
    rng = self._rng(image_id, _DETECT)
    n = scene.num_objects
    logits = rng.standard_normal((n, NUM_CLASSES))
    logits[np.arange(n), 1 + scene.shape] += rng.uniform(3.0, 6.0, n)
    logits[:, 0] += 0.5  # a little background mass, as a detector would have
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    return soft.astype(np.float32), soft[:, 1:].max(1).astype(np.float32)

  def _features(self, scene: Scene, image_id: int) -> np.ndarray:
    """Projection of the one-hot attribute code plus noise, [n, feature_dim] float32."""
    c = scene.centers
    col = np.clip((c[:, 0] / scene.image_w * 3).astype(int), 0, 2)
    row = np.clip((c[:, 1] / scene.image_h * 3).astype(int), 0, 2)
    # code @ projection with four active entries per row, as row gathers (no BLAS
    # threads, which crawl on a loaded machine).
    p = self.projection
    feats = (p[scene.shape] + p[len(SHAPES) + scene.color]
             + p[len(SHAPES) + len(COLORS) + scene.size] + p[_CODE_DIM - 9 + 3 * row + col])
    rng = self._rng(image_id, _FEATURES)
    noise = rng.standard_normal((scene.num_objects, self.feature_dim), dtype=np.float32)
    return feats + noise * np.float32(self.noise)

  def raw_record(self, image_id: int) -> dict:
    """:meth:`record` before the float16 cast of `features` and `soft_labels`."""
    scene = self.layout(image_id)
    captions = make_captions(scene, self._rng(image_id, _CAPTIONS))
    soft, conf = self._detect(scene, image_id)
    feats = self._features(scene, image_id)
    order = np.argsort(-conf, kind='stable')  # most confident first, like BUTD
    scene = scene.reordered(order)
    return {
        'image_id': np.int64(image_id),
        'image_w': np.int32(scene.image_w),
        'image_h': np.int32(scene.image_h),
        'features': feats[order],
        'boxes': scene.boxes,
        'img_pos': box_features(scene.boxes, scene.image_w, scene.image_h),
        'conf': conf[order],
        'soft_labels': soft[order],
        'captions': captions,
        'obj_shape': scene.shape,
        'obj_color': scene.color,
        'obj_size': scene.size,
    }

  def record(self, image_id: int) -> dict:
    """One image-level record of the `vlp_scenes` schema (regions sorted by conf)."""
    out = self.raw_record(image_id)
    out['features'] = out['features'].astype(np.float16)
    out['soft_labels'] = out['soft_labels'].astype(np.float16)
    return out
