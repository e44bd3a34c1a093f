"""Few-shot sampling as LM-BFF does it (k per class, a same-sized dev subset from the rest of the training records,
deterministic per seed), its place in `read_labeled` (config.data.few_shot_*), and the seeds sweep
(`python -m train.sweep`): a tiny two-seed run writes a mean ± std report and a rerun trains nothing again.
"""
import collections
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.data import few_shot

REPO = Path(__file__).resolve().parents[1]
POS, NEG = ('good', 'great', 'wonderful', 'fine'), ('bad', 'awful', 'terrible', 'poor')
FILLER = ('the', 'movie', 'was', 'a', 'story', 'of', 'and', 'it', 'plot', 'actors', 'film', 'very', 'quite', 'this')


def _records(counts):
  """{label: n} -> records as train/data/readers.py's classification_records makes them, labels interleaved."""
  labels = [label for label, n in counts.items() for _ in range(n)]
  order = np.random.default_rng(0).permutation(len(labels))
  return [{'text_a': f'text {i}', 'text_b': '', 'label': labels[j], 'idx': i} for i, j in enumerate(order)]


def _ids(records):
  return [r['idx'] for r in records]


def test_sampling_is_deterministic_per_seed_and_differs_between_seeds():
  records = _records({'neg': 40, 'pos': 30, 'neutral': 25})
  a = few_shot.sample(records, k=4, seed=13)
  again = few_shot.sample(list(records), k=4, seed=13)
  other = few_shot.sample(records, k=4, seed=21)
  assert (_ids(a[0]), _ids(a[1])) == (_ids(again[0]), _ids(again[1]))
  assert _ids(a[0]) != _ids(other[0]) and _ids(a[1]) != _ids(other[1])
  # The documented order: by label (sorted), then by draw.
  assert [r['label'] for r in a[0]] == ['neg'] * 4 + ['neutral'] * 4 + ['pos'] * 4


@pytest.mark.parametrize('k,dev_k,want_dev', [(8, None, 8), (5, 3, 3), (6, 0, 0)])
def test_exactly_k_per_label_and_a_disjoint_dev_subset(k, dev_k, want_dev):
  records = _records({'0': 20, '1': 16, '2': 30})
  train, dev = few_shot.sample(records, k=k, seed=0, dev_k=dev_k)
  assert few_shot.per_label_counts(train) == {'0': k, '1': k, '2': k}
  assert few_shot.per_label_counts(dev) == ({'0': want_dev, '1': want_dev, '2': want_dev} if want_dev else {})
  assert len(set(_ids(train))) == len(train) and len(set(_ids(dev))) == len(dev)  # without replacement
  assert not set(_ids(train)) & set(_ids(dev))
  assert set(_ids(train + dev)) <= set(_ids(records))


def test_per_label_counts():
  assert few_shot.per_label_counts(_records({'b': 3, 'a': 2})) == {'a': 2, 'b': 3}
  assert list(few_shot.per_label_counts(_records({'b': 3, 'a': 2}))) == ['a', 'b']


def test_too_few_records_is_an_error_naming_the_label_its_count_and_the_fix():
  records = _records({'neg': 40, 'pos': 11})
  with pytest.raises(ValueError, match=r"label 'pos' has 11 training record\(s\).*k=8 \+ dev_k=8 = 16.*few_shot_k"):
    few_shot.sample(records, k=8, seed=0)
  few_shot.sample(records, k=8, seed=0, dev_k=3)  # 11 >= 8 + 3: enough
  # A class the run knows (its label names) but the records lack is as short as it gets.
  with pytest.raises(ValueError, match=r"label 'neutral' has 0 training record"):
    few_shot.sample(records, k=2, seed=0, labels=('neg', 'neutral', 'pos'))
  with pytest.raises(ValueError, match='k=0 must be an integer >= 1'):
    few_shot.sample(records, k=0, seed=0)


# ------------------------------------------------------------------------------------------------- read_labeled


def _write_tsv(path, rows):
  path.write_text('sentence\tlabel\n' + ''.join(f'{s}\t{label}\n' for s, label in rows))
  return path


def _data(**fields):
  from configs import finetune
  data = finetune.get_config('task=sst2,runlocal').data
  data.update(fields)
  return data


