"""The command line as a newcomer meets it: a bad config, bad data or a mistake in the flags is one line on stderr
naming the field or file and the fix, exit code 2, and nothing in an existing workdir touched; --print_config shows
every field after overrides without training; nested model overrides, runlocal with a named size, and config paths
that work from any directory. Every case stops before anything compiles, so each subprocess takes seconds."""
import errno
import importlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from configs import common
from model.config import set_fields

REPO = Path(__file__).resolve().parents[1]
FAMILIES = ('bert', 'electra', 'gpt', 'llama', 'roberta', 't5')

# Failures inside the trainer (config validated against the model and data before compiling).
TRAINER_CASES = {
    # gpt2-tiny has d_model 128; a single nested key and a whole dict both reach the model config.
    'heads_do_not_divide_d_model': (['--config.model.overrides.num_heads=3'], 'num_heads'),
    'heads_do_not_divide_d_model_dict': (["--config.model.overrides={'num_heads': 3}"], 'num_heads'),
    'unknown_objective': (["--config.objectives={'clm': 1.0, 'clm_typo': 1.0}"], 'clm_typo'),
    'no_pretraining_objective': (["--config.objectives={'mlm_typo': 1.0}"], 'config.objectives'),
    'missing_data_file': (['--config.data.source=files',
                           '--config.data.path=/nonexistent/corpus.txt'], 'config.data.path'),
    # Counts that would divide by zero, delete every checkpoint or never stop, refused before anything runs.
    'keep_no_checkpoints': (['--config.train.keep_checkpoints=0'], 'config.train.keep_checkpoints=0'),
    'log_every_zero': (['--config.train.log_every=0'], 'config.train.log_every=0'),
    'checkpoint_every_zero': (['--config.train.checkpoint_every=0'], 'config.train.checkpoint_every=0'),
    'negative_eval_steps': (['--config.train.eval_steps=-1'], 'config.train.eval_steps=-1'),
    'no_steps': (['--config.train.steps=0'], 'config.train.steps=0'),
    'best_metric_without_split': (['--config.train.best_metric=loss'], "'eval/<metric>'"),
    'infinite_learning_rate': (['--config.optim.learning_rate=inf'], 'learning_rate=inf'),
    'negative_targets_len': (['--config.data.targets_len=-4'], 'config.data.targets_len=-4'),
    # As the command line parses them (tests/test_refusals.py has every refused value in process).
    'mesh_rule_unknown_axis': (["--config.mesh.rules=[['embed','nope']]"], "config.mesh.rules: the rule ['embed', "
                               "'nope'] maps 'embed' to 'nope', which is not a mesh axis"),
    'mesh_shape_not_integers': (['--config.mesh.shape=abc'], "config.mesh.shape=('abc',): give one integer size"),
    'dropout_above_one': (["--config.model.overrides={'dropout_rate': 2.0}"],
                          'config.model.overrides.dropout_rate: ModelConfig.dropout_rate=2.0: must be in [0, 1)'),
    'bad_coordinator': (['--coordinator=nohost', '--num_processes=2', '--process_id=0'], "--coordinator='nohost'"),
    'process_id_out_of_range': (['--coordinator=127.0.0.1:1', '--num_processes=2', '--process_id=5'], '--process_id=5'),
}

