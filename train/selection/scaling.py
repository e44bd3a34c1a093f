"""Scaling-law fits: L(N, D) = E + A/N^alpha + B/D^beta fitted to (model size, tokens, loss) points as Hoffmann et al.
2022 (approach 3) and the Besiroglu et al. 2024 replication do (log-space logsumexp model, Huber loss with delta 1e-3,
L-BFGS from a grid of starts, the best kept), with percentile bootstrap intervals for the five parameters and for the
compute-optimal allocation under C = 6ND; `plot` draws the fit, `points_from_runs` reads the points off lmlab run
workdirs (N non-embedding by default, D = steps x batch x tokens per example, loss = the final eval loss).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
from typing import Any, Iterable, Mapping, Optional

import numpy as np
from scipy import optimize

PARAMS = ('E', 'A', 'B', 'alpha', 'beta')
THETA = ('a', 'b', 'e', 'alpha', 'beta')  # what L-BFGS moves: a = log A, b = log B, e = log E
# Hoffmann et al. / Besiroglu et al.'s grid of starting points: 6 x 6 x 6 x 5 x 5 = 5400 starts.
HOFFMANN_GRID = {
    'a': np.arange(0., 30., 5.),
    'b': np.arange(0., 30., 5.),
    'e': np.arange(-1., 2., .5),
    'alpha': np.arange(0., 2.5, .5),
    'beta': np.arange(0., 2.5, .5)
}
REFINE = 16  # L-BFGS runs from this many of the best grid starts (None: from every start, as the papers do)
BOOT_STARTS = 1  # a bootstrap refit starts from the full fit's optimum and its resample's best grid start
MIN_POINTS = len(PARAMS)
_LBFGS = dict(maxiter=2000, ftol=1e-15, gtol=1e-12)  # the Huber values are ~1e-6 a point: scipy's defaults stop early

# ------------------------------------------------------------------------------------------------ the objective


def _huber(r, delta):
  a = np.abs(r)
  return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _objective(theta, ln, ld, y, delta):
  """Sum of Huber(logsumexp(a - alpha log N, b - beta log D, e) - log L) and its gradient in THETA order."""
  a, b, e, alpha, beta = theta
  z = np.stack([a - alpha * ln, b - beta * ld, np.full_like(ln, e)])  # (3, points)
  m = z.max(0)
  w = np.exp(z - m)
  s = w.sum(0)
  r = m + np.log(s) - y
  w /= s  # d logsumexp / dz
  psi = np.clip(r, -delta, delta)  # Huber'(r)
  grad = np.array([psi @ w[0], psi @ w[1], psi @ w[2], -(psi * w[0]) @ ln, -(psi * w[1]) @ ld])
  return float(_huber(r, delta).sum()), grad


def _grid_scores(grid, ln, ld, y, delta, chunk=1024):
  """The objective at every grid row (k, 5), vectorized in chunks: ranking 5400 starts costs milliseconds."""
  out = []
  for g in np.array_split(grid, max(1, math.ceil(len(grid) / chunk))):
    z = np.stack([g[:, :1] - g[:, 3:4] * ln, g[:, 1:2] - g[:, 4:5] * ld, np.broadcast_to(g[:, 2:3], (len(g), len(ln)))])
    m = z.max(0)
    out.append(_huber(m + np.log(np.exp(z - m).sum(0)) - y, delta).sum(1))
  return np.concatenate(out)


def _one_blas_thread():
  """scipy's L-BFGS-B calls BLAS on 10 x 10 matrices: threaded OpenBLAS made each run ~7x slower here on 2 busy
  cores, so the fit holds BLAS to one thread (threadpoolctl, when installed; it comes with scikit-learn)."""
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    return contextlib.nullcontext()
  return threadpool_limits(1, user_api='blas')


def _lbfgs(theta0, data):
  res = optimize.minimize(_objective, theta0, args=data, jac=True, method='L-BFGS-B', options=_LBFGS)
  return float(res.fun), res.x


def _best(data, grid, refine, extra=()):
  """(objective, theta): L-BFGS from the `refine` best grid rows (every row if None) and from `extra`; the best."""
  if refine is not None and refine < len(grid):
    grid = grid[np.argsort(_grid_scores(grid, *data), kind='stable')[:refine]]
  best = (math.inf, None)
  for theta0 in itertools.chain(extra, grid):
    fun, x = _lbfgs(np.asarray(theta0, float), data)
    if np.isfinite(fun) and np.all(np.isfinite(x)) and fun < best[0]:
      best = (fun, x)
  return best


def _natural(theta):
  """THETA (a, b, e, alpha, beta) -> PARAMS (E, A, B, alpha, beta), along the last axis."""
  theta = np.asarray(theta, float)
  return np.stack([np.exp(theta[..., 2]), np.exp(theta[..., 0]), np.exp(theta[..., 1]), theta[..., 3], theta[..., 4]],
                  -1)


# --------------------------------------------------------------------------------------------------- checking


def _check_points(n, d, loss):
  """The three columns as float64 vectors, or a ValueError naming the argument, the point and the fix."""
  cols = {}
  for name, v, what in (('n', n, 'parameter counts'), ('d', d, 'token counts'), ('loss', loss, 'losses')):
    try:
      a = np.asarray(v, dtype=float)
    except (TypeError, ValueError):
      raise ValueError(f'{name}: expected a sequence of numbers ({what}), got {type(v).__name__}.') from None
    if a.ndim != 1:
      raise ValueError(f'{name}: expected a 1-D sequence of {what}, got shape {a.shape}; pass one value per run.')
    bad = np.flatnonzero(~np.isfinite(a))
    if bad.size:
      raise ValueError(f'{name}[{bad[0]}] is {a[bad[0]]}: every value must be finite; drop that point (or rerun it).')
    bad = np.flatnonzero(a <= 0)
    if bad.size:
      raise ValueError(f'{name}[{bad[0]}] = {a[bad[0]]:g}: {what} must be > 0 (the fit takes logs); drop that point.')
    cols[name] = a
  lengths = {k: len(v) for k, v in cols.items()}
  if len(set(lengths.values())) > 1:
    raise ValueError(f'n, d and loss must have one value per point each; got lengths {lengths}.')
  if lengths['n'] < MIN_POINTS:
    raise ValueError(f'n, d, loss: {lengths["n"]} points, fewer than the {MIN_POINTS} parameters of L(N, D); '
                     'add runs (several model sizes, each at several token counts).')
  for name, what in (('n', 'model sizes'), ('d', 'token counts')):
    if len(np.unique(cols[name])) < 2:
      raise ValueError(f'{name}: every point has the same value {cols[name][0]:g}; the exponent needs at least 2 '
                       f'distinct {what}.')
  return cols['n'], cols['d'], cols['loss']


def _grid(starts):
  """`starts` -> (k, 5) rows in THETA order: None (Hoffmann's grid), a mapping THETA name -> values (their product),
  or an array of rows."""
  if starts is None:
    starts = HOFFMANN_GRID
  if isinstance(starts, Mapping):
    if set(starts) != set(THETA):
      raise ValueError(f'starts: a grid names exactly {THETA} (a = log A, b = log B, e = log E); got {sorted(starts)}.')
    return np.array(list(itertools.product(*(np.atleast_1d(np.asarray(starts[k], float)) for k in THETA))))
  rows = np.atleast_2d(np.asarray(starts, dtype=float))
  if rows.ndim != 2 or rows.shape[1] != len(THETA) or not len(rows) or not np.all(np.isfinite(rows)):
    raise ValueError(f'starts: expected finite rows of {THETA} (shape (k, 5)) or a mapping of grid values; got shape '
                     f'{rows.shape}.')
  return rows


# ------------------------------------------------------------------------------------------------------ the fit


def _optimal(p, flops):
  """Compute-optimal (N, D) under C = 6ND for PARAMS rows p (..., 5) broadcast against flops; NaN where an exponent is
  not positive."""
  E, A, B, alpha, beta = (p[..., i] for i in range(5))
  with np.errstate(all='ignore'):
    ok = (alpha > 0) & (beta > 0)
    s = np.where(ok, alpha + beta, np.nan)
    g = (alpha * A / (beta * B)) ** (1 / s)
    c = np.asarray(flops, float) / 6
    return g * c ** (beta / s), c ** (alpha / s) / g


def _law(p, n, d):
  """E + A/N^alpha + B/D^beta for PARAMS rows p (..., 5), broadcast."""
  return p[..., 0] + p[..., 1] / np.asarray(n, float) ** p[..., 3] + p[..., 2] / np.asarray(d, float) ** p[..., 4]


def _scalar_or_array(x):
  x = np.asarray(x, float)
  return float(x) if x.ndim == 0 else x


@dataclasses.dataclass(frozen=True)
class Fit:
  """A fitted L(N, D) = E + A/N^alpha + B/D^beta; `intervals` holds percentile 95% bootstrap intervals (empty
  without a bootstrap) for PARAMS and for the compute-optimal exponents n_exponent = beta/(alpha+beta) and
  d_exponent = alpha/(alpha+beta) (N_opt ~ C^n_exponent); `samples` the bootstrap fits as PARAMS rows."""
  E: float
  A: float
  B: float
  alpha: float
  beta: float
  intervals: dict
  n_points: int
  huber_loss: float  # the summed Huber loss of the log residuals at the optimum
  delta: float = 1e-3
  samples: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 5)), repr=False, compare=False)

  @property
  def params(self) -> np.ndarray:
    return np.array([self.E, self.A, self.B, self.alpha, self.beta])

  def predict(self, n, d):
    """The fitted loss at model size n and tokens d (numbers or broadcastable arrays)."""
    return _scalar_or_array(_law(self.params, n, d))

  def compute_optimal(self, flops):
    """(N_opt, D_opt) minimizing the fitted loss under C = 6ND: N_opt = G (C/6)^(beta/(alpha+beta)), D_opt =
    G^-1 (C/6)^(alpha/(alpha+beta)), G = (alpha A / (beta B))^(1/(alpha+beta))."""
    if not (self.alpha > 0 and self.beta > 0):
      raise ValueError(f'compute_optimal: the fitted exponents alpha={self.alpha:.3g}, beta={self.beta:.3g} must both '
                       'be > 0 for a compute-optimal size; the points do not pin the law down (add sizes/token counts).')
    _check_flops(flops)
    n, d = _optimal(self.params, flops)
    return _scalar_or_array(n), _scalar_or_array(d)

  def compute_optimal_interval(self, flops, level: float = 0.95):
    """((N_lo, N_hi), (D_lo, D_hi)): percentile intervals of the bootstrap fits' compute-optimal N and D at flops."""
    if not len(self.samples):
      raise ValueError('compute_optimal_interval: this fit has no bootstrap fits; fit(..., bootstrap=200) makes them.')
    _check_flops(flops)
    n, d = _optimal(self.samples[:, None, :] if np.ndim(flops) else self.samples, flops)
    q = [50 * (1 - level), 50 * (1 + level)]
    (n_lo, n_hi), (d_lo, d_hi) = np.nanpercentile(n, q, axis=0), np.nanpercentile(d, q, axis=0)
    return (_scalar_or_array(n_lo), _scalar_or_array(n_hi)), (_scalar_or_array(d_lo), _scalar_or_array(d_hi))

  def to_dict(self) -> dict[str, Any]:
    """JSON-shaped: the parameters, intervals as [lo, hi], the bootstrap fits as PARAMS rows; `from_dict` reads it."""
    return {
        **{k: float(getattr(self, k)) for k in PARAMS},
        'intervals': {k: [float(lo), float(hi)] for k, (lo, hi) in self.intervals.items()},
        'n_points': int(self.n_points),
        'huber_loss': float(self.huber_loss),
        'delta': float(self.delta),
        'n_bootstrap': int(len(self.samples)),
        'samples': [[float(v) for v in row] for row in self.samples]
    }

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> 'Fit':
    samples = np.asarray(d.get('samples') or np.zeros((0, 5)), float).reshape(-1, 5)
    return cls(**{k: float(d[k]) for k in PARAMS}, intervals={k: tuple(v) for k, v in d['intervals'].items()},
               n_points=int(d['n_points']), huber_loss=float(d['huber_loss']), delta=float(d.get('delta', 1e-3)),
               samples=samples)

  def summary(self, budget: Optional[float] = None) -> str:
    """A few lines: the law, each parameter with its interval, the compute-optimal exponents and, given a budget in
    FLOPs, the optimal N and D there."""
    values = {**dict(zip(PARAMS, self.params)), **_exponents(self.params)}

    def iv(k, fmt):
      lo_hi = self.intervals.get(k)
      return format(float(values[k]), fmt) + (f' [{lo_hi[0]:{fmt}}, {lo_hi[1]:{fmt}}]' if lo_hi else '')

    boot = f', 95% bootstrap intervals from {len(self.samples)} refits' if len(self.samples) else ''
    lines = [
        f'L(N, D) = E + A/N^alpha + B/D^beta fitted to {self.n_points} points (Huber {self.huber_loss:.3g} at delta '
        f'{self.delta:g}{boot})', f'  E = {iv("E", ".4g")}   A = {iv("A", ".4g")}   B = {iv("B", ".4g")}',
        f'  alpha = {iv("alpha", ".3f")}   beta = {iv("beta", ".3f")}'
    ]
    if not (self.alpha > 0 and self.beta > 0):
      return '\n'.join(lines + ['  no compute-optimal allocation: an exponent is not positive'])
    lines.append(f'  compute-optimal under C = 6ND: N_opt ~ C^{iv("n_exponent", ".3f")}, '
                 f'D_opt ~ C^{iv("d_exponent", ".3f")}')
    if budget is not None:
      n, d = self.compute_optimal(budget)
      n_iv = d_iv = ''
      if len(self.samples):
        (n_lo, n_hi), (d_lo, d_hi) = self.compute_optimal_interval(budget)
        n_iv, d_iv = f' [{n_lo:.3g}, {n_hi:.3g}]', f' [{d_lo:.3g}, {d_hi:.3g}]'
      lines.append(f'  at C = {budget:.3g} FLOPs: N_opt = {n:.3g}{n_iv} params, D_opt = {d:.3g}{d_iv} tokens '
                   f'({d / n:.1f} tokens per param), loss {self.predict(n, d):.4g}')
    return '\n'.join(lines)


def _check_flops(flops):
  f = np.asarray(flops, float)
  if not np.all(np.isfinite(f)) or np.any(f <= 0):
    raise ValueError(f'flops: a compute budget must be finite and > 0 (FLOPs, C = 6ND); got {flops!r}.')


def _exponents(p):
  """PARAMS rows -> {'n_exponent': beta/(alpha+beta), 'd_exponent': alpha/(alpha+beta)}."""
  with np.errstate(all='ignore'):
    s = p[..., 3] + p[..., 4]
    return {'n_exponent': p[..., 4] / s, 'd_exponent': p[..., 3] / s}


def _intervals(samples, level=0.95):
  if not len(samples):
    return {}
  q = [50 * (1 - level), 50 * (1 + level)]
  cols = {k: samples[:, i] for i, k in enumerate(PARAMS)}
  ok = (samples[:, 3] > 0) & (samples[:, 4] > 0)
  cols.update({k: v[ok] for k, v in _exponents(samples).items()})
  return {k: tuple(float(x) for x in np.percentile(v, q)) for k, v in cols.items() if len(v)}


def _bootstrap(data, grid, theta, count, seed):
  """PARAMS rows of `count` refits on resamples (with replacement) of the points; resamples with fewer distinct points
  than parameters, and refits that do not converge to finite numbers, are left out."""
  ln, ld, y, delta = data
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(count):
    i = rng.integers(0, len(y), len(y))
    if len(np.unique(i)) < MIN_POINTS or len(np.unique(ln[i])) < 2 or len(np.unique(ld[i])) < 2:
      continue
    fun, x = _best((ln[i], ld[i], y[i], delta), grid, BOOT_STARTS, extra=(theta,))
    if x is not None:
      rows.append(_natural(x))
  rows = np.array(rows).reshape(-1, 5)
  return rows[np.all(np.isfinite(rows), axis=1)]


def fit(n, d, loss, *, delta: float = 1e-3, starts=None, bootstrap: int = 200, seed: int = 0,
        refine: Optional[int] = REFINE) -> Fit:
  """Fits L(N, D) = E + A/N^alpha + B/D^beta to points (n params, d tokens, loss) by Hoffmann et al.'s approach 3.

  Minimizes the summed Huber(delta) loss of logsumexp(a - alpha log N, b - beta log D, e) - log L with L-BFGS.
  `starts`: None (their 5400-point grid), a mapping of THETA names to grid values, or (k, 5) rows. Every start is
  scored in one vectorized pass and L-BFGS runs from the `refine` best (None: from all of them, the papers' procedure,
  about 40 s on 25 points here; on the synthetic Chinchilla-like grid of the tests the single best start already
  reaches the same minimum). `bootstrap` refits on resamples of the points (seeded by `seed`), each from the full
  fit's optimum and the best grid start of its resample, give the percentile 95% intervals."""
  n, d, loss = _check_points(n, d, loss)
  if not (isinstance(delta, (int, float)) and delta > 0 and math.isfinite(delta)):
    raise ValueError(f'delta: the Huber threshold must be a number > 0 (the papers use 1e-3); got {delta!r}.')
  if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 0:
    raise ValueError(f'bootstrap: the number of resampled refits must be an integer >= 0 (0: no intervals); '
                     f'got {bootstrap!r}.')
  if refine is not None and (isinstance(refine, bool) or not isinstance(refine, int) or refine < 1):
    raise ValueError(f'refine: the number of grid starts L-BFGS runs from must be an integer >= 1 (None: all); '
                     f'got {refine!r}.')
  grid = _grid(starts)
  data = (np.log(n), np.log(d), np.log(loss), float(delta))
  with _one_blas_thread():
    fun, theta = _best(data, grid, refine)
    if theta is None:
      raise ValueError('fit: L-BFGS found no finite optimum from any start; check the points (loss should fall with '
                       'n and d) or pass other starts.')
    samples = _bootstrap(data, grid, theta, bootstrap, seed)
  E, A, B, alpha, beta = (float(v) for v in _natural(theta))
  return Fit(E, A, B, alpha, beta, intervals=_intervals(samples), n_points=len(n), huber_loss=fun, delta=float(delta),
             samples=samples)


# ------------------------------------------------------------------------------------------------------- the plot


def _si(x: float) -> str:
  for unit, scale in (('T', 1e12), ('B', 1e9), ('M', 1e6), ('K', 1e3)):
    if x >= scale:
      return f'{x / scale:.3g}{unit}'
  return f'{x:.3g}'


def _band(ax, x, curves, color):
  """Shade the 2.5-97.5 percentile band of curves (k, len(x)) when there are bootstrap fits."""
  if len(curves):
    with np.errstate(all='ignore'):
      lo, hi = np.nanpercentile(curves, [2.5, 97.5], axis=0)
    ax.fill_between(x, lo, hi, color=color, alpha=0.18, linewidth=0)


def _plot_tokens(ax, fit_, n, d, loss, sizes, colors):
  dd = np.geomspace(d.min() / 1.5, d.max() * 1.5, 120)
  for size, color in zip(sizes, colors):
    m = n == size
    ax.scatter(d[m], loss[m], color=color, s=22, zorder=3, edgecolor='k', linewidth=0.4)
    ax.plot(dd, fit_.predict(size, dd), color=color, label=f'N = {_si(size)}')
    _band(ax, dd, _law(fit_.samples[:, None, :], size, dd), color)
  ax.set_xscale('log')
  ax.set_xlabel('tokens seen D')
  ax.set_ylabel('loss')
  ax.set_title('Loss against tokens, one fitted curve per model size')
  ax.grid(True, which='both', alpha=0.25)


def _plot_compute(ax, fit_, n, d, loss, sizes, colors, budget):
  c = 6 * n * d
  cmax = max(c.max() * 2, budget or 0)
  cc = np.geomspace(c.min() / 2, cmax * 1.5, 160)
  low = loss.min()
  for size, color in zip(sizes, colors):
    m = n == size
    ax.scatter(c[m], loss[m], color=color, s=22, zorder=3, edgecolor='k', linewidth=0.4)
    ax.plot(cc, fit_.predict(size, cc / (6 * size)), color=color, linewidth=1, alpha=0.8)
  if fit_.alpha > 0 and fit_.beta > 0:
    n_opt, d_opt = fit_.compute_optimal(cc)
    frontier = fit_.predict(n_opt, d_opt)
    low = min(low, frontier.min())
    ax.plot(cc, frontier, 'k--', linewidth=1.8, label='compute-optimal frontier', zorder=4)
    s = fit_.samples[:, None, :]
    _band(ax, cc, _law(s, *_optimal(s, cc)), 'k')
    if budget is not None:
      nb, db = fit_.compute_optimal(budget)
      lb = fit_.predict(nb, db)
      ax.scatter([budget], [lb], marker='*', s=220, color='crimson', edgecolor='k', zorder=5,
                 label=f'optimum at C = {budget:.2g}: N = {_si(nb)}, D = {_si(db)}, loss {lb:.3f}')
  span = loss.max() - low
  ax.set_ylim(low - 0.08 * span, loss.max() + 0.15 * span)  # small models' curves rise steeply at little compute
  ax.set_xscale('log')
  ax.set_xlabel('compute C = 6ND (FLOPs)')
  ax.set_ylabel('loss')
  ax.set_title('Loss against compute: iso-size curves (colors as left) and the frontier')
  ax.grid(True, which='both', alpha=0.25)
  ax.legend(fontsize=8, loc='upper right')


def plot(fit: Fit, n, d, loss, path: str, *, budget: Optional[float] = None) -> str:
  """A PNG at path: loss against tokens per model size with the fitted curves and their bootstrap bands, and loss
  against compute 6ND with the iso-size curves, the compute-optimal frontier and budget's optimum. -> path."""
  from matplotlib import colormaps
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  n, d, loss = _check_points(n, d, loss)
  if budget is not None:
    _check_flops(budget)
  sizes = np.unique(n)
  colors = colormaps['viridis'](np.linspace(0, 0.9, len(sizes)))
  fig = Figure(figsize=(14, 5.6))
  FigureCanvasAgg(fig)  # no pyplot: no global backend switch, nothing left open
  ax1, ax2 = fig.subplots(1, 2)
  _plot_tokens(ax1, fit, n, d, loss, sizes, colors)
  _plot_compute(ax2, fit, n, d, loss, sizes, colors, budget)
  ax1.legend(fontsize=8, ncol=2 if len(sizes) > 8 else 1, title='model size (params)', title_fontsize=8)
  boot = f'; bands: 95% of {len(fit.samples)} bootstrap fits' if len(fit.samples) else ''
  fig.suptitle(f'L(N, D) = {fit.E:.3g} + {fit.A:.3g}/N^{fit.alpha:.3f} + {fit.B:.3g}/D^{fit.beta:.3f}  '
               f'({fit.n_points} points{boot})')
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110, format='png')
  return path


