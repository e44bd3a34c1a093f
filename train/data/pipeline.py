"""From `config.data` to a tokenizer and train/eval data for a run: the glue the trainer calls.

Text comes from the embedded stdlib corpus (no files), local text files (through the TFDS text builder, built once
into `<workdir>/tfds`), or a TFDS catalog dataset by name. The tokenizer is loaded from `data.tokenizer_path` or
trained on the training text and saved to `<workdir>/tokenizer`, so a checkpoint is usable without the run. The
example builder and the default tokenizer kind come from the record the trainer passes (train/tasks/: mlm/rtd ->
MaskedLM, mlm+nsp -> NextSentence, clm -> CausalLM, span -> SpanCorruption, or a registered one). A downstream task
reads its labeled train and dev files through its record's validating reader instead (`read_labeled`), with the
checkpoint's tokenizer.
Every path and field is checked here, before anything compiles.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import ml_collections
import numpy as np

from train.data import embedded
from train.data import few_shot
from train.data import tokenizers as toks
from train.data.loader import Loader

# `task` below is a record of train/tasks (an Objective or a Task), which builds on this package: the trainer passes
# one in, and this module reads its fields (name, examples, read, labels, tokenizer_kind) without importing it.
Record = Any

SOURCES = ('embedded', 'files', 'tfds')
MIN_VOCAB = 300  # byte-level BPE's 256-byte alphabet and the special tokens
# The shortest config.data.seq_len that holds one pre-training example of each record, and why.
MIN_SEQ_LEN = {
    'clm': (2, 'a causal-LM row predicts each token from the ones before it; at 1 there is nothing before it'),
    'mlm': (3, 'a masked-LM row holds [CLS] and [SEP] around its text'),
    'rtd': (3, 'a replaced-token row holds [CLS] and [SEP] around its text'),
    'nsp': (5, 'a next-sentence row holds [CLS] A [SEP] B [SEP], a token in each segment'),
    'span': (5, 'span corruption drops no token from fewer than 5 input tokens'),
}


@dataclasses.dataclass
class RunData:
  tokenizer: toks.Tokenizer
  train: Loader
  eval: Optional[Loader]  # pre-training: held-out batches whose loss is averaged
  kind: str  # the record whose example builder made the batches: 'mlm' | 'nsp' | 'clm' | 'sst2' | ...
  tokens_per_example: int
  dev_records: Optional[list] = None  # downstream tasks: every dev record, scored with the task's metrics
  train_size: int = 0  # examples in one pass over the training data (QA: windows)
  no_eval: str = ''  # why a run that asked for evaluation gets none (a held-out split smaller than one batch)


@dataclasses.dataclass
class Labeled:
  """A downstream task's records, read and validated, and the label (or tag) names found in the training file."""
  train: list
  dev: Optional[list]
  names: dict[str, tuple[str, ...]]  # {'label_names': (...)} or {'tag_names': (...)}; {} for QA


def _paths(value) -> list[str]:
  return [p for p in (value.split(',') if isinstance(value, str) else list(value or ())) if p]


def _is_tfds(path) -> bool:
  return isinstance(path, str) and path.startswith('tfds:')


def sources(value, data) -> list:
  """config.data.train / dev -> what the task readers read: file paths, and `tfds:NAME:SPLIT` as a TFDS split."""
  paths = _paths(value)
  if not any(map(_is_tfds, paths)):
    return paths
  from train.data import builders  # TFDS only when a split names it
  return [builders.CatalogSplit.parse(p, data.get('tfds_data_dir') or '') if _is_tfds(p) else p for p in paths]


def _readable(path: str) -> bool:
  """A regular file or a folder: a FIFO, a socket or a device cannot be read twice (TFDS builds, then reads again)."""
  return os.path.isfile(path) or os.path.isdir(path)


def _is_fraction(value, *, high_open: bool = True) -> bool:
  ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  return ok and (0 <= value < 1 if high_open else 0 < value <= 1)


