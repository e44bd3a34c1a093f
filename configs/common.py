"""The fields every pre-training config has, and the parsing of `--config=configs/x.py:size=small,runlocal`.

Family files (bert.py, gpt.py, ...) start from `base()` and set the model, objectives and data that make them what they
are; `runlocal` shrinks a config to seconds on a laptop CPU (tests and CI use it).
"""
from __future__ import annotations

import ml_collections

from train import optim


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'size=small,runlocal' -> {'size': 'small', 'runlocal': True}, over defaults; unknown keys are an error."""
  out = dict(defaults, runlocal=False)
  for part in filter(None, (arg or '').split(',')):
    key, eq, value = part.partition('=')
    if key not in out:
      raise ValueError(f'config argument {key!r} is unknown; known: {sorted(out)} (e.g. "size=small,runlocal").')
    out[key] = value if eq else True
  return ml_collections.ConfigDict(out)


def base() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.objectives = {}
  c.loss = ml_collections.ConfigDict(dict(rtd_lambda=50.0, label_smoothing=0.0, z_loss=0.0))
  c.model = ml_collections.ConfigDict(dict(preset='', overrides={}, generator_preset='', generator_overrides={},
                                           init_from=''))
  c.data = ml_collections.ConfigDict(dict(
      source='embedded',        # 'embedded' (stdlib docstrings, no files) | 'files' | 'tfds'
      embedded_kind='docs',     # 'docs' | 'code'
      path='',                  # files: a text file, a folder of .txt, or a comma-separated list
      name='',                  # files: dataset name under <workdir>/tfds
      document_split='file',    # files: 'file' | 'blank_line' | 'line' (what counts as one document for NSP)
      eval_fraction=0.02,       # files: share of passages held out for eval
      tfds_name='', tfds_train_split='train', tfds_eval_split='validation', tfds_data_dir='', tfds_field_map={},
      tokenizer_path='',        # a saved tokenizer folder, tokenizer.json or vocab.txt; empty: train one
      tokenizer_kind='',        # '' follows the objective: wordpiece (mlm/nsp/rtd), bpe (clm), unigram (span)
      vocab_size=8000,
      tokenizer_train_records=20_000,
      seq_len=128,
      targets_len=0,            # span corruption: decoder length; 0 derives it from seq_len
      batch_size=32,            # global batch, split over hosts and the (data, fsdp) mesh axes
      max_predictions=0,        # MLM slots per row; 0: round(0.15 * seq_len) + 1
      mask_rate=0.15,
      whole_word=False,
      prefetch=2,
  ))
  c.optim = optim.default_config()
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 100
  c.train = ml_collections.ConfigDict(dict(
      steps=10_000, log_every=50, eval_every=1000, eval_steps=10, checkpoint_every=1000, keep_checkpoints=3,
      best_metric='', best_mode='min', async_checkpoints=True))
  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules=None))
  return c


def runlocal(c: ml_collections.ConfigDict, *, steps: int = 60) -> ml_collections.ConfigDict:
  """Seconds on a CPU: tiny vocab, short sequences, small batches, few steps."""
  c.data.vocab_size = 2000
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.data.tokenizer_train_records = 3000
  c.data.prefetch = 0
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 5
  c.optim.total_steps = steps
  c.train.steps = steps
  c.train.log_every = 10
  c.train.eval_every = steps
  c.train.eval_steps = 2
  c.train.checkpoint_every = steps
  return c
