"""VQA questions and referring expressions over the synthetic world (`vlp_scenes`).

Like the caption templates of :mod:`vlp.data.scenes_world`, every generator is a
pure function of a :class:`Scene` (in record order: object i is region i) and a
random generator. Images draw from their own streams (:func:`question_rng`,
:func:`refexp_rng`), distinct from the world's layout, detector, feature and
caption streams, so adding tasks leaves every existing field unchanged.

Questions (VQA v2 conventions; `question_type` names the generator family):

| family | example | answer_type |
|---|---|---|
| color | what color is the large cube? | other |
| shape | what shape is the red object? | other |
| size | what size is the blue sphere? | other |
| count | how many red objects are there? | number |
| exist | is there a blue sphere? | yes/no |
| relation_query | what shape is to the left of the red cube? | other |
| relation_query | what color is the object above the star? | other |
| relation_verify | is the red cube to the left of the blue sphere? | yes/no |

A referent ("the large cube") is described by a minimal attribute set that no other
object shares; a relation question names its answer only when exactly one object
stands in that relation to a uniquely described anchor. Relations are those of
the captions (`left_of_matrix`, `above_matrix`: centres more than
`RELATION_MARGIN` apart). Each question has 10 "human" answers: at least 6 give
the true answer (some as a synonym form that the official VQA normalisation maps
to it: "two" for "2", "Red" for "red"), the others a plausible mistake (a
neighbouring count, a confusable colour or shape, the other size, the opposite
yes/no). The true answer (`multiple_choice_answer`) is in normalised form;
:data:`ANSWER_VOCAB` is the closed set of every possible answer, normalised.

Referring expressions name exactly one object: "the red cube" (a minimal unique
attribute set) or "the cube to the left of the blue sphere" (attributes plus a
relation to a uniquely described anchor, unique together).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools

import numpy as np

from vlp.data.scenes_world import (COLORS, NUMBER_WORDS, SHAPES, SIZES, Scene,
                                   above_matrix, left_of_matrix, plural)

# scenes_world uses streams 1-4 (layout, detector, features, captions).
QUESTION_STREAM, REFEXP_STREAM = 5, 6
NUM_HUMAN_ANSWERS = 10
MIN_QUESTIONS, MAX_QUESTIONS = 4, 6
MIN_REFEXPS, MAX_REFEXPS = 1, 3
ID_STRIDE = 10  # question_id = image_id * 10 + slot (ref_id likewise)
ATTRS = ('size', 'color', 'shape')
_NAMES = {'size': SIZES, 'color': COLORS, 'shape': SHAPES}
RELATIONS = ('to the left of', 'to the right of', 'above', 'below')
_OPPOSITE = {'to the left of': 'to the right of', 'to the right of': 'to the left of',
             'above': 'below', 'below': 'above'}
# Every answer the world can have, normalised as the official VQA evaluation does.
ANSWER_VOCAB = (('yes', 'no') + tuple(str(k) for k in range(len(NUMBER_WORDS)))
                + COLORS + SHAPES + SIZES)
ANSWER_TYPES = ('yes/no', 'number', 'other')
QUESTION_TYPES = ('color', 'shape', 'size', 'count', 'exist', 'relation_query',
                  'relation_verify')
_WEIGHTS = (0.14, 0.12, 0.08, 0.2, 0.16, 0.14, 0.16)
# Mistakes a human plausibly makes; each answer's two neighbours.
_CONFUSABLE = {
    'red': ('orange', 'purple'), 'orange': ('red', 'yellow'), 'yellow': ('orange', 'white'),
    'green': ('blue', 'yellow'), 'blue': ('purple', 'green'), 'purple': ('blue', 'red'),
    'white': ('yellow', 'black'), 'black': ('purple', 'white'),
    'cube': ('cylinder', 'pyramid'), 'sphere': ('ring', 'cylinder'),
    'cylinder': ('cube', 'cone'), 'cone': ('pyramid', 'cylinder'),
    'pyramid': ('cone', 'cube'), 'star': ('heart', 'pyramid'), 'ring': ('sphere', 'heart'),
    'heart': ('star', 'ring'), 'small': ('large',), 'large': ('small',),
    'yes': ('no',), 'no': ('yes',),
}
# P(number of wrong answers = 0..4): at least 6 of 10 answers are right.
_WRONG_COUNT_P = (0.3, 0.3, 0.2, 0.12, 0.08)


@dataclasses.dataclass(frozen=True)
class Question:
  question_id: int
  question: str
  answer: str  # the true answer, normalised (= multiple_choice_answer)
  answers: tuple[str, ...]  # the 10 human answers (raw forms)
  answer_type: str
  question_type: str


@dataclasses.dataclass(frozen=True)
class RefExp:
  ref_id: int
  sentence: str
  target_index: int  # object = region index of the record
  target_box: tuple[float, ...]  # pixel x1 y1 x2 y2 (float32 values)
  kind: str  # 'attributes' | 'relation'


def question_rng(world_seed: int, image_id: int) -> np.random.Generator:
  return np.random.default_rng([int(world_seed), int(image_id), QUESTION_STREAM])


def refexp_rng(world_seed: int, image_id: int) -> np.random.Generator:
  return np.random.default_rng([int(world_seed), int(image_id), REFEXP_STREAM])


def make_tasks(scene: Scene, world_seed: int) -> tuple[list[Question], list[RefExp]]:
  """Questions and referring expressions of one image (record-order Scene)."""
  facts = SceneFacts(scene)
  return (make_questions(scene, question_rng(world_seed, scene.image_id), facts),
          make_refexps(scene, refexp_rng(world_seed, scene.image_id), facts))


# ----------------------------------------------------------------- attribute phrases
def phrase(spec: dict[str, int], *, plural_noun: bool = False) -> str:
  """'large red cube', 'red object' (no article): attributes in size, colour, shape order."""
  words = [_NAMES[a][spec[a]] for a in ('size', 'color') if a in spec]
  noun = SHAPES[spec['shape']] if 'shape' in spec else 'object'
  return ' '.join(words + [plural(noun) if plural_noun else noun])


def _with_article(text: str) -> str:
  return ('an ' if text[0] in 'aeiou' else 'a ') + text


class SceneFacts:
  """A Scene's attributes and relations as Python values, with cached look-ups."""

  def __init__(self, scene: Scene):
    self.scene, self.n = scene, scene.num_objects
    self.values = {a: getattr(scene, a).tolist() for a in ATTRS}
    self._having = {a: {} for a in ATTRS}  # attribute -> value -> objects
    for a in ATTRS:
      for k, v in enumerate(self.values[a]):
        self._having[a].setdefault(v, set()).add(k)
    self._all = frozenset(range(self.n))
    # matrix[r][i][j]: "i <r> j" holds (the captions' relations).
    left, above = left_of_matrix(scene).tolist(), above_matrix(scene).tolist()
    self.matrix = {'to the left of': left, 'above': above,
                   'to the right of': [list(c) for c in zip(*left)],
                   'below': [list(c) for c in zip(*above)]}
    self._counts: dict = {}  # attribute subset -> Counter of value tuples
    self._unique: dict = {}

  def related(self, relation: str, i: int) -> list[int]:
    """The objects j such that "i <relation> j" holds."""
    row = self.matrix[relation][i]
    return [j for j in range(self.n) if row[j]]

  def spec(self, i: int, attrs) -> dict[str, int]:
    return {a: self.values[a][i] for a in attrs}

  def matching(self, spec: dict[str, int]) -> frozenset[int]:
    """Objects having every attribute value of `spec`."""
    out = self._all
    for a, v in spec.items():
      out = out.intersection(self._having[a].get(v, ()))
    return out

  def holds(self, i: int, relation: str, j: int) -> bool:
    return self.matrix[relation][i][j]

  def _count(self, subset: tuple[str, ...], i: int) -> int:
    """How many objects share object i's values of `subset`."""
    counts = self._counts.get(subset)
    if counts is None:
      counts = self._counts[subset] = collections.Counter(
          tuple(self.values[a][k] for a in subset) for k in range(self.n))
    return counts[tuple(self.values[a][i] for a in subset)]

  def unique_specs(self, i: int, allowed=ATTRS) -> list[tuple[str, ...]]:
    """The smallest attribute subsets of `allowed` only object i matches ([] if none)."""
    key = (i, tuple(allowed))
    if key not in self._unique:
      self._unique[key] = []
      for r in range(1, len(allowed) + 1):
        found = [c for c in itertools.combinations(allowed, r) if self._count(c, i) == 1]
        if found:
          self._unique[key] = found
          break
    return self._unique[key]

  def unique_phrase(self, i: int, rng, allowed=ATTRS) -> str | None:
    specs = self.unique_specs(i, allowed)
    if not specs:
      return None
    return phrase(self.spec(i, specs[rng.integers(len(specs))]))


