"""One record per pre-training objective and per downstream task, and the open registry the library reads them from.

A `Task` says everything lmlab needs to train one: the architectures that can serve it, the LanguageModel heads it
reads, the batch keys its loss reads, the example builder that makes those keys from records (and the keys it
provides), the tokenizer kind it trains by default, its loss and the metrics it reports. `build_loss_fn`, the data
pipeline and the trainer read these records and keep no tables of their own. `register(Task(...))` from any module (a
test, a user's config file) adds one that `python -m train.main` then trains like the built-in ones; a config file
that registers its task at import time needs no library file edited.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from model import config as model_config
from model.config import ModelConfig
from model.heads import HEADS, Electra, LanguageModel
from train import evaluate
from train import finetune
from train import objectives as losses
from train.data import task_io

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """config.loss: label_smoothing and z_loss for the generative token losses, ELECTRA's weights."""
  label_smoothing: float = 0.0
  z_loss: float = 0.0
  rtd_lambda: float = 50.0
  generator_temperature: float = 1.0


@dataclasses.dataclass(frozen=True)
class Task:
  """A pre-training objective (kind='pretrain') or a downstream task (kind='task').

  loss(outputs, batch, opts) -> (loss, metrics): outputs is the LanguageModel's dict ('mlm_logits', 'lm_logits', ...).
  examples(records, tokenizer, data) -> (transform, source): the example builder; `transform(source[i], rng)` is one
  example dict holding (at least) `provides`; records are the split's text records (pre-training) or labeled records
  (tasks); data is config.data. A task that runs its own forward pass (ELECTRA samples from a generator between two)
  gives `step_loss(params, batch, rng, *, model, deterministic, opts)` and `model(config, model_cfg)` instead, and
  trains alone.

  Downstream tasks also read labeled files and are scored on them: read(paths, data) -> records (the validating
  readers of train/data/readers.py); labels(paths, data) -> the label or tag names found there, stored in
  config.data.<label_field>; eval_examples(records, tokenizer, data) -> the examples scored, in order (QA: every
  doc-stride window); score(outputs, examples, records, data) -> (metrics, predictions) from the model `outputs`
  named (train/evaluate.py's scorers).
  """
  name: str
  archs: tuple[str, ...]
  heads: tuple[str, ...]
  batch_keys: tuple[str, ...]
  loss: Optional[Callable] = None
  fix: str = ''  # what to do when an architecture cannot serve it
  examples: Optional[Callable] = None
  provides: tuple[str, ...] = ()
  tokenizer_kind: str = ''
  metrics: tuple[str, ...] = ('loss', 'weight_sum')
  kind: str = 'pretrain'
  model: Optional[Callable] = None
  step_loss: Optional[Callable] = None
  check_model: Optional[Callable] = None  # check_model(model) -> an error message, or None when it can serve
  read: Optional[Callable] = None
  labels: Optional[Callable] = None
  label_field: str = ''
  eval_examples: Optional[Callable] = None
  outputs: tuple[str, ...] = ()
  score: Optional[Callable] = None
  columns: tuple[str, ...] = ()  # the record's default text columns and label column (classification readers)
  # Fields that differ on one architecture, e.g. seq2seq on a decoder: {'decoder': {'examples': ..., 'loss': ...}};
  # `for_arch` applies them once the model's architecture is known.
  arch_fields: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  # Classification as cloze or continuation (train/prompts.py): the default (template, verbalizer) per architecture,
  # used when config.finetune.prompt is on and config.finetune.template / verbalizer are ''.
  prompts: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict)


REGISTRY: dict[str, Task] = {}


def register(task: Task, *, replace: bool = False) -> Task:
  """Adds a record; a name already taken is an error unless replace=True (re-running a notebook cell)."""
  if task.name in REGISTRY and not replace:
    raise ValueError(f'task {task.name!r} is already registered; pick another name or pass replace=True.')
  if task.loss is None and task.step_loss is None:
    raise ValueError(f'task {task.name!r} has neither a loss nor a step_loss.')
  REGISTRY[task.name] = task
  return task


