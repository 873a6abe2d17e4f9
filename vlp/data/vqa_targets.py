"""VQA soft targets: which vocabulary answers the human answers support, and how much."""

from __future__ import annotations

import collections
import json

import numpy as np
from etils import epath

from vlp.data.builders.vqa_answers import AnswerVocab, normalize

TARGET_SCORES = ('consensus', 'official')


def answer_labels(answers: list[str]) -> dict[str, int]:
  """{normalised answer: label} of a vocabulary (label = position); duplicates are an error."""
  label_of = {}
  for i, a in enumerate(answers):
    key = normalize(a)
    if key in label_of:
      raise ValueError(f'answers {answers[label_of[key]]!r} and {a!r} normalise to the '
                       f'same {key!r}; an answer vocabulary must be normalised and unique')
    label_of[key] = i
  return label_of


def read_answer_vocab(path: str) -> list[str]:
  """The answer list (label = position) of a JSON file: {answer: label} with labels
  0..N-1 (UNITER's `ans2label.json`), or a list of answers."""
  raw = json.loads(epath.Path(path).read_text())  # Local or on an object store.
  if isinstance(raw, dict):
    labels = sorted(raw.values()) if all(isinstance(v, int) for v in raw.values()) else None
    if labels != list(range(len(raw))) or not all(isinstance(a, str) for a in raw):
      raise ValueError(f'{path}: expected {{answer: label}} with the labels 0..{len(raw) - 1} '
                       'each once (an ans2label.json), or a list of answers')
    raw = sorted(raw, key=raw.get)
  if not isinstance(raw, list) or not raw or not all(isinstance(a, str) for a in raw):
    raise ValueError(f'{path}: expected a non-empty list of answer strings or an '
                     '{answer: label} object')
  try:
    answer_labels(raw)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from e
  return raw


def soft_targets(answers, label_of: dict[str, int], mode: str = 'consensus'):
  """(labels, scores) of the vocabulary answers that the human `answers` support.

  'consensus': min(1, n / 3) for an answer given (after VQA normalisation) by n
  humans (UNITER's training data). 'official': the official VQA accuracy of
  predicting it (0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / >= 4 matches, as the
  `vqa_v2` builder stores). `label_of` maps normalised answers to labels.
  """
  return SoftTargets(label_of, mode)(answers)


class SoftTargets:
  """`soft_targets` with the vocabulary prepared once (checks `mode` at construction)."""

  def __init__(self, label_of: dict[str, int], mode: str):
    if mode not in TARGET_SCORES:
      raise ValueError(f'target_scores must be one of {TARGET_SCORES}, got {mode!r}')
    self.label_of, self.mode = label_of, mode
    if mode == 'official':
      self.vocab = AnswerVocab(sorted(label_of, key=label_of.get))

  def __call__(self, answers) -> tuple[np.ndarray, np.ndarray]:
    if self.mode == 'official':
      labels, scores = self.vocab.soft_scores(answers)
      return np.asarray(labels, np.int32), np.asarray(scores, np.float32)
    counts = collections.Counter(normalize(a) for a in answers)
    hits = sorted((self.label_of[a], min(1.0, n / 3)) for a, n in counts.items()
                  if a in self.label_of)
    return (np.array([h[0] for h in hits], np.int32),
            np.array([h[1] for h in hits], np.float32))
