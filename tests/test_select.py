"""The model-selection job: its plan fits the budget, halving keeps the best, the report is whole, and a selection
killed in the middle and restarted with the same command ends with the same leaderboard as one never interrupted."""
import csv
import os
import subprocess
import sys

import pytest

from configs import select as select_configs
from tests import procs
from train.selection import report
from train.selection import search

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _costs(per_step, per_finetune):
  return search.Costs(pretrain={}, finetune={}, per_step=per_step, per_finetune=per_finetune, flops_per_sec=0.0)


def _config(budget, **search_fields):
  c = select_configs.get_config('runlocal')
  c.search.budget, c.search.budget_kind = budget, 'flops'
  c.search.update(search_fields)
  return c


def _cands(names):
  return [search.Candidate(n, 'gpt', 'runlocal', '', 'full', 0.0, {}, {}) for n in names]


def test_halving_plan_is_the_longest_whose_worst_case_fits_the_budget():
  names = ['a', 'b', 'c', 'd']
  costs = _costs({'a': 1.0, 'b': 2.0, 'c': 3.0, 'd': 5.0}, {n: 7.0 for n in names})
  config = _config(1000.0, eta=2, rungs=3, seeds=3)
  plan = search.make_plan(config, _cands(names), costs)
  assert plan.survivors == (4, 2, 1)
  assert plan.rung_steps[1] == 2 * plan.rung_steps[0] and plan.rung_steps[2] == 4 * plan.rung_steps[0]
  assert plan.worst_case <= 1000.0
  # One more unit of the longest pre-training (4 steps: every rung stays whole) would not fit.
  longer = tuple(s + s // plan.rung_steps[0] for s in plan.rung_steps)
  assert search._halving_cost(costs, names, longer, plan.survivors, plan.seeds) > 1000.0
  # The worst case by hand: rung 1 all four, rung 2 the two dearest, rung 3 the dearest with 3 seeds.
  s1, s2, s3 = plan.rung_steps
  by_hand = (11 * s1 + 4 * 7) + ((5 + 3) * (s2 - s1) + 2 * 7) + (5 * (s3 - s2) + 7) + 2 * 7
  assert plan.worst_case == pytest.approx(by_hand)
  assert plan.evaluations() == 4 + 2 + 1 * 3


def test_a_budget_too_small_is_refused_naming_the_field_and_what_it_needs():
  costs = _costs({'a': 1.0, 'b': 1.0}, {'a': 100.0, 'b': 100.0})
  with pytest.raises(ValueError, match=r'config\.search\.budget=50 .*too small.*needs'):
    search.make_plan(_config(50.0, rungs=2, seeds=1), _cands(['a', 'b']), costs)


def test_equal_compute_gives_every_candidate_the_same_pre_training_flops():
  names = ['cheap', 'dear']
  costs = _costs({'cheap': 10.0, 'dear': 40.0}, {'cheap': 5.0, 'dear': 5.0})
  plan = search.make_plan(_config(10_000.0, mode='equal_compute', seeds=3), _cands(names), costs)
  spent = {n: plan.per_candidate[n] * costs.per_step[n] for n in names}
  assert 0 <= plan.per_candidate['cheap'] - 4 * plan.per_candidate['dear'] < 4  # 4x as many steps, each floored
  assert abs(spent['cheap'] - spent['dear']) <= 40.0  # within one step of the dearer candidate
  assert plan.worst_case <= 10_000.0 and plan.evaluations() == 2 * 3


def test_pareto_front_keeps_only_points_nothing_beats_on_compute_and_metric():
  points = [(1.0, 0.5), (2.0, 0.4), (3.0, 0.7), (4.0, 0.7), (5.0, 0.9), (0.5, 0.1)]
  assert report.pareto(points) == [(0.5, 0.1), (1.0, 0.5), (3.0, 0.7), (5.0, 0.9)]


def test_bad_candidates_and_a_changed_config_are_refused_by_name(tmp_path):
  c = select_configs.get_config('runlocal')
  c.candidates.gpt_clm.family = 'gpt3'
  with pytest.raises(ValueError, match=r'config\.candidates\.gpt_clm\.family=.gpt3.*init_from'):
    search.candidates_of(c)
  c = select_configs.get_config('runlocal')
  search.check_same_config(str(tmp_path), c)
  c.finetune.steps = 999
  with pytest.raises(ValueError, match=r'differs in finetune.*new --workdir'):
    search.check_same_config(str(tmp_path), c)


# ---- the job, end to end --------------------------------------------------------------------------------------------

def _select_cmd(workdir):
  # Two decoders (the fastest family to compile) that differ in learning rate: 2 candidates, 2 rungs, 1 seed.
  return [
      sys.executable, '-m', 'train.select', f'--config={REPO}/tests/select_two_decoders.py', f'--workdir={workdir}'
  ]


def _env(cache):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache), PYTHONUNBUFFERED='1')
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def _rows(workdir):
  with open(os.path.join(workdir, 'leaderboard.csv')) as f:
    return [{k: v for k, v in row.items() if k != 'seconds'} for row in csv.DictReader(f)]


def test_a_selection_killed_in_the_middle_resumes_to_the_same_leaderboard(tmp_path):
  cache = tmp_path / 'jax_cache'
  whole, killed = tmp_path / 'whole', tmp_path / 'killed'
  done = subprocess.run(_select_cmd(whole), env=_env(cache), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'chosen:' in done.stdout and '[3/3]' in done.stdout, done.stdout[-2000:]

  # killed once the first evaluation is recorded: the second is under way
  procs.kill_after_line(_select_cmd(killed), env=_env(cache), prefix='[1/3]', delay=1.0)
  again = subprocess.run(_select_cmd(killed), env=_env(cache), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert _rows(killed) == _rows(whole)
  # What the report holds: the chosen one first; a candidate ranked only if it beat the majority baseline beyond
  # noise ('-' and "did not learn" otherwise); the baseline and intervals above the table; plots and hparams written.
  rows = _rows(whole)
  assert rows[0]['chosen'] == 'True' and rows[1]['chosen'] == 'False'
  for r in rows:
    assert (r['rank'] == '-' and 'did not learn' in r['why']) if r['learned'] == 'False' else r['rank'].isdigit()
    assert float(r['low']) <= float(r['mean']) <= float(r['high'])
  assert 'stopped after rung 1' in rows[1]['why'] or 'did not learn' in rows[1]['why']
  with open(whole / 'leaderboard.md') as f:
    assert 'Majority-class baseline: accuracy 0.2925' in f.read()
  for png in ('metric_vs_compute.png', 'training_curves.png'):
    with open(whole / png, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(whole / png) > 10_000
  assert any(n.startswith('events.out') for _, _, files in os.walk(whole / 'tensorboard' / 'hparams') for n in files)
  # The chosen configuration runs as it is.
  chosen = subprocess.run([sys.executable, '-m', 'train.main', f'--config={whole}/chosen.py',
                           f'--workdir={tmp_path / "chosen"}', '--config.train.steps=2'], env=_env(cache),
                          capture_output=True, text=True, timeout=600)
  assert chosen.returncode == 0, chosen.stderr[-3000:]
  assert 'loaded' in chosen.stdout and os.path.join(str(whole), 'pretrain') in chosen.stdout