def get(name: str) -> Task:
  if name not in REGISTRY:
    raise ValueError(f'unknown objective {name!r}; known objectives: {sorted(REGISTRY)}.')
  return REGISTRY[name]


def for_arch(task: Task, arch: str) -> Task:
  """The record as it runs on `arch`: its arch_fields for that architecture applied (the record itself otherwise)."""
  fields = task.arch_fields.get(arch)
  return dataclasses.replace(task, **fields) if fields else task


def prompting(config) -> bool:
  """Whether config classifies by prompt (template + verbalizer) instead of a classifier head."""
  return bool((config.get('finetune') or {}).get('prompt'))


def for_run(task: Task, config, arch: str) -> Task:
  """The record as `config` runs it on `arch`: for_arch, then, with config.finetune.prompt, as prompt-based
  classification: the 'prompt' head (MLM or LM head + verbalizer) instead of the classifier, prompt examples
  (train/prompts.py); its loss (cross-entropy over the label log-probabilities) and scorer stay the task's."""
  from train import prompts  # pylint: disable=g-import-not-at-top
  task = for_arch(task, arch)
  if prompting(config):
    task = prompts.as_prompt_task(task, config, arch)
  n = finetune.soft_prompt_length(config)
  if not n:
    return task
  return prompts.with_soft_prompt(task, n,
                                  1 if arch == 'encoder' or not prompting(config) or config.finetune.bos else 0)


def run_heads(config, arch: Optional[str] = None) -> tuple[str, ...]:
  """The LanguageModel heads config trains on `arch`: its objectives' (heads_for), the classifier swapped for the
  'prompt' head when config.finetune.prompt is on."""
  heads = heads_for(config.objectives, arch)
  if prompting(config):
    heads = tuple(sorted({'prompt' if h == 'classifier' else h for h in heads}, key=HEADS.index))
  return heads


# --------------------------------------------------------------------------------------------------- losses

_ENCODER = ('tokens', 'segment_ids', 'positions', 'token_type_ids')
_MASKED = ('masked_positions', 'masked_ids', 'masked_weights')
_CAUSAL = ('tokens', 'targets', 'weights', 'segment_ids', 'positions')
_SEQ2SEQ = ('encoder_tokens', 'encoder_segment_ids', 'encoder_positions', 'decoder_tokens', 'decoder_targets',
            'decoder_weights', 'decoder_segment_ids', 'decoder_positions')
_TOKEN_METRICS = ('loss', 'accuracy', 'perplexity', 'weight_sum')


def _mlm(out, batch, opts):
  return losses.mlm_loss(logits=out['mlm_logits'], labels=batch['masked_ids'], weights=batch['masked_weights'])


def _nsp(out, batch, opts):
  return losses.nsp_loss(logits=out['nsp_logits'], labels=batch['nsp_labels'])


def _clm(out, batch, opts):
  return losses.clm_loss(logits=out['lm_logits'], targets=batch['targets'], weights=batch['weights'],
                         label_smoothing=opts.label_smoothing, z_loss=opts.z_loss)


def _seq2seq(out, batch, opts):
  return losses.seq2seq_loss(logits=out['lm_logits'], targets=batch['decoder_targets'],
                             weights=batch['decoder_weights'], label_smoothing=opts.label_smoothing, z_loss=opts.z_loss)


def _span(out, batch, opts):
  return losses.span_loss(logits=out['lm_logits'], targets=batch['decoder_targets'], weights=batch['decoder_weights'],
                          roles=batch.get('decoder_target_roles'), label_smoothing=opts.label_smoothing,
                          z_loss=opts.z_loss)


def _classification(out, batch, opts):
  return losses.classification_loss(logits=out['cls_logits'], labels=batch['label'], weights=batch.get('label_weights'))


