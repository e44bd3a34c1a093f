"""How sure a leaderboard can be: intervals, the trivial baseline and paired significance over dev predictions.

Every function takes per-example correctness (a [seeds, N] or [N] array of 0/1 for the same N dev examples in the
same order) and is pure numpy with an explicit seed, so a report is the same every time it is written. Accuracy is the
mean correctness; an interval is a 95% percentile bootstrap over dev examples (the seeds' correctness averaged per
example first), or, with three or more seeds, Student's t over the seeds' accuracies (what varies between fine-tuning
runs). A candidate "did not learn" when its interval reaches down to the majority-class baseline.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np
from scipy import stats as scipy_stats


def _per_example(correct) -> np.ndarray:
  """[seeds, N] or [N] correctness -> [N] mean over seeds, float64."""
  c = np.asarray(correct, np.float64)
  return c.mean(0) if c.ndim == 2 else c


def bootstrap_interval(correct, *, samples: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
  """The percentile bootstrap interval of mean correctness, resampling dev examples (scipy.stats.bootstrap)."""
  x = _per_example(correct)
  if np.all(x == x[0]):  # no spread to resample: the interval is the point
    return float(x[0]), float(x[0])
  res = scipy_stats.bootstrap((x,), np.mean, n_resamples=samples, confidence_level=level, method='percentile',
                              rng=np.random.default_rng(seed))
  return float(res.confidence_interval.low), float(res.confidence_interval.high)


def seed_interval(accuracies: Sequence[float], level: float = 0.95) -> tuple[float, float]:
  """mean +- t * std / sqrt(n) over the seeds' accuracies (n >= 2; Student's t with n - 1 degrees of freedom)."""
  a = np.asarray(accuracies, np.float64)
  n = len(a)
  half = scipy_stats.t.ppf(0.5 + level / 2, n - 1) * a.std(ddof=1) / np.sqrt(n)
  return float(a.mean() - half), float(a.mean() + half)


def interval(correct) -> tuple[tuple[float, float], str]:
  """(low, high) and how it was made: over seeds with >= 3 of them, else bootstrap over the dev examples."""
  c = np.asarray(correct, np.float64)
  if c.ndim == 2 and c.shape[0] >= 3:
    return seed_interval(c.mean(1)), f't over {c.shape[0]} seeds'
  return bootstrap_interval(c), 'bootstrap over dev examples'


def paired_bootstrap(a, b, *, samples: int = 2000, seed: int = 0) -> tuple[float, float]:
  """(mean accuracy difference a - b, two-sided p-value) from resampling the dev examples both were scored on
  (Koehn 2004's paired bootstrap): p = 2 x the share of resamples in which the sign of the difference flips."""
  x, y = _per_example(a), _per_example(b)
  if x.shape != y.shape:
    raise ValueError(f'paired bootstrap needs predictions on the same dev examples; got {len(x)} and {len(y)}.')
  d = x - y
  idx = np.random.default_rng(seed).integers(0, len(d), size=(samples, len(d)))
  diffs = d[idx].mean(1)
  observed = float(d.mean())
  flips = np.mean(diffs <= 0) if observed > 0 else np.mean(diffs >= 0)
  return observed, float(min(1.0, 2 * flips))


def majority_share(labels: Sequence) -> tuple[float, str]:
  """(share of the most frequent label, that label): the accuracy of always predicting it, on these labels."""
  values, counts = np.unique(np.asarray([str(v) for v in labels]), return_counts=True)
  return float(counts.max() / counts.sum()), str(values[counts.argmax()])


def resolution(n: int, accuracy: float) -> float:
  """The smallest accuracy difference two models scored on the same n examples can show at 95% when their errors are
  independent: 1.96 * sqrt(2 p (1 - p) / n). A dev set resolves gaps above it, not below."""
  p = min(max(accuracy, 1.0 / n), 1 - 1.0 / n)
  return float(1.96 * np.sqrt(2 * p * (1 - p) / n))


@dataclasses.dataclass(frozen=True)
class Verdict:
  """One candidate's dev accuracy with its noise, against the baseline."""
  accuracy: float
  low: float
  high: float
  how: str
  learned: bool


def verdict(correct, baseline: float) -> Verdict:
  """Mean accuracy, its 95% interval, and whether it is above the baseline beyond noise (interval above it)."""
  (low, high), how = interval(correct)
  acc = float(_per_example(correct).mean())
  return Verdict(acc, low, high, how, learned=low > baseline)


def top_two_line(names: Sequence[str], correct: dict, metric: str = 'accuracy') -> Optional[str]:
  """The significance line for the two best learned candidates (names best first), or None with fewer than two."""
  if len(names) < 2:
    return None
  first, second = names[0], names[1]
  diff, p = paired_bootstrap(correct[first], correct[second])
  n = len(_per_example(correct[first]))
  if p < 0.05:
    return (f'{first} is ahead of {second} by {100 * diff:.1f} points of {metric}, significant (paired bootstrap over '
            f'the {n} dev examples, p = {p:.3f}).')
  return (f'{first} and {second} do not differ significantly ({100 * diff:+.1f} points, paired bootstrap over the '
          f'{n} dev examples, p = {p:.2f}): their order is within noise.')
