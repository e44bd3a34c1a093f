"""ELECTRA pre-training: replaced-token detection; a small generator (MLM) and a discriminator share embeddings.

  python -m train.main --config=configs/electra.py:size=small --workdir=/tmp/electra
"""
from configs import common


def get_config(arg=None):
  # A size needs both halves: electra-<size>-discriminator and electra-<size>-generator.
  sizes = sorted(
      set(common.preset_sizes('electra-', '-discriminator')) & set(common.preset_sizes('electra-', '-generator')))
  args = common.parse_arg(arg, sizes=sizes, size='small')
  c = common.base()
  c.model.preset = f'electra-{args.size}-discriminator'
  c.model.generator_preset = f'electra-{args.size}-generator'
  c.objectives = {'rtd': 1.0}
  c.loss.rtd_lambda = 50.0
  c.data.seq_len = 128
  c.data.batch_size = 128
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 10_000
  c.train.steps = 1_000_000
  if args.runlocal:
    common.runlocal(c)
    if not args.size_given:  # ELECTRA-small at 2 layers; a named size keeps its depth
      for overrides in (c.model.overrides, c.model.generator_overrides):
        overrides.num_layers = 2
        overrides.max_len = 128
  return c
