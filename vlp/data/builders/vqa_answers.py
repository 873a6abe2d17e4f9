"""VQA answer normalisation, soft scores and vocabulary, as the official evaluation.

Normalisation follows the official `vqaEval.py` (see docs/spec
matching_systems.md "VQA v2 accuracy"): newlines/tabs become spaces and the
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
import re
from typing import Iterable, Sequence

_PUNCT = (';', '/', '[', ']', '"', '{', '}', '(', ')', '=', '+', '\\', '_', '-', '>', '<',
          '@', '`', ',', '?', '!')
_COMMA_STRIP = re.compile(r'(\d)(,)(\d)')
_PERIOD_STRIP = re.compile(r'(?!<=\d)(\.)(?!\d)')
_NUMBERS = {w: str(i) for i, w in enumerate(
    'zero one two three four five six seven eight nine ten'.split())}
_NUMBERS['none'] = '0'
_ARTICLES = frozenset(('a', 'an', 'the'))
# The official contraction table as "key>value" pairs (its quirks included).
_CONTRACTIONS = dict(pair.split('>') for pair in """
aint>ain't arent>aren't cant>can't couldve>could've couldnt>couldn't
couldn'tve>couldn't've couldnt've>couldn't've didnt>didn't doesnt>doesn't dont>don't
hadnt>hadn't hadnt've>hadn't've hadn'tve>hadn't've hasnt>hasn't havent>haven't hed>he'd
hed've>he'd've he'dve>he'd've hes>he's howd>how'd howll>how'll hows>how's Id've>I'd've
I'dve>I'd've Im>I'm Ive>I've isnt>isn't itd>it'd itd've>it'd've it'dve>it'd've
itll>it'll let's>let's maam>ma'am mightnt>mightn't mightnt've>mightn't've
mightn'tve>mightn't've mightve>might've mustnt>mustn't mustve>must've neednt>needn't
notve>not've oclock>o'clock oughtnt>oughtn't ow's'at>'ow's'at 'ows'at>'ow's'at
'ow'sat>'ow's'at shant>shan't shed've>she'd've she'dve>she'd've she's>she's
shouldve>should've shouldnt>shouldn't shouldnt've>shouldn't've shouldn'tve>shouldn't've
somebody'd>somebodyd somebodyd've>somebody'd've somebody'dve>somebody'd've
somebodyll>somebody'll somebodys>somebody's someoned>someone'd someoned've>someone'd've
someone'dve>someone'd've someonell>someone'll someones>someone's somethingd>something'd
somethingd've>something'd've something'dve>something'd've somethingll>something'll
thats>that's thered>there'd thered've>there'd've there'dve>there'd've therere>there're
theres>there's theyd>they'd theyd've>they'd've they'dve>they'd've theyll>they'll
theyre>they're theyve>they've twas>'twas wasnt>wasn't wed've>we'd've we'dve>we'd've
weve>we've werent>weren't whatll>what'll whatre>what're whats>what's whatve>what've
whens>when's whered>where'd wheres>where's whereve>where've whod>who'd whod've>who'd've
who'dve>who'd've wholl>who'll whos>who's whove>who've whyll>why'll whyre>why're
whys>why's wont>won't wouldve>would've wouldnt>wouldn't wouldnt've>wouldn't've
wouldn'tve>wouldn't've yall>y'all yall'll>y'all'll y'allll>y'all'll yall'd've>y'all'd've
y'alld've>y'all'd've y'all'dve>y'all'd've youd>you'd youd've>you'd've you'dve>you'd've
youll>you'll youre>you're youve>you've
""".split())


def clean(answer: str) -> str:
  """Newlines and tabs to spaces, stripped (applied to every answer)."""
  return answer.replace('\n', ' ').replace('\t', ' ').strip()


def process_punctuation(text: str) -> str:
  out = text
  has_comma_number = _COMMA_STRIP.search(text) is not None
  for p in _PUNCT:
    if p + ' ' in text or ' ' + p in text or has_comma_number:
      out = out.replace(p, '')
    else:
      out = out.replace(p, ' ')
  return _PERIOD_STRIP.sub('', out, 32)  # official: count = re.UNICODE == 32


def process_digit_article(text: str) -> str:
  words = [_NUMBERS.get(w, w) for w in text.lower().split()]
  return ' '.join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize(answer: str) -> str:
  """The full normalisation (what the official code applies when answers disagree)."""
  return process_digit_article(process_punctuation(clean(answer)))


def official_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
  """Official VQA accuracy of one prediction against the ground-truth answers."""
  gts = [clean(g) for g in gt_answers]
  pred = clean(prediction)
  if len(set(gts)) > 1:
    gts = [process_digit_article(process_punctuation(g)) for g in gts]
    pred = process_digit_article(process_punctuation(pred))
  n, m = sum(g == pred for g in gts), len(gts)
  return _score(n, m)


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