# ----------------------------------------------------------------- question families
def _q_attribute(asked: str):
  others = tuple(a for a in ATTRS if a != asked)

  def generate(facts: SceneFacts, rng):
    for i in rng.permutation(facts.n):
      referent = facts.unique_phrase(i, rng, others)
      if referent is not None:
        return f'what {asked} is the {referent}?', _NAMES[asked][facts.values[asked][i]], 'other'
    return None
  return generate


def _q_count(facts: SceneFacts, rng):
  attrs = ((), ('color',), ('shape',), ('color', 'shape'))[_draw(rng.random(), (.1, .4, .3, .2))]
  if rng.random() < 0.85:  # about objects that are there
    spec = facts.spec(int(rng.integers(facts.n)), attrs)
  else:  # possibly about something absent
    spec = {a: int(rng.integers(len(_NAMES[a]))) for a in attrs}
  count = len(facts.matching(spec))
  return f'how many {phrase(spec, plural_noun=True)} are there?', str(count), 'number'


def _q_exist(facts: SceneFacts, rng):
  attrs = (('color', 'shape'), ('size', 'shape'), ('color',), ('shape',))[
      _draw(rng.random(), (.5, .2, .15, .15))]
  if rng.random() < 0.5:
    spec = facts.spec(int(rng.integers(facts.n)), attrs)
  else:
    spec = {a: int(rng.integers(len(_NAMES[a]))) for a in attrs}
  answer = 'yes' if facts.matching(spec) else 'no'
  return f'is there {_with_article(phrase(spec))}?', answer, 'yes/no'


