"""Fine-tuning strategies as masks over the one params pytree: which leaves train, and which are not differentiated.

`full` trains every parameter (layer-wise learning-rate decay through config.optim.layerwise_lr_decay); `head` trains
only the task's head (the classifier, tagger or QA span layer, and the pooler when config.finetune.train_pooler)
while the backbone is frozen: the train step wraps frozen leaves in stop_gradient, so JAX builds no backward pass
through the backbone at all (the compiled step's FLOPs drop to about the forward's), the optimizer keeps no state for
them and they come out of every step bitwise unchanged. A strategy is turned into config.optim.trainable patterns,
the same mechanism a pre-training run uses to freeze parts of a model, so the mask has one source.
"""
from __future__ import annotations

from typing import Sequence

import ml_collections

STRATEGIES = ('full', 'head')

# A LanguageModel head's parameters sit under the attribute it is built as; 'pooler' serves NSP and classification.
HEAD_PARAMS = {
    'classifier': ('classifier',),
    'tagger': ('tagger',),
    'qa': ('qa',),
    'nsp': ('nsp',),
    'mlm': ('mlm',),
    'rtd': ('rtd',)
}


def trainable_patterns(strategy: str, heads: Sequence[str], *, train_pooler: bool = False) -> tuple[str, ...]:
  """The config.optim.trainable patterns of a strategy: () = everything (full), the heads' subtrees (head)."""
  if strategy not in STRATEGIES:
    raise ValueError(f'config.finetune.strategy={strategy!r}: use one of {STRATEGIES}.')
  if strategy == 'full':
    return ()
  untrainable = [h for h in heads if h not in HEAD_PARAMS]
  if untrainable:
    raise ValueError(f"config.finetune.strategy='head' cannot train head(s) {untrainable} alone: the LM head is "
                     "tied to the input embedding, part of the backbone; use strategy='full'.")
  patterns = tuple(p for h in heads for p in HEAD_PARAMS[h])
  return patterns + (('pooler',) if train_pooler else ())


def apply_strategy(config: ml_collections.ConfigDict, heads: Sequence[str]) -> ml_collections.ConfigDict:
  """config with config.optim.trainable set from config.finetune (a copy; the caller's config is left as it is)."""
  ft = config.get('finetune')
  if ft is None or not ft.get('strategy'):
    return config
  patterns = trainable_patterns(ft.strategy, heads, train_pooler=bool(ft.get('train_pooler', False)))
  if not patterns:
    return config
  if config.optim.get('trainable'):
    raise ValueError(f'config.optim.trainable={tuple(config.optim.trainable)} and config.finetune.strategy='
                     f"{ft.strategy!r} both say what trains; set one of them.")
  config = ml_collections.ConfigDict(config.to_dict())
  config.optim.trainable = patterns
  return config
