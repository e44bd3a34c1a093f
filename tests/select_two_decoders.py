"""A selection config for tests: two tiny decoders that differ in learning rate, 2 rungs, 1 seed (seconds)."""
import ml_collections

from configs import select


def get_config(arg=None):
  del arg
  c = select.get_config('runlocal')
  gpt = c.candidates.gpt_clm.to_dict()
  c.candidates = ml_collections.ConfigDict({
      'gpt_fast': dict(gpt, learning_rate=3e-3),
      'gpt_slow': dict(gpt, learning_rate=1e-5),
  })
  c.search.seeds = 1
  c.search.budget = 60
  return c
