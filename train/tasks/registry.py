"""The two kinds of record lmlab trains from, and the open registry that holds them.

An `Objective` is a pre-training objective (train/tasks/objectives.py: mlm, nsp, clm, rtd, span); a `Task` is a
downstream task (one module per kind: classification.py, tagging.py, qa.py, text_to_text.py). Each says everything
lmlab needs to train it: the architectures that can serve it, the LanguageModel heads it reads, the batch keys its loss
reads, the example builder that makes those keys from records (and the keys it provides), the tokenizer kind it trains
by default, its loss and the metrics it reports; a Task also reads labeled files and scores predictions. The data
pipeline, the loss combinator (compose.py) and the trainer read these records and keep no tables of their own.

`register(record)` from any module (a test, a user's config file) adds one that `python -m train.main` then trains
like the built-in ones; config.objectives names objectives and tasks alike, so they share one namespace.
docs/extending.md walks through adding each.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from model.config import ModelConfig
from model.heads import HEADS

# Batch keys (the contract in train/data/__init__.py) the records share.
ENCODER = ('tokens', 'segment_ids', 'positions', 'token_type_ids')
MASKED = ('masked_positions', 'masked_ids', 'masked_weights')
CAUSAL = ('tokens', 'targets', 'weights', 'segment_ids', 'positions')
SEQ2SEQ = ('encoder_tokens', 'encoder_segment_ids', 'encoder_positions', 'decoder_tokens', 'decoder_targets',
           'decoder_weights', 'decoder_segment_ids', 'decoder_positions')
TOKEN_METRICS = ('loss', 'accuracy', 'perplexity', 'weight_sum')


@dataclasses.dataclass(frozen=True)
class OwnModel:
  """An objective that runs its own module and forward passes (ELECTRA samples from a generator between two) and so
  trains alone. build(config, model_cfg) -> the flax module; step_loss(params, batch, rng, *, model, deterministic,
  opts) -> (loss, metrics)."""
  build: Callable
  step_loss: Callable


@dataclasses.dataclass(frozen=True)
class TokenTargets:
  """Where a token objective's targets sit in a batch, and the accuracy metric its most-frequent-token baseline is
  for (objectives.token_baselines); roles, when set, keeps only the targets of role 1 (span corruption's dropped
  text)."""
  targets: str
  weights: str
  metric: str = 'accuracy'
  roles: Optional[str] = None


@dataclasses.dataclass(frozen=True)
class Objective:
  """A pre-training objective. loss(outputs, batch, opts) -> (loss, metrics): outputs is the LanguageModel's dict
  ('mlm_logits', 'lm_logits', ...), opts compose.LossOptions. examples(records, tokenizer, data) -> (transform, source):
  `transform(source[i], rng)` is one example dict holding (at least) `provides`; records are text records, data is
  config.data. own: the objective's own module and step (ELECTRA), in place of loss."""
  name: str
  archs: tuple[str, ...]
  heads: tuple[str, ...]
  batch_keys: tuple[str, ...]
  loss: Optional[Callable]
  fix: str  # what to do when an architecture cannot serve it
  examples: Optional[Callable]
  provides: tuple[str, ...]
  tokenizer_kind: str
  metrics: tuple[str, ...] = ('loss', 'weight_sum')
  targets: Optional[TokenTargets] = None
  own: Optional[OwnModel] = None
  kind: str = dataclasses.field(default='pretrain', init=False)


@dataclasses.dataclass(frozen=True)
class Labels:
  """A task's label set: find(paths, data) -> the label (or tag) names in the training files, kept in
  config.data.<field> so the model's head and the dev scorer use the same order."""
  find: Callable
  field: str  # 'label_names' | 'tag_names'