def check_config(data, task: Record):
  """Raises ValueError naming the config.data field and the fix (missing files included)."""
  for field in ('seq_len', 'batch_size'):
    if int(data[field]) <= 0:
      raise ValueError(f'config.data.{field}={data[field]}: must be positive.')
  low, why = MIN_SEQ_LEN.get(task.name, (1, ''))
  if int(data.seq_len) < low:
    raise ValueError(f'config.data.seq_len={data.seq_len}: too short for one {task.name} example ({why}); give at '
                     f'least {low}, e.g. 128.')
  if not _is_fraction(data.get('eval_fraction', 0.0)):
    raise ValueError(f'config.data.eval_fraction={data.get("eval_fraction")!r}: the share of passages held out for '
                     'evaluation must be in [0, 1) (0: none held out; 1 would leave nothing to train on).')
  prefetch = data.get('prefetch', 0)
  if not isinstance(prefetch, int) or isinstance(prefetch, bool) or prefetch < 0:
    raise ValueError(f'config.data.prefetch={prefetch!r}: how many batches are prepared ahead on a thread pool; give '
                     'an integer >= 0 (0: none).')
  if not _is_fraction(data.get('mask_rate', 0.15), high_open=False):
    raise ValueError(f'config.data.mask_rate={data.get("mask_rate")!r}: the share of tokens chosen for prediction '
                     'must be in (0, 1], e.g. 0.15 as BERT.')
  if int(data.get('max_predictions') or 0) < 0:
    raise ValueError(f'config.data.max_predictions={data.max_predictions}: must be >= 0 (0: round(mask_rate * '
                     'seq_len) + 1).')
  if int(data.get('targets_len') or 0) < 0:
    raise ValueError(f'config.data.targets_len={data.targets_len}: must be >= 0 (0 derives it from seq_len).')
  if not data.get('tokenizer_path') and int(data.get('vocab_size') or 0) < MIN_VOCAB:
    raise ValueError(f'config.data.vocab_size={data.get("vocab_size")}: a tokenizer trained for this run needs at '
                     f'least {MIN_VOCAB} entries (its special tokens and byte alphabet); e.g. 8000.')
  if data.tokenizer_path and not os.path.exists(data.tokenizer_path):
    raise FileNotFoundError(f'config.data.tokenizer_path: {data.tokenizer_path} does not exist; point it at a saved '
                            'tokenizer folder, tokenizer.json or vocab.txt, or leave it empty to train one.')
  if data.tokenizer_path and not _readable(data.tokenizer_path):
    raise ValueError(f'config.data.tokenizer_path: {data.tokenizer_path} is not a regular file or a folder; point it '
                     'at a saved tokenizer folder, tokenizer.json or vocab.txt.')
  if data.tokenizer_path:
    _given_tokenizer(data)  # read now (milliseconds), before the cost model reads it for the vocabulary size
  if task.kind == 'task':
    _check_labeled_files(data, task)
    return
  _check_text_source(data)


def _check_labeled_files(data, task: Record) -> None:
  """A downstream task's data.train (required) and data.dev: files that exist and can be read, or TFDS splits."""
  if not _paths(data.get('train')):
    raise ValueError(f'config.data.train is empty: task {task.name!r} trains on a labeled file; give '
                     '--config.data.train=FILE (and --config.data.dev=FILE to evaluate).')
  for field in ('train', 'dev'):
    for p in _paths(data.get(field)):
      if _is_tfds(p):
        name, _, split = p[len('tfds:'):].rpartition(':')
        if not name or not split:
          raise ValueError(f'config.data.{field}={p!r}: a TFDS split is written tfds:NAME:SPLIT, e.g. '
                           'tfds:glue/sst2:train.')
      elif not os.path.exists(p):
        raise FileNotFoundError(f'config.data.{field}: {p} does not exist; give an existing file or a TFDS split '
                                '(tfds:NAME:SPLIT).')
      elif not _readable(p):
        raise ValueError(f'config.data.{field}: {p} is not a regular file or a folder (a FIFO, socket or device '
                         'cannot be read twice); give a file.')