def test_read_labeled_draws_k_per_class_with_the_label_names_of_the_whole_file(tmp_path):
  from train import tasks
  from train.data import pipeline
  rng = np.random.default_rng(1)
  rows = [(f'train sentence {i}', label) for i, label in enumerate(rng.choice(['a', 'b', 'c'], size=120))]
  train = _write_tsv(tmp_path / 'train.tsv', rows)
  dev = _write_tsv(tmp_path / 'dev.tsv', [(f'dev sentence {i}', 'a') for i in range(5)])
  sst2 = tasks.get('sst2')
  full = pipeline.read_labeled(_data(train=str(train), dev=str(dev)), sst2)
  assert len(full.train) == 120 and len(full.dev) == 5  # few_shot_k = 0 (the default): everything
  seen = []
  for seed in (13, 21):
    got = pipeline.read_labeled(_data(train=str(train), dev=str(dev), few_shot_k=4, few_shot_seed=seed), sst2)
    assert collections.Counter(r['label'] for r in got.train) == {'a': 4, 'b': 4, 'c': 4}
    assert collections.Counter(r['label'] for r in got.dev) == {'a': 4, 'b': 4, 'c': 4}
    assert all(r['text_a'].startswith('train') for r in got.dev)  # drawn from training records, not the dev file
    assert not {r['idx'] for r in got.train} & {r['idx'] for r in got.dev}
    assert got.names == full.names == {'label_names': ('a', 'b', 'c')}
    seen.append({r['idx'] for r in got.train})
  assert seen[0] != seen[1]
  # few_shot_dev_k=0: no dev subset; the run's dev evaluation reads data.dev as before.
  got = pipeline.read_labeled(_data(train=str(train), dev=str(dev), few_shot_k=4, few_shot_dev_k=0), sst2)
  assert len(got.train) == 12 and [r['text_a'] for r in got.dev] == [f'dev sentence {i}' for i in range(5)]
  got = pipeline.read_labeled(_data(train=str(train), few_shot_k=3, few_shot_dev_k=2), sst2)
  assert len(got.train) == 9 and len(got.dev) == 6


def test_few_shot_is_refused_for_tasks_without_classes_and_for_bad_sizes(tmp_path):
  from train import tasks
  from train.data import pipeline
  train = _write_tsv(tmp_path / 'train.tsv', [(f's {i}', i % 2) for i in range(10)])
  for name in ('wnut17', 'squad'):
    with pytest.raises(ValueError, match=rf"config.data.few_shot_k=4: .*task '{name}' has no classes"):
      pipeline.read_labeled(_data(train=str(train), few_shot_k=4), tasks.get(name))
  with pytest.raises(ValueError, match='config.data.few_shot_k=-1'):
    pipeline.read_labeled(_data(train=str(train), few_shot_k=-1), tasks.get('sst2'))
  with pytest.raises(ValueError, match='config.data.few_shot_dev_k=-2'):
    pipeline.read_labeled(_data(train=str(train), few_shot_k=2, few_shot_dev_k=-2), tasks.get('sst2'))
  with pytest.raises(ValueError, match=r"label '0' has 5 training record\(s\)"):
    pipeline.read_labeled(_data(train=str(train), few_shot_k=3), tasks.get('sst2'))


# ------------------------------------------------------------------------------------------------- the sweep


def _sentences(rng, n):
  rows = []
  for _ in range(n):
    label = int(rng.integers(2))
    words = list(rng.choice(FILLER, size=int(rng.integers(4, 9))))
    words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(POS if label else NEG)))
    rows.append((' '.join(words), label))
  return rows


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return env


def _sweep(workdir, train, dev, *extra):
  """Two seeds of a from-scratch bert-tiny on 4 + 4 sentences per class, 6 steps each."""
  return subprocess.run([
      sys.executable, '-m', 'train.sweep', '--config=configs/finetune.py:task=sst2,runlocal', f'--workdir={workdir}',
      '--seeds=13,21', f'--eval_data={dev}', f'--config.data.train={train}', '--config.model.preset=bert-tiny',
      '--config.data.vocab_size=300', '--config.data.few_shot_k=4', '--config.train.steps=6',
      '--config.train.eval_every=3', '--config.train.checkpoint_every=3', *extra
  ], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)


def _mtimes(folder):
  return {p: p.stat().st_mtime_ns for p in Path(folder).rglob('*') if p.is_file()}


