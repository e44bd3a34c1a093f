"""Run plots (train/viz/plots.py): metrics.jsonl read as the trainer writes it (a cut-off last line skipped), curves by
split, every form of `runs`, labels, errors that name the run and what it logged, the PNG, and no pyplot."""
import json
import sys

import matplotlib
import numpy as np
import pytest

from train.viz import plots


def _write_run(folder, losses, *, eval_every=2, cut=False):
  folder.mkdir(parents=True, exist_ok=True)
  lines = []
  for i, loss in enumerate(losses, 1):
    lines.append(json.dumps({'step': 10 * i, 'split': 'train', 'loss': loss, 'clm/loss': loss, 'grad_norm': 1.0}))
    if i % eval_every == 0:
      lines.append(json.dumps({'step': 10 * i, 'split': 'eval', 'loss': loss + 0.5}))
  text = '\n'.join(lines) + '\n' + ('{"step": 99, "split": "tra' if cut else '')
  (folder / 'metrics.jsonl').write_text(text)
  return str(folder)


def test_read_metrics_skips_a_cut_off_line_and_curves_follow_the_split(tmp_path):
  run = _write_run(tmp_path / 'gpt', [5.0, 4.0, 3.0, 2.5], cut=True)
  records = plots.read_metrics(run)
  assert len(records) == 6 and records[-1]['step'] == 40
  steps, values = plots.curve(records, 'loss')
  assert steps.tolist() == [10, 20, 30, 40] and values.tolist() == [5.0, 4.0, 3.0, 2.5]
  steps, values = plots.curve(records, 'eval/loss')
  assert steps.tolist() == [20, 40] and values.tolist() == [4.5, 3.0]
  # 'clm/' is part of a metric's name, not a split.
  assert plots.split_metric('clm/loss') == ('train', 'clm/loss')
  assert plots.split_metric('eval/clm/loss') == ('eval', 'clm/loss')
  assert plots.curve(records, 'clm/loss')[1].tolist() == [5.0, 4.0, 3.0, 2.5]
  assert plots.curve(records, 'eval/grad_norm')[0].size == 0
  with pytest.raises(FileNotFoundError, match=r'metrics\.jsonl.*workdir'):
    plots.read_metrics(tmp_path / 'nowhere')