# ------------------------------------------------------------------------------------------------ lmlab workdirs


def _read_json(workdir: str, name: str) -> Any:
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file; points_from_runs reads lmlab run workdirs (config.json and '
                            'metrics.jsonl, written by python -m train.main).')
  with open(path) as f:
    return json.load(f) if name.endswith('.json') else [json.loads(line) for line in f if _whole(line)]


def _whole(line: str) -> bool:
  """A complete JSON line (a kill can cut the last one; the writer drops it on resume)."""
  try:
    json.loads(line)
    return True
  except json.JSONDecodeError:
    return False


def _final_eval(workdir: str, records) -> tuple[int, float]:
  """(step, loss) of the last eval line of metrics.jsonl."""
  evals = [r for r in records if r.get('split') == 'eval' and isinstance(r.get('loss'), (int, float))]
  if not evals:
    raise ValueError(f'{workdir}/metrics.jsonl has no eval line with a loss; pre-train with evaluation on '
                     '(config.train.eval_steps > 0 and a held-out split) so the final step is evaluated.')
  last = max(evals, key=lambda r: r['step'])
  return int(last['step']), float(last['loss'])


def count_params(model: Mapping[str, Any], config: Mapping[str, Any], kind: str = 'non_embedding') -> int:
  """Parameters of the model a run's config.json names ('model': ModelConfig fields, 'config': the run config),
  shapes only (jax.eval_shape, nothing allocated). kind 'non_embedding' leaves out the top-level embed/ subtree
  (token, position and type tables) and head tensors with a vocab-sized dimension (an untied unembedding), as Kaplan
  et al. 2020 count N; 'total' counts everything (Hoffmann et al.)."""
  import ml_collections
  from model import heads as heads_lib
  from model import pytree
  from model.config import ModelConfig
  from train import tasks
  from train.core import resolve

  cfg, run = ModelConfig(**model), ml_collections.ConfigDict(dict(config))
  objectives = dict(run.objectives)
  own = [k for k in objectives if getattr(tasks.get(k), 'own', None) is not None]
  if own:
    raise ValueError(f'config.objectives={sorted(objectives)}: {own[0]!r} trains its own model (ELECTRA: a '
                     'generator and a discriminator); count_params reads LanguageModel runs only.')
  shapes = pytree.flatten(heads_lib.abstract_params(cfg, resolve.heads(run, cfg.arch), **resolve.model_kwargs(run)))
  if kind == 'total':
    return sum(int(np.prod(s.shape)) for s in shapes.values())
  if kind != 'non_embedding':
    raise ValueError(f"params: 'non_embedding' (Kaplan et al.) or 'total' (Hoffmann et al.); got {kind!r}.")

  def embedding(path, shape):
    top = path.split('/', 1)[0]
    return top == 'embed' or (top != 'transformer' and cfg.vocab_size in shape)

  return sum(int(np.prod(s.shape)) for p, s in shapes.items() if not embedding(p, s.shape))


