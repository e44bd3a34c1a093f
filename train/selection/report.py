"""The selection's report in its workdir: the leaderboard (leaderboard.md, leaderboard.csv), the plots (PNG: dev metric
against compute with the Pareto front, the candidates' training curves), the hparams in TensorBoard, and the chosen
configuration as a config file (chosen.py) that `python -m train.main --config=W/chosen.py` runs as it is.
"""
from __future__ import annotations

import csv
import io
import os
import pprint
from typing import Any

import numpy as np

from train.viz import plots
from train.selection import search as search_lib
from train.selection import stats


def _mean_std(values) -> tuple[float, float]:
  return float(np.mean(values)), float(np.std(values)) if len(values) > 1 else float('nan')


def _objectives(s: search_lib.Search, cand: search_lib.Candidate) -> str:
  if not cand.pretrains:
    return f'(pretrained {os.path.basename(cand.init_from.rstrip("/"))})'
  c = search_lib.pretrain_config(s.config, cand, steps=1, max_steps=1)
  return '+'.join(sorted(c.objectives))


def leaderboard(s: search_lib.Search, result: dict[str, Any]) -> list[dict[str, Any]]:
  """One row per candidate, best first: what it is, what it cost, its dev metric (mean +- std over the seeds of the
  last rung it reached) with a 95% interval, whether it beat the majority baseline beyond noise, whether it was
  chosen and why. A candidate that did not learn is not ranked (rank '-'), whatever its mean."""
  rungs, plan, metric = result['rungs'], s.plan, s.config.metric.split('/')[-1]
  base = search_lib.majority(s)
  rows = []
  for cand in s.cands:
    reached = max(k for k, names in enumerate(rungs) if cand.name in names)
    steps = plan.steps(reached, cand.name)
    seeds = plan.seeds if reached == len(rungs) - 1 else 1
    values = [s.study.get(cand.name, steps, k)['value'] for k in range(seeds)]
    spent = [e for (n, _, _), e in s.study.done.items() if n == cand.name]
    mean, std = _mean_std(values)
    correct = search_lib.correctness(s, cand.name, steps, seeds)
    v = stats.verdict(correct, base) if correct is not None and base is not None else None
    rows.append(dict(candidate=cand.name, arch=search_lib.arch_of(cand), objective=_objectives(s, cand),
                     strategy=cand.strategy, params=s.costs.finetune[cand.name].params, rung=reached + 1,
                     pretrain_steps=steps, flops=sum(e['flops'] for e in spent),
                     seconds=sum(e['seconds'] for e in spent), mean=mean, std=std, seeds=seeds,
                     low=v.low if v else float('nan'), high=v.high if v else float('nan'),
                     interval=v.how if v else '', learned=v.learned if v else True,
                     chosen=cand.name == result['chosen'], correct=correct))
  rows.sort(key=lambda r: (not r['learned'], -r['rung'], -r['mean'], r['candidate']))
  for rank, row in enumerate(rows, 1):
    row['rank'] = rank if row['learned'] else '-'
    row['why'] = _why(row, rows, rungs, plan, metric, base)
  return rows


def _why(row, rows, rungs, plan, metric, base) -> str:
  last = len(rungs)
  if not row['learned']:
    return (f'did not learn: {metric} {row["mean"]:.4f} is not above the majority baseline {base:.4f} beyond noise '
            f'(95% interval [{row["low"]:.3f}, {row["high"]:.3f}]); not ranked')
  if row['chosen']:
    seeds = f'over {row["seeds"]} seeds' if row['seeds'] > 1 else 'one seed'
    return (f'best mean {metric} at the last rung ({row["mean"]:.4f}, {seeds})'
            if plan.mode == 'halving' else f'best mean {metric} at equal pre-training compute')
  if row['rung'] == last:
    best = next(r for r in rows if r['chosen'])
    return f'{metric} {row["mean"]:.4f} below the chosen {best["mean"]:.4f}'
  kept = len(rungs[row['rung']])
  return (f'stopped after rung {row["rung"]} ({row["pretrain_steps"]} pre-training steps): {metric} '
          f'{row["mean"]:.4f} was not among the top {kept} of {len(rungs[row["rung"] - 1])}')