def test_plot_curves_labels_lines_by_run_and_metric_and_writes_a_png(tmp_path):
  a = _write_run(tmp_path / 'fast', [5.0, 4.0, 3.0, 2.0])
  b = _write_run(tmp_path / 'slow', [5.0, 4.8, 4.6, 4.5])
  ax = plots.plot_curves([a, b], 'loss', path=str(tmp_path / 'out' / 'loss.png'))
  assert [line.get_label() for line in ax.get_lines()] == ['fast', 'slow']
  assert np.allclose(ax.get_lines()[0].get_ydata(), [5.0, 4.0, 3.0, 2.0])
  assert ax.get_xlabel() == 'step' and ax.get_ylabel() == 'loss'
  png = (tmp_path / 'out' / 'loss.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000

  ax = plots.plot_curves(a, ['loss', 'eval/loss'], logy=True)
  assert [line.get_label() for line in ax.get_lines()] == ['loss', 'eval/loss']
  assert ax.get_yscale() == 'log' and ax.get_title().startswith('fast: ')
  ax.figure.canvas.draw()
  labels = [t.get_text() for t in ax.get_yticklabels() + ax.get_yticklabels(minor=True) if t.get_text()]
  assert '3' in labels and not any('times' in t or '^' in t for t in labels), labels  # 3, not 3x10^0
  assert ax.get_lines()[1].get_marker() == 'o'  # eval points are few: marked

  ax = plots.plot_curves({'A': a, 'B': plots.read_metrics(b)}, ['loss', 'eval/loss'], title='t')
  assert [line.get_label() for line in ax.get_lines()] == ['A: loss', 'A: eval/loss', 'B: loss', 'B: eval/loss']
  assert ax.get_title() == 't'

  ax = plots.plot_curves(plots.read_metrics(a), 'grad_norm')  # one run's records
  assert len(ax.get_lines()) == 1


def test_plot_curves_draws_into_a_given_axes(tmp_path):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure()
  FigureCanvasAgg(fig)
  left, right = fig.subplots(1, 2)
  run = _write_run(tmp_path / 'r', [3.0, 2.0])
  assert plots.plot_curves(run, 'loss', ax=right) is right
  assert not left.get_lines() and len(right.get_lines()) == 1


def test_errors_name_the_run_and_what_it_logged(tmp_path):
  run = _write_run(tmp_path / 'gpt', [5.0, 4.0])
  with pytest.raises(ValueError, match=r"gpt: no 'accuracy'.*train split it logged clm/loss, grad_norm, loss.*eval/"):
    plots.plot_curves(run, 'accuracy')
  with pytest.raises(ValueError, match=r"no 'eval/accuracy'.*eval split it logged loss\."):
    plots.plot_curves(run, 'eval/accuracy')
  with pytest.raises(ValueError, match='nothing to plot'):
    plots.plot_curves([], 'loss')
  with pytest.raises(ValueError, match='at least one metric'):
    plots.plot_curves(run, [])
  with pytest.raises(TypeError, match='workdir or a list of metrics records'):
    plots.plot_curves({'x': 3}, 'loss')
  with pytest.raises(TypeError, match='runs:'):
    plots.plot_curves(42, 'loss')


def test_no_pyplot_and_no_backend_switch(tmp_path):
  # rcParams['backend'] itself would resolve the backend (importing pyplot): read the stored value.
  backend = dict.__getitem__(matplotlib.rcParams, 'backend')
  had_pyplot = 'matplotlib.pyplot' in sys.modules
  plots.plot_curves(_write_run(tmp_path / 'r', [3.0, 2.0]), 'loss', path=str(tmp_path / 'x.png'))
  assert dict.__getitem__(matplotlib.rcParams, 'backend') is backend
  assert had_pyplot or 'matplotlib.pyplot' not in sys.modules


def test_overlapping_runs_get_different_dashes(tmp_path):
  a = _write_run(tmp_path / 'one', [5.0, 4.0])
  b = _write_run(tmp_path / 'eight', [5.0, 4.0])
  lines = plots.plot_curves([a, b], 'loss').get_lines()
  assert lines[0].get_linestyle() == '-' and lines[1].get_linestyle() == '--'  # equal curves: both visible


def test_plot_bars_means_stds_seeds_and_baseline(tmp_path):
  results = {'full': 0.85, 'head': 0.80, 'few-shot': [0.6, 0.7, 0.65]}
  ax = plots.plot_bars(results, metric='dev accuracy', baseline=0.51, baseline_label='majority',
                       path=str(tmp_path / 'bars.png'))
  heights = [p.get_height() for p in ax.patches]
  assert np.allclose(heights, [0.85, 0.80, 0.65])
  texts = [t.get_text() for t in ax.texts]
  assert texts[:2] == ['0.850', '0.800'] and texts[2] == f'0.650\n± {np.std([0.6, 0.7, 0.65]):.3f}', texts
  # One error bar (the only multi-seed result), its half-length the population std; the seeds as dots.
  bars = [c for c in ax.containers if type(c).__name__ == 'ErrorbarContainer']
  assert len(bars) == 1
  segment = bars[0].lines[2][0].get_segments()[0]
  assert np.isclose(segment[1][1] - segment[0][1], 2 * np.std([0.6, 0.7, 0.65]))
  dots = [line for line in ax.get_lines() if line.get_marker() == '.']
  assert len(dots) == 1 and np.allclose(dots[0].get_ydata(), [0.6, 0.7, 0.65])
  assert ax.get_legend().get_texts()[0].get_text() == 'majority 0.510'
  assert [t.get_text() for t in ax.get_xticklabels()] == list(results)
  assert (tmp_path / 'bars.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # A baseline above every bar (results worse than the majority class) stays inside the axes.
  low = plots.plot_bars({'lora': 0.12, 'full': [0.15, 0.17]}, baseline=0.29)
  assert low.get_ylim()[1] > 0.29
  with pytest.raises(ValueError, match='nothing to plot'):
    plots.plot_bars({})
  with pytest.raises(ValueError, match='finite number.*one per seed'):
    plots.plot_bars({'lora': [0.5, float('nan')]})
