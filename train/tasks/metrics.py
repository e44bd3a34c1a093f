"""Downstream-task metrics computed on the host with numpy, each a pure keyword-only function of predictions and
references that returns a dict of named floats: classification (accuracy, macro-F1, positive-class F1), token tagging
(entity-level precision / recall / F1 by `seqeval` under the conlleval rules, plus `word_tags` to turn per-sub-word
predictions back into per-word tag names), extractive QA (exact match and F1 exactly as the official SQuAD v1.1
evaluate script) and generation (BLEU and chrF by `sacrebleu`). Every score is in the unit of the reference tool it
reproduces, so numbers compare directly with published ones: classification and tagging as fractions in [0, 1]
(scikit-learn, seqeval), QA, BLEU and chrF as percentages in [0, 100] (the SQuAD script, sacrebleu)."""
from __future__ import annotations

import collections
import re
import string
from collections.abc import Sequence

import numpy as np


def _check_lengths(predictions: Sequence, references: Sequence, what: str) -> None:
  if len(predictions) != len(references):
    raise ValueError(f"{what}: {len(predictions)} predictions but {len(references)} references; pass one prediction "
                     "per reference, in the same order")
  if not len(predictions):
    raise ValueError(f"{what}: no predictions to score")


# ---- classification --------------------------------------------------------------------------------------------------
def classification_metrics(*, predictions: Sequence[int] | np.ndarray, references: Sequence[int] | np.ndarray,
                           num_classes: int | None = None, positive_label: int = 1) -> dict[str, float]:
  """Accuracy and macro-F1 of class ids (int [N] each); with two classes also "f1", the F1 of `positive_label`
    (the GLUE MRPC/QQP convention). Predictions may be logits [N, K] (argmax is taken).

    Macro-F1 averages the per-class F1 over the classes 0..num_classes-1, or when num_classes is None over the
    classes that occur in predictions or references (scikit-learn's f1_score(average="macro")); a class with no true
    positive has F1 0. Returns {"accuracy", "macro_f1"} (+ "f1" for two classes), fractions in [0, 1]."""
  pred = np.asarray(predictions)
  ref = np.asarray(references).astype(np.int64)
  if pred.ndim == ref.ndim + 1:
    pred = pred.argmax(-1)
  pred = pred.astype(np.int64)
  _check_lengths(pred, ref, "classification_metrics")
  if pred.shape != ref.shape:
    raise ValueError(f"classification_metrics: predictions have shape {pred.shape}, references {ref.shape}")
  classes = np.arange(num_classes) if num_classes is not None else np.union1d(pred, ref)
  tp = np.array([np.sum((pred == c) & (ref == c)) for c in classes], np.float64)
  n_pred = np.array([np.sum(pred == c) for c in classes], np.float64)
  n_ref = np.array([np.sum(ref == c) for c in classes], np.float64)
  # F1 = 2 tp / (#pred + #ref); 0 where the class never occurs (tp is 0 there too).
  f1 = np.divide(2 * tp, n_pred + n_ref, out=np.zeros_like(tp), where=(n_pred + n_ref) > 0)
  out = {"accuracy": float(np.mean(pred == ref)), "macro_f1": float(f1.mean())}
  if len(classes) == 2 or num_classes == 2:
    pos = np.flatnonzero(classes == positive_label)
    out["f1"] = float(f1[pos[0]]) if len(pos) else 0.0
  return out


# ---- token tagging (NER) ---------------------------------------------------------------------------------------------
def word_tags(*, predictions: np.ndarray, tag_weights: np.ndarray, tag_names: Sequence[str],
              num_words: Sequence[int] | np.ndarray | None = None, fill: str = "O") -> list[list[str]]:
  """Per-sub-word tag predictions -> per-word tag names, reading the tag of each word off its first sub-word (the
    positions where tag_weights > 0, the `Tagging` example convention).

    predictions: int [B, T] tag ids, or scores [B, T, K] (argmax is taken); tag_weights [B, T]; num_words [B]: the
    number of words of each reference sentence, so that words cut off by truncation come back as `fill` and every
    sequence lines up with its reference (without it each row has as many tags as weighted positions). Passing the
    batch's `tag_labels` as predictions gives the references' tag names the same way."""
  pred = np.asarray(predictions)
  weights = np.asarray(tag_weights)
  if pred.ndim == weights.ndim + 1:
    pred = pred.argmax(-1)
  if pred.shape != weights.shape or pred.ndim != 2:
    raise ValueError(f"word_tags: predictions {pred.shape} and tag_weights {weights.shape} must both be [B, T]")
  names = list(tag_names)
  out = []
  for b in range(len(pred)):
    ids = pred[b][weights[b] > 0]
    if len(ids) and (ids.min() < 0 or ids.max() >= len(names)):
      raise ValueError(f"word_tags: row {b} has tag id {int(ids.max())} outside the {len(names)} tag_names")
    tags = [names[i] for i in ids]
    if num_words is not None:
      n = int(num_words[b])
      if n < len(tags):
        raise ValueError(f"word_tags: row {b} has {len(tags)} labeled sub-words but num_words says {n} words; "
                         "num_words must count the words of the reference sentence")
      tags += [fill] * (n - len(tags))
    out.append(tags)
  return out