def _check_text_source(data) -> None:
  """Pre-training text: data.source, and data.path's files or data.tfds_name."""
  if data.source not in SOURCES:
    raise ValueError(f'config.data.source={data.source!r}: use one of {SOURCES}.')
  if data.source == 'files':
    paths = [p for p in str(data.path).split(',') if p]
    if not paths:
      raise ValueError('config.data.path is empty: give a text file, a folder of .txt files, or a comma-separated '
                       'list, or set config.data.source="embedded".')
    for p in paths:
      if not os.path.exists(p):
        raise FileNotFoundError(f'config.data.path: {p} does not exist; give an existing text file or folder.')
      if not _readable(p):
        raise ValueError(f'config.data.path: {p} is not a regular file or a folder (a FIFO, socket or device cannot '
                         'be read twice); give a text file or a folder of .txt files.')
  if data.source == 'tfds' and not data.tfds_name:
    raise ValueError('config.data.tfds_name is empty: name a TFDS catalog dataset, e.g. "wikipedia/20230601.en".')


def _few_shot_sizes(data, task: Record) -> tuple[int, int]:
  """(k, dev_k) from config.data.few_shot_k / few_shot_dev_k; (0, 0) when few-shot sampling is off."""
  k, dev_k = int(data.get('few_shot_k') or 0), int(data.get('few_shot_dev_k', -1))
  if k < 0:
    raise ValueError(f'config.data.few_shot_k={k}: must be >= 0 (records per class; 0 trains on all of data.train).')
  if k == 0:
    return 0, 0
  if _label_field(task) != 'label_names':
    raise ValueError(f'config.data.few_shot_k={k}: few-shot sampling draws k records per class, and task '
                     f'{task.name!r} has no classes; use a classification task (sst2, trec, rte, ...) or set it to 0.')
  if dev_k < -1:
    raise ValueError(f'config.data.few_shot_dev_k={dev_k}: use -1 (as many as few_shot_k), 0 (no dev subset: the '
                     'run evaluates on data.dev) or a count per class.')
  return k, k if dev_k == -1 else dev_k


def _label_field(task) -> str:
  labels = getattr(task, 'labels', None)
  return labels.field if labels is not None else ''


def read_labeled(data, task: Record) -> Labeled:
  """The task's train and dev records through its validating reader, with the label names it resolves: those of
  config.data.<task.labels.field> when given (a record with another label is an error naming its file and line), else the
  sorted set found in the training file.

  config.data.few_shot_k > 0 (classification) trains on k records per class drawn with config.data.few_shot_seed and
  evaluates on a dev subset drawn from the other training records (train/data/few_shot.py); the label names still
  come from the whole training file, so every seed's model has the same classes in the same order."""
  k, dev_k = _few_shot_sizes(data, task)
  names = {}
  field = _label_field(task)
  if field:
    given = tuple(data.get(field) or ())
    names[field] = given or tuple(task.labels.find(sources(data.train, data), data))
    data = ml_collections.ConfigDict({**data.to_dict(), **names})  # the reader checks records against them
  train = task.read(sources(data.train, data), data)
  if not train:
    raise ValueError(f'config.data.train={data.train}: no records for task {task.name!r}.')
  if k:
    train, few_dev = few_shot.sample(train, k=k, dev_k=dev_k, seed=int(data.get('few_shot_seed') or 0),
                                     labels=names['label_names'])
    if dev_k:  # LM-BFF: model selection on held-out training records, never on the real dev set
      return Labeled(train, few_dev, names)
  dev = task.read(sources(data.dev, data), data) if _paths(data.get('dev')) else None
  return Labeled(train, dev, names)


