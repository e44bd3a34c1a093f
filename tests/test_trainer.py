"""The pre-training loop end to end on real text: every config family's loss falls, the workdir holds its outputs, and
a diverging run stops with the step number and no checkpoint of bad parameters.

Runs on ../shared/data/tinyshakespeare (skipped when absent) with each family's `runlocal` config shrunk further.
"""
import importlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from train.core import checkpoint as ckpt_lib
from train.core import trainer

DATA = Path(__file__).resolve().parents[2] / 'shared' / 'data'
SHAKESPEARE = DATA / 'tinyshakespeare' / 'input.txt'

pytestmark = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f'{SHAKESPEARE} is not here')

FAMILIES = ('bert', 'roberta', 'electra', 'gpt', 'llama', 't5')
# Steps are cheap next to compiling; more for the families whose loss moves slowest per step.
STEPS = {'bert': 40, 'roberta': 30, 'electra': 150, 'gpt': 30, 'llama': 30, 't5': 40}


def small_config(family: str, *, steps: int, **train):
  """configs/<family>.py:runlocal on tinyshakespeare, shrunk to seconds."""
  c = importlib.import_module(f'configs.{family}').get_config('runlocal')
  c.data.source = 'files'
  c.data.path = str(SHAKESPEARE)
  c.data.document_split = 'blank_line'
  # Encoders see 15% of positions as targets and T5 a few spans: longer rows give them enough signal per step.
  c.data.seq_len = 64 if family in ('bert', 't5') else 32
  c.data.batch_size = 8
  c.data.vocab_size = 500
  c.data.tokenizer_train_records = 1000
  c.optim.total_steps = steps
  c.train.steps = steps
  c.train.log_every = 25 if family == 'electra' else 5
  c.train.eval_every = 0
  c.train.eval_steps = 1
  c.train.checkpoint_every = steps
  for k, v in train.items():
    c.train[k] = v
  return c


_RUNS = {}


@pytest.fixture(scope='module')
def run_family(tmp_path_factory):
  """family -> (summary, workdir), each family trained once per module."""

  def run(family):
    if family not in _RUNS:
      workdir = tmp_path_factory.mktemp(family)
      summary = trainer.train_and_evaluate(small_config(family, steps=STEPS[family]), str(workdir), log=lambda m: None)
      _RUNS[family] = summary, workdir
    return _RUNS[family]

  return run


@pytest.mark.parametrize('family', FAMILIES)
def test_family_trains_and_loss_falls(family, run_family):
  summary, _ = run_family(family)
  first, final = summary['first_loss'], summary['final_loss']
  # Printed for the closing note (pytest -s shows it).
  print(f'\n{family}: {summary["params"] / 1e6:.2f}M params, {summary["steps"]} steps, train loss (mean of 5 steps) '
        f'{first:.4f} -> {final:.4f}, eval loss {summary["eval"]["loss"]:.4f}, {summary["wall_s"]:.1f} s')
  assert summary['status'] == 'done' and summary['steps'] == STEPS[family]
  assert math.isfinite(first) and math.isfinite(final) and math.isfinite(summary['eval']['loss'])
  if family == 'electra':
    # ELECTRA's loss falls from the generator's MLM alone; what says the discriminator learned is its loss below the
    # base rate's (the entropy of the replaced share: predicting "original" everywhere), in the last logged window.
    _, workdir = run_family(family)
    with open(workdir / 'metrics.jsonl') as f:
      last = [r for r in map(json.loads, f) if r['split'] == 'train'][-1]
    print(f'electra: discriminator loss {last["rtd/discriminator/loss"]:.4f}, base rate '
          f'{last["rtd/disc_loss_baseline"]:.4f}, disc_auc {last["rtd/disc_auc"]:.3f}')
    assert last['rtd/discriminator/loss'] < last['rtd/disc_loss_baseline'] - 0.01, last
    return
  # A clear drop, not a tuned threshold: each family falls well over a nat in these runs except T5/BERT (~0.5-1).
  assert final < first - 0.3, (family, first, final)


