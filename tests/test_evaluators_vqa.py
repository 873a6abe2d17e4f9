"""Official VQA v2 accuracy: normalisation, leave-one-out scores, breakdowns, files."""

import itertools
import json

import numpy as np
import pytest

from vlp.evaluators import vqa


@pytest.mark.parametrize("raw,want", [
    ("Two", "2"),                 # lowercased, number word -> digit
    ("the Ten", "10"),
    ("none", "0"),
    ("a dog", "dog"),             # articles dropped
    ("An apple", "apple"),
    ("yes.", "yes"),              # period not followed by a digit is deleted
    ("3.5", "3.5"),               # decimal point kept
    ("dont", "don't"),            # contraction fixed
    ("isnt it", "isn't it"),
    ("Im", "im"),                 # capitalised table keys never match after lowercasing
    ("1,000", "1000"),            # digit,digit: every punctuation mark deleted
    ("1,000-ish", "1000ish"),     # ... even the hyphen, because of the 1,000
    ("red,blue", "red blue"),     # no space next to the comma: it becomes a space
    ("red, blue", "red blue"),    # a space next to it: deleted
    ("t-shirt", "t shirt"),
    ("(yes)", "yes"),
    ("one, two", "1 2"),
    ("\n Yes\t", "yes"),          # newline / tab -> space, stripped
    ("what?", "what"),
    ("it's", "it's"),             # apostrophes are not punctuation here
])
def test_normalize_hand_cases(raw, want):
  assert vqa.normalize_answer(raw) == want


def test_period_strip_count_quirk():
  # The official `sub(..., re.UNICODE)` passes 32 as the count: 40 periods leave 8.
  assert vqa.process_punctuation("." * 40) == "." * 8


def test_raw_comparison_when_annotators_agree():
  # All ten say "2": the prediction is only cleaned, not normalised.
  assert vqa.question_accuracy("Two", ["2"] * 10) == 0.0
  assert vqa.question_accuracy("2", ["2"] * 10) == 1.0
  assert vqa.question_accuracy(" 2\n", ["2"] * 10) == 1.0
  # One annotator wrote "two": now both sides are normalised and all ten match.
  assert vqa.question_accuracy("Two", ["2"] * 9 + ["two"]) == 1.0
  assert vqa.question_accuracy("a dog", ["dog"] * 10) == 0.0
  assert vqa.question_accuracy("a dog", ["dog"] * 9 + ["the dog"]) == 1.0


@pytest.mark.parametrize("n,official,naive", [
    (0, 0.0, 0.0), (1, 0.3, 1 / 3), (2, 0.6, 2 / 3), (3, 0.9, 1.0), (4, 1.0, 1.0),
    (10, 1.0, 1.0)])
def test_leave_one_out_average_by_hand(n, official, naive):
  # n of 10 answers match. Leaving out a matching answer leaves n-1 matches among 9,
  # leaving out another leaves n: (n*min(1,(n-1)/3) + (10-n)*min(1,n/3)) / 10.
  # e.g. n=3: (3 * 2/3 + 7 * 1) / 10 = 0.9, where the naive min(1, 3/3) gives 1.
  gts = ["cat"] * n + ["dog", "bird", "fish", "cow", "pig", "hen", "owl", "bee", "ant",
                       "elk"][:10 - n]
  assert vqa.question_accuracy("cat", gts) == pytest.approx(official)
  assert min(1.0, n / 3) == pytest.approx(naive)
  if n in (1, 2, 3):
    assert official != pytest.approx(naive)


def reference_accuracy(prediction, answer_dicts):
  """Straight transcription of the official procedure on answer dicts: normalise
  only on disagreement, drop each dict in turn (by dict inequality), count
  matches among the rest."""
  def cleaned(s):
    return s.replace("\n", " ").replace("\t", " ").strip()
  dicts = [dict(d, answer=cleaned(d["answer"])) for d in answer_dicts]
  pred = cleaned(prediction)
  if len({d["answer"] for d in dicts}) > 1:
    dicts = [dict(d, answer=vqa.normalize_answer(d["answer"])) for d in dicts]
    pred = vqa.normalize_answer(pred)
  accs = []
  for left_out in dicts:
    others = [d for d in dicts if d != left_out]
    accs.append(min(1.0, sum(d["answer"] == pred for d in others) / 3))
  return sum(accs) / len(accs)


