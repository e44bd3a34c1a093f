"""The fine-tuning selection's report (configs/select.py:mode=finetune): the leaderboard with the trade-off (dev
metric with its 95% interval beside the majority baseline, training seconds, trainable parameters, peak memory as the
cost model estimates it and as measured, dev examples/s, cost), the Pareto plot of metric against cost, the choice by
config.search.choose with its reason, and <workdir>/chosen, which `python -m train.evaluate --from=<workdir>/chosen`
scores on any file.

The cost the choice, the Pareto front and the plot use is the cost model's (training the candidate to its last
rung plus one dev pass, in the budget's units: seconds through the workdir's calibration, or FLOPs), so a resumed
search chooses as an uninterrupted one; the measured seconds stand beside it in the table.
"""
from __future__ import annotations

import csv
import io
import os
from typing import Any, Optional

import numpy as np

from train.selection import finetune_search as fs
from train.selection import report
from train.selection import search
from train.selection import stats

COLUMNS = ('rank', 'candidate', 'start', 'arch', 'method', 'trainable_params', 'params', 'steps', 'rung', 'seeds',
           'mean', 'std', 'low', 'high', 'interval', 'learned', 'cost', 'train_seconds', 'seconds',
           'memory_estimate_mib', 'peak_rss_mib', 'dev_examples_per_s', 'spent', 'pareto', 'chosen', 'why')


def _final(s: fs.FtSearch, cand: fs.Candidate, rungs: list[list[str]]) -> tuple[int, int, Optional[int]]:
  """(steps, seeds, rung index) of the candidate's last evaluation that counts: an inference-only candidate's seeds,
  a trained one's last rung reached (every seed there when it is the last rung); rung None when nothing finished."""
  if not cand.trains:
    n = cand.seeds(s.plan.seeds)
    while n and s.study.get(cand.name, 0, n - 1) is None:
      n -= 1
    return 0, n, (0 if n else None)
  reached = [k for k, names in enumerate(rungs) if cand.name in names and s.study.get(
      cand.name, s.plan.rung_steps[k], 0) is not None]
  if not reached:
    return 0, 0, None
  k = reached[-1]
  steps, seeds = s.plan.rung_steps[k], s.plan.seeds if k == len(s.plan.rung_steps) - 1 else 1
  while seeds > 1 and s.study.get(cand.name, steps, seeds - 1) is None:
    seeds -= 1
  return steps, seeds, k


def _measured(s: fs.FtSearch, cand: fs.Candidate, steps: int) -> dict[str, float]:
  """Measured: seed 0's training seconds up to `steps` (every rung's run added), its last dev pass's examples/s and
  wall seconds, the peak resident memory of any of its evaluations."""
  mine = {k: e for k, e in s.study.done.items() if k[0] == cand.name}
  seed0 = [e for (_, st, seed), e in sorted(mine.items()) if seed == 0 and st <= steps]
  last = s.study.get(cand.name, steps, 0) or {}
  score = last.get('score_seconds') or 0.0
  return dict(train_seconds=sum(e.get('train_seconds') or 0.0 for e in seed0),
              seconds=sum(e['seconds'] for e in seed0),
              dev_examples_per_s=s.costs.dev_records / score if score else float('nan'),
              peak_rss_mib=max((e['peak_rss'] for e in mine.values()), default=float('nan')) / 2**20,
              spent=sum(e.get('charged', 0.0) for e in mine.values()))


def row(s: fs.FtSearch, cand: fs.Candidate, rungs: list[list[str]], base: Optional[float]) -> dict[str, Any]:
  """One candidate's line: what it is, its dev metric (mean ± std over the seeds it has) with a 95% interval, whether
  it beat the majority baseline beyond noise, and its costs, estimated and measured."""
  steps, seeds, rung = _final(s, cand, rungs)
  c = s.costs.train[cand.name] or s.costs.infer[cand.name]
  out = dict(candidate=cand.name, start=cand.init_from if not os.path.isabs(cand.init_from) else
             os.path.basename(cand.init_from.rstrip('/')), arch=s.starts[cand.name].cfg.arch, method=cand.method,
             trainable_params=c.trainable_params if cand.trains else 0, params=c.params, steps=steps, seeds=seeds,
             rung=None if rung is None or not cand.trains else rung + 1, cost=s.costs.model_cost(cand.name, steps),
             memory_estimate_mib=c.bytes['total'] / 2**20, final=False, failed='', correct=None,
             mean=float('nan'), std=float('nan'), low=float('nan'), high=float('nan'), interval='', learned=False)
  out.update(_measured(s, cand, steps))
  if rung is None:
    return out
  evals = [s.study.get(cand.name, steps, k) for k in range(seeds)]
  out['failed'] = next((e['failed'] for e in evals if e.get('failed')), '')
  out['final'] = not cand.trains or rung == len(s.plan.rung_steps) - 1
  if out['failed']:
    return out
  values = [e['value'] for e in evals]
  out['mean'], out['std'] = float(np.mean(values)), float(np.std(values)) if len(values) > 1 else float('nan')
  out['correct'] = search.correctness(s, cand.name, steps, seeds)
  if out['correct'] is not None and base is not None:
    v = stats.verdict(out['correct'], base)
    out.update(low=v.low, high=v.high, interval=v.how, learned=v.learned)
  else:
    out['learned'] = True  # nothing to test against: a metric other than accuracy
  return out


