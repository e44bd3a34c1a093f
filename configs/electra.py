"""ELECTRA pre-training: replaced-token detection; a small generator (MLM) and a discriminator share embeddings.

  python -m train.main --config=configs/electra.py:size=small --workdir=/tmp/electra

The recipe is google-research/electra's (configure_pretraining.py: AdamW 5e-4, linear decay, weight decay 0.01, the
discriminator's loss x 50, a generator a quarter as wide, 15% of tokens replaced) except the generator's sampling
temperature, 1.5 instead of 1.0. Measured here (docs/objectives.md): with temperature 1.0 the generator's samples
match the text's unigram distribution within ~100-150 steps, before the discriminator has learned context, and
disc_auc falls from ~0.72 to 0.52-0.59 and stays there (runlocal, 4 x 256 on gutenberg_books, 300-1,000 steps, 5e-4 to
1e-3, pre- and post-LN alike); at 1.5 the samples stay distinguishable and disc_auc holds at 0.69-0.75 past 1,000
steps. At 2e-3 with 5 warmup steps (the old runlocal) the post-LN discriminator collapses outright: every token's
final hidden state becomes one vector (token_variance_share 0.0000 on held-out text) and it predicts "original"
everywhere. The reference's 1.0 is for its 1M steps at batch 128 x 128; set config.loss.generator_temperature=1.0 to
train exactly as it does. Watch rtd/disc_auc, rtd/disc_loss_baseline and rtd/token_variance_share in metrics.jsonl.
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
  c.loss.generator_temperature = 1.5
  c.data.seq_len = 128
  c.data.batch_size = 128
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 10_000
  c.train.steps = 1_000_000
  if args.runlocal:
    common.runlocal(c, steps=300)
    c.optim.learning_rate = 5e-4  # 2e-3 (runlocal's) collapses the post-LN discriminator within ~50 steps
    c.optim.warmup_steps = 50
    c.train.log_every = 50
    if not args.size_given:  # ELECTRA-small at 2 layers; a named size keeps its depth
      for overrides in (c.model.overrides, c.model.generator_overrides):
        overrides.num_layers = 2
        overrides.max_len = 128
  return c