def test_random_answer_sets_match_reference():
  rng = np.random.default_rng(0)
  pool = ["2", "two", "Two", "a dog", "dog", "yes", "yes.", "no", "1,000", "1000", "red"]
  for _ in range(300):
    gts = [{"answer": str(rng.choice(pool)), "answer_confidence": "yes", "answer_id": j + 1}
           for j in range(10)]
    pred = str(rng.choice(pool))
    assert vqa.question_accuracy(pred, [g["answer"] for g in gts]) == pytest.approx(
        reference_accuracy(pred, gts))


def test_agrees_with_training_soft_scores():
  # The training targets (vlp.data.builders.vqa_answers.AnswerVocab.soft_scores,
  # a count formula over normalised answers) must score every vocabulary answer
  # as the evaluator's leave-one-out accuracy does.
  from vlp.data.builders import vqa_answers
  words = ["2", "two", "Two", "a dog", "dog", "yes.", "1,000", "red, blue", "dont", "none"]
  vocab = vqa_answers.AnswerVocab(["2", "dog", "yes", "1000", "red blue", "don't", "0", "Two"])
  for combo in itertools.islice(itertools.product(words, repeat=3), 400):
    gts = [combo[0]] * 5 + [combo[1]] * 4 + [combo[2]]
    labels, scores = vocab.soft_scores(gts)
    got = dict(zip(labels, scores))
    for label, answer in enumerate(vocab.answers):
      assert got.get(label, 0.0) == pytest.approx(vqa.question_accuracy(answer, gts))


def _ann(qid, answers, answer_type, question_type, image_id=None):
  return {"question_id": qid, "image_id": image_id if image_id is not None else qid * 10,
          "answer_type": answer_type, "question_type": question_type,
          "multiple_choice_answer": answers[0],
          "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": j + 1}
                      for j, a in enumerate(answers)]}


def _dataset():
  anns = [
      _ann(1, ["yes"] * 10, "yes/no", "is this"),                # "yes": 1.0
      _ann(2, ["2"] * 2 + ["3"] * 8, "number", "how many"),      # "two": 2 matches, 0.6
      _ann(3, ["red"] * 3 + ["blue"] * 7, "other", "what color"),  # "Red.": 3, 0.9
      _ann(4, ["no"] + ["yes"] * 9, "yes/no", "is this"),        # "no": 1 match, 0.3
  ]
  questions = [{"question_id": a["question_id"], "image_id": a["image_id"], "question": "?"}
               for a in anns]
  results = [{"question_id": 3, "answer": "Red."}, {"question_id": 1, "answer": "yes"},
             {"question_id": 4, "answer": "no"}, {"question_id": 2, "answer": "two"}]
  return anns, questions, results


def test_per_type_breakdown():
  anns, questions, results = _dataset()
  r = vqa.vqa_accuracy(results, {"annotations": anns}, {"questions": questions})
  assert r["overall"] == pytest.approx(100 * (1 + 0.6 + 0.9 + 0.3) / 4)  # 70
  assert r["per_answer_type"] == pytest.approx(
      {"yes/no": 65.0, "number": 60.0, "other": 90.0})
  assert r["per_question_type"] == pytest.approx(
      {"is this": 65.0, "how many": 60.0, "what color": 90.0})
  assert r["num_questions"] == 4
  # Plain lists are accepted, and the questions are optional.
  assert vqa.vqa_accuracy(results, anns, questions) == r
  assert vqa.vqa_accuracy(results, anns) == r
  assert vqa.per_question_accuracy(results, anns) == pytest.approx({1: 1.0, 2: 0.6, 3: 0.9,
                                                                    4: 0.3})


def test_rounding_like_the_official_code():
  anns = [_ann(1, ["yes"] * 10, "yes/no", "is"), _ann(2, ["no"] * 10, "yes/no", "is"),
          _ann(3, ["cat"] + ["dog"] * 9, "other", "what")]
  results = [{"question_id": 1, "answer": "yes"}, {"question_id": 2, "answer": "no"},
             {"question_id": 3, "answer": "cat"}]
  # (1 + 1 + 0.3) / 3 = 0.7666...
  assert vqa.vqa_accuracy(results, anns)["overall"] == 76.67
  assert vqa.vqa_accuracy(results, anns, digits=None)["overall"] == pytest.approx(230 / 3)