def _records(data, workdir: str) -> dict[str, Any]:
  if data.source == 'embedded':
    return embedded.corpus(data.embedded_kind)
  if data.source == 'files':
    from train.data import builders  # imports TFDS; only runs when local files are used
    paths = [p for p in str(data.path).split(',') if p]
    built = builders.build('text', name=data.name or 'corpus', data_dir=os.path.join(workdir, 'tfds'),
                           splits={'corpus': paths}, document_split=data.document_split)
    records = built['corpus']  # not 'all': TFDS reserves that split name
    if data.document_split == 'verbatim':
      return _verbatim_split(records, data.eval_fraction)
    n_eval = max(1, int(len(records) * data.eval_fraction)) if data.eval_fraction > 0 else 0
    # The last passages are held out: whole documents mostly, and stable when the file grows at the end.
    return {
        'train': _Slice(records, 0,
                        len(records) - n_eval),
        'validation': _Slice(records,
                             len(records) - n_eval, len(records))
    }
  from train.data import builders
  field_map = dict(data.tfds_field_map) if data.tfds_field_map else {'text': 'text'}
  try:
    return {
        'train': builders.catalog_source(data.tfds_name, split=data.tfds_train_split, data_dir=data.tfds_data_dir,
                                         field_map=field_map),
        'validation': builders.catalog_source(data.tfds_name, split=data.tfds_eval_split, data_dir=data.tfds_data_dir,
                                              field_map=field_map)
    }
  except ValueError as e:  # TFDS's own: no such dataset, config or split
    raise ValueError(f'config.data.tfds_name={data.tfds_name!r}: {" ".join(str(e).split())[:400]}') from None


def _verbatim_split(records, eval_fraction: float) -> dict[str, list]:
  """Each file's text split by characters, as nanoGPT's prepare.py does: the first 1 - eval_fraction to train, the
  rest held out."""
  train, validation = [], []
  for i in range(len(records)):
    text = records[i]['text']
    n = int(len(text) * (1 - eval_fraction))
    train.append({'text': text[:n], 'document_id': i})
    if n < len(text):
      validation.append({'text': text[n:], 'document_id': i})
  return {'train': train, 'validation': validation}


class _Slice:
  """A random-access window [start, stop) of a source."""

  def __init__(self, source, start, stop):
    self.source, self.start, self.stop = source, start, stop

  def __len__(self):
    return self.stop - self.start

  def __getitem__(self, i):
    if not 0 <= i < len(self):
      raise IndexError(i)
    return self.source[self.start + i]


def _given_tokenizer(data) -> toks.Tokenizer:
  try:
    return toks.Tokenizer.load(data.tokenizer_path)
  except ValueError as e:  # a file that is no tokenizer, named in one line
    raise ValueError(f'config.data.tokenizer_path: {e}; or leave it empty to train one.') from None


def _tokenizer(data, task: Record, texts, workdir: str) -> toks.Tokenizer:
  """config.data.tokenizer_path's, the run's own (a resumed run keeps the one its checkpoints were trained with), or
  one trained on `texts` (a callable: only called when training) and saved to <workdir>/tokenizer."""
  saved = os.path.join(workdir, 'tokenizer')
  if data.tokenizer_path:
    return _given_tokenizer(data)
  if os.path.exists(saved):
    try:
      return toks.Tokenizer.load(saved)
    except ValueError as e:  # the run's own, written by an earlier start of this workdir and damaged since
      raise ValueError(f'{e}. It is this run\'s own tokenizer: put back an intact copy (its checkpoints were trained '
                       f'with it), or start over in a new --workdir.') from None
  tok = toks.train_tokenizer(data.tokenizer_kind or task.tokenizer_kind, texts(), vocab_size=data.vocab_size)
  os.makedirs(workdir, exist_ok=True)
  tok.save(saved)
  return tok


_TEXT_FIELDS = ('text_a', 'text_b', 'source', 'target', 'question', 'context')


