"""VQA v2 accuracy, as computed by the official evaluation code (`vqaEval.py`).

Per question, with the M (normally 10) ground-truth answers gt_1..gt_M and the
prediction a:

1. Every answer (ground truth and prediction) has newlines and tabs replaced by
   spaces and is stripped.
2. Only when the ground-truth answers are *not all identical* after step 1,
   `process_punctuation` then `process_digit_article` are applied to the
   ground truth and to the prediction. When they all agree, the prediction is
   compared raw: "Two" does not match ten "2"s, but it does match when the
   annotators disagree. Models should emit answers already normalised.
3. Acc(a) = (1/M) sum_k min(1, #{j != k : gt_j == a} / 3): the mean over the M
   leave-one-out subsets. By number of matches n out of 10 this is 0, 0.3,
   0.6, 0.9 and 1.0 for n = 0, 1, 2, 3, >= 4 (not the min(1, n/3) often used as
   a training target).

The official code leaves one answer out by dropping every answer dict equal to
it; as the 10 dicts of a question carry distinct `answer_id`s that drops exactly
one. Here answers are left out by position, and repeated `answer_id`s within a
question are an error, so both agree on every valid file.

Normalisation quirks of the official code are kept on purpose:
* a punctuation mark is deleted (instead of turned into a space) when it is
  next to a space anywhere in the answer, or when the answer holds a digit,
  comma, digit sequence ("1,000" -> "1000");
* the period regex `(?!<=\\d)(\\.)(?!\\d)` is a look-*ahead* (it deletes every
  period not followed by a digit: "yes." -> "yes", "2.5" kept), and its `sub`
  is passed `re.UNICODE` (32) as the count, so at most 32 periods go;
* lowercasing happens only in `process_digit_article`, before mapping number
  words ("none", "zero".."ten") to digits, dropping articles (a, an, the) and
  then fixing contractions word by word ("dont" -> "don't"); table keys with
  capitals ("Im", "Ive", "Id've") therefore never match.

Scores are reported as the official code does: 100 * mean, rounded to 2
digits (pass `digits=None` for the unrounded value), overall, per answer type
(the annotation's `answer_type`: "yes/no", "number", "other") and per question
type (`question_type`). Means are summed in annotation order, as the official
code does, so the floats agree bit for bit.
"""

from __future__ import annotations

import functools
import json
import numbers
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from etils import epath  # Results files may be on an object store.

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
                ">", "<", "@", "`", ",", "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_COUNT = 32  # The official code passes re.UNICODE (== 32) as `count`.
_NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3",
                 "four": "4", "five": "5", "six": "6", "seven": "7", "eight": "8",
                 "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})


def _contraction_table() -> dict[str, str]:
  """Contraction fixes of the official evaluator (missing apostrophes -> written)."""
  # Groups "written: spelling ..." (a token ending in ':' starts a group).
  groups = """
  ain't: aint | aren't: arent | can't: cant | could've: couldve | couldn't: couldnt
  couldn't've: couldn'tve couldnt've | didn't: didnt | doesn't: doesnt | don't: dont
  hadn't: hadnt | hadn't've: hadnt've hadn'tve | hasn't: hasnt | haven't: havent
  he'd: hed | he'd've: hed've he'dve | he's: hes | how'd: howd | how'll: howll
  how's: hows | I'd've: Id've I'dve | I'm: Im | I've: Ive | isn't: isnt | it'd: itd
  it'd've: itd've it'dve | it'll: itll | let's: let's | ma'am: maam | mightn't: mightnt
  mightn't've: mightnt've mightn'tve | might've: mightve | mustn't: mustnt
  must've: mustve | needn't: neednt | not've: notve | o'clock: oclock
  oughtn't: oughtnt | 'ow's'at: ow's'at 'ows'at 'ow'sat | shan't: shant
  she'd've: shed've she'dve | she's: she's | should've: shouldve
  shouldn't: shouldnt | shouldn't've: shouldnt've shouldn'tve | somebodyd: somebody'd
  somebody'd've: somebodyd've somebody'dve | somebody'll: somebodyll
  somebody's: somebodys | someone'd: someoned | someone'd've: someoned've someone'dve
  someone'll: someonell | someone's: someones | something'd: somethingd
  something'd've: somethingd've something'dve | something'll: somethingll
  that's: thats | there'd: thered | there'd've: thered've there'dve
  there're: therere | there's: theres | they'd: theyd | they'd've: theyd've they'dve
  they'll: theyll | they're: theyre | they've: theyve | 'twas: twas | wasn't: wasnt
  we'd've: wed've we'dve | we've: weve | weren't: werent | what'll: whatll
  what're: whatre | what's: whats | what've: whatve | when's: whens | where'd: whered
  where's: wheres | where've: whereve | who'd: whod | who'd've: whod've who'dve
  who'll: wholl | who's: whos | who've: whove | why'll: whyll | why're: whyre
  why's: whys | won't: wont | would've: wouldve | wouldn't: wouldnt
  wouldn't've: wouldnt've wouldn'tve | y'all: yall | y'all'll: yall'll y'allll
  y'all'd've: yall'd've y'alld've y'all'dve | you'd: youd | you'd've: youd've you'dve
  you'll: youll | you're: youre | you've: youve
  """
  table, written = {}, None
  for token in groups.split():
    if token.endswith(":"):
      written = token[:-1]
    elif token != "|":
      table[token] = written
  return table


