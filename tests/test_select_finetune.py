"""The fine-tuning selection (configs/select.py:mode=finetune): its plan is the longest that fits the budget, the
leaderboard's intervals, baseline verdicts, Pareto set and choice are right on hand-made scores, and end to end over
two tiny lmlab starting points x three strategies the budget is never exceeded, a search killed in the middle resumes
to the same leaderboard, the choice is scored by train.evaluate, and a seconds budget is a hard limit."""
import csv
import os
import signal
import subprocess
import sys
import threading
import time
import types

import numpy as np
import pytest

from configs import select as select_configs
from tests import procs
from train.core import cost as cost_lib
from train.selection import finetune_candidates as fcands
from train.selection import finetune_plan as fp
from train.selection import finetune_report as ft_report
from train.selection import finetune_search as fs
from train.selection import search
from train.selection import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the plan ---------------------------------------------------------------------------------------------------


def _cand(name, strategy='full', demonstrations=0):
  return fcands.Candidate(name, name, '/' + name, strategy, demonstrations=demonstrations)


def _costs(per_step, per_score, overhead=0.0):
  one = cost_lib.Cost(params=1000, trainable_params=100, flops_per_step=1.0, tokens_per_step=1,
                      bytes={'total': 2.0**20})
  names = list(per_score)
  return fp.Costs(train={n: one if per_step.get(n) else None for n in names}, infer={n: one for n in names},
                  groups={n: 1 for n in names}, per_step={n: per_step.get(n, 0.0) for n in names},
                  per_score=dict(per_score), score_flops=dict(per_score), overhead=overhead, flops_per_sec=0.0,
                  dev_records=100, labels=('0', '1'))


def _config(budget, **search_fields):
  c = select_configs.get_config('mode=finetune')
  c.search.budget_kind, c.search.budget, c.finetune.steps = 'flops', budget, 0
  c.search.update(search_fields)
  return c


def test_the_plan_is_the_longest_whose_worst_case_fits_and_counts_every_evaluation():
  cands = [_cand('a'), _cand('b'), _cand('c'), _cand('zs', 'prompt'), _cand('icl', 'prompt', demonstrations=4)]
  costs = _costs({'a': 1.0, 'b': 2.0, 'c': 5.0}, {'a': 3.0, 'b': 3.0, 'c': 4.0, 'zs': 10.0, 'icl': 20.0}, overhead=1.0)
  plan = fp.make_plan(_config(2000.0, eta=2, rungs=2, seeds=3), cands, costs)
  assert plan.survivors == (3, 2) and plan.trained == ('a', 'b', 'c') and plan.inference == ('zs', 'icl')
  m = plan.rung_steps[0]
  assert plan.rung_steps == (m, 2 * m) and plan.worst_case <= 2000.0
  # By hand: zero-shot once and in-context once per seed; rung 1 all three; rung 2 the two dearest for m more steps;
  # the two dearest again from scratch for seeds 1 and 2; every evaluation with its overhead.
  by_hand = (11 + 3 * 21) + (8 * m + 10 + 3) + ((5 + 2) * m + 7 + 2) + 2 * ((5 + 2) * 2 * m + 7 + 2)
  assert plan.worst_case == pytest.approx(by_hand)
  assert fp.worst_case(costs, cands, (m + 1, 2 * m + 2), plan.survivors, 3) > 2000.0  # one step longer: too dear
  assert plan.evaluations(cands) == 1 + 3 + 3 + 2 + 2 * 2
  capped = _config(2000.0, eta=2, rungs=2, seeds=3)
  capped.finetune.steps = 20
  assert fp.make_plan(capped, cands, costs).rung_steps == (10, 20)


def test_a_budget_too_small_and_bad_candidates_are_refused_by_name(tmp_path):
  costs = _costs({'a': 1.0}, {'a': 100.0, 'zs': 100.0})
  with pytest.raises(ValueError, match=r'config\.search\.budget=150 flops is too small.*needs'):
    fp.make_plan(_config(150.0, rungs=2, seeds=1), [_cand('a'), _cand('zs', 'prompt')], costs)
  c = select_configs.get_config('mode=finetune')
  c.candidates.minilm_full.init_from = str(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match=r'config\.candidates\.minilm_full\.init_from=.*does not exist.*packaged'):
    fcands.candidates_of(c)
  c = select_configs.get_config('mode=finetune')
  c.candidates.minilm_full.demonstrations = 4
  with pytest.raises(ValueError, match=r"minilm_full\.demonstrations=4.*strategy='prompt'"):
    fcands.candidates_of(c)
  c = select_configs.get_config('mode=finetune')
  c.candidates.minilm_full.strategy = 'prompt+nonsense'
  with pytest.raises(ValueError, match=r'minilm_full\.strategy=.prompt\+nonsense'):
    fcands.candidates_of(c)
  c = select_configs.get_config('mode=finetune')
  c.search.only = ('minilm_head', 'gpt9')
  with pytest.raises(ValueError, match=r"config\.search\.only names \['gpt9'\]"):
    fcands.candidates_of(c)