_COLUMNS = ('rank', 'candidate', 'arch', 'objective', 'strategy', 'params', 'rung', 'pretrain_steps', 'flops',
            'seconds', 'mean', 'std', 'low', 'high', 'interval', 'seeds', 'learned', 'chosen', 'why')


def _fmt_metric(row) -> str:
  out = f'{row["mean"]:.4f}' + ('' if np.isnan(row['std']) else f' ± {row["std"]:.4f}')
  return out + ('' if np.isnan(row['low']) else f' [{row["low"]:.3f}, {row["high"]:.3f}]')


def noise_lines(s: search_lib.Search, rows) -> list[str]:
  """What the dev set can and cannot tell: the baseline, the significance of the top two, the dev set's resolution."""
  base, metric = search_lib.majority(s), s.config.metric.split('/')[-1]
  if base is None:
    return [f'No per-example dev predictions for {s.config.metric}: no baseline, interval or significance test '
            '(they are computed for accuracy).']
  any_row = next(r for r in rows if r['correct'] is not None)
  n = any_row['correct'].shape[-1]
  label = next(e['majority_label'] for e in s.study.done.values() if e.get('majority') is not None)
  out = [f'Majority-class baseline: {metric} {base:.4f} (always "{label}", the most frequent of the {n} dev labels). '
         f'Intervals are 95%: {any_row["interval"] or "bootstrap over dev examples"} at the last rung, bootstrap '
         'over dev examples for one seed.']
  learned = [r for r in rows if r['learned']]
  if not learned:
    out.append('No candidate is above the majority baseline beyond noise: none learned the task; the choice below is '
               'the best mean, not a model that works.')
  last = max(r['rung'] for r in rows)
  top = [r for r in learned if r['rung'] == last and r['correct'] is not None]
  line = stats.top_two_line([r['candidate'] for r in top], {r['candidate']: r['correct'] for r in top}, metric)
  if line:
    out.append(line)
  if len(top) >= 2:
    gap, res = top[0]['mean'] - top[1]['mean'], stats.resolution(n, top[0]['mean'])
    if gap < res:
      out.append(f'Warning: {n} dev examples resolve {metric} differences of about {100 * res:.1f} points (95%); the '
                 f'top two are {100 * gap:.1f} apart. A larger dev set (or more seeds) is needed to rank them.')
  return out


def markdown(s: search_lib.Search, rows) -> str:
  metric = s.config.metric
  plan = s.plan
  out = io.StringIO()
  out.write(f'# Model selection: {s.config.task}, ranked by dev {metric}\n\n')
  out.write(f'Plan ({plan.mode}): pre-training steps per rung {list(plan.rung_steps)}, candidates per rung '
            f'{list(plan.survivors)}, {plan.seeds} fine-tuning seeds at the last rung; worst case {plan.worst_case:.3g}'
            f' of the budget {plan.budget:.3g} {s.config.search.budget_kind}.\n\n')
  for line in noise_lines(s, rows):
    out.write(line + '\n\n')
  out.write(f'| rank | candidate | arch | objective | strategy | params | rung | pre-training steps | compute (FLOPs) '
            f'| seconds | dev {metric} (mean ± std [95% interval]) | chosen | why |\n')
  out.write('|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|:---:|---|\n')
  for r in rows:
    out.write(f'| {r["rank"]} | {r["candidate"]} | {r["arch"]} | {r["objective"]} | {r["strategy"]} | '
              f'{r["params"] / 1e6:.2f}M | {r["rung"]} | {r["pretrain_steps"]} | {r["flops"]:.3g} | '
              f'{r["seconds"]:.0f} | {_fmt_metric(r)} | {"**yes**" if r["chosen"] else ""} | {r["why"]} |\n')
  return out.getvalue()


