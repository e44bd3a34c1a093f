"""T5 pre-training: span corruption (15% noise, mean span 3, sentinels) on an encoder-decoder, Adafactor.

  python -m train.main --config=configs/t5.py:size=small --workdir=/tmp/t5
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, sizes=common.preset_sizes('t5-'), size='small')
  c = common.base()
  c.model.preset = f't5-{args.size}'
  c.objectives = {'span': 1.0}
  c.data.seq_len = 512
  c.data.batch_size = 128
  c.optim.optimizer = 'adafactor'
  c.optim.learning_rate = 1e-2
  c.optim.decay = 'inverse_sqrt'
  c.optim.warmup_steps = 10_000
  c.optim.weight_decay = 0.0
  c.train.steps = 524_288
  if args.runlocal:
    common.runlocal(c)
    if not args.size_given:
      c.model.preset = 't5-tiny'
    c.optim.learning_rate = 1e-2
  return c