def pareto_names(rows) -> list[str]:
  """The candidates no other beats on both cost (lower) and dev metric (higher), cheapest first: report.pareto over
  the rows that learned and have a result."""
  pts = {(r['cost'], r['mean']): r['candidate'] for r in sorted(rows, key=lambda r: r['candidate'], reverse=True)
         if r['learned'] and not r['failed'] and not np.isnan(r['mean'])}
  return [pts[p] for p in report.pareto(list(pts))]


def choose(rows, rule: str = 'best', within_points: float = 1.0) -> tuple[Optional[str], str]:
  """(the chosen candidate, the reason) among the rows that finished the search (inference-only, or at the last
  rung): 'best' the highest mean; 'cheapest_within' the cheapest whose mean is within `within_points` points (of
  100) of that best. A candidate that did not learn is chosen only when none did. Ties: cheaper, then by name."""
  final = [r for r in rows if r['final'] and not r['failed'] and not np.isnan(r['mean'])]
  if not final:
    return None, 'no candidate finished: nothing to choose'
  pool = [r for r in final if r['learned']] or final
  caveat = '' if any(r['learned'] for r in final) else ' (none is above the majority baseline beyond noise)'
  best = min(pool, key=lambda r: (-r['mean'], r['cost'], r['candidate']))
  if rule == 'best':
    return best['candidate'], f'the best mean dev metric {best["mean"]:.4f} of {len(pool)} finalists{caveat}'
  near = [r for r in pool if r['mean'] >= best['mean'] - within_points / 100.0 - 1e-12]
  pick = min(near, key=lambda r: (r['cost'], -r['mean'], r['candidate']))
  if pick is best:
    return pick['candidate'], (f'the best mean {best["mean"]:.4f} is also the cheapest of the {len(near)} within '
                               f'{within_points:g} points of it{caveat}')
  return pick['candidate'], (f'the cheapest ({pick["cost"]:.3g}) of the {len(near)} candidates within '
                             f'{within_points:g} points of the best {best["candidate"]} ({best["mean"]:.4f}, cost '
                             f'{best["cost"]:.3g}): {pick["mean"]:.4f}{caveat}')


def _why(r, chosen: Optional[str], reason: str, rungs, rule: str, within: float, metric: str, base) -> str:
  if r['failed']:
    return f'failed: {r["failed"]}'
  if np.isnan(r['mean']):
    return 'not run: the search stopped before it (see above)'
  if not r['learned']:
    return (f'did not learn: {metric} {r["mean"]:.4f} is not above the majority baseline {base:.4f} beyond noise '
            f'(95% interval [{r["low"]:.3f}, {r["high"]:.3f}])')
  if r['candidate'] == chosen:
    return f'chosen: {reason}'
  if not r['final']:
    k = r['rung']
    return (f'stopped after rung {k} ({r["steps"]} steps): {metric} {r["mean"]:.4f} was not among the top '
            f'{len(rungs[k]) if k < len(rungs) else "?"} of {len(rungs[k - 1])}')
  return f'{metric} {r["mean"]:.4f}, not chosen by rule {rule!r}' + (f' ({within:g} points)' if rule != 'best' else '')


def leaderboard(s: fs.FtSearch, result: dict) -> tuple[list[dict], Optional[str], str]:
  """Every candidate's row, best first (those that did not learn or failed unranked), the choice and its reason."""
  base, rungs = search.majority(s), result['rungs']
  rows = [row(s, cand, rungs, base) for cand in s.cands]
  rule, within, metric = s.config.search.choose, float(s.config.search.within_points), s.config.metric.split('/')[-1]
  chosen, reason = choose(rows, rule, within)
  front = set(pareto_names(rows))
  rows.sort(key=lambda r: (bool(r['failed']) or np.isnan(r['mean']), not r['learned'], not r['final'],
                           0 if r['final'] else -(r['rung'] or 0), -np.nan_to_num(r['mean'], nan=-1.0), r['candidate']))
  rank = 0
  for r in rows:
    ok = r['learned'] and not r['failed'] and not np.isnan(r['mean'])
    rank += ok
    r.update(rank=rank if ok else '-', pareto=r['candidate'] in front, chosen=r['candidate'] == chosen)
    r['why'] = _why(r, chosen, reason, rungs, rule, within, metric, base)
  return rows, chosen, reason


