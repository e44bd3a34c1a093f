"""The fields every pre-training config has, each documented where it is set, and the parsing of
`--config=configs/x.py:size=small,runlocal`.

Family files (bert.py, gpt.py, ...) start from `base()` and set the model, objectives and data that make them what they
are; `runlocal` shrinks data, batch and steps to seconds on a laptop CPU (tests and CI use it) and, unless a size was
named, picks the family's tiny model. `python -m train.main --config=... --print_config` prints the resolved config.
`config.model.overrides` holds every ModelConfig field (documented in model/config.py) as None, meaning "keep the
preset's value"; `model.config.set_fields()` is how readers get the fields a config really sets.
"""
from __future__ import annotations

import dataclasses
import typing
from typing import Optional, Sequence

import ml_collections
from ml_collections import config_dict

from model import transformer
from train.core import optim

_TRUE, _FALSE = ('', 'true', '1', 'yes'), ('false', '0', 'no')


def parse_arg(arg: str | None, *, sizes: Optional[Sequence[str]] = None, **defaults) -> ml_collections.ConfigDict:
  """'size=small,runlocal' -> {'size': 'small', 'runlocal': True, 'size_given': True}, over defaults.

  Unknown keys, a size not in `sizes`, and a value that does not fit its key are errors naming the argument and the
  choices. `size_given` says whether the argument named a size (runlocal keeps a named size's model).
  """
  out = dict(defaults, runlocal=False)
  given = set()
  for part in filter(None, (arg or '').split(',')):
    key, eq, value = part.partition('=')
    if key not in out:
      raise ValueError(f'config argument {key!r} is unknown; known: {sorted(out)} (e.g. "size=small,runlocal").')
    if isinstance(out[key], bool):
      if value.lower() not in _TRUE + _FALSE:
        raise ValueError(f'config argument {part!r}: {key} is a switch; write "{key}" or "{key}=false".')
      out[key] = value.lower() in _TRUE
    elif not eq or not value:
      raise ValueError(f'config argument {part!r} needs a value, e.g. "{key}={out[key]}".')
    else:
      out[key] = value
    given.add(key)
  if sizes is not None:
    if out.get('size') not in sizes:
      raise ValueError(f'config argument size={out.get("size")!r} is unknown; known sizes: {", ".join(sizes)}.')
    out['size_given'] = 'size' in given
  return ml_collections.ConfigDict(out)


def preset_sizes(prefix: str, suffix: str = '') -> tuple[str, ...]:
  """The sizes the model presets offer under a name pattern: preset_sizes('bert-') -> ('base', 'mini', ...)."""
  names = [n for n in transformer.PRESETS if n.startswith(prefix) and n.endswith(suffix)]
  return tuple(sorted(n[len(prefix):len(n) - len(suffix)] for n in names))


def _placeholder_type(hint) -> type:
  """The type a None-valued override field accepts: Optional[X] -> X; tuple[...] -> tuple (CLI: '(1, 2)')."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if typing.get_origin(hint) is typing.Union and len(args) == 1:
    hint = args[0]
  origin = typing.get_origin(hint)
  if origin is tuple or hint is tuple:
    return tuple
  return origin or hint


def model_fields() -> ml_collections.ConfigDict:
  """Every ModelConfig field as an unset (None) placeholder of its type: what config.model.overrides starts as."""
  hints = typing.get_type_hints(transformer.ModelConfig)
  return ml_collections.ConfigDict({
      f.name: config_dict.placeholder(_placeholder_type(hints[f.name]))
      for f in dataclasses.fields(transformer.ModelConfig)
  })


def _loss() -> ml_collections.ConfigDict:
  """config.loss: the objectives' loss settings."""
  return ml_collections.ConfigDict(dict(  # yapf: disable (one field per line, its meaning beside it)
      rtd_lambda=50.0,          # ELECTRA: loss = generator MLM + rtd_lambda * discriminator loss
      label_smoothing=0.0,      # clm/span: eps of the (1 - eps) one-hot + eps uniform target distribution
      z_loss=0.0,               # clm/span: adds z_loss * log(Z)^2 per target (keeps the softmax normalizer near 1)
      generator_temperature=1.0,  # ELECTRA: temperature of the generator's samples that replace masked tokens
  ))


