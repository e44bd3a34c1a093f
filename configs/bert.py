"""BERT pre-training: masked LM + next-sentence prediction on sentence pairs, post-LN encoder.

  python -m train.main --config=configs/bert.py:size=small --workdir=/tmp/bert
  python -m train.main --config=configs/bert.py:runlocal --workdir=/tmp/bert --config.data.source=files \
      --config.data.path=../shared/data/gutenberg_books
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, sizes=common.preset_sizes('bert-'), size='small')
  c = common.base()
  c.model.preset = f'bert-{args.size}'
  c.objectives = {'mlm': 1.0, 'nsp': 1.0}
  c.optim.learning_rate = 1e-4
  c.optim.warmup_steps = 10_000
  c.train.steps = 1_000_000
  c.data.seq_len = 128
  c.data.batch_size = 256
  if args.runlocal:
    common.runlocal(c)
    if not args.size_given:
      c.model.preset = 'bert-tiny'
  return c
