"""ELECTRA pre-training: replaced-token detection; a small generator (MLM) and a discriminator share embeddings.

  python -m train.main --config=configs/electra.py:size=small --workdir=/tmp/electra
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, size='small')
  c = common.base()
  c.model.preset = f'electra-{args.size}-discriminator'
  c.model.generator_preset = f'electra-{args.size}-generator'
  c.objectives = {'rtd': 1.0}
  c.loss.rtd_lambda = 50.0
  c.data.seq_len = 128
  c.data.batch_size = 128
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 10_000
  c.optim.total_steps = c.train.steps = 1_000_000
  if args.runlocal:
    common.runlocal(c)
    small = {'num_layers': 2, 'max_len': 128}
    c.model.overrides = dict(small)
    c.model.generator_overrides = dict(small)
  return c