def tagging_metrics(*, predictions: Sequence[Sequence[str]], references: Sequence[Sequence[str]], strict: bool = False,
                    by_type: bool = False) -> dict[str, float]:
  """Entity-level precision, recall and F1 (micro-averaged over entities) of BIO/IOB2 tag-name sequences, by
    seqeval: the default conlleval rules (an I- tag after O or another type starts an entity, as conlleval.pl) or,
    with strict, seqeval's strict IOB2 mode (such a broken entity does not count). Also token-level "accuracy".
    by_type adds "f1_<TYPE>" per entity type. Fractions in [0, 1]."""
  from seqeval import metrics as sm
  from seqeval.scheme import IOB2
  _check_lengths(predictions, references, "tagging_metrics")
  y_pred, y_true = [list(p) for p in predictions], [list(r) for r in references]
  for i, (p, r) in enumerate(zip(y_pred, y_true)):
    if len(p) != len(r):
      raise ValueError(f"tagging_metrics: sentence {i} has {len(p)} predicted tags but {len(r)} reference tags; "
                       "use word_tags(..., num_words=...) to pad truncated sentences")
  kw = {"mode": "strict", "scheme": IOB2} if strict else {}
  out = {
      "precision": float(sm.precision_score(y_true, y_pred, zero_division=0, **kw)),
      "recall": float(sm.recall_score(y_true, y_pred, zero_division=0, **kw)),
      "f1": float(sm.f1_score(y_true, y_pred, zero_division=0, **kw)),
      "accuracy": float(sm.accuracy_score(y_true, y_pred)),
  }
  if by_type:
    report = sm.classification_report(y_true, y_pred, output_dict=True, zero_division=0, **kw)
    out.update({f"f1_{k}": float(v["f1-score"]) for k, v in report.items() if not k.endswith(" avg")})
  return out


# ---- extractive QA (SQuAD v1.1) --------------------------------------------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
  """SQuAD v1.1's normalize_answer: lower case, drop ASCII punctuation, the articles a/an/the, and extra whitespace
    (in the script's order: lower, punctuation, articles, whitespace)."""
  s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
  return " ".join(_ARTICLES.sub(" ", s).split())


def squad_f1(prediction: str, ground_truth: str) -> float:
  """Bag-of-tokens F1 of two normalized answers (in [0, 1]; 0 when they share no token, also when both are empty)."""
  pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
  same = sum((collections.Counter(pred) & collections.Counter(gold)).values())
  if same == 0:
    return 0.0
  precision, recall = same / len(pred), same / len(gold)
  return 2 * precision * recall / (precision + recall)


def squad_exact_match(prediction: str, ground_truth: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def squad_metrics(*, predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
  """SQuAD v1.1 "exact_match" and "f1": per question the max over its gold answers, averaged over questions, as
    percentages in [0, 100] (the official evaluate-v1.1.py). references[i]: the gold answer texts of question i
    (a single string is one answer)."""
  _check_lengths(predictions, references, "squad_metrics")
  em = f1 = 0.0
  for i, (pred, golds) in enumerate(zip(predictions, references)):
    golds = [golds] if isinstance(golds, str) else list(golds)
    if not golds:
      raise ValueError(f"squad_metrics: question {i} has no gold answers (SQuAD v1.1 scoring needs at least one)")
    em += max(squad_exact_match(pred, g) for g in golds)
    f1 += max(squad_f1(pred, g) for g in golds)
  n = len(predictions)
  return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


# ---- generation ------------------------------------------------------------------------------------------------------
def _reference_streams(references: Sequence[Sequence[str] | str]) -> list[list[str | None]]:
  """Per-hypothesis reference lists -> sacrebleu's streams (stream k = the k-th reference of every hypothesis; None
    where a hypothesis has fewer references)."""
  refs = [[r] if isinstance(r, str) else list(r) for r in references]
  for i, r in enumerate(refs):
    if not r:
      raise ValueError(f"generation metrics: prediction {i} has no reference")
  k = max(map(len, refs))
  return [[r[j] if j < len(r) else None for r in refs] for j in range(k)]


def bleu(*, predictions: Sequence[str], references: Sequence[Sequence[str] | str], smooth_method: str = "exp",
         tokenize: str = "13a", lowercase: bool = False) -> float:
  """Corpus BLEU (sacrebleu.corpus_bleu, its defaults: 13a tokenization, exp smoothing), in [0, 100].
    references[i]: the reference(s) of prediction i."""
  import sacrebleu
  _check_lengths(predictions, references, "bleu")
  return float(
      sacrebleu.corpus_bleu(list(predictions), _reference_streams(references), smooth_method=smooth_method,
                            tokenize=tokenize, lowercase=lowercase).score)


def chrf(*, predictions: Sequence[str], references: Sequence[Sequence[str] | str], word_order: int = 0) -> float:
  """Corpus chrF (sacrebleu.corpus_chrf: character 6-grams, beta 2; word_order=2 gives chrF++), in [0, 100]."""
  import sacrebleu
  _check_lengths(predictions, references, "chrf")
  return float(sacrebleu.corpus_chrf(list(predictions), _reference_streams(references), word_order=word_order).score)


def generation_metrics(*, predictions: Sequence[str], references: Sequence[Sequence[str] | str]) -> dict[str, float]:
  """{"bleu", "chrf"} of detokenized predictions against their reference(s), sacrebleu defaults, in [0, 100], and
    "accuracy": the fraction of predictions equal to a reference after stripping whitespace (exact match, as T5 scores
    a classification task trained as text-to-text), in [0, 1]."""
  refs = [[r] if isinstance(r, str) else list(r) for r in references]
  exact = [p.strip() in {r.strip() for r in rs} for p, rs in zip(predictions, refs)]
  return {
      "bleu": bleu(predictions=predictions, references=references),
      "chrf": chrf(predictions=predictions, references=references),
      "accuracy": float(np.mean(exact)) if exact else 0.0,
  }