def _record_texts(records, limit: int) -> list[str]:
  """The text of labeled records (both sides of pairs and translations, a tagged sentence's words) for a tokenizer."""
  out = []
  for r in records[:limit]:
    out += [r[k] for k in _TEXT_FIELDS if r.get(k)]
    if r.get('tokens'):
      out.append(' '.join(r['tokens']))
  return out


def build(data, task: Record, *, workdir: str, seed: int, labeled: Optional[Labeled] = None) -> RunData:
  """Tokenizer + train loader (+ eval loader when a validation split exists); check_config(data) has passed.

  A downstream task passes its `read_labeled` records; pre-training reads its text here."""
  if labeled is not None:
    return _build_labeled(data, task, labeled, seed, workdir)
  records = _records(data, workdir)
  train_records = records['train']
  if not len(train_records):
    where = data.path if data.source == 'files' else f'the {data.source} corpus'
    raise ValueError(f'config.data: {where} gives {len(records.get("validation") or ())} passage(s), all held out '
                     f'for evaluation (config.data.eval_fraction={data.eval_fraction}) and none to train on; give '
                     'more text (passages are split at blank lines or by document) or set eval_fraction=0.')
  tokenizer = _tokenizer(
      data, task,
      lambda: [train_records[i]['text'] for i in range(min(len(train_records), data.tokenizer_train_records))], workdir)

  def loader(split, split_seed, shuffle):
    recs = records.get(split)
    if recs is None or len(recs) == 0:
      return None
    transform, source = task.examples(recs, tokenizer, data if split == 'train' else _fixed_windows(data))
    if len(source) < data.batch_size:
      raise ValueError(f'config.data: the {split} split gives {len(source)} examples of seq_len {data.seq_len}, '
                       f'fewer than one batch of {data.batch_size}; use more text or a smaller batch/seq_len.')
    return Loader(source, transform, batch_size=data.batch_size, seed=split_seed, shuffle=shuffle,
                  prefetch=data.prefetch)

  train = loader('train', seed, True)
  no_eval = ''
  try:
    evaluation = loader('validation', seed + 1, False)
  except ValueError as e:
    evaluation = None  # a validation split too small for one batch: no eval rather than no run, said in the log
    no_eval = f'no evaluation: {e}'
  return RunData(tokenizer, train, evaluation, task.name, _tokens_per_example(train), train_size=len(train.source),
                 no_eval=no_eval)


def _tokens_per_example(loader) -> int:
  """Input tokens of one example, an encoder-decoder's targets included (span corruption derives their length)."""
  example = loader.transform(loader.source[0], np.random.default_rng(0))
  return sum(int(np.shape(example[k])[-1]) for k in ('tokens', 'encoder_tokens', 'decoder_tokens') if k in example)


def _fixed_windows(data):
  """config.data for evaluation: held-out windows are cut at fixed places whatever data.random_start says."""
  if not data.get('random_start', False):
    return data
  fixed = ml_collections.ConfigDict(data.to_dict())
  fixed.random_start = False
  return fixed


def _build_labeled(data, task: Record, labeled: Labeled, seed: int, workdir: str) -> RunData:
  # Usually the init_from checkpoint's tokenizer; a model trained from scratch on the task gets one of its own.
  tokenizer = _tokenizer(data, task, lambda: _record_texts(labeled.train, data.tokenizer_train_records), workdir)
  transform, source = task.examples(labeled.train, tokenizer, data)
  if len(source) < data.batch_size:
    raise ValueError(f'config.data.train gives {len(source)} examples, fewer than one batch of {data.batch_size}; '
                     'lower config.data.batch_size.')
  train = Loader(source, transform, batch_size=data.batch_size, seed=seed, shuffle=True, prefetch=data.prefetch)
  return RunData(tokenizer, train, None, task.name, data.seq_len, dev_records=labeled.dev, train_size=len(source))