# Mistakes in the flags themselves: (arguments after --workdir, substrings the one line must hold).
FLAG_CASES = {
    'field_typo': (['--config=configs/gpt.py:runlocal', '--config.trian.steps=5'],
                   ['--config.trian.steps', "no field 'trian'", 'did you mean config.train?']),
    'nested_field_typo': (['--config=configs/gpt.py:runlocal', '--config.model.overrides.num_layer=4'],
                          ["no field 'num_layer'", 'did you mean config.model.overrides.num_layers?']),
    'wrong_type': (['--config=configs/gpt.py:runlocal',
                    '--config.train.steps=abc'], ['--config.train.steps=abc', 'takes an int value']),
    'wrong_type_override': (['--config=configs/gpt.py:runlocal', '--config.model.overrides.num_layers=four'],
                            ['--config.model.overrides.num_layers=four', 'int']),
    'missing_config_file': (['--config=configs/nope.py:runlocal'], ["no file 'configs/nope.py'", 'configs/gpt.py']),
    'bad_config_argument': (['--config=configs/gpt.py:sise=small'], ["config argument 'sise' is unknown", 'size']),
    'unknown_size': (['--config=configs/bert.py:size=mini2,runlocal'], ["size='mini2'", 'base, mini, small, tiny']),
    'switch_with_value': (['--config=configs/gpt.py:runlocal=maybe'], ['runlocal is a switch']),
    'unknown_flag': (['--config=configs/gpt.py:runlocal', '--stepz=4'], ["Unknown command line flag 'stepz'"]),
    'stray_argument': (['--config=configs/gpt.py:runlocal', 'steps=4'], ["unexpected argument(s) ['steps=4']"]),
}


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  env.pop('XLA_FLAGS', None)
  return env


def _cli(*args, cwd=REPO, **kwargs):
  return subprocess.run([sys.executable, '-m', 'train.main', *args], cwd=cwd, env=_env(), capture_output=True,
                        text=True, timeout=300, check=False, **kwargs)


def _snapshot(workdir: Path):
  return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in sorted(workdir.rglob('*')) if p.is_file()}


def _earlier_run(tmp_path: Path) -> Path:
  """A workdir from an earlier run: its outputs must survive a bad command."""
  workdir = tmp_path / 'run'
  (workdir / 'checkpoints').mkdir(parents=True)
  (workdir / 'config.json').write_text('{"config": {"marker": 1}}\n')
  (workdir / 'metrics.jsonl').write_text('{"step": 5, "split": "train", "loss": 1.5}\n')
  (workdir / 'checkpoints' / 'note.txt').write_text('earlier run\n')
  return workdir


def _assert_one_line_error(proc, *needles):
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])
  assert 'Traceback' not in proc.stdout + proc.stderr


@pytest.mark.parametrize('case', sorted(TRAINER_CASES))
def test_bad_config_or_data_is_one_line_and_touches_nothing(case, tmp_path):
  args, field = TRAINER_CASES[case]
  workdir = _earlier_run(tmp_path)
  before = _snapshot(workdir)
  proc = _cli('--config=configs/gpt.py:runlocal', f'--workdir={workdir}', *args)
  print(f'\n{case}: rc {proc.returncode}, stderr: {proc.stderr.strip()}')
  _assert_one_line_error(proc, field)
  assert _snapshot(workdir) == before


def test_a_corpus_of_one_passage_is_refused_in_one_line(tmp_path):
  corpus = tmp_path / 'one.txt'
  corpus.write_text('One passage of text and no blank line in it.\n')
  workdir = _earlier_run(tmp_path)
  before = _snapshot(workdir)
  proc = _cli('--config=configs/gpt.py:runlocal', f'--workdir={workdir}', '--config.data.source=files',
              f'--config.data.path={corpus}')
  _assert_one_line_error(proc, str(corpus), 'none to train on', 'eval_fraction')
  assert _snapshot(workdir) == before  # the TFDS build and the tokenizer it made are gone again


def test_a_finished_workdir_reruns_to_exit_0_and_refuses_another_model(tmp_path):
  # The last checkpoint is the final step (as after a kill that lands after it): a rerun, as a preemption-restart
  # loop does it, says so and writes nothing; the same workdir with another architecture is refused in one line.
  workdir = tmp_path / 'run'
  run = ('--config=configs/gpt.py:runlocal', f'--workdir={workdir}', '--config.train.steps=6',
         '--config.train.checkpoint_every=3', '--config.train.log_every=3')
  first = _cli(*run)
  assert first.returncode == 0, first.stderr[-2000:]
  evals = [line for line in (workdir / 'metrics.jsonl').read_text().splitlines() if '"eval"' in line]
  assert len(evals) == 1 and '"step": 6' in evals[0]  # the last step is evaluated though eval_every is 60
  before = _snapshot(workdir)
  again = _cli(*run)
  assert again.returncode == 0 and 'nothing to do' in again.stdout, (again.stdout, again.stderr)
  assert _snapshot(workdir) == before
  other = _cli(*run, '--config.model.overrides.num_layers=3')
  _assert_one_line_error(other, 'another model', 'num_layers: 2 -> 3')
  assert _snapshot(workdir) == before