def points_from_runs(workdirs: Iterable[str], *, params: str = 'non_embedding'):
  """(n, d, loss) float64 vectors, one point per lmlab pre-training run workdir: n its parameter count (count_params;
  non-embedding by default, as Kaplan et al.: at the sizes trained here the embeddings are half the model and
  their count bends the power law, while 6ND with non-embedding N is the training compute), d the tokens seen by its
  final evaluation (eval step x config.data.batch_size x (seq_len + targets_len)), loss that eval's loss."""
  if isinstance(workdirs, (str, os.PathLike)):
    workdirs = [workdirs]
  rows, counts = [], {}
  for w in map(str, workdirs):
    saved = _read_json(w, 'config.json')
    if not isinstance(saved, dict) or 'model' not in saved or 'config' not in saved:
      raise ValueError(f'{w}/config.json: expected the keys "config" and "model" of an lmlab run.')
    step, loss = _final_eval(w, _read_json(w, 'metrics.jsonl'))
    data = saved['config']['data']
    tokens = step * int(data['batch_size']) * (int(data['seq_len']) + int(data.get('targets_len') or 0))
    key = json.dumps([saved['model'], saved['config'].get('objectives')], sort_keys=True)
    if key not in counts:  # one trace per distinct model
      counts[key] = count_params(saved['model'], saved['config'], params)
    rows.append((counts[key], tokens, loss))
  if not rows:
    raise ValueError('workdirs: no run workdirs given; pass the directories python -m train.main wrote.')
  n, d, loss = (np.array(col, float) for col in zip(*rows))
  return n, d, loss
