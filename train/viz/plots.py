"""Plots of runs, for the colabs and for anyone reading a workdir: the metrics a run logged (its metrics.jsonl, one
JSON object per logged step) drawn as curves against the step, one line per run and metric.

Figures are made without pyplot (a Figure on the Agg canvas), so nothing switches a notebook's inline backend or is
left open; pass `ax` to draw into a figure of your own, `path` to write a PNG. A metric is named as the run logs it
('loss', 'clm/perplexity', 'grad_norm', ...), on the training split unless prefixed by the split, as
config.train.best_metric names it: 'eval/loss' is the held-out loss.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

SPLITS = ('train', 'eval')
Records = Sequence[Mapping[str, Any]]
Run = Union[str, os.PathLike, Records]


def read_metrics(workdir: Union[str, os.PathLike]) -> list[dict[str, Any]]:
  """A run's metrics.jsonl as records, in order. A line cut off by a kill is skipped (the trainer drops it too when
  the run resumes); a workdir without the file is a FileNotFoundError naming it."""
  path = os.path.join(os.fspath(workdir), 'metrics.jsonl')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file; is {os.fspath(workdir)!r} an lmlab run workdir that has logged a '
                            'step (config.train.log_every)?')
  records = []
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return records


def split_metric(metric: str) -> tuple[str, str]:
  """'eval/loss' -> ('eval', 'loss'); 'clm/loss' -> ('train', 'clm/loss'): only 'train/' and 'eval/' name a split."""
  head, sep, rest = metric.partition('/')
  return (head, rest) if sep and head in SPLITS and rest else ('train', metric)


def curve(records: Records, metric: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, values) of one metric ('loss', 'eval/loss', ...) over the records that hold it, by step."""
  split, name = split_metric(metric)
  pts = sorted((int(r['step']), float(r[name])) for r in records if r.get('split', 'train') == split and name in r)
  steps, values = (np.array(v) for v in zip(*pts)) if pts else (np.zeros(0, int), np.zeros(0))
  return steps, values


def _label(run: Run, default: str) -> str:
  if isinstance(run, (str, os.PathLike)):
    return os.path.basename(os.fspath(run).rstrip('/\\')) or os.fspath(run)
  return default


def _is_records(x) -> bool:
  return isinstance(x, Sequence) and not isinstance(x, (str, bytes)) and all(isinstance(r, Mapping) for r in x)


def runs_of(runs) -> list[tuple[str, list]]:
  """What plot_curves accepts -> [(label, records)]: a workdir; a list of records; a sequence of workdirs or record
  lists; or a mapping label -> workdir or records."""
  if isinstance(runs, Mapping):
    items = list(runs.items())
  elif isinstance(runs, (str, os.PathLike)) or (_is_records(runs) and len(runs)):
    items = [(_label(runs, 'run'), runs)]
  elif isinstance(runs, Sequence) and not isinstance(runs, (str, bytes)):
    items = [(_label(r, f'run {i}'), r) for i, r in enumerate(runs)]
  else:
    raise TypeError(f'runs: a workdir, a list of metrics records, a sequence of either, or a mapping label -> either; '
                    f'got {type(runs).__name__}.')
  if not items:
    raise ValueError('runs: nothing to plot (an empty sequence or mapping).')
  out = []
  for label, run in items:
    if isinstance(run, (str, os.PathLike)):
      out.append((str(label), read_metrics(run)))
    elif _is_records(run):
      out.append((str(label), list(run)))
    else:
      raise TypeError(f'runs[{label!r}]: a workdir or a list of metrics records, not {type(run).__name__}.')
  return out