@dataclasses.dataclass(frozen=True)
class Task:
  """A downstream task, trained on labeled files and scored on them. Beyond Objective's fields: read(paths, data) ->
  records (train/data/readers.py validates); eval_examples(records, tokenizer, data) -> the examples scored, in order
  (QA: every doc-stride window); score(outputs, examples, records, data, tokenizer) -> (metrics, predictions) from
  the model `outputs` named, or from `forward(model, data)`'s when the task computes its own (generation); labels: its
  label set when it has one; columns: its default text and label columns; arch_fields: fields that differ on one
  architecture ({'decoder': {...}}, applied by for_arch); prompts: the default (template, verbalizer) per architecture
  for classification as a cloze or a continuation (train/finetune/prompts.py)."""
  name: str
  archs: tuple[str, ...]
  heads: tuple[str, ...]
  batch_keys: tuple[str, ...]
  loss: Callable
  fix: str
  examples: Callable
  provides: tuple[str, ...]
  tokenizer_kind: str
  metrics: tuple[str, ...]
  read: Callable
  eval_examples: Callable
  score: Callable
  outputs: tuple[str, ...] = ()
  best: str = 'accuracy'  # the dev metric a run keeps its best checkpoint by (configs/finetune.py: eval/<best>)
  forward: Optional[Callable] = None
  labels: Optional[Labels] = None
  columns: tuple[str, ...] = ()
  arch_fields: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  prompts: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
  kind: str = dataclasses.field(default='task', init=False)


Record = Union[Objective, Task]
REGISTRY: dict[str, Record] = {}


def register(record: Record, *, replace: bool = False) -> Record:
  """Adds an Objective or a Task; a name already taken is an error unless replace=True (re-running a notebook cell)."""
  if not isinstance(record, (Objective, Task)):
    raise TypeError(f'register() takes an Objective or a Task (train/tasks/registry.py); got {type(record).__name__}.')
  if record.name in REGISTRY and not replace:
    raise ValueError(f'{record.kind} {record.name!r} is already registered; pick another name or pass replace=True.')
  if record.loss is None and getattr(record, 'own', None) is None:
    raise ValueError(f'{record.kind} {record.name!r} has neither a loss nor its own model and step.')
  REGISTRY[record.name] = record
  return record


def get(name: str) -> Record:
  if name not in REGISTRY:
    raise ValueError(f'unknown objective {name!r}; known objectives: {sorted(REGISTRY)}.')
  return REGISTRY[name]


def dataset(base: str, name: str, *, read: Optional[Callable] = None, labels: Optional[Labels] = None,
            columns: tuple[str, ...] = (), prompts=None) -> Task:
  """A dataset's record: its kind's (`base`), under its own name (metrics are logged as '<name>/...'), with its own
  reader, label set, columns and default prompts where they differ."""
  task = REGISTRY[base]
  fields = {k: v for k, v in dict(read=read, labels=labels, columns=columns, prompts=prompts).items() if v}
  return dataclasses.replace(task, name=name, **fields)


def for_arch(record: Record, arch: str) -> Record:
  """The record as it runs on `arch`: a Task's arch_fields for that architecture applied (the record otherwise)."""
  fields = record.arch_fields.get(arch) if isinstance(record, Task) else None
  return dataclasses.replace(record, **fields) if fields else record


# ------------------------------------------------------------------------------------------- which records run


def _arch(cfg_or_arch) -> str:
  if isinstance(cfg_or_arch, ModelConfig):
    return cfg_or_arch.arch
  if isinstance(cfg_or_arch, str):
    return cfg_or_arch
  raise TypeError(f'expected a ModelConfig or an arch name, got {type(cfg_or_arch).__name__}.')


def _check_names(names: Iterable[str]) -> None:
  unknown = sorted(set(names) - set(REGISTRY))
  if unknown:
    raise ValueError(f'unknown objective(s) {unknown} (config.objectives); known objectives: {sorted(REGISTRY)}, or '
                     'register your own with train.tasks.register(...) (docs/extending.md).')


