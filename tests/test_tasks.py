"""The task registry is open: an objective defined here, in the test file, pre-trains through `python -m train.main`.

This file is also the config file that run loads (`get_config` below): importing it registers the toy objective "predict
the token two ahead", so no library file knows of it. The other tests check what the records drive: the example
builder chosen for a set of objectives, the tokenizer kind, heads and refusals.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train import objectives
from train import tasks
from train.data import examples as ex

REPO = Path(__file__).resolve().parents[1]


def _skip_two_examples(records, tokenizer, data):
  """Windows of seq_len + 2 tokens: targets[t] = tokens[t + 2], weight 0 where that token is in another document."""
  stream = ex.TokenStream.from_records(records, tokenizer, doc_end_id=tokenizer.eos_id)
  n = data.seq_len

  def transform(index, rng=None):
    toks, seg = stream.window(int(index), n + 2)
    return {
        'tokens': toks[:n],
        'skip_targets': toks[2:].copy(),
        'skip_weights': (seg[2:] == seg[:n]).astype(np.float32),
        'segment_ids': seg[:n],
        'positions': ex.segment_positions(seg[:n])
    }

  return transform, range(stream.num_windows(n + 2))


def _skip_two_loss(out, batch, opts):
  return objectives.cross_entropy(logits=out['lm_logits'], targets=batch['skip_targets'], weights=batch['skip_weights'])


SKIP_TWO = tasks.register(
    tasks.Task(name='skip_two', archs=('decoder',), heads=('lm',), batch_keys=('skip_targets', 'skip_weights'),
               loss=_skip_two_loss, fix='a decoder predicts the token two ahead', examples=_skip_two_examples,
               provides=('tokens', 'skip_targets', 'skip_weights', 'segment_ids', 'positions'), tokenizer_kind='bpe',
               metrics=('loss', 'accuracy', 'perplexity', 'weight_sum')), replace=True)


def get_config(arg=None):
  """The gpt runlocal config, shrunk, training only the toy objective."""
  sys.path.insert(0, str(REPO))
  from configs import gpt  # pylint: disable=g-import-not-at-top
  c = gpt.get_config('runlocal')
  c.objectives = {'skip_two': 1.0}
  c.data.vocab_size = 500
  c.data.seq_len = 32
  c.optim.learning_rate = 3e-3
  c.optim.total_steps = c.train.steps = 40
  c.train.log_every = 5
  c.train.eval_every = 0
  c.train.eval_steps = 0
  c.train.checkpoint_every = 40
  c.train.async_checkpoints = False
  return c


def test_a_task_defined_in_a_test_file_pretrains_through_main(tmp_path):
  workdir = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run(
      [sys.executable, '-m', 'train.main', f'--config={Path(__file__).resolve()}', f'--workdir={workdir}'], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  train = [r for r in rows if r['split'] == 'train']
  assert 'skip_two/loss' in train[0] and 'skip_two/accuracy' in train[0]
  first, last = train[0]['skip_two/loss'], train[-1]['skip_two/loss']
  assert last < first - 0.5, (first, last)
  # The record's tokenizer kind was trained (no config.data.tokenizer_kind is set).
  assert json.loads((workdir / 'tokenizer' / 'lmlab_tokenizer.json').read_text())['kind'] == 'bpe'


def test_example_builder_is_the_one_that_provides_every_key():
  assert tasks.example_task({'mlm': 1.0, 'nsp': 1.0}).name == 'nsp'
  assert tasks.example_task({'mlm': 1.0}).name == 'mlm'
  assert tasks.example_task({'rtd': 1.0}).examples is tasks.get('mlm').examples
  assert tasks.example_task({'skip_two': 1.0}) is SKIP_TWO
  with pytest.raises(ValueError, match='no one example builder'):
    tasks.example_task({'clm': 1.0, 'skip_two': 1.0})


def test_records_drive_heads_and_refusals():
  assert tasks.heads_for({'skip_two': 1.0, 'clm': 1.0}) == ('lm',)
  with pytest.raises(ValueError, match=r"'skip_two'.*arch='encoder'.*two ahead"):
    tasks.validate_objectives('encoder', {'skip_two': 1.0})
  with pytest.raises(ValueError, match="already registered"):
    tasks.register(SKIP_TWO)
  with pytest.raises(ValueError, match="'classification' and 'regression' both read the one classifier head"):
    tasks.validate_objectives('encoder', {'classification': 1.0, 'regression': 1.0})
