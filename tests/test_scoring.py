"""Length-bucketed scoring (train/tasks/scoring.py run_forward) gives the predictions and metrics of full-length
scoring, in the records' order, for a classifier (encoder, mean and [CLS] pooling; decoder, last token) and for
zero-shot prompts; tasks whose outputs have a position axis (tags) keep full length. Nothing here is timed.
"""
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from model.config import preset
from model.heads import init_params
from train import tasks
from train.core import resolve
from train.data import tokenizers
from train.tasks import scoring

REPO = Path(__file__).resolve().parents[1]
VOCAB = REPO.parent / 'shared' / 'data' / 'bert_uncased_vocab' / 'vocab.txt'
WORDS = ('a fine and moving film with actors who were wonderful from the first scene to the last one , and a story '
         'that stays with you long after it ends').split()


def _records(n=23, seed=0):
  """Sentences of 1 to len(WORDS) words in a shuffled order (lengths spread over several buckets), labels alternate."""
  rng = np.random.default_rng(seed)
  return [{
      'text_a': ' '.join(WORDS[:int(k)]),
      'text_b': '',
      'label': str(i % 2),
      'idx': i
  } for i, k in enumerate(rng.integers(1, len(WORDS) + 1, size=n))]


def _config(strategy='full', **data):
  c = finetune_config.get_config(f'task=sst2,strategy={strategy},runlocal')
  c.data.label_names = ('0', '1')
  c.data.seq_len = 64
  c.data.update(data)
  return c


def _score_both(config, model_cfg, tok, records, batch_size=4, seed=0):
  task = resolve.run_task(tasks.task_of(config.objectives), config, model_cfg.arch)
  model = resolve.build_model(config, model_cfg)
  examples = task.eval_examples(records, tok, config.data)
  params = init_params(model, jax.random.key(seed), {k: np.stack([e[k] for e in examples[:2]]) for k in examples[0]})
  fwd = scoring.task_forward(task, model, config.data)
  run = lambda buckets: scoring.score(task, fwd, params, records, tok, config.data, batch_size=batch_size,
                                      buckets=buckets, min_batches=1)
  return run(()), run(None), (fwd, params, examples)


def _assert_same(full, bucketed):
  (m_full, rows_full), (m_b, rows_b) = full, bucketed
  assert m_full == m_b
  assert [(r['idx'], r['label'], r['prediction']) for r in rows_full] == [(r['idx'], r['label'], r['prediction'])
                                                                          for r in rows_b]
  for a, b in zip(rows_full, rows_b):
    np.testing.assert_allclose(list(a['probabilities'].values()), list(b['probabilities'].values()), atol=2e-6)


@pytest.mark.parametrize('pooling', ['mean', 'cls'])
def test_bucketed_encoder_classifier_scores_as_at_full_length(pooling):
  if not VOCAB.exists():
    pytest.skip(f'{VOCAB} is not here')
  tok = tokenizers.from_vocab_txt(VOCAB)
  config = _config()
  config.model.classifier_pooling = pooling
  cfg = preset('bert-mini', vocab_size=tok.vocab_size, num_layers=2, max_len=64, dropout_rate=0.0)
  records = _records()
  full, bucketed, (fwd, params, examples) = _score_both(config, cfg, tok, records)
  _assert_same(full, bucketed)
  # the bucketed run really cut the batches: longest first, several lengths, all below seq_len but the longest
  order, lengths = scoring._plan(fwd, params, examples, 4, None, 1)  # pylint: disable=protected-access
  assert lengths is not None and len(set(lengths)) >= 2 and min(lengths) < 64
  got = scoring.example_lengths(examples)
  assert list(got[order]) == sorted(got, reverse=True)
  out_full = scoring.run_forward(fwd, params, examples, batch_size=4, buckets=())
  out_b = scoring.run_forward(fwd, params, examples, batch_size=4, min_batches=1)
  np.testing.assert_allclose(out_b['cls_logits'], out_full['cls_logits'], atol=1e-5)


def test_bucketed_decoder_classifier_and_zero_shot_prompts_score_as_at_full_length():
  text = ' '.join(r['text_a'] for r in _records()) + ' review sentiment negative positive'
  tok = tokenizers.train_bpe([text] * 20, vocab_size=300)
  cfg = preset('llama-tiny', vocab_size=tok.vocab_size, max_len=64)
  records = _records(n=19, seed=1)
  full, bucketed, _ = _score_both(_config(), cfg, tok, records, batch_size=5)
  _assert_same(full, bucketed)
  prompt = _config('prompt')
  prompt.finetune.verbalizer = '0:negative;1:positive|good film'  # a two-token word: two input rows per example
  full, bucketed, (fwd, params, examples) = _score_both(prompt, cfg, tok, records, batch_size=5)
  _assert_same(full, bucketed)
  assert examples[0]['segment_ids'].ndim == 2
  assert scoring._plan(fwd, params, examples, 5, None, 1)[1] is not None  # pylint: disable=protected-access


def test_outputs_with_a_position_axis_keep_full_length():
  if not VOCAB.exists():
    pytest.skip(f'{VOCAB} is not here')
  tok = tokenizers.from_vocab_txt(VOCAB)
  config = finetune_config.get_config('task=wnut17,strategy=full,runlocal')
  config.data.tag_names = ('O', 'B-x', 'I-x')
  config.data.seq_len = 64
  cfg = preset('bert-mini', vocab_size=tok.vocab_size, num_layers=1, max_len=64)
  task = resolve.run_task(tasks.get('wnut17'), config, 'encoder')
  records = [{'tokens': WORDS[:k], 'tags': ['O'] * k} for k in (3, 30, 7, 12, 1)]
  examples = task.eval_examples(records, tok, config.data)
  model = resolve.build_model(config, cfg)
  params = init_params(model, jax.random.key(0), {k: np.stack([e[k] for e in examples[:2]]) for k in examples[0]})
  fwd = scoring.task_forward(task, model, config.data)
  assert scoring._plan(fwd, params, examples, 2, None)[1] is None  # pylint: disable=protected-access
  out = scoring.run_forward(fwd, params, examples, batch_size=2)
  np.testing.assert_array_equal(out['tag_logits'],
                                scoring.run_forward(fwd, params, examples, batch_size=2, buckets=())['tag_logits'])


def test_bucket_lengths_are_few_and_end_at_seq_len():
  assert scoring.bucket_lengths(128) == (16, 24, 32, 40, 48, 56, 64, 72, 88, 104, 120, 128)
  assert scoring.bucket_lengths(100)[-2:] == (88, 100)
  long = scoring.bucket_lengths(512)
  assert all(b % 8 == 0 and b < a * 9 / 8 + 8 for a, b in zip(long, long[1:])) and len(long) == 22
  assert scoring.bucket_lengths(8) == (8,)


def test_a_length_too_few_batches_would_use_goes_to_the_next_longer_one():
  merge = scoring._merge_small  # pylint: disable=protected-access
  assert merge(np.array([64, 48, 48, 32, 32, 32, 16]), 2).tolist() == [64, 48, 48, 32, 32, 32, 32]
  assert merge(np.array([64, 48, 32, 16]), 4).tolist() == [64, 64, 64, 64]
  assert merge(np.array([64, 32, 32, 32, 32, 24]), 4).tolist() == [64, 32, 32, 32, 32, 32]