def new_figure(figsize):
  """A matplotlib Figure on the Agg canvas (no pyplot: nothing global changes, nothing is left open)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=figsize)
  FigureCanvasAgg(fig)
  return fig


def new_axes(figsize):
  return new_figure(figsize).subplots()


def save(ax, path: Optional[str]):
  """Writes the figure of `ax` (an Axes or a Figure) as a PNG at `path` (its folder made) when a path is given; -> ax."""
  if path:
    fig = getattr(ax, 'figure', ax)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110, format='png')
  return ax


def plot_curves(runs, metric: Union[str, Sequence[str]] = 'loss', *, ax=None, logy: bool = False,
                title: Optional[str] = None, path: Optional[str] = None, figsize=(7.0, 4.2)):
  """Draws `metric` (a name or several) of every run against the step -> the matplotlib Axes.

  runs: a workdir, a list of metrics records (read_metrics), a sequence of those, or a mapping label -> one. Lines
  are labeled by run (several runs), by metric (several metrics) or both; eval metrics, logged rarely, get markers.
  A run that never logged a metric is a ValueError naming the run and the metrics it has on that split. `ax`: draw
  there (None: a new pyplot-free Figure, shown in a notebook by displaying `ax.figure`); `path`: also write the
  figure as a PNG there (its folder is made)."""
  metrics = [metric] if isinstance(metric, str) else list(metric)
  if not metrics:
    raise ValueError('metric: name at least one metric, e.g. "loss" or "eval/loss".')
  loaded = runs_of(runs)
  ax = new_axes(figsize) if ax is None else ax
  for run_index, (label, records) in enumerate(loaded):
    dash = ('-', '--', ':', '-.')[run_index % 4]  # runs that overlap (equal losses) stay visible
    for m in metrics:
      steps, values = curve(records, m)
      if not len(steps):
        split, _ = split_metric(m)
        have = sorted({k for r in records if r.get('split', 'train') == split for k in r} - {'step', 'split'})
        hint = '' if split == 'eval' else ' (held-out metrics are named "eval/<name>")'
        raise ValueError(f'{label}: no {m!r} in its metrics; on the {split} split it logged '
                         f'{", ".join(have) or "nothing"}{hint}.')
      name = label if len(metrics) == 1 else m if len(loaded) == 1 else f'{label}: {m}'
      is_eval = split_metric(m)[0] == 'eval'
      ax.plot(steps, values, marker='o' if is_eval else None, ls='--' if is_eval else dash, ms=5,
              lw=1.2 if is_eval else 1.6 + 0.6 * (run_index == 0 and len(loaded) > 1), label=name)
  if logy:
    from matplotlib import ticker
    ax.set_yscale('log')
    # Plain numbers (7, 10) rather than 7x10^0: a loss often spans less than a decade, so minor ticks carry the labels
    # (LogFormatter leaves them out where a wider range would crowd them).
    ax.yaxis.set_major_formatter(ticker.LogFormatter())
    ax.yaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False))
  ax.set_xlabel('step')
  ax.set_ylabel(metrics[0] if len(metrics) == 1 else ', '.join(metrics))
  if title is None:
    title = (f'{loaded[0][0]}: ' if len(loaded) == 1 else '') + ' and '.join(metrics) + ' against step'
  ax.set_title(title)
  ax.grid(alpha=0.3, which='both' if logy else 'major')
  if len(loaded) > 1 or len(metrics) > 1:
    ax.legend(fontsize=8)
  return save(ax, path)


def _mean_std(value) -> tuple[float, float, np.ndarray]:
  values = np.atleast_1d(np.asarray(value, dtype=np.float64))
  if not values.size or not np.all(np.isfinite(values)):
    raise ValueError(f'a result must be a finite number or a non-empty sequence of them (one per seed); got {value!r}.')
  return float(values.mean()), float(values.std()), values


def plot_bars(results: Mapping[str, Union[float, Sequence[float]]], *, metric: str = 'accuracy',
              baseline: Optional[float] = None, baseline_label: str = 'baseline', ax=None, title: str = '',
              path: Optional[str] = None, figsize=(7.0, 3.8)):
  """One bar per result (label -> a number, or one number per seed: the bar is the mean, the error bar the std
  (ddof=0, as train/sweep.py reports it) and each seed a dot), each labelled with its value; `baseline` (e.g. the
  majority class) is a dashed line. -> the Axes."""
  if not results:
    raise ValueError('results: nothing to plot; give {label: value or [value per seed]}.')
  stats = {label: _mean_std(v) for label, v in results.items()}
  ax = new_axes(figsize) if ax is None else ax
  x = np.arange(len(stats))
  means = [m for m, _, _ in stats.values()]
  stds = [s for _, s, _ in stats.values()]
  ax.bar(x, means, color='#80b1d3', edgecolor='#335577')
  for i, (mean, std, values) in enumerate(stats.values()):
    if values.size > 1:  # the spread over seeds: mean ± std and every seed
      ax.errorbar([i], [mean], yerr=[std], color='black', capsize=4, lw=1.2)
      ax.plot(np.full(values.size, i) + np.linspace(-0.12, 0.12, values.size), values, 'k.', ms=4)
    ax.text(i, mean + std, f'{mean:.3f}' + (f'\n± {std:.3f}' if values.size > 1 else ''), ha='center', va='bottom',
            fontsize=7.5)
  if baseline is not None:
    ax.axhline(baseline, color='#aa3333', ls='--', lw=1.0, label=f'{baseline_label} {baseline:.3f}')
    ax.legend(fontsize=8, loc='lower right')
  ax.set_xticks(x, list(stats), rotation=20 if len(stats) > 4 else 0, ha='right' if len(stats) > 4 else 'center',
                fontsize=8)
  top = max([m + s for m, s in zip(means, stds)] + ([baseline] if baseline is not None else []))  # the line shows too
  ax.set_ylim(0, top * 1.2 if top > 0 else 1.0)
  ax.set_ylabel(metric)
  ax.set_title(title or f'{metric} by run')
  ax.grid(axis='y', alpha=0.3)
  return save(ax, path)