def _regression(out, batch, opts):
  return losses.regression_loss(predictions=out['cls_logits'][..., 0], targets=batch['label'],
                                weights=batch.get('label_weights'))


def _tagging(out, batch, opts):
  return losses.tagging_loss(logits=out['tag_logits'], labels=batch['tag_labels'], weights=batch['tag_weights'])


def _qa(out, batch, opts):
  return losses.span_qa_loss(start_logits=out['start_logits'], end_logits=out['end_logits'],
                             start_positions=batch['start_positions'], end_positions=batch['end_positions'],
                             weights=batch.get('label_weights'))


def _electra_step_loss(params, batch, rng, *, model, deterministic, opts):
  if not isinstance(model, Electra):
    raise ValueError(f"objective 'rtd' needs the Electra(generator_cfg, discriminator_cfg) model, got "
                     f'{type(model).__name__}.')
  if rng is None:
    raise ValueError("objective 'rtd' samples the generator's replacements and needs an rng, also in evaluation.")
  return losses.electra_loss(params, batch, rng, model=model, rtd_lambda=opts.rtd_lambda, deterministic=deterministic,
                             temperature=opts.generator_temperature)


# Discriminator fields the generator shares; the rest comes from config.model.generator_preset and its overrides.
_GENERATOR_SHARES = ('vocab_size', 'pad_id', 'max_len', 'embed_dim', 'type_vocab_size', 'dtype', 'param_dtype',
                     'scan_layers', 'remat_policy')


def _electra_model(config, model_cfg: ModelConfig):
  gen = {k: getattr(model_cfg, k) for k in _GENERATOR_SHARES}
  gen.update(model_config.set_fields(config.model.generator_overrides))
  return Electra(model_config.preset(config.model.generator_preset, **gen), model_cfg)


def _needs_one_label(model):
  if model.num_labels != 1:
    return f"objective 'regression' needs LanguageModel(num_labels=1); got num_labels={model.num_labels}."
  return None


# Classification on an encoder-decoder (T5's way): the label's name is the target text (LM head, seq2seq loss), and
# evaluation ranks every label by the log-probability of its text (LanguageModel.label_text_scores -> cls_logits).
_LABEL_TEXT = dict(heads=('lm',), batch_keys=('encoder_tokens',) + _SEQ2SEQ[3:6], loss=_seq2seq,
                   examples=task_io.label_text_examples, provides=_SEQ2SEQ + ('label',), tokenizer_kind='unigram',
                   eval_examples=task_io.label_text_candidates)