def test_results_must_cover_each_question_once():
  anns, _, results = _dataset()
  with pytest.raises(ValueError, match=r"1 missing \[2\], 0 answered more than once \[\], "
                                       r"0 not in the annotations \[\]"):
    vqa.vqa_accuracy(results[:3], anns)
  with pytest.raises(ValueError, match=r"1 answered more than once \[2\]"):
    vqa.vqa_accuracy(results + [{"question_id": 2, "answer": "3"}], anns)
  with pytest.raises(ValueError, match=r"1 not in the annotations \[99\]"):
    vqa.vqa_accuracy(results + [{"question_id": 99, "answer": "3"}], anns)
  with pytest.raises(ValueError, match=r"results\[0\].*'answer' must be a string"):
    vqa.vqa_accuracy([{"question_id": 3, "answer": 3}] + results[1:], anns)


def test_annotation_and_question_errors():
  anns, questions, results = _dataset()
  bad = [dict(a) for a in anns]
  bad[1]["answers"] = bad[1]["answers"][:9] + [dict(bad[1]["answers"][0])]
  with pytest.raises(ValueError, match="question_id 2: answers.*repeats answer_id 1"):
    vqa.vqa_accuracy(results, bad)
  bad = [dict(a) for a in anns]
  del bad[2]["answer_type"]
  with pytest.raises(ValueError, match="question_id 3: 'answer_type' must be a string"):
    vqa.vqa_accuracy(results, bad)
  with pytest.raises(ValueError, match=r"1 annotated but not in the questions \[4\]"):
    vqa.vqa_accuracy(results, anns, questions[:3])
  wrong_image = [dict(q) for q in questions]
  wrong_image[0]["image_id"] = 7
  with pytest.raises(ValueError, match="question_id 1: image_id 7 in the questions but 10"):
    vqa.vqa_accuracy(results, anns, wrong_image)
  with pytest.raises(ValueError, match="'annotations' list"):
    vqa.vqa_accuracy(results, {"questions": questions})


def test_results_file_round_trip(tmp_path):
  path = str(tmp_path / "results.json")
  vqa.write_results(path, np.array([5, 3], np.int64), ["yes", "2"])
  with open(path) as f:
    assert json.load(f) == [{"question_id": 5, "answer": "yes"},
                            {"question_id": 3, "answer": "2"}]
  assert vqa.read_results(path) == [{"question_id": 5, "answer": "yes"},
                                    {"question_id": 3, "answer": "2"}]
  with pytest.raises(ValueError, match="question_id 3 appears twice"):
    vqa.write_results(path, [3, 3], ["a", "b"])
  with pytest.raises(ValueError, match="2 question ids but 1 answers"):
    vqa.write_results(path, [1, 2], ["a"])
  with open(path, "w") as f:
    json.dump([{"question_id": 1, "answer": "a"}, {"question_id": 1, "answer": "b"}], f)
  with pytest.raises(ValueError, match="question_id 1 appears twice"):
    vqa.read_results(path)
  with open(path, "w") as f:
    json.dump([{"question_id": "1", "answer": "a"}], f)
  with pytest.raises(ValueError, match="question_id must be an integer"):
    vqa.read_results(path)


def test_majority_baseline_by_hand():
  def ann(qid, answers, atype="other"):
    return {"question_id": qid, "image_id": 1, "answer_type": atype, "question_type": "what",
            "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(answers)]}
  # "Yes" / "yes." normalise to "yes" (13 of 30 answers): the majority answer.
  anns = {"annotations": [ann(1, ["yes"] * 6 + ["no"] * 4, "yes/no"),
                          ann(2, ["Yes"] * 3 + ["two"] * 7, "number"),
                          ann(3, ["red"] * 6 + ["yes."] * 4)]}
  answer, acc = vqa.majority_baseline(anns)
  assert answer == "yes"
  # Per question: min(1, matches / 3) averaged over the 10 leave-one-out subsets:
  # 6 matches -> 1; 3 matches -> (7 * 1 + 3 * 2/3) / 10 = 0.9; 4 -> 1 (the official
  # normalisation strips the period of "yes." only when it is not a decimal point).
  expected = [vqa.question_accuracy("yes", [a["answer"] for a in x["answers"]])
              for x in anns["annotations"]]
  assert expected == pytest.approx([1.0, 0.9, 1.0])
  assert acc == pytest.approx(100 * np.mean(expected), abs=0.01)