def _atomic(path: str, text: str) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    f.write(text)
  os.replace(tmp, path)


def write_csv(path: str, rows) -> None:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=_COLUMNS, extrasaction='ignore')
  w.writeheader()
  w.writerows(rows)
  _atomic(path, buf.getvalue())


def _read_metrics(workdir: str, split: str, name: str) -> tuple[list[int], list[float]]:
  """(steps, values) of `name` in the run's `split` lines; nothing for a run that has not logged yet."""
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    return [], []
  rows = [r for r in plots.read_metrics(workdir) if r.get('split') == split and name in r]
  return [int(r['step']) for r in rows], [float(r[name]) for r in rows]


def _points(s: search_lib.Search) -> dict[str, list[tuple[float, float]]]:
  """Per candidate: (compute of its model so far: pre-training to the rung + one fine-tuning, seed-0 dev metric)."""
  out = {}
  for (name, steps, seed), e in sorted(s.study.done.items()):
    if seed == 0:
      pre = s.costs.pretrain[name]
      compute = (pre.flops_per_step * steps if pre else 0.0) + s.costs.finetune[name].flops_per_step * int(
          s.config.finetune.steps)
      out.setdefault(name, []).append((compute, e['value']))
  return out


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
  """The points no other beats on both compute (lower) and metric (higher), by compute."""
  front, best = [], -np.inf
  for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
    if y > best:
      front.append((x, y))
      best = y
  return front