def _model() -> ml_collections.ConfigDict:
  """config.model: the architecture (a preset and its overrides) and the starting checkpoint."""
  return ml_collections.ConfigDict(dict(  # yapf: disable (one field per line, its meaning beside it)
      preset='',                # a name from model/config.py PRESETS: 'bert-base', 'gpt2-small', 'llama-tiny', ...
      overrides=model_fields(),  # ModelConfig fields over the preset (--config.model.overrides.num_layers=4);
                                # None: the preset's value. Fields and meanings: model/config.py ModelConfig
      generator_preset='',      # ELECTRA: the generator's preset ('' for every other objective)
      generator_overrides=model_fields(),  # ELECTRA: ModelConfig fields over generator_preset, as overrides
      init_from='',             # start from a checkpoint: an lmlab workdir, a converted dir, a HF model dir or a
                                # .gguf file; its architecture replaces the preset, and overrides still apply
  ))


def _data() -> ml_collections.ConfigDict:
  """config.data: where the text comes from, its tokenizer, and how it becomes batches."""
  return ml_collections.ConfigDict(dict(  # yapf: disable (one field per line, its meaning beside it)
      source='embedded',        # 'embedded' (stdlib docstrings, no files) | 'files' | 'tfds'
      embedded_kind='docs',     # 'docs' | 'code'
      path='',                  # files: a text file, a folder of .txt, or a comma-separated list
      name='',                  # files: dataset name under <workdir>/tfds
      document_split='file',    # files: 'file' | 'blank_line' | 'line' (what counts as one document for NSP)
      #                           | 'verbatim' (a file's text as is, split by characters: char-level LM)
      eval_fraction=0.02,       # files: share of passages held out for eval
      tfds_name='',             # tfds: a TFDS catalog name, e.g. 'wikipedia/20230601.en'
      tfds_train_split='train',  # tfds: split to train on
      tfds_eval_split='validation',  # tfds: split to evaluate on
      tfds_data_dir='',         # tfds: where the prepared dataset lives; '' is TFDS's default
      tfds_field_map={},        # tfds: {'text': <the dataset's text feature>}; empty: {'text': 'text'}
      tokenizer_path='',        # a saved tokenizer folder, tokenizer.json or vocab.txt; empty: train one
      tokenizer_kind='',        # '' follows the objective: wordpiece (mlm/nsp/rtd), bpe (clm), unigram (span);
                                # or 'char': one id per distinct character (+ <|endoftext|>, <unk>), as nanoGPT's
                                # shakespeare_char; vocab_size then only caps it
      vocab_size=8000,          # size of the tokenizer trained here (a given tokenizer_path brings its own)
      tokenizer_train_records=20_000,  # training records the tokenizer is trained on
      seq_len=128,              # tokens per example (encoder input for span corruption)
      targets_len=0,            # span corruption: decoder length; 0 derives it from seq_len
      batch_size=32,            # global batch, split over hosts and the (data, fsdp) mesh axes
      max_predictions=0,        # MLM slots per row; 0: round(0.15 * seq_len) + 1
      mask_rate=0.15,           # MLM/RTD: share of tokens chosen for prediction (80% [MASK], 10% random, 10% kept)
      whole_word=False,         # MLM/RTD: mask all pieces of a word together
      random_start=False,       # pre-training: each train window starts at a random offset inside its slot, so every
                                # epoch cuts the text anew (nanoGPT's random crops); eval windows stay fixed
      prefetch=2,               # batches prepared ahead on a thread pool (order unchanged); 0: none
  ))


