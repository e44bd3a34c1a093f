"""Bad values refused by name, in process: `trainer.prepare` raises one line naming the config field (or the file)
and the fix, before anything compiles, for every value that would otherwise train nonsense or fail inside a library
(a dropout of 2, label smoothing of 1.5, every objective weighted 0, a one-token sequence, a mesh axis that does not
exist, a FIFO as the corpus, an unknown TFDS name, a tokenizer file that is not one, ...). The command line turns each
into `error: <line>` and exit code 2 (tests/test_main_cli.py runs a few end to end).

Also here, the rest of the run's start-up as a user meets it on a short or resumed run: a warmup longer than the run
is clipped with a line, train.steps changed on resume is said, every strategy's trainable and frozen parameter counts
are logged, and a finished workdir trims the checkpoints a kill left over."""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.core import trainer

REPO = Path(__file__).resolve().parents[1]


def _config(family='gpt', **fields):
  """configs/<family>.py:runlocal with 'section.field' (or 'section.sub.field') values set."""
  c = importlib.import_module(f'configs.{family}').get_config('runlocal')
  for path, value in fields.items():
    node, keys = c, path.split('__')
    for k in keys[:-1]:
      node = node[k]
    node[keys[-1]] = value
  return c


def _refused(config, tmp_path, *needles, error=(ValueError, FileNotFoundError)):
  logs = []
  with pytest.raises(error) as e:
    trainer.prepare(config, str(tmp_path / 'run'), log=logs.append)
  message = str(e.value)
  print(f'\n{message}')
  assert '\n' not in message, message
  for needle in needles:
    assert needle in message, (needle, message)
  assert not any('memory check skipped' in line for line in logs), logs  # no noise before the error
  return message


CASES = {
    'dropout': (dict(model__overrides__dropout_rate=2.0),
                ['config.model.overrides.dropout_rate: ModelConfig.dropout_rate=2.0', '[0, 1)']),
    'attention_dropout': (dict(model__overrides__attention_dropout_rate=1.0), ['attention_dropout_rate=1.0']),
    'mlp_dropout': (dict(model__overrides__mlp_dropout_rate=-0.1), ['mlp_dropout_rate=-0.1']),
    'label_smoothing': (dict(loss__label_smoothing=1.5), ['config.loss.label_smoothing=1.5', '[0, 1)']),
    'eval_fraction_negative': (dict(data__eval_fraction=-0.5), ['config.data.eval_fraction=-0.5', '[0, 1)']),
    'eval_fraction_above_one': (dict(data__eval_fraction=1.5), ['config.data.eval_fraction=1.5']),
    'every_weight_zero':
        (dict(objectives=dict(clm=0.0)), ['config.objectives=', 'every weight is 0', '--config.objectives.clm=1.0']),
    'negative_weight': (dict(objectives=dict(clm=-1.0)), ['config.objectives.clm=-1.0', '>= 0']),
    'one_token_rows': (dict(data__seq_len=1), ['config.data.seq_len=1', 'at least 2']),
    'mesh_shape_not_integers': (dict(mesh__shape=('abc',)), ['config.mesh.shape=', 'integer size']),
    'mesh_rule_unknown_axis':
        (dict(mesh__rules=(['embed', 'nope'],)), ['config.mesh.rules', "'nope'", 'not a mesh axis']),
    'negative_prefetch': (dict(data__prefetch=-1), ['config.data.prefetch=-1', '>= 0']),
    'param_growth_guard_below_one': (dict(train__max_param_growth=0.5), ['config.train.max_param_growth=0.5']),
    'best_mode': (dict(train__best_mode='sideways'), ["config.train.best_mode='sideways'"]),
    'unknown_tfds_name': (dict(data__source='tfds',
                               data__tfds_name='nope_dataset'), ["config.data.tfds_name='nope_dataset'", 'no dataset']),
    'missing_init_from': (dict(model__init_from='/nonexistent/ckpt'), ['config.model.init_from=/nonexistent/ckpt']),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_a_bad_value_is_refused_in_one_line_naming_it(case, tmp_path):
  fields, needles = CASES[case]
  message = _refused(_config(**fields), tmp_path, *needles)
  if case == 'unknown_tfds_name':
    assert len(message) < 300, message  # not the catalog's every name


def test_bert_mask_rate_above_one_and_best_mode_with_a_best_metric(tmp_path):
  _refused(_config('bert', data__mask_rate=2.0), tmp_path, 'config.data.mask_rate=2.0', '(0, 1]')
  finetune = importlib.import_module('configs.finetune').get_config('task=sst2,strategy=full,runlocal')
  finetune.train.best_mode = 'sideways'  # best_metric is eval/accuracy: the mode is what is wrong
  _refused(finetune, tmp_path, "config.train.best_mode='sideways'")


def test_files_that_cannot_train_are_named(tmp_path):
  fifo = tmp_path / 'corpus.fifo'
  os.mkfifo(fifo)
  _refused(_config(data__source='files', data__path=str(fifo)), tmp_path, f'config.data.path: {fifo}',
           'not a regular file')
  control = tmp_path / 'control.txt'
  control.write_bytes(b''.join(bytes([c, c + 1, c + 2]) + b'\n\n' for c in range(1, 28, 3)))
  _refused(_config(data__source='files', data__path=str(control), data__document_split='blank_line'), tmp_path,
           str(control), 'only control characters')


def test_a_file_that_is_no_tokenizer_is_one_line_naming_it(tmp_path):
  garbage = tmp_path / 'tokenizer.json'
  garbage.write_bytes(bytes(range(256)) * 4)
  _refused(_config(data__tokenizer_path=str(garbage)), tmp_path, 'config.data.tokenizer_path', str(garbage),
           'not a readable tokenizer file')
  text = tmp_path / 'notes.txt'
  text.write_text('some plain text, not a vocabulary\nand a second line\n')
  _refused(_config(data__tokenizer_path=str(text)), tmp_path, 'config.data.tokenizer_path', str(text),
           'not a BERT vocab.txt')
  # The run's own tokenizer (a resumed workdir), damaged since it was written.
  from train.data import tokenizers
  own = tmp_path / 'run' / 'tokenizer'
  tokenizers.train_tokenizer('bpe', ['a few words of text to learn from'] * 20, vocab_size=300).save(own)
  (own / 'tokenizer.json').write_bytes(bytes(range(256)))
  _refused(_config(), tmp_path, str(own / 'tokenizer.json'), "this run's own tokenizer")


def test_evaluate_names_from_when_it_is_no_run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  for where, why in (('/nonexistent/run', 'does not exist'), (str(tmp_path), 'holds no config.json')):
    proc = subprocess.run([
        sys.executable, '-m', 'train.evaluate', f'--from={where}', f'--data={tmp_path / "dev.tsv"}',
        f'--out={tmp_path / "out"}'
    ], cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, proc.stderr[-2000:])
    assert lines[0].startswith(f'error: --from={where} {why}'), lines


def _checkpoint_steps(workdir: Path) -> list[int]:
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def test_a_runaway_learning_rate_stops_before_absurd_parameters_are_saved(tmp_path):
  # SGD at lr 1e30: step 1 is warmup's lr 0, step 2 moves the parameters to ~1e28, finite, which no checkpoint may
  # hold; the default growth guard (train.max_param_growth=1000) stops the run at that step's log.
  c = _config(optim__optimizer='sgd', optim__learning_rate=1e30, optim__clip_norm=0.0, optim__warmup_steps=1,
              train__steps=4, train__log_every=1, train__checkpoint_every=1, train__eval_steps=0)
  workdir = tmp_path / 'run'
  with pytest.raises(FloatingPointError, match=r'at step 2 is over config.train.max_param_growth=1000 times'):
    trainer.train_and_evaluate(c, str(workdir), log=lambda m: None)
  import numpy as np
  import orbax.checkpoint as ocp
  assert _checkpoint_steps(workdir) == [1]
  params = ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / '1' / 'state')['params']
  import jax
  assert max(float(np.abs(np.asarray(x)).max()) for x in jax.tree.leaves(params)) < 100