def validate_objectives(cfg_or_arch: Union[ModelConfig, str], objectives: Mapping[str, float]) -> None:
  """Raises ValueError, naming the objective, the architecture and the fix, for anything the model cannot serve."""
  arch = _arch(cfg_or_arch)
  if not objectives:
    raise ValueError(f'no objectives given; name at least one of {sorted(REGISTRY)} with a weight, '
                     "e.g. {'mlm': 1.0}.")
  _check_names(objectives)
  for name, weight in objectives.items():
    if not isinstance(weight, numbers.Real) or isinstance(weight, bool) or not 0 <= weight < float('inf'):
      raise ValueError(f'objective {name!r} has weight {weight!r}; weights must be finite numbers >= 0.')
    record = REGISTRY[name]
    if arch not in record.archs:
      raise ValueError(f"objective {name!r} cannot be trained on arch={arch!r} (it needs {' or '.join(record.archs)}): "
                       f'{record.fix}.')
  own = [n for n in objectives if isinstance(REGISTRY[n], Objective) and REGISTRY[n].own is not None]
  if own and len(objectives) > 1:
    others = sorted(set(objectives) - {own[0]})
    raise ValueError(f'objective {own[0]!r} runs its own model and forward pass (for rtd: ELECTRA, which already '
                     f'includes its generator\'s MLM loss) and has no heads for {others}; train {own[0]} alone.')
  _check_shared_heads(objectives, arch)


def _check_shared_heads(objectives, arch):
  readers: dict[str, list[str]] = {}
  for name in objectives:
    record = for_arch(REGISTRY[name], arch)
    for head in record.heads:
      readers.setdefault(head, []).append(name)
  for head, names in readers.items():
    tasks = [n for n in names if REGISTRY[n].kind == 'task']
    if len(tasks) > 1:
      raise ValueError(f'objectives {" and ".join(map(repr, tasks))} both read the one {head} head; pick one.')


def heads_for(objectives: Iterable[str], arch: Optional[str] = None) -> tuple[str, ...]:
  """The LanguageModel heads the objectives (names, or a {name: weight} dict) read, in HEADS order: ('mlm', 'nsp');
  on `arch` when given (classification on an encoder-decoder reads the LM head, not a classifier)."""
  _check_names(objectives)
  records = [for_arch(REGISTRY[name], arch) if arch else REGISTRY[name] for name in objectives]
  needed = {h for record in records for h in record.heads}
  return tuple(h for h in HEADS if h in needed)


def own_model(objectives: Iterable[str]) -> Optional[Objective]:
  """The objective among these that runs its own model (ELECTRA's rtd), or None."""
  return next((REGISTRY[n] for n in objectives
               if isinstance(REGISTRY.get(n), Objective) and REGISTRY[n].own is not None), None)


def task_of(objectives: Iterable[str]) -> Optional[Task]:
  """The downstream task among the objectives (a fine-tuning run trains one), or None for pre-training."""
  found = [REGISTRY[n] for n in objectives if n in REGISTRY and REGISTRY[n].kind == 'task']
  if len(found) > 1:
    raise ValueError(f'config.objectives={sorted(objectives)} names several downstream tasks '
                     f'({[t.name for t in found]}); fine-tune one task per run.')
  return found[0] if found else None


def pretraining_task(objectives: Mapping[str, float]) -> Objective:
  """The record that builds pre-training examples from text; downstream tasks read labeled files instead."""
  record = example_task(objectives)
  if record.kind != 'pretrain':
    raise ValueError(f'config.objectives={sorted(objectives)}: {record.name!r} is a downstream task, trained on '
                     'labeled files (configs/finetune.py), not on pre-training text; pre-train with one of '
                     f'{sorted(n for n, t in REGISTRY.items() if t.kind == "pretrain")}.')
  return record


def example_task(objectives: Mapping[str, float]) -> Record:
  """The record whose example builder provides every batch key the objectives read (mlm + nsp -> nsp's pairs)."""
  _check_names(objectives)
  needed = {k for name in objectives for k in REGISTRY[name].batch_keys}
  for name in sorted(objectives, key=lambda n: -len(REGISTRY[n].provides)):
    record = REGISTRY[name]
    if record.examples is not None and needed <= set(record.provides):
      return record
  raise ValueError(f'config.objectives={sorted(objectives)}: no one example builder provides every batch key they '
                   f'read ({sorted(needed)}); train them separately or register a record whose examples provide all.')
