"""Scaling-law fits (train/selection/scaling.py): recovery of a known L(N, D) from synthetic points with bootstrap
intervals that hold the truth, the closed-form compute-optimal allocation against brute force, errors naming the bad
argument, the PNG, and the (N, D, loss) points read off two tiny real runs."""
import json

import numpy as np
import pytest

from train.selection import scaling

TRUTH = dict(E=1.7, A=400.0, B=410.0, alpha=0.34, beta=0.28)


def synthetic(noise: float, seed: int = 0):
  """A 5 x 5 grid of N in [1e6, 1e9] and D in [1e8, 1e11] on TRUTH's law, with multiplicative log-normal noise."""
  n, d = (g.ravel() for g in np.meshgrid(np.logspace(6, 9, 5), np.logspace(8, 11, 5), indexing='ij'))
  t = TRUTH
  loss = t['E'] + t['A'] / n ** t['alpha'] + t['B'] / d ** t['beta']
  return n, d, loss * np.exp(np.random.default_rng(seed).normal(0.0, noise, loss.shape))


@pytest.fixture(scope='module')
def noisy():
  n, d, loss = synthetic(0.005)
  return scaling.fit(n, d, loss, bootstrap=200, seed=0), (n, d, loss)


def test_fit_recovers_known_law_with_intervals_and_plot(noisy, tmp_path):
  f, (n, d, loss) = noisy
  print(f'\n{f.summary(budget=1e21)}')  # pytest -s: the numbers for the closing note
  assert abs(f.alpha - 0.34) < 0.03 and abs(f.beta - 0.28) < 0.03, (f.alpha, f.beta)
  assert abs(f.E - 1.7) < 0.1 and abs(np.log(f.A / 400)) < 0.3 and abs(np.log(f.B / 410)) < 0.3, f
  assert f.n_points == 25 and len(f.samples) == 200 and f.huber_loss > 0
  for k, v in TRUTH.items():
    lo, hi = f.intervals[k]
    assert lo <= v <= hi, (k, lo, v, hi)
    assert lo <= getattr(f, k) <= hi, (k, lo, getattr(f, k), hi)
  lo, hi = f.intervals['n_exponent']
  assert lo < 0.28 / 0.62 < hi
  # JSON-shaped, and back.
  back = scaling.Fit.from_dict(json.loads(json.dumps(f.to_dict())))
  assert back == f and np.allclose(back.samples, f.samples)
  assert np.isclose(back.compute_optimal_interval(1e21)[0][0], f.compute_optimal_interval(1e21)[0][0])

  png = scaling.plot(f, n, d, loss, str(tmp_path / 'fit.png'), budget=1e21)
  data = open(png, 'rb').read()
  assert data[:8] == b'\x89PNG\r\n\x1a\n' and len(data) > 30_000, len(data)


def test_fit_without_noise_is_exact():
  f = scaling.fit(*synthetic(0.0), bootstrap=0)
  for k, v in TRUTH.items():
    assert abs(getattr(f, k) / v - 1) < 1e-5, (k, getattr(f, k))
  assert f.intervals == {} and f.huber_loss < 1e-15
  with pytest.raises(ValueError, match='bootstrap=200'):
    f.compute_optimal_interval(1e21)
  assert 'alpha = 0.340' in f.summary(budget=1e20)


def test_compute_optimal_matches_brute_force(noisy):
  f, _ = noisy
  grid = np.geomspace(1e4, 1e15, 200_001)  # 1.3e-4 in log N a step
  for c in (1e17, 1e21, 1e25):
    n_opt, d_opt = f.compute_optimal(c)
    brute = grid[np.argmin(f.predict(grid, c / (6 * grid)))]
    assert abs(n_opt / brute - 1) < 0.02, (c, n_opt, brute)
    assert np.isclose(6 * n_opt * d_opt, c)
    (n_lo, n_hi), (d_lo, d_hi) = f.compute_optimal_interval(c)
    assert n_lo < n_opt < n_hi and d_lo < d_opt < d_hi
  n_many, d_many = f.compute_optimal(np.array([1e17, 1e21]))
  assert n_many.shape == (2,) and np.isclose(n_many[1], f.compute_optimal(1e21)[0])
  (lo, hi), _ = f.compute_optimal_interval(np.array([1e17, 1e21]))
  assert lo.shape == (2,) and np.all(lo < hi)