def _q_relation_query(facts: SceneFacts, rng):
  for j in rng.permutation(facts.n).tolist():
    if not facts.unique_specs(j):
      continue
    for r in rng.permutation(len(RELATIONS)).tolist():
      relation = RELATIONS[r]
      related = [k for k in range(facts.n) if facts.matrix[relation][k][j]]
      if len(related) != 1:
        continue
      i, anchor = related[0], facts.unique_phrase(j, rng)
      if rng.random() < 0.5:
        return (f'what shape is {relation} the {anchor}?', SHAPES[facts.values['shape'][i]],
                'other')
      return (f'what color is the object {relation} the {anchor}?',
              COLORS[facts.values['color'][i]], 'other')
  return None


def _q_relation_verify(facts: SceneFacts, rng):
  pairs = sorted({(i, j) for r in ('to the left of', 'above') for i in range(facts.n)
                  for j in facts.related(r, i)})
  for p in rng.permutation(len(pairs)).tolist():
    i, j = pairs[p]
    if not (facts.unique_specs(i) and facts.unique_specs(j)):
      continue
    a, b = facts.unique_phrase(i, rng), facts.unique_phrase(j, rng)
    true = [r for r in RELATIONS if facts.holds(i, r, j)]
    relation = true[rng.integers(len(true))]
    if rng.random() < 0.5:
      return f'is the {a} {relation} the {b}?', 'yes', 'yes/no'
    return f'is the {a} {_OPPOSITE[relation]} the {b}?', 'no', 'yes/no'
  return None


_FAMILIES = {'color': _q_attribute('color'), 'shape': _q_attribute('shape'),
             'size': _q_attribute('size'), 'count': _q_count, 'exist': _q_exist,
             'relation_query': _q_relation_query, 'relation_verify': _q_relation_verify}