_BUILTIN = (
    Task('mlm', ('encoder',), ('mlm',), _MASKED, _mlm, "use an encoder (arch='encoder'); decoder-only models train "
         "with 'clm'", task_io.masked_examples, _ENCODER + _MASKED, 'wordpiece', _TOKEN_METRICS),
    Task('nsp', ('encoder',), ('nsp',), ('nsp_labels',), _nsp, "use an encoder (arch='encoder') or drop 'nsp'",
         task_io.next_sentence_examples, _ENCODER + _MASKED + ('nsp_labels',), 'wordpiece', _TOKEN_METRICS),
    Task('clm', ('decoder',), ('lm',), ('targets', 'weights'), _clm, "use a decoder (arch='decoder'); encoders train "
         "with 'mlm', encoder-decoders with 'span' or 'seq2seq'", task_io.causal_examples, _CAUSAL, 'bpe',
         _TOKEN_METRICS),
    Task(
        'rtd', ('encoder',), ('rtd',), ('tokens',) + _MASKED, None, "ELECTRA's replaced-token detection needs an "
        'encoder discriminator and the Electra(generator_cfg, discriminator_cfg) model', task_io.masked_examples,
        _ENCODER + _MASKED, 'wordpiece', ('loss', 'generator/loss', 'discriminator/loss', 'discriminator/accuracy'),
        model=_electra_model, step_loss=_electra_step_loss),
    Task(
        'span', ('encoder_decoder',), ('lm',), ('encoder_tokens',) + _SEQ2SEQ[3:6], _span,
        "span corruption needs an encoder-decoder (arch='encoder_decoder'); use 'mlm' for encoders, 'clm' for "
        'decoders', task_io.span_examples, _SEQ2SEQ + ('decoder_target_roles',), 'unigram',
        _TOKEN_METRICS + ('token_accuracy', 'sentinel_accuracy', 'eos_accuracy')),
    Task(
        'seq2seq', ('encoder_decoder', 'decoder'), ('lm',), ('encoder_tokens',) + _SEQ2SEQ[3:6], _seq2seq,
        "use an encoder-decoder (source in, target out) or a decoder (source in a prompt, target after it)",
        task_io.seq2seq_examples, _SEQ2SEQ, 'unigram', _TOKEN_METRICS, kind='task', read=task_io.read_seq2seq(
            ('source', 'target')), eval_examples=task_io.each_record(task_io.seq2seq_examples), outputs=('generated',),
        score=evaluate.score_generation, columns=('source', 'target'), arch_fields={
            'decoder': dict(batch_keys=('targets', 'weights'), loss=_clm, examples=task_io.completion_examples,
                            provides=_CAUSAL, tokenizer_kind='bpe', eval_examples=task_io.completion_prompts)
        }),
    Task('classification', ('encoder', 'decoder', 'encoder_decoder'), ('classifier',), ('label',), _classification,
         '', task_io.classification_examples,
         _ENCODER + ('label',), 'wordpiece', ('loss', 'accuracy', 'weight_sum'), kind='task',
         read=task_io.read_classification(('sentence', 'label')), labels=task_io.classification_labels(
             ('sentence',
              'label')), label_field='label_names', eval_examples=task_io.each_record(task_io.classification_examples),
         outputs=('cls_logits',), score=evaluate.score_classification, columns=('sentence', 'label'),
         arch_fields={'encoder_decoder': _LABEL_TEXT}),
    Task('regression', ('encoder', 'decoder'), ('classifier',), ('label',), _regression,
         "encoder-decoders regress with 'seq2seq' on the value as text", None, (), 'wordpiece', kind='task',
         check_model=_needs_one_label),
    Task('tagging', ('encoder', 'decoder'), ('tagger',), ('tag_labels', 'tag_weights'), _tagging,
         'use an encoder for token classification', task_io.tagging_examples, _ENCODER + ('tag_labels', 'tag_weights'),
         'wordpiece', ('loss', 'accuracy', 'weight_sum'), kind='task', read=task_io.read_conll,
         labels=task_io.conll_tags, label_field='tag_names',
         eval_examples=task_io.each_record(task_io.tagging_examples), outputs=('tag_logits',),
         score=evaluate.score_tagging),
    Task('qa', ('encoder', 'decoder'), ('qa',), ('start_positions', 'end_positions'), _qa,
         "use an encoder for extractive QA, or 'seq2seq' for generative QA", task_io.qa_examples, _ENCODER +
         ('start_positions', 'end_positions', 'offsets'), 'wordpiece',
         ('loss', 'start_accuracy', 'end_accuracy', 'exact_match', 'weight_sum'), kind='task', read=task_io.read_squad,
         eval_examples=task_io.qa_windows, outputs=('start_logits', 'end_logits'), score=evaluate.score_qa),
)
for _task in _BUILTIN:
  register(_task)


def _dataset(base: str, name: str, columns: tuple[str, ...] = (), prompts=None) -> Task:
  """A dataset's record: its base kind's, under its own name (metrics are logged as '<name>/...'), with its columns
  and its default prompts."""
  task = REGISTRY[base]
  if columns:
    task = dataclasses.replace(task, read=task_io.read_classification(columns),
                               labels=task_io.classification_labels(columns), columns=columns)
  return dataclasses.replace(task, name=name, prompts=prompts or task.prompts)


