"""One place that resolves a config into what a run needs: the record it trains (with its architecture's and the
fine-tuning strategy's changes), the model's heads and module, the ModelConfig (a preset with its overrides, or a
starting point's architecture, with the tokenizer's vocabulary and special ids), the strategy's trainable patterns.

The trainer (train/core/trainer.py), the cost model (cost.py: from config files alone, building nothing), the
evaluate job, the loading of a run as a starting point (pretrained.py) and the selection all call these, so a new
model field or strategy is taught here once.
"""
from __future__ import annotations

import json
import os
import types
from typing import Any, Optional

from model import config as model_config
from model.config import ModelConfig
from model.heads import HEADS, LanguageModel
from train import tasks
from train.finetune import prompts
from train.finetune import strategies

# ------------------------------------------------------------------------------------------------ the record


def import_registrations(config) -> None:
  """Imports config.register_from's modules (dotted names) or files (paths ending in .py), once each, so the tasks,
  objectives and strategies they register exist before anything is resolved (the evaluate job reads a run's
  config.json only)."""
  import importlib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  for entry in tuple(config.get('register_from') or ()):
    entry = str(entry)
    if not entry.endswith('.py'):
      importlib.import_module(entry)
      continue
    name = 'lmlab_registered_' + os.path.splitext(os.path.basename(entry))[0]
    if name in sys.modules or any(getattr(m, '__file__', None) == os.path.abspath(entry)
                                  for m in list(sys.modules.values())):
      continue
    if not os.path.isfile(entry):
      raise FileNotFoundError(f'config.register_from: {entry} does not exist; give a module name or a .py file.')
    spec = importlib.util.spec_from_file_location(name, entry)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


def prompting(config) -> bool:
  """Whether config classifies by prompt (template + verbalizer) instead of a classifier head."""
  return bool((config.get('finetune') or {}).get('prompt'))


def record(config) -> tasks.registry.Record:
  """The record config.objectives trains: its downstream task, or the pre-training objective whose examples serve
  them all (before any architecture is known)."""
  objectives = dict(config.objectives)
  return tasks.task_of(objectives) or tasks.pretraining_task(objectives)


def run_task(record_, config, arch: str):
  """The record as `config` runs it on `arch`: for_arch, then, with config.finetune.prompt, as prompt-based
  classification: the 'prompt' head (MLM or LM head + verbalizer) instead of the classifier, prompt examples
  (train/finetune/prompts.py); its loss (cross-entropy over the label log-probabilities) and scorer stay the
  task's; with a soft prompt, its slots in every input."""
  record_ = tasks.for_arch(record_, arch)
  if prompting(config):
    record_ = prompts.as_prompt_task(record_, config, arch)
  n = strategies.soft_prompt_length(config)
  if not n:
    return record_
  return prompts.with_soft_prompt(record_, n,
                                  1 if arch == 'encoder' or not prompting(config) or config.finetune.bos else 0)


def heads(config, arch: Optional[str] = None) -> tuple[str, ...]:
  """The LanguageModel heads config trains on `arch`: its objectives' (heads_for), the classifier swapped for the
  'prompt' head when config.finetune.prompt is on."""
  out = tasks.heads_for(config.objectives, arch)
  if prompting(config):
    out = tuple(sorted({'prompt' if h == 'classifier' else h for h in out}, key=HEADS.index))
  return out


def with_strategy(config, arch: Optional[str] = None):
  """config with its fine-tuning strategy's trainable patterns and model fields set (a pre-training config as is)."""
  return strategies.apply_strategy(config, heads(config, arch))


# ------------------------------------------------------------------------------------------------ the model


def model_kwargs(config) -> dict[str, Any]:
  """LanguageModel's task arguments from config: label and tag counts (resolved from the data), classifier pooling,
  and whether a frozen backbone runs without dropout (the head strategy, unless config.finetune.backbone_dropout)."""
  kw = {}
  if config.data.get('label_names'):
    kw['num_labels'] = len(config.data.label_names)
  if config.data.get('tag_names'):
    kw['num_tags'] = len(config.data.tag_names)
  if config.model.get('classifier_pooling'):
    kw['classifier_pooling'] = config.model.classifier_pooling
  ft = config.get('finetune') or {}
  if ft.get('strategy') == 'head' and not ft.get('backbone_dropout', False):
    kw['backbone_deterministic'] = True  # soft_prompt and lora keep the backbone's dropout, as peft does
  if strategies.soft_prompt_length(config):
    kw['soft_prompt_length'] = strategies.soft_prompt_length(config)
  return kw