# ---- the leaderboard on hand-made scores -------------------------------------------------------------------------


def _correct(n, accuracy, seed):
  c = np.zeros(n, int)
  c[np.random.default_rng(seed).permutation(n)[:int(round(accuracy * n))]] = 1
  return c


def _hand_made_search(tmp_path, choose='best', within=1.0):
  """A search whose study holds hand-made evaluations over 200 dev examples (majority class 0.6): 'full' reaches the
  last rung with three seeds, 'lora' stops at rung 1, 'head' is at the baseline, a zero-shot and an in-context one."""
  config = _config(1e9, choose=choose, within_points=within, seeds=3, rungs=2)
  cands = [_cand('full'), _cand('lora'), _cand('head'), _cand('zs', 'prompt'), _cand('icl', 'prompt', 1)]
  costs = _costs({'full': 2.0, 'lora': 1.0, 'head': 0.5}, {n: 10.0 for n in ('full', 'lora', 'head', 'zs', 'icl')})
  plan = fp.Plan((10, 20), (3, 2), 3, ('full', 'lora', 'head'), ('zs', 'icl'), 0.0, 1e9)
  starts = {c.name: fcands.Start(types.SimpleNamespace(arch='encoder'), '') for c in cands}
  study = search.Study(str(tmp_path), [c.name for c in cands])
  s = fs.FtSearch(config, str(tmp_path), cands, starts, costs, plan, study, ('', ''))
  scored = {('full', 10, 0): 0.80, ('full', 20, 0): 0.86, ('full', 20, 1): 0.84, ('full', 20, 2): 0.88,
            ('lora', 10, 0): 0.70, ('head', 10, 0): 0.72, ('head', 20, 0): 0.60, ('head', 20, 1): 0.61,
            ('head', 20, 2): 0.59, ('zs', 0, 0): 0.855, ('icl', 0, 0): 0.75, ('icl', 0, 1): 0.77, ('icl', 0, 2): 0.73}
  for k, ((name, steps, seed), acc) in enumerate(scored.items()):
    correct = _correct(200, acc, k)
    study.add(name, steps, seed, float(correct.mean()), dict(
        correct=''.join(map(str, correct)), majority=0.6, majority_label='0', charged=1.0, seconds=2.0,
        train_seconds=1.0, score_seconds=0.5, peak_rss=2.0**30, failed='', rung=0))
  return s, {'rungs': [['full', 'lora', 'head'], ['full', 'head']], 'stopped': ''}


def test_intervals_baseline_pareto_and_choice_on_hand_made_scores(tmp_path):
  s, result = _hand_made_search(tmp_path)
  rows, chosen, reason = ft_report.leaderboard(s, result)
  by = {r['candidate']: r for r in rows}
  # Three seeds: Student's t over the seeds' accuracies; one seed (zero-shot): bootstrap over the dev examples.
  seeds = [s.study.get('full', 20, k)['value'] for k in range(3)]
  assert (by['full']['low'], by['full']['high']) == pytest.approx(stats.seed_interval(seeds))
  assert by['full']['interval'] == 't over 3 seeds' and by['full']['mean'] == pytest.approx(np.mean(seeds))
  zs = np.array([int(c) for c in s.study.get('zs', 0, 0)['correct']])
  assert (by['zs']['low'], by['zs']['high']) == pytest.approx(stats.bootstrap_interval(zs))
  assert by['zs']['interval'] == 'bootstrap over dev examples'
  # At the majority class: not learned, not ranked; stopped at rung 1: ranked below the finalists, with why.
  assert not by['head']['learned'] and by['head']['rank'] == '-' and 'did not learn' in by['head']['why']
  assert not by['lora']['final'] and 'stopped after rung 1' in by['lora']['why']
  assert [r['candidate'] for r in rows if r['rank'] != '-'][:3] == ['full', 'zs', 'icl']
  # Cost = per step x steps + one dev pass: zs 10, icl 10, lora 20, full 50. Pareto over the learned: the cheapest
  # best of each cost (zs beats icl at the same cost), then full (higher mean, dearer); lora is dominated by zs.
  assert {r['candidate']: r['cost'] for r in rows} == {'full': 50.0, 'lora': 20.0, 'head': 20.0, 'zs': 10.0,
                                                       'icl': 10.0}
  assert ft_report.pareto_names(rows) == ['zs', 'full']
  assert chosen == 'full' and 'best mean' in reason
  # The cheapest within 1 point of the best (0.86) is the zero-shot prompt (0.855); within 0.1 point, the best.
  assert ft_report.choose(rows, 'cheapest_within', 1.0)[0] == 'zs'
  assert ft_report.choose(rows, 'cheapest_within', 0.1)[0] == 'full'
  paths, chosen, _ = ft_report.write(s, result)
  assert os.readlink(paths['chosen']) == os.path.join('finetune', 'full-seed0')
  with open(paths['leaderboard']) as f:
    text = f.read()
  assert 'Majority-class baseline: accuracy 0.6000' in text and 'Chosen: **full**' in text
  with open(paths['pareto'], 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_a_candidate_that_did_not_learn_is_chosen_only_when_none_did():
  rows = [dict(candidate='a', mean=0.62, cost=1.0, final=True, failed='', learned=False),
          dict(candidate='b', mean=0.70, cost=5.0, final=True, failed='', learned=True)]
  assert ft_report.choose(rows, 'best')[0] == 'b'
  rows[1]['learned'] = False
  name, reason = ft_report.choose(rows, 'best')
  assert name == 'b' and 'none is above the majority baseline' in reason


# ---- end to end ---------------------------------------------------------------------------------------------------


def _env(cache):
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=str(cache), PYTHONUNBUFFERED='1')
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  return env