def human_answers(answer: str, answer_type: str, rng: np.random.Generator) -> tuple[str, ...]:
  """Ten noisy answers: >= 6 say `answer` (maybe as a synonym form), the rest mistakes."""
  u = rng.random(2 * NUM_HUMAN_ANSWERS + 1).tolist()  # one draw: this runs per question
  wrong = _draw(u[0], _WRONG_COUNT_P)
  if answer_type == 'number':
    c = int(answer)
    options = [str(v) for v in (c - 1, c + 1) if 0 <= v < len(NUMBER_WORDS)]
  else:
    options = _CONFUSABLE[answer]
  values = [options[int(x * len(options))] for x in u[1:1 + wrong]]
  values += [answer] * (NUM_HUMAN_ANSWERS - wrong)
  synonym = u[1 + NUM_HUMAN_ANSWERS:]
  if answer_type == 'number':  # "two": normalised to "2"
    values = [NUMBER_WORDS[int(v)] if x < 0.25 else v for v, x in zip(values, synonym)]
  else:  # "Red": normalised to "red"
    values = [v.capitalize() if x < 0.1 else v for v, x in zip(values, synonym)]
  return tuple(values[i] for i in rng.permutation(NUM_HUMAN_ANSWERS).tolist())


def _draw(u: float, p) -> int:
  """The index that a uniform draw `u` in [0, 1) picks with weights `p`."""
  u, acc = u * sum(p), 0.0
  for i, w in enumerate(p):
    acc += w
    if u < acc:
      return i
  return len(p) - 1


def make_questions(scene: Scene, rng: np.random.Generator,
                   facts: SceneFacts | None = None) -> list[Question]:
  """4-6 distinct questions of one image, families drawn by `_WEIGHTS`."""
  facts = facts or SceneFacts(scene)
  target = int(rng.integers(MIN_QUESTIONS, MAX_QUESTIONS + 1))
  weights = dict(zip(QUESTION_TYPES, _WEIGHTS))
  out, texts = [], set()
  for _ in range(8 * MAX_QUESTIONS):
    if len(out) == target or not weights:
      break
    names = list(weights)
    family = names[_draw(rng.random(), [weights[k] for k in names])]
    made = _FAMILIES[family](facts, rng)
    if made is None:  # the family does not apply to this scene
      del weights[family]
      continue
    text, answer, answer_type = made
    if text in texts:
      continue
    texts.add(text)
    out.append(Question(question_id=scene.image_id * ID_STRIDE + len(out), question=text,
                        answer=answer, answers=human_answers(answer, answer_type, rng),
                        answer_type=answer_type, question_type=family))
  return out


# ----------------------------------------------------------------- referring expressions
def _relational(facts: SceneFacts, i: int, rng) -> str | None:
  """'<head> <relation> the <anchor>' naming object i only, with the shortest head."""
  for r in range(1, len(ATTRS) + 1):
    found = []
    for head in itertools.combinations(ATTRS, r):
      same = facts.matching(facts.spec(i, head))
      for relation in RELATIONS:
        for j in facts.related(relation, i):
          if (all(k == i or not facts.holds(k, relation, j) for k in same)
              and facts.unique_specs(j)):
            found.append((head, relation, j))
    if found:
      head, relation, j = found[rng.integers(len(found))]
      return f'the {phrase(facts.spec(i, head))} {relation} the {facts.unique_phrase(j, rng)}'
  return None


def make_refexps(scene: Scene, rng: np.random.Generator,
                 facts: SceneFacts | None = None) -> list[RefExp]:
  """1-3 expressions, each naming a different object (fewer if too few can be named)."""
  facts = facts or SceneFacts(scene)
  target = int(rng.integers(MIN_REFEXPS, MAX_REFEXPS + 1))
  out = []
  for i in rng.permutation(scene.num_objects):
    if len(out) == target:
      break
    text, kind = None, 'relation'
    if rng.random() < 0.3:
      text = _relational(facts, i, rng)
    if text is None:
      referent, kind = facts.unique_phrase(i, rng), 'attributes'
      text = None if referent is None else f'the {referent}'
    if text is None:
      text, kind = _relational(facts, i, rng), 'relation'
    if text is None:
      continue
    out.append(RefExp(ref_id=scene.image_id * ID_STRIDE + len(out), sentence=text,
                      target_index=int(i), target_box=tuple(scene.boxes[i].tolist()),
                      kind=kind))
  return out