# Default prompts (encoders: LM-BFF's manual templates and words; decoders: a plain question-and-answer form).
_TREC_WORDS = 'ABBR:{};DESC:{};ENTY:{};HUM:{};LOC:{};NUM:{}'
_PROMPTS = {
    'sst2': {
        'encoder': ('{sentence} It was {mask}.', '0:terrible;1:great'),
        'decoder': ('Review: {sentence}\nSentiment:', '0:negative;1:positive')
    },
    'trec': {
        'encoder': ('{mask}: {question}',
                    _TREC_WORDS.format('Expression', 'Description', 'Entity', 'Human', 'Location', 'Number')),
        'decoder': ('Question: {question}\nType:',
                    _TREC_WORDS.format('abbreviation', 'description', 'entity', 'person', 'location', 'number'))
    },
    'rte': {
        'encoder': ('{sentence1} ? {mask} , {sentence2}', 'entailment:Yes;not_entailment:No'),
        'decoder':
            ('{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:', 'entailment:True;not_entailment:False')
    },
    'snli': {
        'encoder': ('{premise} ? {mask} , {hypothesis}', 'entailment:Yes;neutral:Maybe;contradiction:No'),
        'decoder': ('{premise}\nQuestion: {hypothesis} True, False or Neither?\nAnswer:',
                    'entailment:True;neutral:Neither;contradiction:False')
    },
}

# The datasets in ../shared/data (and their public originals): TSV columns as those files have them.
_DATASETS = (
    _dataset('classification', 'sst2', ('sentence', 'label'), _PROMPTS['sst2']),
    _dataset('classification', 'trec', ('question', 'coarse_label'), _PROMPTS['trec']),
    _dataset('classification', 'trec_fine', ('question', 'fine_label')),
    _dataset('classification', 'rte', ('sentence1', 'sentence2', 'label'), _PROMPTS['rte']),
    _dataset('classification', 'snli', ('premise', 'hypothesis', 'label'), _PROMPTS['snli']),
    _dataset('tagging', 'wnut17'),
    _dataset('qa', 'squad'),
    _dataset('qa', 'xquad'),
    dataclasses.replace(_dataset('seq2seq', 'translation'), read=task_io.read_seq2seq(('en', 'de')),
                        columns=('en', 'de')),
)  # yapf: disable (one dataset per line)
for _task in _DATASETS:
  register(_task)

# --------------------------------------------------------------------------------------------- reading records


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
                     'register your own with train.tasks.register(Task(...)).')


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
    task = REGISTRY[name]
    if arch not in task.archs:
      raise ValueError(f"objective {name!r} cannot be trained on arch={arch!r} (it needs {' or '.join(task.archs)}): "
                       f'{task.fix}.')
  own = [n for n in objectives if REGISTRY[n].step_loss is not None]
  if own and len(objectives) > 1:
    others = sorted(set(objectives) - {own[0]})
    raise ValueError(f'objective {own[0]!r} runs its own model and forward pass (for rtd: ELECTRA, which already '
                     f'includes its generator\'s MLM loss) and has no heads for {others}; train {own[0]} alone.')
  _check_shared_heads(objectives)


def _check_shared_heads(objectives):
  readers: dict[str, list[str]] = {}
  for name in objectives:
    task = REGISTRY[name]
    for head in task.heads:
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
  needed = {h for task in records for h in task.heads}
  return tuple(h for h in HEADS if h in needed)


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
  if finetune.soft_prompt_length(config):
    kw['soft_prompt_length'] = finetune.soft_prompt_length(config)
  return kw


def build_model(config, model_cfg: ModelConfig):
  """The module config.objectives trains: the record's own model (ELECTRA) or a LanguageModel with their heads."""
  objectives = dict(config.objectives)
  for name in objectives:
    if REGISTRY[name].model is not None:
      return REGISTRY[name].model(config, model_cfg)
  return LanguageModel(model_cfg, heads=run_heads(config, model_cfg.arch), **model_kwargs(config))


