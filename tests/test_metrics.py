"""Downstream metrics against their reference implementations: classification against scikit-learn, NER against
seqeval's classification_report and hand-counted entities (a broken I- tag under conlleval and strict rules), SQuAD
against the official v1.1 script's formulas written out here, BLEU/chrF against values known without sacrebleu."""
import collections
import math
import re
import string

import numpy as np
import pytest

from train.tasks import metrics as M

seqeval_metrics = pytest.importorskip("seqeval.metrics")
sacrebleu = pytest.importorskip("sacrebleu")


# ---- classification --------------------------------------------------------------------------------------------------
def test_classification_matches_sklearn():
  sk = pytest.importorskip("sklearn.metrics")
  rng = np.random.default_rng(0)
  for k in (2, 3, 5):
    ref = rng.integers(0, k, 200)
    pred = np.where(rng.random(200) < 0.6, ref, rng.integers(0, k, 200))
    got = M.classification_metrics(predictions=pred, references=ref)
    assert got["accuracy"] == pytest.approx(sk.accuracy_score(ref, pred))
    assert got["macro_f1"] == pytest.approx(sk.f1_score(ref, pred, average="macro"))
    if k == 2:
      assert got["f1"] == pytest.approx(sk.f1_score(ref, pred))
    else:
      assert "f1" not in got
  # Logits are argmaxed; a class that never occurs counts 0 in the macro average when num_classes names it.
  logits = np.eye(3)[[0, 1, 1, 0]]
  got = M.classification_metrics(predictions=logits, references=[0, 1, 0, 0], num_classes=3)
  assert got["accuracy"] == 0.75
  assert got["macro_f1"] == pytest.approx((0.8 + 2 / 3 + 0) / 3)


def test_classification_rejects_mismatched_lengths():
  with pytest.raises(ValueError, match="3 predictions but 2 references"):
    M.classification_metrics(predictions=[0, 1, 1], references=[0, 1])


# ---- tagging ---------------------------------------------------------------------------------------------------------
# Sentence 1 predicts a broken "I-LOC" right after O; sentence 2 cuts the ORG short.
TRUE_TAGS = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "I-ORG", "O", "B-PER"]]
PRED_TAGS = [["B-PER", "I-PER", "O", "I-LOC"], ["O", "B-ORG", "O", "O", "B-PER"]]


def test_tagging_conlleval_rules_match_seqeval_report_and_hand_count():
  got = M.tagging_metrics(predictions=PRED_TAGS, references=TRUE_TAGS, by_type=True)
  report = seqeval_metrics.classification_report(TRUE_TAGS, PRED_TAGS, output_dict=True)
  micro = report["micro avg"]
  assert got["precision"] == pytest.approx(micro["precision"])
  assert got["recall"] == pytest.approx(micro["recall"])
  assert got["f1"] == pytest.approx(micro["f1-score"])
  # By hand (conlleval: the I-LOC opens a LOC entity, which matches): 4 gold, 4 predicted, 3 right.
  assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((0.75, 0.75, 0.75))
  assert got["accuracy"] == pytest.approx(7 / 9)
  assert got["f1_LOC"] == 1.0 and got["f1_ORG"] == 0.0 and got["f1_PER"] == 1.0