_CONTRACTIONS = _contraction_table()


def clean_answer(answer: str) -> str:
  """Newlines and tabs to spaces, then strip (applied to every answer)."""
  return answer.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str) -> str:
  out = text
  digit_comma_digit = _DIGIT_COMMA_DIGIT.search(text) is not None
  for p in _PUNCTUATION:
    if p + " " in text or " " + p in text or digit_comma_digit:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return _PERIOD.sub("", out, count=_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
  words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def normalize_answer(answer: str) -> str:
  """The full normalisation (what is applied when the annotators disagree)."""
  return _processed(clean_answer(answer))


@functools.lru_cache(maxsize=1 << 16)
def _processed(cleaned: str) -> str:
  return process_digit_article(process_punctuation(cleaned))


def question_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
  """Official accuracy (in [0, 1]) of one prediction against the ground-truth answers."""
  gts = [clean_answer(g) for g in gt_answers]
  if not gts:
    raise ValueError("a question needs at least one ground-truth answer")
  pred = clean_answer(prediction)
  if len(set(gts)) > 1:
    gts = [_processed(g) for g in gts]
    pred = _processed(pred)
  n = sum(g == pred for g in gts)
  # Leaving out answer k leaves n - [gt_k == a] matches among the others.
  per_subset = [min(1, float(n - (g == pred)) / 3) for g in gts]
  return float(sum(per_subset)) / len(per_subset)


def _entries(data: Any, key: str, what: str) -> list:
  if isinstance(data, Mapping):
    if key not in data:
      raise ValueError(f"{what}: expected a dict with a {key!r} list or a plain list, "
                       f"got a dict with keys {sorted(data)[:10]}")
    data = data[key]
  if not isinstance(data, (list, tuple)):
    raise ValueError(f"{what}: expected a list of entries, got {type(data).__name__}")
  return list(data)


def _int_id(value: Any, where: str, field: str = "question_id") -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{where}: {field} must be an integer, got {value!r}")
  return int(value)


def _id_list(ids: Iterable[int], limit: int = 10) -> str:
  ids = sorted(ids)
  more = f" ... ({len(ids)} in all)" if len(ids) > limit else ""
  return ", ".join(str(i) for i in ids[:limit]) + more


def _gt_answers(ann: Mapping, where: str) -> list[str]:
  answers = ann.get("answers")
  if not isinstance(answers, (list, tuple)) or not answers:
    raise ValueError(f"{where}: 'answers' must be a non-empty list, got {answers!r}")
  out, answer_ids = [], set()
  for j, a in enumerate(answers):
    if isinstance(a, str):
      out.append(a)
      continue
    if not isinstance(a, Mapping) or not isinstance(a.get("answer"), str):
      raise ValueError(f"{where}: answers[{j}] must be a dict with a string 'answer' "
                       f"(or a plain string), got {a!r}")
    if "answer_id" in a:
      if a["answer_id"] in answer_ids:
        raise ValueError(f"{where}: answers[{j}] repeats answer_id {a['answer_id']!r}; "
                         "the official leave-one-out needs distinct answer dicts")
      answer_ids.add(a["answer_id"])
    out.append(a["answer"])
  return out


def _index_annotations(annotations: Any) -> dict[int, Mapping]:
  by_id: dict[int, Mapping] = {}
  for i, ann in enumerate(_entries(annotations, "annotations", "annotations")):
    where = f"annotations[{i}]"
    if not isinstance(ann, Mapping) or "question_id" not in ann:
      raise ValueError(f"{where}: expected a dict with 'question_id', got {ann!r}")
    qid = _int_id(ann["question_id"], where)
    where = f"annotation of question_id {qid}"
    if qid in by_id:
      raise ValueError(f"{where}: question_id appears twice in the annotations")
    for field in ("answer_type", "question_type"):
      if not isinstance(ann.get(field), str):
        raise ValueError(f"{where}: {field!r} must be a string, got {ann.get(field)!r}")
    by_id[qid] = ann
  if not by_id:
    raise ValueError("annotations: no questions to evaluate")
  return by_id


def _check_questions(questions: Any, annotations: Mapping[int, Mapping]) -> None:
  seen = set()
  for i, q in enumerate(_entries(questions, "questions", "questions")):
    if not isinstance(q, Mapping) or "question_id" not in q:
      raise ValueError(f"questions[{i}]: expected a dict with 'question_id', got {q!r}")
    qid = _int_id(q["question_id"], f"questions[{i}]")
    if qid in seen:
      raise ValueError(f"questions: question_id {qid} appears twice")
    seen.add(qid)
    ann = annotations.get(qid)
    if (ann is not None and "image_id" in q and "image_id" in ann
        and int(q["image_id"]) != int(ann["image_id"])):
      raise ValueError(f"question_id {qid}: image_id {q['image_id']} in the questions but "
                       f"{ann['image_id']} in the annotations")
  missing, extra = set(annotations) - seen, seen - set(annotations)
  if missing or extra:
    raise ValueError("questions and annotations cover different question ids: "
                     f"{len(missing)} annotated but not in the questions "
                     f"[{_id_list(missing)}], {len(extra)} in the questions but not "
                     f"annotated [{_id_list(extra)}]")


def _index_results(results: Any, annotated: Iterable[int]) -> dict[int, str]:
  if not isinstance(results, (list, tuple)):
    raise ValueError(f"results: expected a list of {{'question_id', 'answer'}} dicts, "
                     f"got {type(results).__name__}")
  answers: dict[int, str] = {}
  duplicates = set()
  for i, r in enumerate(results):
    if not isinstance(r, Mapping) or "question_id" not in r or "answer" not in r:
      raise ValueError(f"results[{i}]: expected a dict with 'question_id' and 'answer', "
                       f"got {r!r}")
    qid = _int_id(r["question_id"], f"results[{i}]")
    if not isinstance(r["answer"], str):
      raise ValueError(f"results[{i}] (question_id {qid}): 'answer' must be a string, "
                       f"got {r['answer']!r}")
    if qid in answers:
      duplicates.add(qid)
    answers[qid] = r["answer"]
  annotated = set(annotated)
  missing, unknown = annotated - set(answers), set(answers) - annotated
  if missing or unknown or duplicates:
    raise ValueError("results must answer each annotated question exactly once: "
                     f"{len(missing)} missing [{_id_list(missing)}], "
                     f"{len(duplicates)} answered more than once [{_id_list(duplicates)}], "
                     f"{len(unknown)} not in the annotations [{_id_list(unknown)}]")
  return answers


def per_question_accuracy(results: Any, annotations: Any) -> dict[int, float]:
  """question_id -> official accuracy in [0, 1], in annotation order (validated as
  in `vqa_accuracy`)."""
  return _accuracies(results, _index_annotations(annotations))


def _accuracies(results: Any, by_id: Mapping[int, Mapping]) -> dict[int, float]:
  answers = _index_results(results, by_id)
  return {qid: question_accuracy(answers[qid],
                                 _gt_answers(ann, f"annotation of question_id {qid}"))
          for qid, ann in by_id.items()}


def vqa_accuracy(results: Any, annotations: Any, questions: Any = None, *,
                 digits: int | None = 2) -> dict[str, Any]:
  """Official VQA v2 accuracy in percent.

  Args:
    results: list of {"question_id": int, "answer": str}, one per annotated question.
    annotations: the official annotation JSON ({"annotations": [...]}) or its list.
    questions: optional official question JSON ({"questions": [...]}) or its list;
      when given it must cover the same question ids (and the same image_ids).
    digits: rounding of the reported percentages (official: 2); None = unrounded.

  Returns:
    {"overall": float, "per_answer_type": {type: float}, "per_question_type":
    {type: float}, "num_questions": int}; the types are those of the annotations.
  """
  by_id = _index_annotations(annotations)
  if questions is not None:
    _check_questions(questions, by_id)
  accuracies = _accuracies(results, by_id)
  overall: list[float] = []
  by_answer_type: dict[str, list[float]] = {}
  by_question_type: dict[str, list[float]] = {}
  for qid, ann in by_id.items():
    acc = accuracies[qid]
    overall.append(acc)
    by_answer_type.setdefault(ann["answer_type"], []).append(acc)
    by_question_type.setdefault(ann["question_type"], []).append(acc)

  def percent(values: list[float]) -> float:
    value = 100 * float(sum(values)) / len(values)
    return value if digits is None else round(value, digits)

  return {
      "overall": percent(overall),
      "per_answer_type": {t: percent(v) for t, v in by_answer_type.items()},
      "per_question_type": {t: percent(v) for t, v in by_question_type.items()},
      "num_questions": len(overall),
  }


def majority_baseline(annotations: Any) -> tuple[str, float]:
  """The single most common (normalised) human answer of `annotations`, and the
  `vqa_accuracy` of giving it to every question: the majority-answer baseline.

  It reads the answers of the split it scores, so it is an optimistic version of
  the usual "most common training answer" baseline (ties: the first seen).
  """
  by_id = _index_annotations(annotations)
  counts: dict[str, int] = {}
  for qid, ann in by_id.items():
    for a in _gt_answers(ann, f"question {qid}"):
      key = normalize_answer(a)
      counts[key] = counts.get(key, 0) + 1
  answer = max(counts, key=counts.get)  # dicts keep insertion order: first max wins
  results = [{"question_id": qid, "answer": answer} for qid in by_id]
  return answer, vqa_accuracy(results, annotations)["overall"]


def write_results(path: str, question_ids: Sequence[int], answers: Sequence[str]) -> None:
  """Writes the official results file: a JSON list of {"question_id", "answer"}."""
  question_ids, answers = list(question_ids), list(answers)
  if len(question_ids) != len(answers):
    raise ValueError(f"write_results: {len(question_ids)} question ids but "
                     f"{len(answers)} answers")
  entries, seen = [], set()
  for i, (qid, answer) in enumerate(zip(question_ids, answers)):
    qid = _int_id(qid, f"question_ids[{i}]")
    if qid in seen:
      raise ValueError(f"write_results: question_id {qid} appears twice")
    if not isinstance(answer, str):
      raise ValueError(f"write_results: answer for question_id {qid} must be a string, "
                       f"got {answer!r}")
    seen.add(qid)
    entries.append({"question_id": qid, "answer": answer})
  epath.Path(path).write_text(json.dumps(entries), encoding="utf-8")


def read_results(path: str) -> list[dict[str, Any]]:
  """Reads and checks an official results file (no duplicate question ids)."""
  data = json.loads(epath.Path(path).read_text(encoding="utf-8"))
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a JSON list of results, got {type(data).__name__}")
  out, seen = [], set()
  for i, r in enumerate(data):
    if not isinstance(r, dict) or "question_id" not in r or not isinstance(r.get("answer"), str):
      raise ValueError(f"{path}: entry {i} must be {{'question_id': int, 'answer': str}}, "
                       f"got {r!r}")
    qid = _int_id(r["question_id"], f"{path}: entry {i}")
    if qid in seen:
      raise ValueError(f"{path}: question_id {qid} appears twice")
    seen.add(qid)
    out.append({"question_id": qid, "answer": r["answer"]})
  return out
