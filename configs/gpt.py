"""GPT-2 pre-training: causal LM with a byte-level BPE tokenizer, pre-LN decoder.

  python -m train.main --config=configs/gpt.py:size=small --workdir=/tmp/gpt
  python -m train.main --config=configs/gpt.py:runlocal --workdir=/tmp/gpt --config.data.source=files \
      --config.data.path=../shared/data/tinyshakespeare/input.txt --config.data.document_split=blank_line
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, sizes=common.preset_sizes('gpt2-'), size='small')
  c = common.base()
  c.model.preset = f'gpt2-{args.size}'
  c.objectives = {'clm': 1.0}
  c.data.seq_len = 1024
  c.data.batch_size = 512
  c.optim.learning_rate = 6e-4
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.optim.decay = 'cosine'
  c.optim.end_lr = 0.1
  c.optim.warmup_steps = 2000
  c.train.steps = 600_000
  if args.runlocal:
    common.runlocal(c)
    if not args.size_given:
      c.model.preset = 'gpt2-tiny'
  return c