def task_of(config) -> Optional[Task]:
  """The downstream task among config.objectives (a fine-tuning run trains one), or None for pre-training."""
  found = [REGISTRY[n] for n in config.objectives if n in REGISTRY and REGISTRY[n].kind == 'task']
  if len(found) > 1:
    raise ValueError(f'config.objectives={sorted(config.objectives)} names several downstream tasks '
                     f'({[t.name for t in found]}); fine-tune one task per run.')
  return found[0] if found else None


def pretraining_task(objectives: Mapping[str, float]) -> Task:
  """The record that builds pre-training examples from text; downstream tasks read labeled files instead."""
  task = example_task(objectives)
  if task.kind != 'pretrain':
    raise ValueError(f'config.objectives={sorted(objectives)}: {task.name!r} is a downstream task, trained on labeled '
                     'files (configs/finetune.py), not on pre-training text; pre-train with one of '
                     f'{sorted(n for n, t in REGISTRY.items() if t.kind == "pretrain")}.')
  return task


def example_task(objectives: Mapping[str, float]) -> Task:
  """The record whose example builder provides every batch key the objectives read (mlm + nsp -> nsp's pairs)."""
  _check_names(objectives)
  needed = {k for name in objectives for k in REGISTRY[name].batch_keys}
  for name in sorted(objectives, key=lambda n: -len(REGISTRY[n].provides)):
    task = REGISTRY[name]
    if task.examples is not None and needed <= set(task.provides):
      return task
  raise ValueError(f'config.objectives={sorted(objectives)}: no one example builder provides every batch key they '
                   f'read ({sorted(needed)}); train them separately or register a Task whose examples provide all.')


# ---------------------------------------------------------------------------------- baselines and collapse signals

# Where each token objective's targets sit in a batch: (targets, weights, roles key or None, the metric compared).
# Span corruption's baseline counts the dropped text only (roles == 1), as its token_accuracy does.
_TOKEN_TARGETS = {
    'mlm': ('masked_ids', 'masked_weights', None, 'accuracy'),
    'clm': ('targets', 'weights', None, 'accuracy'),
    'span': ('decoder_targets', 'decoder_weights', 'decoder_target_roles', 'token_accuracy'),
}


