"""Fine-tuning strategies as masks over the one params pytree: which leaves train, and which are not differentiated.

Strategies: `full`, `head`, `soft_prompt` (n learned input vectors, config.finetune.soft_prompt_length) and `lora`
(low-rank adapters on the backbone's projections, config.finetune.lora_*), each a `Strategy` in an open registry
(`register(Strategy(...))` adds one that configs/finetune.py's strategy=<name> offers); the last two also train a task
head that starts fresh (the classifier, tagger or QA span layer), as peft's modules_to_save. Any of them composes with
config.finetune.prompt (train/finetune/prompts.py: the label read off the MLM/LM head through a template and verbalizer,
PET-style), where `head` then trains the MLM head's transform.

`full` trains every parameter (layer-wise learning-rate decay through config.optim.layerwise_lr_decay); `head` trains
only the task's head (the classifier, tagger or QA span layer, and the pooler when config.finetune.train_pooler)
while the backbone is frozen: the train step wraps frozen leaves in stop_gradient, so JAX builds no backward pass
through the backbone at all (the compiled step's FLOPs drop to about the forward's), the optimizer keeps no state for
them and they come out of every step bitwise unchanged. A strategy is turned into config.optim.trainable patterns,
the same mechanism a pre-training run uses to freeze parts of a model, so the mask has one source.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

FRESH_HEADS = ('classifier', 'tagger', 'qa')  # task heads a pretrained checkpoint never holds

# A LanguageModel head's parameters sit under the attribute it is built as; 'pooler' serves NSP and classification.
HEAD_PARAMS = {
    'classifier': ('classifier',),
    'tagger': ('tagger',),
    'qa': ('qa',),
    'nsp': ('nsp',),
    'mlm': ('mlm',),
    'rtd': ('rtd',),
    'prompt': ('mlm',)
}


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A fine-tuning strategy: trainable(heads, train_pooler) -> the config.optim.trainable patterns over the params
  pytree (() = every parameter); model_fields(config) -> the ModelConfig fields it adds to the backbone (LoRA's)."""
  name: str
  trainable: Callable[[Sequence[str], bool], tuple[str, ...]]
  model_fields: Callable[[Any], dict] = lambda config: {}
  about: str = ''


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy, *, replace: bool = False) -> Strategy:
  """Adds a strategy configs/finetune.py's strategy=<name> then offers; a name taken is an error unless replace."""
  if strategy.name in STRATEGIES and not replace:
    raise ValueError(f'strategy {strategy.name!r} is already registered; pick another name or pass replace=True.')
  STRATEGIES[strategy.name] = strategy
  return strategy


def get(name: str) -> Strategy:
  if name not in STRATEGIES:
    raise ValueError(f'config.finetune.strategy={name!r}: use one of {tuple(STRATEGIES)}.')
  return STRATEGIES[name]


def fresh_head_patterns(heads) -> tuple[str, ...]:
  """The patterns of the task heads among `heads` that a pretrained checkpoint never holds (they start fresh)."""
  return tuple(p for h in heads if h in FRESH_HEADS for p in HEAD_PARAMS[h])


def _head_only(heads, train_pooler):
  untrainable = [h for h in heads if h not in HEAD_PARAMS]
  if untrainable:
    raise ValueError(f"config.finetune.strategy='head' cannot train head(s) {untrainable} alone: the LM head is "
                     "tied to the input embedding, part of the backbone; use strategy='full'.")
  return tuple(p for h in heads for p in HEAD_PARAMS[h]) + (('pooler',) if train_pooler else ())


def _lora_fields(config) -> dict:
  ft = config.get('finetune') or {}
  rank = int(ft.get('lora_rank') or 0)
  if rank < 1:
    raise ValueError(f"config.finetune.lora_rank={ft.get('lora_rank')!r}: strategy='lora' needs a rank >= 1 (e.g. 8).")
  targets = tuple(ft.get('lora_targets') or ())
  if not targets:
    raise ValueError("config.finetune.lora_targets is empty: name the projections that get adapters, e.g. "
                     "('query', 'value') or ('query', 'key', 'value', 'out', 'mlp/*').")
  return dict(lora_rank=rank, lora_alpha=float(ft.get('lora_alpha', 16.0)),
              lora_dropout=float(ft.get('lora_dropout', 0.0)), lora_targets=targets)


for _strategy in (
    Strategy('full', lambda heads, pooler: (), about='every parameter trains'),
    Strategy('head', _head_only, about='the backbone is frozen and not differentiated; only the task head trains'),
    Strategy('soft_prompt', lambda heads, pooler: ('soft_prompt',) + fresh_head_patterns(heads),
             about='learned input vectors (and a fresh task head) on the frozen backbone'),
    Strategy('lora', lambda heads, pooler: ('*lora_a', '*lora_b') + fresh_head_patterns(heads), _lora_fields,
             about='low-rank adapters (and a fresh task head) on the frozen backbone'),
):
  register(_strategy)


def trainable_patterns(strategy: str, heads: Sequence[str], *, train_pooler: bool = False) -> tuple[str, ...]:
  """The config.optim.trainable patterns of a strategy: () = everything (full), the heads' subtrees (head)."""
  return get(strategy).trainable(tuple(heads), train_pooler)


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


def model_fields(config) -> dict:
  """ModelConfig fields the run's strategy sets on the backbone (LoRA: the adapters' rank, scale, dropout, targets)."""
  ft = config.get('finetune') or {}
  return get(ft.strategy).model_fields(config) if ft.get('strategy') else {}


def soft_prompt_length(config) -> int:
  """How many soft-prompt vectors the model prepends: config.finetune.soft_prompt_length under strategy='soft_prompt'."""
  ft = config.get('finetune') or {}
  if ft.get('strategy') != 'soft_prompt':
    return 0
  n = int(ft.get('soft_prompt_length') or 0)
  if n < 1 or n >= int(config.data.seq_len) // 2:
    raise ValueError(f'config.finetune.soft_prompt_length={n}: give 1 <= n < data.seq_len / 2 '
                     f'({int(config.data.seq_len) // 2}) learned vectors (20 is usual at seq_len 128).')
  return n


def init_soft_prompt(params, config, *, pad_id: int, num_special: int = 5):
  """params with the soft prompt started from vocabulary rows (config.finetune.soft_prompt_init='vocab', as Lester
  et al.): vector i = E[v_i] - E[pad] for words v_i drawn with config.seed among the first 5000 ids past the
  specials, so placeholder + vector i embeds exactly as word v_i. 'random' keeps the normal initialization."""
  ft = config.get('finetune') or {}
  if 'soft_prompt' not in params or ft.get('soft_prompt_init', 'vocab') == 'random':
    return params
  if ft.get('soft_prompt_init', 'vocab') != 'vocab':
    raise ValueError(f"config.finetune.soft_prompt_init={ft.soft_prompt_init!r}: use 'vocab' or 'random'.")
  table = np.asarray(params['embed']['token']['embedding'])  # [V,E]
  n = params['soft_prompt'].shape[0]
  ids = np.random.default_rng(int(config.seed)).choice(np.arange(num_special, min(len(table), 5000)), n, replace=False)
  vectors = table[ids] - table[pad_id]
  return {**params, 'soft_prompt': np.asarray(vectors, table.dtype)}
