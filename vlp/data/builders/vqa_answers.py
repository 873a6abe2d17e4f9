"""VQA answer normalisation, soft scores and vocabulary, as the official evaluation.

Normalisation follows the official `vqaEval.py` (github GT-Vision-Lab/VQA,
`PythonEvaluationTools/vqaEvaluation/vqaEval.py`): newlines/tabs become spaces and the
answer is stripped; then, only when a question's ground-truth answers are not all
identical, punctuation handling and digit/article handling are applied to the
ground truth and the prediction. Quirks of the official code are kept on purpose
(the period regex `(?!<=\\d)(\\.)(?!\\d)` is a lookahead, and its `sub` is called
with `re.UNICODE` as the count, i.e. at most 32 periods are removed).

The soft score of an answer is its official accuracy as a prediction:
Acc(a) = (1/M) sum_k min(1, #{j != k : gt_j == a} / 3) over the M answers, i.e.
0, 0.3, 0.6, 0.9, 1.0 for 0, 1, 2, 3, >= 4 matches out of 10.
"""

from __future__ import annotations

import collections
from typing import Iterable, Sequence

from vlp.evaluators import vqa as vqa_eval

# One normalisation for training targets and evaluation: the evaluator's (which
# imports nothing heavy), so builder soft scores and reported accuracy cannot drift.
clean = vqa_eval.clean_answer
process_punctuation = vqa_eval.process_punctuation
process_digit_article = vqa_eval.process_digit_article
normalize = vqa_eval.normalize_answer


def official_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
  """Official VQA accuracy of one prediction against the ground-truth answers."""
  return vqa_eval.question_accuracy(prediction, gt_answers) if gt_answers else 0.0


def _score(n: int, m: int) -> float:
  """Mean over leave-one-out subsets of min(1, matches / 3); n of m answers match."""
  if m == 0:
    return 0.0
  return (n * min(1.0, (n - 1) / 3) + (m - n) * min(1.0, n / 3)) / m


def build_vocab(answers: Iterable[str], size: int) -> list[str]:
  """The `size` most frequent normalised answers (ties: alphabetical)."""
  counts = collections.Counter(a for a in (normalize(x) for x in answers) if a)
  ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
  return [a for a, _ in ranked[:size]]


class AnswerVocab:
  """Answer classes and the official soft score of each for a question."""

  def __init__(self, answers: Sequence[str]):
    self.answers = list(answers)
    self.index = {a: i for i, a in enumerate(self.answers)}
    self._by_normalized = collections.defaultdict(list)
    for i, a in enumerate(self.answers):
      self._by_normalized[process_digit_article(process_punctuation(clean(a)))].append(i)

  def __len__(self) -> int:
    return len(self.answers)

  def soft_scores(self, gt_answers: Sequence[str]) -> tuple[list[int], list[float]]:
    """(labels, scores) of the vocabulary answers with a positive official score.

    Equal to `official_accuracy(answers[label], gt_answers)` for every label;
    sorted by descending score, then label.
    """
    gts = [clean(g) for g in gt_answers]
    disagree = len(set(gts)) > 1
    if disagree:
      gts = [process_digit_article(process_punctuation(g)) for g in gts]
    out = {}
    for g, n in collections.Counter(gts).items():
      if disagree:
        labels = self._by_normalized.get(g, ())
      else:  # compared raw (cleaned) to the prediction
        labels = [self.index[g]] if g in self.index else ()
      for label in labels:
        out[label] = _score(n, len(gts))
    ranked = sorted(out.items(), key=lambda kv: (-kv[1], kv[0]))
    return [k for k, _ in ranked], [v for _, v in ranked]
