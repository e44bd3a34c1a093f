"""Starting points: a run initialised from another run's checkpoint starts where that run ended; generate reads it."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import gpt
from train.core import pretrained
from train.core import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(steps, **data):
  c = gpt.get_config('runlocal')
  c.data.seq_len, c.data.batch_size, c.data.vocab_size, c.data.tokenizer_train_records = 32, 4, 500, 600
  c.data.update(data)
  c.optim.total_steps = c.train.steps = steps
  c.optim.warmup_steps = min(2, steps - 1)
  c.optim.decay = 'constant' if steps < 3 else c.optim.decay
  c.train.log_every = c.train.checkpoint_every = steps
  c.train.eval_every, c.train.eval_steps = 0, 0
  return c


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('run_a'))
  summary = trainer.train_and_evaluate(_config(25), workdir, log=lambda m: None)
  return workdir, summary


def test_init_from_a_run_starts_from_its_parameters(trained, tmp_path):
  workdir, summary_a = trained
  loaded = pretrained.load(workdir)
  final_a = jax.device_get(summary_a['state']['params'])
  for a, b in zip(jax.tree.leaves(final_a), jax.tree.leaves(loaded.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # One more step from A's parameters (on A's tokenizer) has a far lower loss than one from scratch.
  cont = _config(1)
  cont.model.init_from = workdir
  fresh = trainer.train_and_evaluate(_config(1, tokenizer_path=os.path.join(workdir, 'tokenizer')),
                                     str(tmp_path / 'fresh'), log=lambda m: None)
  started = trainer.train_and_evaluate(cont, str(tmp_path / 'cont'), log=lambda m: None)
  assert started['first_loss'] < fresh['first_loss'] - 0.5, (started['first_loss'], fresh['first_loss'])
  assert abs(started['first_loss'] - summary_a['final_loss']) < 0.5


def test_init_from_shape_mismatch_names_the_parameter(trained, tmp_path):
  workdir, _ = trained
  cont = _config(1)
  cont.model.init_from = workdir
  cont.model.overrides = {'d_ff': 256}
  with pytest.raises(ValueError, match=r'mlp/wi/(kernel|bias) has shape'):
    trainer.train_and_evaluate(cont, str(tmp_path / 'bad'), log=lambda m: None)


def test_generate_cli_reads_a_run(trained):
  workdir, _ = trained
  out = subprocess.run(
      [sys.executable, '-m', 'train.generate', f'--from={workdir}', '--prompt=The', '--max_new_tokens=5'], cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip().startswith("'The' -> ")
  bad = subprocess.run([sys.executable, '-m', 'train.generate', '--from=/nonexistent/run', '--prompt=x'], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and 'does not exist' in bad.stderr


def test_an_electra_run_is_a_starting_point_through_its_discriminator(tmp_path):
  """ELECTRA fine-tunes its discriminator: loading an rtd run gives the discriminator's architecture and weights (the
  shared embeddings, its encoder and RTD head), not the generator's."""
  from configs import electra
  c = electra.get_config('runlocal')
  c.data.seq_len, c.data.batch_size, c.data.vocab_size, c.data.tokenizer_train_records = 32, 4, 500, 600
  c.optim.total_steps = c.train.steps = c.train.log_every = c.train.checkpoint_every = 3
  c.optim.warmup_steps, c.train.eval_every, c.train.eval_steps = 1, 0, 0
  summary = trainer.train_and_evaluate(c, str(tmp_path / 'electra'), log=lambda m: None)
  loaded = pretrained.load(str(tmp_path / 'electra'))
  trained_params = jax.device_get(summary['state']['params'])
  assert loaded.heads == ('rtd',) and loaded.cfg.d_model == 256 and sorted(loaded.params) == ['embed', 'rtd',
                                                                                              'transformer']
  for ours, theirs in ((loaded.params['transformer'], trained_params['discriminator']),
                       (loaded.params['embed'], trained_params['embed']), (loaded.params['rtd'], trained_params['rtd'])):
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