def _write_task(folder):
  """A tiny SST-2 file pair that a tiny model can tell apart (a sentiment word in every sentence), 60% negative."""
  rng = np.random.default_rng(0)
  words = {'0': ('bad', 'awful', 'dull'), '1': ('good', 'great', 'fun')}
  filler = 'the film was a story of people and time in the city'.split()
  for name, n in (('train', 120), ('dev', 50)):
    rows = ['sentence\tlabel']
    for i in range(n):
      label = '0' if i % 5 < 3 else '1'
      text = list(rng.choice(filler, 6)) + [rng.choice(words[label])]
      rows.append(' '.join(rng.permutation(text)) + f'\t{label}')
    (folder / f'{name}.tsv').write_text('\n'.join(rows) + '\n')


@pytest.fixture(scope='module')
def starts(tmp_path_factory):
  """Two tiny lmlab runs to start from: an encoder (MLM) and a decoder (CLM), pre-trained a few steps."""
  root = tmp_path_factory.mktemp('starts')
  cache = root / 'jax_cache'
  for family, extra in (('bert', ["--config.objectives={'mlm': 1.0}"]), ('gpt', [])):
    done = subprocess.run([sys.executable, '-m', 'train.main', f'--config=configs/{family}.py:runlocal',
                           f'--workdir={root / family}', '--config.train.steps=3', '--config.train.eval_every=0'] +
                          extra, env=_env(cache), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
  _write_task(root)
  return root


def _selection_file(root, folder, budget):
  path = folder / 'select_finetune_tiny.py'
  path.write_text(f'''
import ml_collections
from configs import select

def get_config(arg=None):
  c = select.get_config('mode=finetune')
  c.data.train, c.data.dev = '{root}/train.tsv', '{root}/dev.tsv'
  c.finetune.seq_len, c.finetune.batch_size, c.finetune.warmup_steps, c.finetune.steps = 32, 8, 1, 6
  c.search.budget_kind, c.search.budget, c.search.rungs, c.search.eta, c.search.seeds = 'flops', {budget}, 2, 3, 1
  ft = select._ft
  c.candidates = ml_collections.ConfigDict({{
      'bert_full': ft('{root}/bert', 'full', learning_rate=3e-3),
      'bert_head': ft('{root}/bert', 'head', learning_rate=3e-2),
      'bert_zero_shot': ft('{root}/bert', 'prompt'),
      'gpt_zero_shot': ft('{root}/gpt', 'prompt'),
      'gpt_2shot': ft('{root}/gpt', 'prompt', demonstrations=2, seq_len=64),
      'gpt_lora': ft('{root}/gpt', 'lora', learning_rate=3e-2, finetune={{'lora_rank': 4}}),
  }})
  return c
''')
  return path


def _cmd(config, workdir):
  return [sys.executable, '-m', 'train.select', f'--config={config}', f'--workdir={workdir}']


_MEASURED = ('train_seconds', 'seconds', 'peak_rss_mib', 'dev_examples_per_s')


def _rows(workdir):
  with open(os.path.join(workdir, 'leaderboard.csv')) as f:
    return [{k: v for k, v in row.items() if k not in _MEASURED} for row in csv.DictReader(f)]


def _children_of(workdir):
  """Processes whose command line names the workdir (an evaluation's spec file lies in it)."""
  out = []
  for pid in filter(str.isdigit, os.listdir('/proc')):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as f:
        if str(workdir).encode() in f.read():
          out.append(int(pid))
    except OSError:
      continue
  return out


def test_a_tiny_selection_keeps_its_budget_and_a_killed_one_resumes_to_the_same_leaderboard(starts, tmp_path):
  config, cache = _selection_file(starts, tmp_path, 1e11), tmp_path / 'jax_cache'
  whole, killed = tmp_path / 'whole', tmp_path / 'killed'
  done = subprocess.run(_cmd(config, whole), env=_env(cache), cwd=REPO, capture_output=True, text=True, timeout=900)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert 'worst case' in done.stdout.split('[1/')[0]  # the plan is printed before anything runs
  assert '[7/7]' in done.stdout and 'chosen:' in done.stdout, done.stdout[-3000:]
  # The budget: the plan's worst case fits it and what the evaluations cost (the cost model's count) fits the plan.
  s = fs.prepare(select_configs_from(config), str(whole), log=lambda *_: None)
  spent = s.spent()
  assert s.plan.rung_steps == (2, 6) and s.plan.survivors == (3, 1)
  assert spent['units'] <= s.plan.worst_case <= s.plan.budget == 1e11
  assert len(s.study.done) == 7

  # killed once the first trained evaluation is recorded: the next is under way
  procs.kill_after_line(_cmd(config, killed), env=_env(cache), cwd=REPO, prefix='[4/7]', delay=2.0)
  time.sleep(1.0)
  assert not _children_of(killed), 'an evaluation outlived the killed selection'
  again = subprocess.run(_cmd(config, killed), env=_env(cache), cwd=REPO, capture_output=True, text=True, timeout=900)
  assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
  assert _rows(killed) == _rows(whole)

  rows = _rows(whole)
  assert {r['candidate'] for r in rows} == {'bert_full', 'bert_head', 'bert_zero_shot', 'gpt_zero_shot', 'gpt_2shot',
                                            'gpt_lora'}
  for r in rows:
    assert float(r['low']) <= float(r['mean']) <= float(r['high'])
    assert (r['rank'] == '-') == (r['learned'] == 'False')
  chosen = next(r for r in rows if r['chosen'] == 'True')
  # The choice is scored on any file by the evaluate job, whichever kind it is.
  out = tmp_path / 'scored'
  ev = subprocess.run([sys.executable, '-m', 'train.evaluate', f'--from={whole}/chosen',
                       f'--data={starts}/dev.tsv', f'--out={out}'], env=_env(cache), cwd=REPO, capture_output=True,
                      text=True, timeout=600)
  assert ev.returncode == 0, ev.stderr[-3000:]
  with open(out / 'predictions.jsonl') as f:
    assert len(f.readlines()) == 50
  with open(whole / 'leaderboard.md') as f:
    assert f'Chosen: **{chosen["candidate"]}**' in f.read()


def select_configs_from(path):
  """The config a selection file gives (what the job read)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('tiny_selection', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def test_a_seconds_budget_is_a_hard_limit_on_the_measured_seconds(starts, tmp_path):
  from train import select as select_job
  config = select_configs_from(_selection_file(starts, tmp_path, 1e11))
  config.search.budget_kind, config.search.budget, config.search.overhead_seconds = 'seconds', 2.0, 0.001
  config.search.only = ('gpt_zero_shot',)
  (tmp_path / 'w').mkdir()
  # A machine this fast would score it in no time: the plan fits, and the measured seconds must stop it.
  (tmp_path / 'w' / 'calibration.json').write_text('{"flops_per_sec": 1e18}')
  s, result, paths, chosen, _ = select_job.finetune(config, str(tmp_path / 'w'), log=lambda *_: None)
  assert result['stopped'] and chosen is None and 'chosen' not in paths
  assert s.spent()['seconds'] <= 2.0 + 1.0 and s.plan.worst_case <= 2.0
  with open(paths['leaderboard']) as f:
    assert 'The search stopped early' in f.read()


def test_sigterm_while_an_evaluation_scores_stops_the_search_and_records_nothing(tmp_path, monkeypatch):
  # A zero-shot or in-context evaluation has no checkpoint to save: SIGTERM simply ends it (exit -15). The search must
  # stop there (Preempted: exit 143, the same command resumes), not record the evaluation as failed and go on.
  monkeypatch.setattr(fs.finetune_worker, 'COMMAND', 'import time; time.sleep(60)')
  before = signal.getsignal(signal.SIGTERM)
  timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
  timer.start()
  t0 = time.time()
  try:
    with pytest.raises(search.Preempted, match='SIGTERM'):
      fs.run_child({}, str(tmp_path / 'zs-0-seed0.log'), None, str(tmp_path))
  finally:
    timer.cancel()
  assert time.time() - t0 < 30  # the child did not sleep its 60 s out
  assert signal.getsignal(signal.SIGTERM) is before  # the search's own handler is back