def _fmt_metric(r) -> str:
  if np.isnan(r['mean']):
    return '-'
  out = f'{r["mean"]:.4f}' + ('' if np.isnan(r['std']) else f' ± {r["std"]:.4f}')
  return out + ('' if np.isnan(r['low']) else f' [{r["low"]:.3f}, {r["high"]:.3f}]')


def _num(x, fmt) -> str:
  return '-' if x is None or (isinstance(x, float) and np.isnan(x)) else format(x, fmt)


def noise_lines(s: fs.FtSearch, rows) -> list[str]:
  """The baseline, the significance of the top two finalists and what the dev set can resolve."""
  base, metric = search.majority(s), s.config.metric.split('/')[-1]
  if base is None:
    return [f'No per-example dev predictions for {s.config.metric}: no baseline, interval or significance test.']
  label = next(e['majority_label'] for e in s.study.done.values() if e.get('majority') is not None)
  n = s.costs.dev_records
  out = [f'Majority-class baseline: {metric} {base:.4f} (always "{label}", the most frequent of the {n} dev labels). '
         'Intervals are 95%: Student\'s t over seeds with three or more, else bootstrap over the dev examples; a '
         'candidate whose interval reaches the baseline did not learn and is not ranked.']
  top = [r for r in rows if r['learned'] and r['final'] and r['correct'] is not None and not r['failed']]
  top.sort(key=lambda r: -r['mean'])
  line = stats.top_two_line([r['candidate'] for r in top], {r['candidate']: r['correct'] for r in top}, metric)
  if line:
    out.append(line)
  if len(top) >= 2 and top[0]['mean'] - top[1]['mean'] < stats.resolution(n, top[0]['mean']):
    out.append(f'{n} dev examples resolve {metric} differences of about '
               f'{100 * stats.resolution(n, top[0]["mean"]):.1f} points (95%); the top two are '
               f'{100 * (top[0]["mean"] - top[1]["mean"]):.1f} apart.')
  return out


def markdown(s: fs.FtSearch, rows, chosen: Optional[str], reason: str, result: dict) -> str:
  kind, plan, spent = s.config.search.budget_kind, s.plan, s.spent()
  unit = 's' if kind == 'seconds' else 'FLOPs'
  out = io.StringIO()
  out.write(f'# Choosing a starting point and a strategy: {s.config.task}, ranked by dev {s.config.metric}\n\n')
  out.write(f'Plan: {len(plan.inference)} candidate(s) scored without training; {len(plan.trained)} trained by '
            f'successive halving over fine-tuning steps {list(plan.rung_steps)} (candidates per rung '
            f'{list(plan.survivors)}, {plan.seeds} seed(s) at the last rung). Budget {plan.budget:.4g} {kind}: worst '
            f'case {plan.worst_case:.4g}, spent {spent["units"]:.4g} by the cost model, {spent["seconds"]:.0f} s '
            'measured (the evaluations\' own processes).\n\n')
  if result.get('stopped'):
    out.write(f'**The search stopped early**: {result["stopped"]}.\n\n')
  for line in noise_lines(s, rows):
    out.write(line + '\n\n')
  out.write(f'| rank | candidate | start | method | trainable | steps | dev {s.config.metric} '
            f'(mean ± std [95% interval]) | cost ({unit}) | train s | memory MiB (est. / peak RSS) | dev ex/s | '
            'Pareto | why |\n')
  out.write('|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|:---:|---|\n')
  for r in rows:
    out.write(f'| {r["rank"]} | {"**" + r["candidate"] + "**" if r["chosen"] else r["candidate"]} | {r["start"]} | '
              f'{r["method"]} | {r["trainable_params"]:,} | {r["steps"]} | {_fmt_metric(r)} | {r["cost"]:.3g} | '
              f'{r["train_seconds"]:.0f} | {r["memory_estimate_mib"]:.0f} / {_num(r["peak_rss_mib"], ".0f")} | '
              f'{_num(r["dev_examples_per_s"], ".1f")} | {"yes" if r["pareto"] else ""} | {r["why"]} |\n')
  out.write(f'\nChosen: **{chosen}** (rule {s.config.search.choose!r}): {reason}. Score it on any file:\n\n'
            f'    python -m train.evaluate --from={os.path.abspath(os.path.join(s.workdir, "chosen"))} '
            '--data=FILE --out=DIR\n\n' if chosen else f'\nNothing chosen: {reason}.\n\n')
  out.write('Cost: the cost model\'s, training to the steps shown plus one dev pass (seconds at the workdir\'s '
            'calibrated FLOP/s for a seconds budget). Train s: measured seconds of the training processes of seed 0 '
            '(start-up, loading and compiling included). Memory: the cost model\'s estimate of one training step '
            '(inference only: one scoring batch) against the peak resident set of the evaluation\'s process '
            '(Python, XLA, the loaded checkpoint and data included). Dev ex/s: dev records over the seconds of '
            'scoring them (the forward\'s compilation included, loading excluded).\n')
  return out.getvalue()