def build_model(config, model_cfg: ModelConfig):
  """The module config.objectives trains: the record's own model (ELECTRA) or a LanguageModel with their heads."""
  own = tasks.own_model(config.objectives)
  if own is not None:
    return own.own.build(config, model_cfg)
  return LanguageModel(model_cfg, heads=heads(config, model_cfg.arch), **model_kwargs(config))


def arch_config(config, init_cfg: Optional[ModelConfig] = None) -> ModelConfig:
  """config.model: the preset with its overrides, or the starting point's architecture (init_cfg) with them."""
  overrides = {**model_config.set_fields(config.model.overrides), **strategies.model_fields(config)}
  return init_cfg.replace(**overrides) if init_cfg is not None else model_config.preset(config.model.preset,
                                                                                      **overrides)


def with_tokenizer(cfg: ModelConfig, tokenizer, overrides) -> ModelConfig:
  """cfg with the tokenizer's vocabulary size and special ids, where config.model.overrides does not set them."""
  pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
  fields = {
      'vocab_size': tokenizer.vocab_size,
      'pad_id': pad,
      'decoder_start_id': pad,
      'eos_id': tokenizer.eos_id,
      'bos_id': tokenizer.bos_id
  }
  set_ = model_config.set_fields(overrides)
  return cfg.replace(**{k: v for k, v in fields.items() if v is not None and k not in set_})


def model_config_of(config, *, init_cfg: Optional[ModelConfig] = None, tokenizer=None) -> ModelConfig:
  """The ModelConfig the run builds: a starting point's architecture as it is (its own vocabulary), or the preset
  with the overrides and the tokenizer's vocabulary (tokenizer_stand_in(config.data) when none is built yet)."""
  arch = arch_config(config, init_cfg)
  if init_cfg is not None:
    return arch
  return with_tokenizer(arch, tokenizer if tokenizer is not None else tokenizer_stand_in(config.data),
                        config.model.overrides)


def tokenizer_stand_in(data):
  """What with_tokenizer reads of the run's tokenizer: a given one's vocabulary (loaded, it is small), else the size
  the run would train (config.data.vocab_size; the trained one may come out a little smaller on a small corpus)."""
  if data.get('tokenizer_path'):
    from train.data import tokenizers  # pylint: disable=g-import-not-at-top
    return tokenizers.Tokenizer.load(data.tokenizer_path)
  return types.SimpleNamespace(vocab_size=int(data.vocab_size), pad_id=None, eos_id=None, bos_id=None)


def checkpoint_model_cfg(path: str) -> ModelConfig:
  """The ModelConfig train/core/pretrained.py's load(path) would give, read from the checkpoint's config file alone.

  An lmlab run's config.json, a converted directory's lmlab_model.json, a Hugging Face directory's config.json (the
  ties of LM heads as it declares them with tie_word_embeddings; the importer reads them off the weights). A GGUF
  file's architecture sits behind its whole tokenizer table and tensor index, so it is refused (ValueError)."""
  from model import convert  # pylint: disable=g-import-not-at-top
  from model.convert import hf_layouts as layouts  # pylint: disable=g-import-not-at-top
  kind = convert.checkpoint_kind(path)
  if kind == 'lmlab-run':
    with open(os.path.join(path, 'config.json')) as f:
      return ModelConfig(**json.load(f)['model'])
  if kind == 'converted':
    with open(os.path.join(path, convert.CONFIG_FILE)) as f:
      return ModelConfig(**json.load(f)['model_config']).replace(scan_layers=True)
  if kind == 'gguf':
    raise ValueError(f'config.model.init_from={path}: the cost model reads a checkpoint\'s config only, and a GGUF '
                     'file\'s lies behind its tokenizer and tensor tables; convert it once (python -m model.convert '
                     'import --from=FILE --to=DIR) and set init_from=DIR, or call estimate() with its ModelConfig.')
  where = os.path.join(path, 'config.json')
  with open(where) as f:
    hf = json.load(f)
  family = layouts.model_family(hf, where)
  if family in ('bert', 'roberta', 'electra'):
    fields = layouts.bert_like_config(hf, family, where)
  elif family == 'gpt2':
    fields = layouts.gpt2_config(hf, where)
  elif family == 't5':
    fields = layouts.t5_config(hf, where, tied=bool(hf.get('tie_word_embeddings', True)))
  else:
    fields = layouts.llama_config(hf, where)
  return ModelConfig(**fields, scan_layers=True)