def test_workdir_outputs(run_family):
  summary, workdir = run_family('gpt')
  steps = STEPS['gpt']
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['config']['model']['preset'] == 'gpt2-tiny' and saved['config']['train']['steps'] == steps
  assert 0 < saved['model']['vocab_size'] <= 500

  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [r for r in records if r['split'] == 'train']
  assert [r['step'] for r in train] == list(range(5, steps + 1, 5))
  for r in train:
    for key in ('loss', 'clm/loss', 'clm/accuracy', 'clm/perplexity', 'grad_norm', 'learning_rate', 'steps_per_sec',
                'tokens_per_sec'):
      assert isinstance(r[key], float) and math.isfinite(r[key]), (key, r)
    assert r['tokens_per_sec'] == pytest.approx(r['steps_per_sec'] * 8 * 32)
  assert train[0]['loss'] == summary['first_loss'] and train[-1]['loss'] == summary['final_loss']
  evals = [r for r in records if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [steps] and math.isfinite(evals[0]['loss'])

  assert len(list((workdir / 'tensorboard').glob('events.*'))) == 1  # train and eval scalars in one event file
  ckpts = ckpt_lib.Checkpoints(str(workdir / 'checkpoints'))
  assert ckpts.all_steps() == [steps]
  ckpts.close()
  tokenizer_files = [p for p in (workdir / 'tokenizer').rglob('*') if p.is_file()]
  assert tokenizer_files


@pytest.mark.parametrize('trainable', [None, {'w': True, 'b': False}])
def test_train_step_applies_the_optimizer_or_leaves_a_nonfinite_step_bitwise(trainable):
  """A finite step is exactly the optimizer's update (frozen leaves untouched); one with an infinite input leaves
  params and optimizer state bitwise as they were, counts the step and records it as the first non-finite one."""
  import jax
  import jax.numpy as jnp
  import optax
  from train.core import steps

  def loss_fn(params, batch, rng, *, model, deterministic):
    loss = jnp.sum((batch['x'] @ params['w'] + params['b'] - 1.0) ** 2)
    return loss, {'loss': loss}

  rng = np.random.default_rng(0)
  params = {'w': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32), 'b': jnp.ones((2,), jnp.float32)}
  opt = optax.adamw(0.1, weight_decay=0.01)
  state = dict(params=params, opt_state=opt.init(params), step=jnp.int32(4), rng=jax.random.key_data(jax.random.key(0)),
               nonfinite_step=jnp.int32(-1))
  step = jax.jit(lambda s, b: steps.train_step(s, b, model=None, loss_fn=loss_fn, optimizer=opt, trainable=trainable))
  x = rng.normal(size=(5, 3)).astype(np.float32)
  new, metrics = step(state, {'x': x})
  grads = jax.grad(lambda p: loss_fn(p, {'x': x}, None, model=None, deterministic=False)[0])(params)
  if trainable:
    grads['b'] = jnp.zeros_like(grads['b'])
  updates, opt_state = opt.update(grads, state['opt_state'], params)
  want = optax.apply_updates(params, updates)
  if trainable:
    want['b'] = params['b']
  for k in params:
    np.testing.assert_allclose(new['params'][k], want[k], rtol=1e-6, atol=1e-7)
  assert not np.array_equal(new['params']['w'], params['w'])
  if trainable:
    np.testing.assert_array_equal(new['params']['b'], params['b'])  # frozen: bitwise
  assert int(new['step']) == 5 and int(new['nonfinite_step']) == -1 and np.isfinite(float(metrics['grad_norm']))

  x[2, 1] = np.inf
  bad, metrics = step(new, {'x': x})
  assert int(bad['step']) == 6 and int(bad['nonfinite_step']) == 5 and not np.isfinite(float(metrics['loss']))
  for a, b in zip(jax.tree.leaves((bad['params'], bad['opt_state'])), jax.tree.leaves(
      (new['params'], new['opt_state']))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nonfinite_loss_stops_with_step_and_no_bad_checkpoint(tmp_path):
  # lr 1e30: warmup starts at 0, so step 1 is finite; the parameters then blow up and a later loss is NaN/Inf.
  c = small_config('gpt', steps=12, checkpoint_every=2, log_every=6)
  c.optim.learning_rate = 1e30
  c.optim.clip_norm = 0.0
  c.train.max_param_growth = 0.0  # the growth guard would stop the run first: this test is the NaN guard's
  with pytest.raises(FloatingPointError, match=r'at step \d+') as err:
    trainer.train_and_evaluate(c, str(tmp_path), log=lambda m: None)
  message = str(err.value)
  bad = int(message.split('at step ')[1].split(';')[0])
  print(f'\nnon-finite at step {bad}: {message}')
  assert 1 <= bad <= 12 and '\n' not in message
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints'))
  steps = ckpts.all_steps()
  ckpts.close()
  assert all(s < bad for s in steps), (bad, steps)
  # The checkpoint the message names as the last good one is really there (its async save was waited for) ...
  if steps:
    assert f'the last checkpoint (step {max(steps)}) holds finite parameters' in message, (message, steps)
  else:
    assert 'no checkpoint had been written yet' in message, message
  if steps:
    # ... and finite all through.
    import orbax.checkpoint as ocp
    state = ocp.StandardCheckpointer().restore(tmp_path / 'checkpoints' / str(max(steps)) / 'state')
    assert all(np.isfinite(np.asarray(x)).all() for x in jax_leaves(state['params']))
  metrics = tmp_path / 'metrics.jsonl'
  for line in (metrics.read_text().splitlines() if metrics.exists() else []):
    assert json.loads(line)['step'] < bad


def test_divergence_guard_stops_runaway_but_finite_parameters_before_they_are_saved(tmp_path):
  # lr 1e30 makes the parameters huge before they turn NaN; train.max_param_norm stops the run at the first save or
  # log step past the limit, and no checkpoint ever holds such parameters.
  c = small_config('gpt', steps=12, checkpoint_every=1, log_every=1)
  c.optim.learning_rate, c.optim.clip_norm, c.train.max_param_norm = 1e30, 0.0, 1e4
  with pytest.raises(FloatingPointError, match=r'parameter norm .* exceeds config.train.max_param_norm=10000'):
    trainer.train_and_evaluate(c, str(tmp_path), log=lambda m: None)
  import optax
  import orbax.checkpoint as ocp
  for step_dir in (p for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit()):
    params = ocp.StandardCheckpointer().restore(step_dir / 'state')['params']
    assert float(optax.tree.norm(params)) <= 1e4, step_dir.name


def jax_leaves(tree):
  import jax
  return jax.tree.leaves(tree)


def test_sigterm_saves_a_checkpoint_and_returns(tmp_path):
  # Preemption (Colab / Cloud TPU) arrives as SIGTERM: sent here from the progress log after step 3 of 10.
  import signal
  c = small_config('gpt', steps=10, log_every=1, checkpoint_every=10)
  c.train.eval_steps = 0

  def log(message):
    if message.startswith('step 3/'):
      os.kill(os.getpid(), signal.SIGTERM)

  previous = signal.getsignal(signal.SIGTERM)
  summary = trainer.train_and_evaluate(c, str(tmp_path), log=log)
  assert signal.getsignal(signal.SIGTERM) == previous  # the handler is the loop's only
  assert summary['status'] == 'preempted' and summary['steps'] == 3
  ckpts = ckpt_lib.Checkpoints(str(tmp_path / 'checkpoints'))
  assert ckpts.all_steps() == [3]
  ckpts.close()
