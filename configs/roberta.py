"""RoBERTa pre-training: masked LM only (no NSP) over packed full-length windows, larger batches.

  python -m train.main --config=configs/roberta.py:size=base --workdir=/tmp/roberta
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, sizes=('base',) + tuple(s for s in common.preset_sizes('bert-') if s != 'base'),
                          size='base')
  c = common.base()
  c.model.preset = 'roberta-base' if args.size == 'base' else f'bert-{args.size}'
  c.model.overrides.type_vocab_size = 1  # one segment type: without NSP there are no sentence pairs
  c.objectives = {'mlm': 1.0}
  c.data.tokenizer_kind = 'bpe'
  c.data.seq_len = 512
  c.data.batch_size = 2048
  c.optim.learning_rate = 6e-4
  c.optim.b2 = 0.98
  c.optim.warmup_steps = 24_000
  c.train.steps = 500_000
  if args.runlocal:
    common.runlocal(c)
    if not args.size_given:
      c.model.preset = 'bert-tiny'
  return c