def test_tagging_strict_mode_drops_the_broken_entity():
  from seqeval.scheme import IOB2
  got = M.tagging_metrics(predictions=PRED_TAGS, references=TRUE_TAGS, strict=True)
  report = seqeval_metrics.classification_report(TRUE_TAGS, PRED_TAGS, output_dict=True, mode="strict", scheme=IOB2,
                                                 zero_division=0)
  assert got["f1"] == pytest.approx(report["micro avg"]["f1-score"])
  # 4 gold, 3 predicted (no LOC), 2 right.
  assert (got["precision"], got["recall"]) == pytest.approx((2 / 3, 0.5))
  assert got["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_word_tags_reads_first_subwords_and_pads_truncated_words():
  names = ["O", "B-PER", "I-PER"]
  # [CLS] w0 w1 ##a w2 [SEP] pad: first sub-words at 1, 2, 4.
  weights = np.array([[0, 1, 1, 0, 1, 0, 0], [0, 1, 0, 0, 0, 0, 0]], np.float32)
  preds = np.array([[2, 1, 2, 0, 0, 1, 1], [0, 1, 2, 2, 2, 2, 2]])
  assert M.word_tags(predictions=preds, tag_weights=weights, tag_names=names) == [["B-PER", "I-PER", "O"], ["B-PER"]]
  # Scores are argmaxed; the second sentence had 3 words, 2 cut off by truncation.
  got = M.word_tags(predictions=np.eye(3)[preds], tag_weights=weights, tag_names=names, num_words=[3, 3])
  assert got == [["B-PER", "I-PER", "O"], ["B-PER", "O", "O"]]
  with pytest.raises(ValueError, match="num_words"):
    M.word_tags(predictions=preds, tag_weights=weights, tag_names=names, num_words=[2, 1])


# ---- SQuAD v1.1 ------------------------------------------------------------------------------------------------------
def _official_normalize(s):
  """evaluate-v1.1.py's normalize_answer, verbatim in substance."""

  def remove_articles(text):
    return re.sub(r"\b(a|an|the)\b", " ", text)

  def white_space_fix(text):
    return " ".join(text.split())

  def remove_punc(text):
    exclude = set(string.punctuation)
    return "".join(ch for ch in text if ch not in exclude)

  return white_space_fix(remove_articles(remove_punc(s.lower())))


def _official_f1(prediction, ground_truth):
  p, g = _official_normalize(prediction).split(), _official_normalize(ground_truth).split()
  common = collections.Counter(p) & collections.Counter(g)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision, recall = np.float64(num_same) / len(p), np.float64(num_same) / len(g)
  return 2 * precision * recall / (precision + recall)


def _official(predictions, references):
  em = sum(
      max(float(_official_normalize(p) == _official_normalize(g))
          for g in gs)
      for p, gs in zip(predictions, references))
  f1 = sum(max(_official_f1(p, g) for g in gs) for p, gs in zip(predictions, references))
  return {"exact_match": 100.0 * em / len(predictions), "f1": 100.0 * f1 / len(predictions)}


SQUAD_PREDICTIONS = [
    "The Eiffel Tower",  # article + case -> exact
    "an apple, a pear",  # articles inside, punctuation
    "Denver Broncos!!",  # punctuation at the end
    "the the the",  # only articles -> empty after normalization
    "Theater of the absurd",  # 'the' inside a word is kept: "theater"
    "1,000 men",  # digits with a comma: "1000"
    "Super Bowl 50",  # matches the second gold answer
    "",  # empty prediction
    "north-east  of   Paris",  # hyphen removed (no space), whitespace collapsed
    "A A a",  # repeated tokens: counted with multiplicity
]
SQUAD_REFERENCES = [
    ["Eiffel Tower"],
    ["apple pear", "an apple"],
    ["Broncos"],
    ["the"],
    ["theater of absurd"],
    ["1000 men", "a thousand men"],
    ["Super Bowl", "Super Bowl 50", "50"],
    ["something"],
    ["northeast of Paris"],
    ["a", "a a"],
]


def test_squad_normalization_matches_the_official_script():
  for s in SQUAD_PREDICTIONS + [g for gs in SQUAD_REFERENCES for g in gs] + ["Ünïcode «quotes» – dash", "a.b.c"]:
    assert M.normalize_answer(s) == _official_normalize(s), s
  assert M.normalize_answer("The  Quick, brown-fox!") == "quick brownfox"
  assert M.normalize_answer("an apple a day") == "apple day"


def test_squad_metrics_match_the_official_formulas():
  got = M.squad_metrics(predictions=SQUAD_PREDICTIONS, references=SQUAD_REFERENCES)
  ref = _official(SQUAD_PREDICTIONS, SQUAD_REFERENCES)
  assert got["exact_match"] == pytest.approx(ref["exact_match"], abs=1e-12)
  assert got["f1"] == pytest.approx(ref["f1"], abs=1e-12)
  # Exact: Eiffel, apple/pear, theater, 1000 men, Super Bowl 50, northeast, and the two that normalize to "" on
  # both sides ("the the the", "A A a"), which F1 scores 0 (no shared token).
  assert got["exact_match"] == pytest.approx(80.0)
  # F1 by hand: 6 exact non-empty answers, Broncos 2 * (1/2 * 1) / (3/2) = 2/3, the rest 0.
  assert got["f1"] == pytest.approx(100 * (6 + 2 / 3) / 10)
  one = M.squad_metrics(predictions=["denver broncos"], references=["Broncos"])  # a string is one gold answer
  assert one["f1"] == pytest.approx(100 * 2 / 3)


# ---- generation ------------------------------------------------------------------------------------------------------
def test_bleu_and_chrf_of_identical_text_are_100():
  hyps = ["the cat sat on the mat .", "a quick brown fox jumps", "hello world , again and again"]
  got = M.generation_metrics(predictions=hyps, references=hyps)
  assert got["bleu"] == pytest.approx(100.0) and got["chrf"] == pytest.approx(100.0)
  # Several references, not the same number for each: matching any one of them is perfect.
  refs = [["something else entirely here", hyps[0]], [hyps[1]], ["no", "nope", hyps[2]]]
  got = M.generation_metrics(predictions=hyps, references=refs)
  assert got["bleu"] == pytest.approx(100.0) and got["chrf"] == pytest.approx(100.0)
  assert M.chrf(predictions=["abc"], references=["xyz"]) == 0.0


def test_generation_accuracy_is_the_share_of_exact_matches_with_any_reference():
  got = M.generation_metrics(predictions=["positive ", "negative", "positive"],
                             references=[["positive"], ["neutral", "negative"], "negative"])
  assert got["accuracy"] == pytest.approx(2 / 3)


def test_bleu_equals_the_hand_computed_corpus_value_without_smoothing():
  hyps = ["a b c d e", "the cat sat on the mat"]
  refs = ["a b c d e", "the cat sat on a red mat"]
  # Clipped n-gram matches / hypothesis n-grams, summed over the corpus:
  # 1-grams (5 + 5) / (5 + 6), 2-grams (4 + 3) / (4 + 5), 3-grams (3 + 2) / (3 + 4), 4-grams (2 + 1) / (2 + 3).
  precisions = [10 / 11, 7 / 9, 5 / 7, 3 / 5]
  brevity = math.exp(1 - 12 / 11)  # hypothesis 11 tokens, reference 12
  expected = 100 * brevity * math.exp(sum(map(math.log, precisions)) / 4)
  assert M.bleu(predictions=hyps, references=refs, smooth_method="none") == pytest.approx(expected, abs=1e-9)
  single = 100 * (5 / 6 * 3 / 5 * 1 / 2 * 1 / 3) ** 0.25  # same length, so no brevity penalty
  assert M.bleu(predictions=hyps[1:], references=["the cat sat on a mat"],
                smooth_method="none") == pytest.approx(single)