def _figure(width: float, height: float):
  """A matplotlib Figure on the Agg canvas: no pyplot, so a notebook's backend and open figures stay as they were."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def plot_metric_vs_compute(s: search_lib.Search, chosen: str, path: str, rows=()) -> None:
  """Seed-0 dev metric of every rung against compute, the Pareto front, each candidate's last rung as mean with its
  95% interval (error bars over seeds or dev examples, as the leaderboard), and the majority baseline."""
  fig = _figure(7, 4.5)
  ax = fig.subplots()
  points = _points(s)
  last = {r['candidate']: r for r in rows}
  for i, (name, pts) in enumerate(points.items()):
    xs, ys = zip(*pts)
    line, = ax.plot(xs, ys, '-', marker='osD^vP*X'[i % 8], ms=9 - i % 4,
                    label=name + (' (chosen)' if name == chosen else '') +
                    ('' if last.get(name, {}).get('learned', True) else ' (did not learn)'),
                    lw=2.5 if name == chosen else 1.2)
    r = last.get(name)
    if r is not None and not np.isnan(r['low']):
      ax.errorbar([xs[-1]], [r['mean']], yerr=[[r['mean'] - r['low']], [r['high'] - r['mean']]], color=line.get_color(),
                  capsize=5, lw=1.5, fmt='none')
  base = search_lib.majority(s)
  if base is not None:
    ax.axhline(base, color='gray', ls=':', lw=1.5, label=f'majority class ({base:.3f})')
  front = pareto([p for pts in points.values() for p in pts])
  if front:
    fx, fy = zip(*front)
    ax.plot(fx, fy, 'k--', drawstyle='steps-post', marker='o', ms=14, mfc='none', alpha=0.6,
            label='Pareto front (circled)')
  ax.set_xscale('log')
  ax.set_xlabel('training compute of the model (FLOPs: pre-training + fine-tuning)')
  ax.set_ylabel(f'dev {s.config.metric} (seed 0; bars: 95% interval, last rung)')
  ax.set_title(f'{s.config.task}: dev metric against compute, per rung')
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def plot_training_curves(s: search_lib.Search, result: dict, path: str) -> None:
  fig = _figure(11, 4.2)
  pre_ax, ft_ax = fig.subplots(1, 2)
  metric = s.config.metric.split('/')[-1]
  for cand in s.cands:
    if cand.pretrains:
      steps, loss = _read_metrics(os.path.join(s.workdir, 'pretrain', cand.name), 'train', 'loss')
      pre_ax.plot(steps, loss, label=cand.name)
    reached = max(k for k, names in enumerate(result['rungs']) if cand.name in names)
    ft = os.path.join(s.workdir, 'finetune', f'{cand.name}-{s.plan.steps(reached, cand.name)}-seed0')
    steps, values = _read_metrics(ft, 'eval', metric)
    ft_ax.plot(steps, values, 'o-', label=f'{cand.name} (rung {reached + 1})')
  pre_ax.set(title='pre-training loss (each its own objective)', xlabel='step', ylabel='train loss', yscale='log')
  ft_ax.set(title=f'fine-tuning: dev {metric} (seed 0, last rung reached)', xlabel='step', ylabel=metric)
  for ax in (pre_ax, ft_ax):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def write_hparams(s: search_lib.Search) -> None:
  """Every evaluation as a TensorBoard hparams run (tensorboard/hparams/<candidate>-<steps>-seed<k>)."""
  try:
    from tensorboardX import SummaryWriter
  except ImportError:
    return
  metric = s.config.metric.split('/')[-1]
  root = os.path.join(s.workdir, 'tensorboard', 'hparams')
  todo = [(k, e) for k, e in sorted(s.study.done.items()) if not os.path.isdir(os.path.join(root, '%s-%d-seed%d' % k))]
  if not todo:
    return
  with SummaryWriter(root) as w:
    for (name, steps, seed), e in todo:
      cand = s.cand(name)
      w.add_hparams({'candidate': name, 'family': cand.family or 'pretrained', 'strategy': cand.strategy,
                     'learning_rate': cand.learning_rate, 'pretrain_steps': steps, 'seed': seed},
                    {f'hparam/{metric}': e['value'], 'hparam/flops': e['flops']}, name=f'{name}-{steps}-seed{seed}')


def write_chosen(s: search_lib.Search, chosen: str, path: str) -> str:
  """The chosen candidate's fine-tuning config (its last-rung pre-training as init_from) as a config file."""
  cand = s.cand(chosen)
  steps = s.plan.steps(len(s.plan.rung_steps) - 1, chosen)
  init = os.path.abspath(os.path.join(s.workdir, 'pretrain', chosen)) if cand.pretrains else cand.init_from
  files = tuple(os.path.abspath(p) for p in s.files)
  fc = search_lib.finetune_config(s.config, cand, init_from=init, seed=0, arch=search_lib.arch_of(cand),
                                  data_files=files)
  text = (f'"""The configuration the selection in {os.path.abspath(s.workdir)} chose: {chosen} '
          f'({cand.family or "pretrained"}, {steps} pre-training steps, strategy {cand.strategy}).\n\n'
          f'  python -m train.main --config={os.path.abspath(path)} --workdir=WORKDIR\n"""\n'
          'import ml_collections\n\n\n'
          'def get_config(arg=None):\n'
          f'  return ml_collections.ConfigDict({pprint.pformat(fc.to_dict(), indent=2, width=110, sort_dicts=True)})\n')
  _atomic(path, text)
  return path


def write(s: search_lib.Search, result: dict) -> dict[str, str]:
  """Every report file, rewritten whole (atomically) from the study; -> {what: path}."""
  rows = leaderboard(s, result)
  w = s.workdir
  paths = {'leaderboard': os.path.join(w, 'leaderboard.md'), 'csv': os.path.join(w, 'leaderboard.csv'),
           'metric_vs_compute': os.path.join(w, 'metric_vs_compute.png'),
           'training_curves': os.path.join(w, 'training_curves.png'), 'chosen': os.path.join(w, 'chosen.py')}
  _atomic(paths['leaderboard'], markdown(s, rows))
  write_csv(paths['csv'], rows)
  plot_metric_vs_compute(s, result['chosen'], paths['metric_vs_compute'], rows)
  plot_training_curves(s, result, paths['training_curves'])
  write_hparams(s)
  write_chosen(s, result['chosen'], paths['chosen'])
  return paths