@pytest.mark.parametrize('case', sorted(FLAG_CASES))
def test_flag_mistake_is_one_line_with_the_fix(case, tmp_path):
  args, needles = FLAG_CASES[case]
  workdir = _earlier_run(tmp_path)
  before = _snapshot(workdir)
  proc = _cli(f'--workdir={workdir}', *args)
  print(f'\n{case}: rc {proc.returncode}, stderr: {proc.stderr.strip()}')
  _assert_one_line_error(proc, *needles)
  assert _snapshot(workdir) == before


def test_print_config_shows_every_field_after_overrides_and_trains_nothing(tmp_path):
  workdir = tmp_path / 'never_created'
  proc = _cli('--config=configs/gpt.py:runlocal', f'--workdir={workdir}', '--print_config',
              '--config.model.overrides.num_layers=4', '--config.train.steps=7', "--config.mesh.shape=(1,-1,1)")
  assert proc.returncode == 0, proc.stderr
  lines = set(proc.stdout.splitlines())
  for line in ('config.model.overrides.num_layers = 4', 'config.train.steps = 7', 'config.mesh.shape = (1, -1, 1)',
               "config.model.preset = 'gpt2-tiny'", 'config.model.overrides.d_model = None',
               'config.model.generator_overrides.num_heads = None', 'config.optim.total_steps = 0'):
    assert line in lines, (line, proc.stdout[:2000])
  assert not workdir.exists()
  # --workdir may be left out when only printing.
  assert _cli('--config=configs/t5.py:runlocal', '--print_config').returncode == 0


