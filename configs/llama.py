"""LLaMA-style pre-training: causal LM with RoPE, RMSNorm, SwiGLU and grouped-query attention.

  python -m train.main --config=configs/llama.py:size=smollm2-135m --workdir=/tmp/llama
"""
from configs import common


def get_config(arg=None):
  sizes = common.preset_sizes('llama-') + tuple(f'smollm2-{s}' for s in common.preset_sizes('smollm2-'))
  args = common.parse_arg(arg, sizes=sizes, size='smollm2-135m')
  c = common.base()
  c.model.preset = args.size if args.size.startswith('smollm2') else f'llama-{args.size}'
  c.objectives = {'clm': 1.0}
  c.data.seq_len = 2048
  c.data.batch_size = 256
  c.optim.learning_rate = 3e-3
  c.optim.b2 = 0.95
  c.optim.weight_decay = 0.1
  c.optim.decay = 'cosine'
  c.optim.warmup_steps = 2000
  c.train.steps = 200_000
  if args.runlocal:
    common.runlocal(c)
    if not args.size_given:
      c.model.preset = 'llama-tiny'
  return c
