"""Property-based fuzzing (hypothesis) of what a user types and feeds: random config overrides through the trainer's
first stage, random bytes and rows in a task's data file through its reader. Whatever comes in, the only errors that
leave are the ones the CLI prints as one line (ValueError, its DataError, FileNotFoundError), never one from inside
jax, flax, orbax, tfds, grain or ml_collections, and a refused start leaves an existing workdir byte-identical."""
import math
from pathlib import Path

import pytest

hypothesis = pytest.importorskip('hypothesis')
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from configs import finetune, gpt  # noqa: E402
from train import tasks  # noqa: E402
from train.core import trainer  # noqa: E402
from train.data import pipeline  # noqa: E402

ONE_LINE = (ValueError, FileNotFoundError)  # train/main.py prints these as `error: ...`, exit 2

_INTS = st.one_of(st.integers(-3, 4), st.sampled_from([0, 1, 7, 10 ** 9]))
_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-3, 1e30]))
OVERRIDES = {
    'train.steps': _INTS,
    'train.log_every': _INTS,
    'train.checkpoint_every': _INTS,
    'train.eval_every': _INTS,
    'train.eval_steps': _INTS,
    'train.keep_checkpoints': _INTS,
    'train.best_metric': st.sampled_from(['', 'loss', 'eval/loss', 'eval/', 'train/loss']),
    'train.best_mode': st.sampled_from(['min', 'max', 'maximum', '']),
    'optim.learning_rate': _FLOATS,
    'optim.warmup_steps': _INTS,
    'optim.total_steps': _INTS,
    'optim.clip_norm': _FLOATS,
    'optim.grad_accum_steps': _INTS,
    'data.seq_len': st.one_of(_INTS, st.sampled_from([16, 100000])),
    'data.batch_size': _INTS,
    'data.vocab_size': st.sampled_from([-1, 0, 5, 300, 10 ** 7]),
    'mesh.shape': st.sampled_from([(-1, 1, 1), (1, 1, 1), (2, 1, 1), (-1, -1, 1), (0, 1, 1), (1, 2), (3, 1, 1)]),
    'model.overrides.num_heads': st.sampled_from([None, 0, 1, 3, 5, -2]),
    'model.overrides.num_layers': st.sampled_from([None, 0, 1, -1]),
    'model.overrides.d_model': st.sampled_from([None, 0, 8, 130, -64]),
}


def _snapshot(workdir: Path):
  return {p.relative_to(workdir).as_posix(): p.read_bytes() for p in sorted(workdir.rglob('*')) if p.is_file()}


def _earlier_run(root: Path) -> Path:
  workdir = root / 'run'
  (workdir / 'checkpoints').mkdir(parents=True, exist_ok=True)
  (workdir / 'config.json').write_text('{"config": {"marker": 1}}\n')
  (workdir / 'metrics.jsonl').write_text('{"step": 5, "split": "train", "loss": 1.5}\n')
  return workdir


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.sets(st.sampled_from(sorted(OVERRIDES)), min_size=1,
            max_size=4).flatmap(lambda keys: st.fixed_dictionaries({k: OVERRIDES[k] for k in keys})))
def test_config_overrides_fail_in_one_line_and_leave_the_workdir_alone(tmp_path_factory, overrides):
  config = gpt.get_config('runlocal')
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for key in parents:
      node = node[key]
    try:
      node[leaf] = value
    except TypeError:  # a value of another type: the CLI's flag parser refuses it in one line (test_main_cli)
      hypothesis.assume(False)
  root = tmp_path_factory.mktemp('fuzz')
  workdir = _earlier_run(root)
  before = _snapshot(workdir)
  try:
    trainer.prepare(config, str(workdir), log=lambda *_: None)
  except ONE_LINE as e:
    assert '\n' not in str(e).strip() and str(e), (overrides, e)
    assert _snapshot(workdir) == before, overrides  # refused: nothing written
  # Anything else (TypeError, ZeroDivisionError, an orbax or XLA error) fails the test with the overrides shown.


_CELL = st.one_of(st.text(max_size=12), st.sampled_from(['', '\t', '0', '1', '2', '"', '\x00', '\ufeff', 'é']))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.lists(_CELL, min_size=0, max_size=4), min_size=0, max_size=8),
       header=st.sampled_from(['sentence\tlabel', 'label\tsentence', 'text\tlabel', 'sentence',
                               '']), raw=st.binary(max_size=64))
def test_data_files_fail_in_one_line_naming_the_file(tmp_path_factory, rows, header, raw):
  d = tmp_path_factory.mktemp('data')
  body = '\n'.join('\t'.join(r) for r in rows)
  train = d / 'train.tsv'
  train.write_bytes((header + '\n' + body + '\n').encode('utf-8', 'surrogatepass') + raw)
  data = finetune.get_config('task=sst2,runlocal').data
  data.train = data.dev = str(train)
  try:
    labeled = pipeline.read_labeled(data, tasks.get('sst2'))
  except ONE_LINE as e:
    message = str(e)
    assert '\n' not in message.strip() and (str(train) in message or 'config.data' in message), message
    return
  assert labeled.train and all(math.isfinite(len(r['text_a'])) for r in labeled.train)


def test_a_carriage_return_inside_a_field_is_a_bad_row_naming_its_line(tmp_path):
  # Found by the fuzzing above: csv raised its own error for it.
  train = tmp_path / 'train.tsv'
  train.write_bytes(b'sentence\tlabel\ngood\t1\n0\r\t\n')
  data = finetune.get_config('task=sst2,runlocal').data
  data.train = data.dev = str(train)
  with pytest.raises(ValueError, match=f'{train}:3: unreadable row'):
    pipeline.read_labeled(data, tasks.get('sst2'))