def test_config_path_works_from_any_directory(tmp_path):
  proc = _cli('--config=configs/llama.py:size=tiny', '--print_config', cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert "config.model.preset = 'llama-tiny'" in proc.stdout.splitlines()


@pytest.mark.parametrize('family', FAMILIES)
def test_runlocal_keeps_a_named_size_and_unknown_sizes_fail(family):
  get_config = importlib.import_module(f'configs.{family}').get_config
  full, local = get_config(None), get_config('runlocal')
  named = dict(bert='base', electra='small', gpt='small', llama='smollm2-135m', roberta='base', t5='v1_1-small')[family]
  sized = get_config(f'size={named},runlocal')
  # runlocal shrinks data and steps in both cases; only without a size does it also pick a tiny model.
  for c in (local, sized):
    # ELECTRA's runlocal trains 300 steps at 5e-4: its discriminator needs them to learn (configs/electra.py).
    steps = 300 if family == 'electra' else 60
    assert c.train.steps == steps and c.optim.total_steps == 0 and c.data.batch_size == 8 and c.data.seq_len == 64
  assert sized.model.preset == get_config(f'size={named}').model.preset
  assert set_fields(sized.model.overrides) == set_fields(get_config(f'size={named}').model.overrides)
  assert local.model.preset != full.model.preset or set_fields(local.model.overrides).get('num_layers')
  with pytest.raises(ValueError, match=r"size='mini2' is unknown; known sizes: "):
    get_config('size=mini2,runlocal')


def test_set_fields_drops_unset_overrides():
  c = importlib.import_module('configs.roberta').get_config('runlocal')
  assert set(c.model.overrides) >= {'num_layers', 'd_model', 'rope_theta', 'num_kv_heads'}
  assert set_fields(c.model.overrides) == {'type_vocab_size': 1}
  c.model.overrides.num_layers = 4
  c.model.overrides.rope_theta = 500  # an int into a float field is stored as a float
  assert set_fields(c.model.overrides) == {'type_vocab_size': 1, 'num_layers': 4, 'rope_theta': 500.0}
  assert set_fields({'max_len': 64, 'head_dim': None, 'shape': (1, 2)}) == {'max_len': 64, 'shape': (1, 2)}
  assert set_fields(None) == {}


def test_every_config_field_is_documented_where_it_is_set():
  """Each field of base() (and of optim.default_config) has a comment on its line in configs/common.py (or
  train/core/optim.py), so `grep field configs/common.py` tells what it means."""
  sources = (REPO / 'configs' / 'common.py').read_text() + (REPO / 'train' / 'core' / 'optim.py').read_text()
  commented = [line for line in sources.splitlines() if '#' in line]
  names = []
  for key, value in common.base().items():
    if hasattr(value, 'items') and key != 'objectives':  # a group: its fields (model.overrides: model/config.py)
      names += [f'{key}.{k}' for k in value.keys()]
    else:
      names.append(key)
  for name in names:
    pattern = re.compile(rf'(\b|\.){name.rsplit(".", 1)[-1]}\s*=.*#')
    assert any(pattern.search(line) for line in commented), f'config.{name} has no comment where it is set'


def test_a_second_run_on_a_busy_workdir_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
  import signal

  from train.core.workdir import WorkdirLock
  workdir = tmp_path / 'run'
  first = subprocess.Popen([
      sys.executable, '-m', 'train.main', '--config=configs/gpt.py:runlocal', f'--workdir={workdir}',
      '--config.train.steps=100000', '--config.train.log_every=5', '--config.train.checkpoint_every=100000'
  ], cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    for line in first.stdout:  # training has started: the lock is held
      if line.startswith('step 5/'):
        break
    metrics = (workdir / 'metrics.jsonl').read_bytes()
    second = _cli('--config=configs/gpt.py:runlocal', f'--workdir={workdir}')
    _assert_one_line_error(second, 'is in use by process', str(first.pid), 'another --workdir')
    assert (workdir / 'metrics.jsonl').read_bytes()[:len(metrics)] == metrics  # the first run's lines untouched
  finally:
    first.send_signal(signal.SIGKILL)
    first.wait()
  with WorkdirLock(str(workdir)):  # the kernel dropped the killed run's lock
    pass
  assert not (workdir / '.lock').exists()


@pytest.mark.parametrize('damage', ['truncate', 'flip'])
def test_a_corrupt_latest_checkpoint_is_set_aside_and_the_run_resumes_from_the_last_good_one(tmp_path, damage):
  workdir = tmp_path / 'run'
  run = ('--config=configs/gpt.py:runlocal', f'--workdir={workdir}', '--config.train.checkpoint_every=3',
         '--config.train.log_every=3')
  first = _cli(*run, '--config.train.steps=6')
  assert first.returncode == 0, first.stderr[-2000:]
  assert (workdir / 'checkpoints' / '6' / 'lmlab_digest.json').exists()
  # The largest array file of step 6: cut in half, or 64 bytes in its middle flipped (it still parses).
  target = max((p for p in (workdir / 'checkpoints' / '6' / 'state').rglob('*') if p.is_file()),
               key=lambda p: p.stat().st_size)
  data = bytearray(target.read_bytes())
  if damage == 'truncate':
    data = data[:len(data) // 2]
  else:
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
  target.write_bytes(bytes(data))
  again = _cli(*run, '--config.train.steps=9')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'checkpoint step 6 is corrupt' in again.stdout and 'was changed' in again.stdout, again.stdout
  assert 'resumed from step 3' in again.stdout and 'Traceback' not in again.stdout + again.stderr
  assert (workdir / 'checkpoints' / 'corrupt-6' / 'state').is_dir()  # set aside, never deleted
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == ['3', '6', '9']


def _file_size_limit(limit: int):
  """preexec_fn: `ulimit -f` for the child (SIGXFSZ left at its default: train.main must keep it from killing)."""
  import resource

  def set_limit():
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

  return set_limit


def test_a_disk_that_fills_inside_an_async_save_is_one_line_and_the_rerun_resumes_from_the_last_good_step(tmp_path):
  # Steps 3 and 6 saved; then a run to step 9 under a 1 MiB file-size limit (ulimit -f 1024): the small files still
  # write, orbax's array file of step 9 (~7 MB) fails partway in its background thread. One line, not orbax's
  # tracebacks; step 6 stays the newest checkpoint, and the rerun with room resumes from it to the same numbers.
  workdir = tmp_path / 'run'
  run = ('--config=configs/gpt.py:runlocal', f'--workdir={workdir}', '--config.optim.total_steps=9',
         '--config.train.checkpoint_every=3', '--config.train.log_every=3')
  first = _cli(*run, '--config.train.steps=6')
  assert first.returncode == 0, first.stderr[-2000:]
  full = _cli(*run, '--config.train.steps=9', preexec_fn=_file_size_limit(1 << 20))
  print(f'\nfull disk: rc {full.returncode}, stderr: {full.stderr.strip()}')
  _assert_one_line_error(full, 'the disk is full (File too large) writing', 'checkpoints/9.orbax-checkpoint-tmp',
                         'ulimit -f', 'it resumes from step 6')
  checkpoints = workdir / 'checkpoints'
  assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ['3', '6']
  assert (checkpoints / '6' / 'lmlab_digest.json').exists()
  logged = (workdir / 'metrics.jsonl').read_text()  # step 9 was trained, logged and evaluated before the save

  again = _cli(*run, '--config.train.steps=9')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from step 6' in again.stdout and 'is corrupt' not in again.stdout, again.stdout
  assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ['3', '6', '9']

  def numbers(text):  # every logged value but the timings
    timing = ('steps_per_sec', 'tokens_per_sec')
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in text.splitlines()]

  resumed = numbers((workdir / 'metrics.jsonl').read_text())
  assert [(r['step'], r['split']) for r in resumed][-2:] == [(9, 'train'), (9, 'eval')]
  assert resumed == numbers(logged)  # bitwise: the resumed steps 7-9 are the ones the failed run computed


def test_a_full_disk_is_recognised_from_every_layer_and_nothing_else_is(tmp_path):
  from train.core import failures  # pylint: disable=g-import-not-at-top
  (tmp_path / 'checkpoints' / '12').mkdir(parents=True)
  (tmp_path / 'checkpoints' / '15.orbax-checkpoint-tmp').mkdir()
  orbax = ValueError('OUT_OF_RANGE: Error writing "params/0" in OCDBT database at local file "/w/ckpt/": Failed '
                     'writing: "/w/ckpt/d/ab12": Failed to write 3203072 bytes to file 5: No space left on device '
                     "[os_error_code='28']")
  cases = {
      'orbax': (orbax, 'the disk is full (No space left on device) writing /w/ckpt/d/ab12:'),
      'python': (OSError(errno.EDQUOT, 'Disk quota exceeded',
                         '/w/metrics.jsonl'), 'the disk is full (Disk quota exceeded) writing /w/metrics.jsonl:'),
      'rust_tokenizer':
          (Exception('File too large (os error 27)'), f'the disk is full (File too large) writing {tmp_path}:'),
      'wrapped': (RuntimeError('save failed'), 'the disk is full (No space left on device)'),
  }
  cases['wrapped'][0].__cause__ = OSError(errno.ENOSPC, 'No space left on device')
  for name, (error, start) in cases.items():
    line = failures.disk_full(error, str(tmp_path))
    assert line is not None and line.startswith(start), (name, line)
    assert 'ulimit -f' in line and 'it resumes from step 12, the newest complete checkpoint' in line, (name, line)
  for other in (ValueError('File too large to parse as a config'), OSError(errno.EACCES, 'Permission denied')):
    assert failures.disk_full(other, str(tmp_path)) is None


def test_the_lock_leaves_another_runs_lock_file_alone(tmp_path):
  # A workdir deleted and made again under a live run (rm -rf, a new run): the old run's exit must neither fail nor
  # remove the new run's lock file.
  import shutil

  from train.core.workdir import WorkdirLock
  workdir = tmp_path / 'run'
  with WorkdirLock(str(workdir)):
    shutil.rmtree(workdir)
    workdir.mkdir()
    (workdir / '.lock').write_text('{"pid": 1}')
  assert (workdir / '.lock').read_text() == '{"pid": 1}'
  with WorkdirLock(str(tmp_path / 'gone')):
    shutil.rmtree(tmp_path / 'gone')  # removed with its lock: the exit has nothing to clean