@pytest.mark.parametrize('change, match', [
    (lambda n, d, l: (n[:-1], d, l), 'one value per point'),
    (lambda n, d, l: (n, np.where(np.arange(25) == 3, 0.0, d), l), r'd\[3\] = 0'),
    (lambda n, d, l: (-n, d, l), r'n\[0\] = -1e\+06'),
    (lambda n, d, l: (n, d, np.where(np.arange(25) == 2, np.nan, l)), r'loss\[2\] is nan'),
    (lambda n, d, l: (n[:4], d[:4], l[:4]), 'fewer than the 5 parameters'),
    (lambda n, d, l: (np.full(25, 1e6), d, l), 'n: every point has the same value'),
    (lambda n, d, l: (n.reshape(5, 5), d, l), 'n: expected a 1-D'),
    (lambda n, d, l: (n, d, ['a'] * 25), 'loss: expected a sequence of numbers'),
])
def test_bad_points_name_the_argument(change, match):
  with pytest.raises(ValueError, match=match):
    scaling.fit(*change(*synthetic(0.0)), bootstrap=0)


def test_bad_options_name_the_argument():
  pts = synthetic(0.0)
  for kw, match in ((dict(delta=0), 'delta:'), (dict(bootstrap=-1), 'bootstrap:'), (dict(refine=0), 'refine:'),
                    (dict(starts={'a': [0]}), 'starts:'), (dict(starts=np.zeros((2, 4))), 'starts:')):
    with pytest.raises(ValueError, match=match):
      scaling.fit(*pts, **{'bootstrap': 0, **kw})
  f = scaling.fit(*pts, bootstrap=0, starts=[[6, 6, 0.5, 0.3, 0.3]])  # one explicit start is enough here
  assert abs(f.alpha - 0.34) < 1e-4
  with pytest.raises(ValueError, match='flops:'):
    f.compute_optimal(-1.0)


def test_points_from_runs_reads_tokens_and_final_eval_loss(tmp_path):
  from configs import gpt
  from train.core import trainer

  runs = []
  for name, steps, layers in (('a', 4, 2), ('b', 6, 1)):
    c = gpt.get_config('runlocal')
    c.data.vocab_size, c.data.tokenizer_train_records = 300, 300
    c.data.seq_len, c.data.batch_size = 32, 4
    c.model.overrides.num_layers = layers
    c.train.steps = c.train.log_every = c.train.checkpoint_every = steps
    c.train.eval_every, c.train.eval_steps = 0, 1
    c.optim.warmup_steps = 1
    summary = trainer.train_and_evaluate(c, str(tmp_path / name), log=lambda m: None)
    runs.append((str(tmp_path / name), summary, steps))
  n, d, loss = scaling.points_from_runs([w for w, _, _ in runs])
  n_total, _, _ = scaling.points_from_runs([w for w, _, _ in runs], params='total')
  for i, (w, summary, steps) in enumerate(runs):
    model = json.load(open(f'{w}/config.json'))['model']
    assert d[i] == steps * 4 * 32
    assert loss[i] == summary['eval']['loss']
    assert n_total[i] == summary['params']
    # gpt2: tied token table and learned positions are the embeddings.
    assert n[i] == summary['params'] - (model['vocab_size'] + model['max_len']) * model['d_model']
  assert n[0] > n[1]
  with pytest.raises(ValueError, match="params: 'non_embedding'"):
    scaling.points_from_runs(runs[0][0], params='some')
  with pytest.raises(FileNotFoundError, match='config.json'):
    scaling.points_from_runs([str(tmp_path / 'missing')])


def test_objective_gradient_matches_finite_differences():
  n, d, loss = synthetic(0.02, seed=3)
  data = (np.log(n), np.log(d), np.log(loss), 1e-3)
  for theta in ([6.0, 6.5, 0.5, 0.35, 0.3], [2.0, 9.0, -0.5, 0.1, 0.6]):
    theta = np.array(theta)
    _, grad = scaling._objective(theta, *data)
    eps = 1e-7
    num = [(scaling._objective(theta + eps * e, *data)[0] - scaling._objective(theta - eps * e, *data)[0]) / (2 * eps)
           for e in np.eye(5)]
    assert np.allclose(grad, num, rtol=1e-4, atol=1e-9), (grad, num)