def test_a_sweep_reports_mean_and_std_over_seeds_and_a_rerun_trains_nothing(tmp_path):
  rng = np.random.default_rng(0)
  train = _write_tsv(tmp_path / 'train.tsv', _sentences(rng, 60))
  dev = _write_tsv(tmp_path / 'dev.tsv', _sentences(rng, 30))
  workdir = tmp_path / 'sweep'
  proc = _sweep(workdir, train, dev)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  assert 'seed 21 (2/2) done' in proc.stdout and 'ETA' in proc.stdout
  scores = [json.loads((workdir / f'seed_{s}' / 'eval' / 'metrics.json').read_text()) for s in (13, 21)]
  run = json.loads((workdir / 'seed_21' / 'config.json').read_text())['config']
  assert run['seed'] == 21 and run['data']['few_shot_seed'] == 21 and run['data']['few_shot_k'] == 4
  md = (workdir / 'results.md').read_text()
  print(md)
  table = [line.split('|')[1:-1] for line in md.splitlines() if line.startswith('| ')]
  head = [c.strip() for c in table[0]]
  assert head[:4] == ['seed', 'accuracy', 'f1', 'macro_f1'] and [r[0].strip() for r in table[1:]
                                                                ] == ['13', '21', 'mean ± std']
  for j, metric in enumerate(head[1:4], 1):
    values = [s[metric] for s in scores]
    assert [float(r[j]) for r in table[1:3]] == pytest.approx(values, abs=5e-5)
    mean, std = (float(x) for x in table[3][j].split('±'))
    assert mean == pytest.approx(np.mean(values), abs=5e-5) and std == pytest.approx(np.std(values), abs=5e-5)
  rows = list(csv.DictReader((workdir / 'results.csv').open()))
  assert [r['seed'] for r in rows] == ['13', '21', 'mean', 'std']
  assert float(rows[2]['accuracy']) == pytest.approx(np.mean([s['accuracy'] for s in scores]), abs=1e-12)
  assert 'ddof=0' in md
  # The rerun skips both seeds: no training, no scoring, no file of theirs touched.
  before = _mtimes(workdir / 'seed_13') | _mtimes(workdir / 'seed_21')
  again = _sweep(workdir, train, dev)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('skipped') == 2 and '[seed' not in again.stdout, again.stdout
  assert _mtimes(workdir / 'seed_13') | _mtimes(workdir / 'seed_21') == before
  assert (workdir / 'results.md').read_text().split('| seed')[1] == md.split('| seed')[1]


@pytest.mark.parametrize('args,message', [
    (['--seeds=13,x'], '--seeds=13,x: give comma-separated integers'),
    (['--seeds=13,13'], 'each once'),
    (['--config.seed=3'], '--config.seed=3: the sweep sets config.seed'),
    (['--config.data.few_shot_seed', '3'], 'sets config.data.few_shot_seed'),
    (['--eval_data=/nonexistent.tsv'], '--eval_data=/nonexistent.tsv does not exist'),
    (['--bogus=1'], "Unknown command line flag 'bogus'"),
])
def test_bad_sweep_flags_fail_in_one_line_with_exit_code_2(tmp_path, capsys, args, message):
  from train import sweep
  dev = _write_tsv(tmp_path / 'dev.tsv', [('s', 0)])
  argv = ['sweep', '--config=configs/finetune.py:task=sst2', f'--workdir={tmp_path / "w"}', f'--eval_data={dev}']
  assert sweep.main(argv + args) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: ') and message in err, err
  assert not (tmp_path / 'w').exists()
  assert sweep.main(['sweep', '--workdir=w']) == 2  # flags of the previous call do not linger
  assert '--config --eval_data required' in capsys.readouterr().err


def test_a_misspelt_override_fails_before_any_seed_trains(tmp_path):
  dev = _write_tsv(tmp_path / 'dev.tsv', [('s', 0)])
  proc = subprocess.run([
      sys.executable, '-m', 'train.sweep', '--config=configs/finetune.py:task=sst2', f'--workdir={tmp_path / "w"}',
      f'--eval_data={dev}', '--config.trian.steps=3'
  ], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().count('\n') == 0, proc.stderr
  assert "--config.trian.steps: config has no field 'trian'; did you mean config.train?" in proc.stderr
  assert not (tmp_path / 'w').exists()