def write_csv(path: str, rows) -> None:
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction='ignore')
  w.writeheader()
  w.writerows(rows)
  report._atomic(path, buf.getvalue())


def plot(s: fs.FtSearch, rows, path: str) -> None:
  """Dev metric (mean, 95% interval as error bars) against cost per candidate, the Pareto front, the baseline."""
  fig = report._figure(8, 5)
  ax = fig.subplots()
  shown = [r for r in rows if not np.isnan(r['mean'])]
  for i, r in enumerate(sorted(shown, key=lambda r: r['candidate'])):
    yerr = None if np.isnan(r['low']) else [[r['mean'] - r['low']], [r['high'] - r['mean']]]
    label = r['candidate'] + (' (chosen)' if r['chosen'] else '') + ('' if r['learned'] else ' (did not learn)') + (
        '' if r['final'] else f' (stopped at rung {r["rung"]})')
    ax.errorbar([r['cost']], [r['mean']], yerr=yerr, fmt='osD^vP*Xh<>p'[i % 12], ms=11 if r['chosen'] else 7,
                capsize=4, label=label, mfc='none' if not r['final'] else None, lw=1.5)
  front = [r for r in shown if r['pareto']]
  if front:
    front.sort(key=lambda r: r['cost'])
    ax.plot([r['cost'] for r in front], [r['mean'] for r in front], 'k--', drawstyle='steps-post', alpha=0.5,
            label='Pareto front')
  base = search.majority(s)
  if base is not None:
    ax.axhline(base, color='gray', ls=':', lw=1.5, label=f'majority class ({base:.3f})')
  kind = s.config.search.budget_kind
  ax.set_xscale('log')
  ax.set_xlabel('cost: training + one dev pass (' + ('seconds, cost model at the calibrated FLOP/s)' if kind ==
                                                     'seconds' else 'FLOPs, cost model)'))
  ax.set_ylabel(f'dev {s.config.metric} (bars: 95% interval)')
  ax.set_title(f'{s.config.task}: starting points x strategies')
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7, loc='best')
  else:  # no candidate has a dev score yet and the task has no majority class: say so instead of an empty legend
    ax.text(0.5, 0.5, 'no candidate scored on dev within the budget', transform=ax.transAxes, ha='center')
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def link_chosen(s: fs.FtSearch, chosen: Optional[str]) -> Optional[str]:
  """<workdir>/chosen -> the chosen candidate's seed-0 directory (a relative link, so the workdir can move): a run
  whose latest checkpoint is its last rung, or a zero-shot / in-context prompt config that train.evaluate scores."""
  link = os.path.join(s.workdir, 'chosen')
  if chosen is None:
    return None
  target = os.path.relpath(s.run_dir(chosen, 0), s.workdir)
  tmp = link + '.tmp'
  if os.path.lexists(tmp):
    os.remove(tmp)
  os.symlink(target, tmp)
  os.replace(tmp, link)
  return link


def write(s: fs.FtSearch, result: dict) -> tuple[dict[str, str], Optional[str], str]:
  """Every report file, rewritten whole from the study -> ({what: path}, chosen, reason)."""
  rows, chosen, reason = leaderboard(s, result)
  w = s.workdir
  paths = {'leaderboard': os.path.join(w, 'leaderboard.md'), 'csv': os.path.join(w, 'leaderboard.csv'),
           'pareto': os.path.join(w, 'metric_vs_cost.png')}
  report._atomic(paths['leaderboard'], markdown(s, rows, chosen, reason, result))
  write_csv(paths['csv'], rows)
  plot(s, rows, paths['pareto'])
  link = link_chosen(s, chosen)
  if link:
    paths['chosen'] = link
  return paths, chosen, reason
