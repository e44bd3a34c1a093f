"""Few-shot subsets of a labeled training set, as LM-BFF (Gao et al. 2021) draws them: k records per class for training
and a dev subset of the same size per class drawn from the rest of the training records, never from the real dev set,
so that model selection sees no more labels than training does. Results are then reported as mean ± std over several
seeds (train/sweep.py), since with k = 16 the draw of the examples moves accuracy by several points.

The draw is a pure function of (records, k, dev_k, seed): labels are visited in sorted order and each one's records are
permuted by one `np.random.default_rng(seed)`; the first k of a permutation go to training and the next dev_k to dev.
Both subsets come back ordered by label, then by draw (the training loader shuffles them with the run's own seed).
"""
from __future__ import annotations

import collections
from typing import Any, Mapping, Optional, Sequence

import numpy as np

Record = Mapping[str, Any]


def per_label_counts(records: Sequence[Record], *, label_key: str = 'label') -> dict[str, int]:
  """{label: how many records carry it}, labels sorted: what a few-shot draw can take from."""
  counts = collections.Counter(str(r[label_key]) for r in records)
  return dict(sorted(counts.items()))


def _check_sizes(k, dev_k):
  for name, value, low in (('k', k, 1), ('dev_k', dev_k, 0)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise ValueError(f'few-shot sampling: {name}={value!r} must be an integer >= {low} '
                       f'(config.data.few_shot_{name}).')


def _by_label(records, label_key, labels):
  groups = {str(label): [] for label in labels or ()}
  for i, r in enumerate(records):
    groups.setdefault(str(r[label_key]), []).append(i)
  return dict(sorted(groups.items()))


def sample(records: Sequence[Record], *, k: int, seed: int, label_key: str = 'label', dev_k: Optional[int] = None,
           labels: Optional[Sequence[str]] = None) -> tuple[list, list]:
  """(train subset, dev subset): k and dev_k (default k) records per label, disjoint, drawn without replacement.

  `labels` are the classes every draw must cover (a run's label names, which may include a class absent from these
  records); by default those found in the records. A label with fewer than k + dev_k records is a ValueError naming it,
  its count and the fix: a draw of fewer would silently change the k the results are reported for.
  """
  dev_k = k if dev_k is None else dev_k
  _check_sizes(k, dev_k)
  groups = _by_label(records, label_key, labels)
  short = {label: len(idx) for label, idx in groups.items() if len(idx) < k + dev_k}
  if short:
    label, n = next(iter(short.items()))
    others = f' (and {len(short) - 1} other label(s))' if len(short) > 1 else ''
    raise ValueError(f'few-shot sampling: label {label!r} has {n} training record(s){others}, fewer than k={k} + '
                     f'dev_k={dev_k} = {k + dev_k}; lower config.data.few_shot_k or config.data.few_shot_dev_k '
                     '(0: no dev subset, the run evaluates on data.dev), or give more training records of that label.')
  rng = np.random.default_rng(seed)
  train, dev = [], []
  for idx in groups.values():
    drawn = [idx[j] for j in rng.permutation(len(idx))[:k + dev_k]]
    train += [records[i] for i in drawn[:k]]
    dev += [records[i] for i in drawn[k:]]
  return train, dev