def token_baselines(objectives: Iterable[str], batches: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """'<objective>/<metric>_baseline' for each token objective among `objectives`: the accuracy of always predicting
  the most frequent target of these batches (the evaluation's own, so a generous trivial baseline): what
  mlm/accuracy, clm/accuracy and span/token_accuracy must beat before a model can be said to have learned."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  out = {}
  for name in objectives:
    if name not in _TOKEN_TARGETS:
      continue
    targets, weights, roles, metric = _TOKEN_TARGETS[name]
    ids = []
    for batch in batches:
      if targets not in batch:
        break
      keep = np.asarray(batch[weights]) > 0
      if roles is not None and roles in batch:
        keep &= np.asarray(batch[roles]) == 1
      ids.append(np.asarray(batch[targets])[keep])
    ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
    if len(ids):
      out[f'{name}/{metric}_baseline'] = float(np.bincount(ids.astype(np.int64)).max() / len(ids))
  return out


def health_warnings(values: Mapping[str, float], *, split: str) -> list[str]:
  """One line per objective whose logged values say it is not learning (ELECTRA's discriminator predicting the base
  rate everywhere; its final hidden states the same vector for every token). split: 'train' (a window, dropout on)
  or 'eval' (no dropout: token_variance_share is only read there, as dropout alone keeps it near 0.08 in training)."""
  out = []
  auc, loss, base = (values.get(f'rtd/{k}') for k in ('disc_auc', 'discriminator/loss', 'disc_loss_baseline'))
  if auc is not None and base is not None and auc < 0.55 and loss > base - 0.005:
    out.append(f'warning: rtd did not learn: disc_auc {auc:.3f} and discriminator loss {loss:.4f} at the base rate\'s '
               f'{base:.4f} ({split}): it predicts "original" everywhere. Lower config.optim.learning_rate, lengthen '
               'warmup_steps or raise config.loss.generator_temperature (configs/electra.py says what was measured).')
  share = values.get('rtd/token_variance_share')
  if split == 'eval' and share is not None and share < 0.01:
    out.append(f'warning: rtd collapsed: the discriminator\'s final hidden states are one vector for every token '
               f'(token_variance_share {share:.4f}, healthy runs > 0.05).')
  return out


# ------------------------------------------------------------------------------------------------ the combinator


def _check_model(model, objectives, heads):
  if not isinstance(model, LanguageModel):
    raise ValueError(f'objectives {sorted(objectives)} need a LanguageModel, got {type(model).__name__}.')
  missing = sorted(set(heads) - set(model.heads))
  if missing:
    raise ValueError(f'objectives {sorted(objectives)} read head(s) {missing} the model was built without; build '
                     f'LanguageModel(cfg, heads=heads_for(objectives)) = heads={heads}.')
  for name in objectives:
    check = REGISTRY[name].check_model
    problem = check(model) if check is not None else None
    if problem:
      raise ValueError(problem)


def _check_batch(batch, records: Mapping[str, Task]):
  for name, task in records.items():
    missing = [k for k in task.batch_keys if k not in batch]
    if missing:
      raise ValueError(f'objective {name!r} needs batch key(s) {missing}; the batch has {sorted(batch)} '
                       '(see the batch contract in train/data/__init__.py).')


def build_loss_fn(cfg_or_arch: Union[ModelConfig, str], objectives: Mapping[str, float], *,
                  heads: Optional[Sequence[str]] = None, **options: Any) -> LossFn:
  """One loss over the params pytree for a weighted set of objectives, e.g. {'mlm': 1.0, 'nsp': 1.0}.

  Validates now (ValueError naming objective, arch and fix) and returns
  `loss_fn(params, batch, rng, *, model, deterministic=False) -> (loss, metrics)`, for
  `jax.value_and_grad(loss_fn, has_aux=True)`. `model` is `build_model(config, cfg)`: a LanguageModel with
  `heads_for(objectives)`, or the record's own (Electra for 'rtd'); `rng` feeds dropout and ELECTRA's sampling (it may
  be None with deterministic=True, except for 'rtd', which samples even in evaluation). options are LossOptions'
  fields (config.loss). loss = sum_name weight * loss_name; metrics are '<name>/<metric>' per objective plus 'loss'.
  heads: the model's heads when they are not heads_for(objectives) (run_heads: a prompt-based run).
  """
  validate_objectives(cfg_or_arch, objectives)
  objectives = dict(objectives)
  opts = LossOptions(**options)
  heads = tuple(heads) if heads is not None else heads_for(objectives, _arch(cfg_or_arch))
  records = {n: for_arch(REGISTRY[n], _arch(cfg_or_arch)) for n in objectives}
  own = [t for t in records.values() if t.step_loss is not None]

  def loss_fn(params, batch, rng, *, model, deterministic: bool = False):
    if own:
      _check_batch(batch, records)
      loss, m = own[0].step_loss(params, batch, rng, model=model, deterministic=deterministic, opts=opts)
      total = objectives[own[0].name] * loss
      return total, {'loss': total, **{f'{own[0].name}/{k}': v for k, v in m.items()}}
    _check_model(model, objectives, heads)
    _check_batch(batch, records)
    # rng may be None for deterministic evaluation of non-sampling objectives.
    out = model.apply({'params': params}, batch, deterministic=deterministic,
                      rngs={} if rng is None else {'dropout': rng})
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for name, weight in objectives.items():
      loss, m = records[name].loss(out, batch, opts)
      total = total + weight * loss
      metrics.update({f'{name}/{k}': v for k, v in m.items()})
    metrics['loss'] = total
    return total, metrics

  return loss_fn
