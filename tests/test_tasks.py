"""The registry is open: an objective and a downstream task defined here, in the test file, train through
`python -m train.main`, and the task is scored by `python -m train.evaluate`, with no library file edited.

This file is also the config file those runs load (`get_config` below): importing it registers the toy objective
"predict the token two ahead" and the toy task "which of two sentences is longer", and its configs name it in
config.register_from so the evaluate job, which reads only the run's config.json, registers them too. The other
tests check what the records drive: the example builder chosen for a set of objectives, heads and refusals.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train import tasks
from train.data import examples as ex
from train.data import task_examples as tex
from train.tasks import losses as objectives

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
    tasks.Objective(name='skip_two', archs=('decoder',), heads=('lm',), batch_keys=('skip_targets', 'skip_weights'),
                    loss=_skip_two_loss, fix='a decoder predicts the token two ahead', examples=_skip_two_examples,
                    provides=('tokens', 'skip_targets', 'skip_weights', 'segment_ids', 'positions'),
                    tokenizer_kind='bpe', metrics=('loss', 'accuracy', 'perplexity', 'weight_sum')), replace=True)

# ---- a toy downstream task: which of two sentences has more words (its own reader, label set, examples, scorer) ----


def _longer_read(paths, data):
  """Lines 'sentence<TAB>sentence'; the label is which one has more words ('first' or 'second')."""
  out = []
  for path in paths:
    with open(path) as f:
      for i, line in enumerate(f):
        a, b = line.rstrip('\n').split('\t')
        out.append({'idx': i, 'text_a': a, 'text_b': b, 'label': 'first' if len(a.split()) > len(b.split()) else
                    'second'})
  return out


def _longer_examples(records, tokenizer, data):
  return tex.Classification(tokenizer, seq_len=data.seq_len, label_names=list(data.label_names)), records


def _longer_eval_examples(records, tokenizer, data):
  transform, _ = _longer_examples(records, tokenizer, data)
  return [transform(r) for r in records]


def _longer_score(outputs, examples, records, data, tokenizer=None):
  pred = outputs['cls_logits'].argmax(-1)
  names = list(data.label_names)
  rows = [{'idx': r['idx'], 'label': r['label'], 'prediction': names[p]} for r, p in zip(records, pred)]
  return {'accuracy': float(np.mean([row['label'] == row['prediction'] for row in rows]))}, rows


LONGER = tasks.register(
    tasks.Task(name='toy_longer', archs=('encoder',), heads=('classifier',), batch_keys=('label',),
               loss=lambda out, batch, opts: objectives.classification_loss(logits=out['cls_logits'],
                                                                             labels=batch['label']),
               fix='an encoder classifies the pair', examples=_longer_examples,
               provides=('tokens', 'segment_ids', 'positions', 'token_type_ids', 'label'), tokenizer_kind='wordpiece',
               metrics=('loss', 'accuracy', 'weight_sum'), read=_longer_read, eval_examples=_longer_eval_examples,
               score=_longer_score, outputs=('cls_logits',),
               labels=tasks.Labels(lambda paths, data: ('first', 'second'), 'label_names')), replace=True)


def get_config(arg=None):
  """The gpt runlocal config, shrunk, training only the toy objective; 'task': configs/finetune.py on the toy task."""
  sys.path.insert(0, str(REPO))
  if arg == 'task':
    from configs import finetune  # pylint: disable=g-import-not-at-top
    c = finetune.get_config('task=toy_longer,strategy=full,runlocal')
    c.model.preset = 'bert-tiny'
    c.data.vocab_size = 400
    c.train.steps, c.train.eval_every, c.train.checkpoint_every = 40, 20, 20
    c.register_from = (str(Path(__file__).resolve()),)
    return c
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
  with pytest.raises(ValueError, match="'classification' and 'sst2' both read the one classifier head"):
    tasks.validate_objectives('encoder', {'classification': 1.0, 'sst2': 1.0})


def test_a_task_defined_in_a_test_file_fine_tunes_and_the_evaluate_job_scores_it(tmp_path):
  """configs/finetune.py offers the toy task (its task list is the registry's); train.main trains it, and
  train.evaluate, which registers it from the run's config.register_from, scores the dev file exactly as the run's
  last dev evaluation did."""
  rng = np.random.default_rng(0)
  words = 'the a cat dog sat ran on under red blue big small'.split()
  sentence = lambda: ' '.join(rng.choice(words, rng.integers(2, 12)))
  for split, n in (('train', 400), ('dev', 64)):
    (tmp_path / f'{split}.tsv').write_text(''.join(f'{sentence()}\t{sentence()}\n' for _ in range(n)))
  workdir, out = tmp_path / 'run', tmp_path / 'scored'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  run = lambda *args: subprocess.run([sys.executable, '-m', *args], cwd=REPO, env=env, capture_output=True, text=True,
                                     timeout=600)
  proc = run('train.main', f'--config={Path(__file__).resolve()}:task', f'--workdir={workdir}',
             f'--config.data.train={tmp_path / "train.tsv"}', f'--config.data.dev={tmp_path / "dev.tsv"}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  logged = [r for r in rows if r['split'] == 'eval']
  assert logged and 'accuracy' in logged[-1] and 'toy_longer/loss' in [r for r in rows if r['split'] == 'train'][0]
  proc = run('train.evaluate', f'--from={workdir}', f'--data={tmp_path / "dev.tsv"}', f'--out={out}', '--step=latest')
  assert proc.returncode == 0, proc.stderr[-3000:]
  scored = json.loads((out / 'metrics.json').read_text())
  assert scored['task'] == 'toy_longer' and scored['examples'] == 64
  assert scored['accuracy'] == pytest.approx(logged[-1]['accuracy'])
  assert len((out / 'predictions.jsonl').read_text().splitlines()) == 64


def test_a_strategy_registered_here_is_offered_by_the_finetune_config():
  from configs import finetune  # pylint: disable=g-import-not-at-top
  from train.finetune import strategies  # pylint: disable=g-import-not-at-top
  strategies.register(strategies.Strategy('bitfit', lambda heads, pooler: ('*bias',) +
                                          strategies.fresh_head_patterns(heads)), replace=True)
  c = finetune.get_config('task=sst2,strategy=bitfit')
  assert c.finetune.strategy == 'bitfit'
  assert strategies.trainable_patterns('bitfit', ('classifier',)) == ('*bias', 'classifier')
  with pytest.raises(ValueError, match='strategy=.nope'):
    finetune.get_config('task=sst2,strategy=nope')