def test_short_resumed_and_finished_runs_say_what_they_do(tmp_path):
  workdir, logs = tmp_path / 'run', []
  # runlocal's 5 warmup steps do not fit a 4-step run: clipped, with a line, instead of an optimizer error.
  c = _config(train__steps=4, train__checkpoint_every=1, train__keep_checkpoints=4, train__log_every=2,
              train__eval_steps=0)
  summary = trainer.train_and_evaluate(c, str(workdir), log=logs.append)
  assert summary['status'] == 'done' and _checkpoint_steps(workdir) == [1, 2, 3, 4]
  assert any('config.optim.warmup_steps=5 does not fit' in line and 'clipped to 0' in line for line in logs), logs
  # Every run says how many parameters train and how many are frozen (here all train).
  model = next(line for line in logs if line.startswith('model '))
  assert f'{summary["params"]:,} trainable, 0 frozen' in model, model
  # A kill after the final save and before orbax's cleanup leaves one step too many: the rerun that has nothing to
  # train trims to keep_checkpoints.
  logs.clear()
  c.train.keep_checkpoints = 3
  assert trainer.train_and_evaluate(c, str(workdir), log=logs.append)['status'] == 'finished'
  assert _checkpoint_steps(workdir) == [2, 3, 4]
  assert any('removed checkpoint step(s) [1]' in line for line in logs), logs
  # More steps on resume: accepted, and said, with what it does to the learning-rate schedule.
  logs.clear()
  c.train.steps = 6
  assert trainer.train_and_evaluate(c, str(workdir), log=logs.append)['steps'] == 6
  said = [line for line in logs if 'config.train.steps changed' in line]
  assert len(said) == 1 and 'from 4' in said[0] and 'to 6' in said[0] and 'schedule now ends at step 6' in said[0]


@pytest.mark.parametrize('strategy', ['full', 'head', 'soft_prompt', 'lora', 'prompt+lora'])
def test_every_strategy_counts_its_trainable_and_frozen_parameters(strategy, tmp_path):
  rows = ''.join(f'{"a good film" if i % 2 else "a bad film"} number {i}\t{i % 2}\n' for i in range(40))
  (tmp_path / 'train.tsv').write_text('sentence\tlabel\n' + rows)
  c = importlib.import_module('configs.finetune').get_config(f'task=sst2,strategy={strategy},runlocal')
  c.model.preset, c.data.train, c.data.vocab_size = 'bert-tiny', str(tmp_path / 'train.tsv'), 300
  run = trainer.prepare(c, str(tmp_path / 'run'), log=lambda m: None)
  from model import heads
  total, trainable = heads.count_params(run.setup.abstract_state['params']), trainer.trainable_params(run.setup)
  print(f'\n{strategy}: {trainable:,} of {total:,} train')
  if strategy == 'full':
    assert trainable == total
  else:
    assert 0 < trainable < total / 10, (trainable, total)