def _train() -> ml_collections.ConfigDict:
  """config.train: steps, logging, evaluation, checkpoints and the divergence guards."""
  return ml_collections.ConfigDict(dict(  # yapf: disable (one field per line, its meaning beside it)
      steps=10_000,             # train steps (batches) of the whole run; the lr schedule ends here too
      log_every=50,             # steps per logged window (console, metrics.jsonl, TensorBoard): metrics are averaged
      eval_every=1000,          # steps between evaluations on the held-out split; 0: only at the end
      eval_steps=10,            # eval batches per evaluation (0 with eval_every=0: no evaluation)
      checkpoint_every=1000,    # steps between checkpoints; the last step and SIGTERM always save
      keep_checkpoints=3,       # how many recent checkpoints stay on disk
      best_metric='',           # also keep the best checkpoint by this eval metric, e.g. 'eval/loss'; '': off
      best_mode='min',          # 'min' | 'max': which way best_metric improves
      async_checkpoints=True,   # save in the background while training goes on
      max_param_norm=0.0,       # divergence guard: stop without saving when the global parameter norm exceeds it; 0: off
      max_loss_ratio=0.0,       # divergence guard: stop when a logged loss exceeds this times the lowest so far; 0: off
      max_param_growth=1000.0,  # divergence guard: stop without saving when the parameter norm exceeds this times its
      #                           value when the run (or its resumption) started; 0: off
      memory_check=True,        # refuse a run whose estimated bytes per device (train/core/cost.py) exceed the
      #                           device's memory, before anything is built
      compilation_cache=True,   # JAX's persistent compilation cache in <workdir>/jax_cache (a rerun or resume starts
      #                           from the compiled step); a cache directory the user set wins
  ))


def _mesh() -> ml_collections.ConfigDict:
  """config.mesh: how devices are arranged and parameters are sharded over them."""
  return ml_collections.ConfigDict(dict(  # yapf: disable (one field per line, its meaning beside it)
      shape=(-1, 1, 1),         # devices along (data, fsdp, tensor); one -1 takes the rest, e.g. '(1,-1,1)' = FSDP
      rules=config_dict.placeholder(tuple),  # [[logical axis, mesh axes], ...], e.g. "[['embed', 'fsdp']]";
      #                           None: train/core/partitioning.py DEFAULT_RULES
  ))


def base() -> ml_collections.ConfigDict:
  """Every field a pre-training run reads, with its default and what it means; family files change some of them."""
  c = ml_collections.ConfigDict()
  # yapf: disable (a table: one field per line, its meaning aligned beside it)
  c.seed = 0                    # parameter init, dropout, data shuffling and masking all derive from it
  c.objectives = {}             # pre-training objective -> loss weight: 'mlm', 'nsp', 'clm', 'rtd', 'span'
  c.register_from = ()          # Python modules or .py files imported before the run resolves its objectives: the
  #                               tasks, objectives and strategies they register (docs/extending.md). Kept in
  #                               config.json, so train.evaluate and a later init_from register them too
  # yapf: enable
  c.loss, c.model, c.data = _loss(), _model(), _data()
  c.optim = optim.default_config()  # fields and meanings: train/core/optim.py default_config()
  c.optim.learning_rate = 5e-4
  c.optim.warmup_steps = 100
  c.optim.total_steps = 0  # 0: the schedule ends with the run (train.steps / optim.grad_accum_steps)
  c.train, c.mesh = _train(), _mesh()
  return c


def runlocal(c: ml_collections.ConfigDict, *, steps: int = 60) -> ml_collections.ConfigDict:
  """Seconds on a CPU: tiny vocab, short sequences, small batches, few steps (the model is the family's to choose)."""
  c.data.vocab_size = 2000
  c.data.seq_len = 64
  c.data.batch_size = 8
  c.data.tokenizer_train_records = 3000
  c.data.prefetch = 0
  c.optim.learning_rate = 2e-3
  c.optim.warmup_steps = 5
  c.train.steps = steps
  c.train.log_every = 10
  c.train.eval_every = steps
  c.train.eval_steps = 2
  c.train.checkpoint_every = steps
  return c
