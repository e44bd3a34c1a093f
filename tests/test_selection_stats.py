"""The leaderboard's honesty on hand-made predictions: intervals cover what they should, a model at the majority class
"did not learn", the paired bootstrap separates a real gap from noise, and the dev set's resolution is the textbook
formula."""
import numpy as np
import pytest

from train.selection import stats


def _correct(n, accuracy, seed):
  rng = np.random.default_rng(seed)
  c = np.zeros(n)
  c[rng.permutation(n)[:int(round(accuracy * n))]] = 1
  return c


def test_bootstrap_interval_holds_the_mean_and_narrows_as_the_dev_set_grows():
  small, large = _correct(100, 0.7, 0), _correct(2500, 0.7, 0)
  lo_s, hi_s = stats.bootstrap_interval(small)
  lo_l, hi_l = stats.bootstrap_interval(large)
  assert lo_s < 0.7 < hi_s and lo_l < 0.7 < hi_l
  # The normal approximation's half-width, 1.96 sqrt(p(1-p)/n), within 20%.
  for n, (lo, hi) in ((100, (lo_s, hi_s)), (2500, (lo_l, hi_l))):
    assert (hi - lo) / 2 == pytest.approx(1.96 * np.sqrt(0.21 / n), rel=0.2)
  assert stats.bootstrap_interval(np.ones(50)) == (1.0, 1.0)
  # The same seed gives the same interval: a report written twice reads the same.
  assert stats.bootstrap_interval(small) == (lo_s, hi_s)


def test_seed_interval_is_students_t():
  acc = [0.70, 0.74, 0.72]
  lo, hi = stats.seed_interval(acc)
  half = 4.302652729911275 * np.std(acc, ddof=1) / np.sqrt(3)  # t(0.975, 2 degrees of freedom)
  assert (lo, hi) == (pytest.approx(0.72 - half), pytest.approx(0.72 + half))
  # Three or more seeds: the interval is over seeds; fewer: over dev examples.
  rows = np.stack([_correct(200, a, k) for k, a in enumerate(acc)])
  assert stats.interval(rows)[1] == 't over 3 seeds'
  assert stats.interval(rows[:2])[1] == 'bootstrap over dev examples'


def test_a_model_at_the_majority_class_did_not_learn_and_a_good_one_did():
  labels = ['pos'] * 60 + ['neg'] * 40
  share, label = stats.majority_share(labels)
  assert (share, label) == (0.6, 'pos')
  always_pos = np.array([1.0] * 60 + [0.0] * 40)
  assert not stats.verdict(always_pos, share).learned
  slightly_better = always_pos.copy()
  slightly_better[60:63] = 1  # 0.63: within noise of 0.60 on 100 examples
  assert not stats.verdict(slightly_better, share).learned
  good = _correct(100, 0.85, 3)
  v = stats.verdict(good, share)
  assert v.learned and v.low > 0.6 and v.accuracy == pytest.approx(0.85)


def test_paired_bootstrap_tells_a_real_gap_from_noise():
  rng = np.random.default_rng(4)
  a = (rng.random(400) < 0.75).astype(float)
  b = a.copy()
  flip = rng.permutation(400)[:60]
  b[flip] = 0  # b is a with 60 answers more wrong, never more right: a real gap
  diff, p = stats.paired_bootstrap(a, b)
  assert diff == pytest.approx((a - b).mean()) and p < 0.01
  diff, p = stats.paired_bootstrap(a, a)
  assert diff == 0 and p == 1.0
  # Two models that disagree on 10 examples, 6-4: not significant.
  c = a.copy()
  wrong = np.flatnonzero(a == 1)[:4]
  right = np.flatnonzero(a == 0)[:6]
  c[wrong], c[right] = 0, 1
  assert stats.paired_bootstrap(c, a)[1] > 0.05
  line = stats.top_two_line(['c', 'a'], {'c': c, 'a': a})
  assert 'do not differ significantly' in line
  assert 'significant' in stats.top_two_line(['a', 'b'], {'a': a, 'b': b})
  with pytest.raises(ValueError, match='same dev examples'):
    stats.paired_bootstrap(a, a[:10])


def test_resolution_is_the_two_proportion_formula():
  assert stats.resolution(872, 0.8) == pytest.approx(1.96 * np.sqrt(2 * 0.8 * 0.2 / 872))
  assert stats.resolution(212, 0.5) > stats.resolution(872, 0.5)
