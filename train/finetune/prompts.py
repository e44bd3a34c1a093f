"""Prompt-based classification: a task reworded as the pre-training task (PET, LM-BFF), and in-context demonstrations.

A template is a plain string with the record's fields in braces and `{mask}` where the label word goes, e.g.
'{sentence} It was {mask}.' (field names: the task's text columns, or text_a / text_b); several templates separated
by ' || ' are ensembled. A verbalizer maps every label to one or more words: '0:terrible;1:great|good'.

- Encoders: `{mask}` becomes n mask tokens for a word of n tokens, and the word scores the sum of its tokens'
  log-probabilities under the MLM head at those masks (every word of every length, not its first token only).
- Decoders: the template up to `{mask}` is the context and each word (after `word_prefix`, default ' ') its
  continuation, scored by the LM head as the sum of the continuation tokens' log-probabilities given all before.
  With `demonstrations` = k > 0 the context is preceded by k labeled training records (in-context learning),
  sampled per query with a seed and dropped from the front when they do not fit the sequence.

One example per record holds G inputs (tokens [G,T]: one per distinct mask count or continuation prefix, so
single-token verbalizers cost one forward) and the C candidate words that read them; the LanguageModel's 'prompt'
head turns them into label log-probabilities (`cls_logits`), which the classification loss and scorer then read
unchanged: cross-entropy over them is PET's loss, and with no training step the same examples are zero-shot.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from train.tasks import classification
from train.data.examples import pad_to, segment_positions
from train.data.tokenizers import Tokenizer

MASK = 'mask'
TEMPLATE_SEPARATOR = ' || '


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """What config.finetune says about prompting (see configs/finetune.py for each field)."""
  templates: tuple[str, ...]
  verbalizer: tuple[tuple[str, ...], ...]  # the words of each label, in label id order
  arch: str  # 'encoder' (MLM at masks) or 'decoder' (continuations)
  length_norm: bool = False  # a word scores the mean, not the sum, of its tokens' log-probabilities
  word_prefix: str = ' '  # decoders: put before each verbalizer word (BPE words start with their space)
  bos: bool = False  # decoders: start the context with the tokenizer's BOS token
  demonstrations: int = 0  # decoders: in-context examples before the query
  balanced: bool = True  # demonstrations: as many of each label (demonstrations // labels)
  seed: int = 0  # demonstrations: np.random.default_rng([seed, query index]) draws them
  separator: str = '\n\n'  # between demonstrations and before the query


def parse_verbalizer(text: str, label_names: Sequence[str], *, field: str = 'config.finetune.verbalizer'):
  """'0:terrible;1:great|good' -> (('terrible',), ('great', 'good')) in label_names order; every label once."""
  words: dict[str, tuple[str, ...]] = {}
  for part in [p for p in str(text).split(';') if p.strip()]:
    label, sep, rest = part.partition(':')
    label, found = label.strip(), tuple(w.strip() for w in rest.split('|') if w.strip())
    if not sep or not found:
      raise ValueError(f'{field}={text!r}: {part.strip()!r} is not LABEL:WORD[|WORD...]; write e.g. '
                       "'0:terrible;1:great'.")
    if label not in label_names:
      raise ValueError(f'{field}={text!r}: label {label!r} is not one of the labels {list(label_names)}.')
    if label in words:
      raise ValueError(f'{field}={text!r}: label {label!r} appears twice; separate its words with |.')
    words[label] = found
  missing = [n for n in label_names if n not in words]
  if missing:
    raise ValueError(f'{field}={text!r} gives no word for label(s) {missing}; every label of {list(label_names)} '
                     'needs one (LABEL:WORD;...).')
  return tuple(words[n] for n in label_names)


def parse_templates(text: str, fields: Sequence[str], arch: str, *, field: str = 'config.finetune.template'):
  """The ' || '-separated templates, each checked: known fields only, one {mask} (decoders: at the end, or none)."""
  templates = tuple(t for t in str(text).split(TEMPLATE_SEPARATOR) if t.strip())
  if not templates:
    raise ValueError(f'{field} is empty; give a template such as "{{{fields[0]}}} It was {{mask}}."')
  for t in templates:
    try:
      names = [name for _, name, _, _ in string.Formatter().parse(t) if name is not None]
    except ValueError as e:
      raise ValueError(f'{field}={t!r}: {e}; write a literal brace as {{{{ or }}}}.') from None
    unknown = sorted(set(names) - set(fields) - {MASK})
    if unknown:
      raise ValueError(f'{field}={t!r} names field(s) {unknown}; the records have {sorted(fields)} (and {{mask}}).')
    if names.count(MASK) > 1 or (arch == 'encoder' and names.count(MASK) != 1):
      raise ValueError(f'{field}={t!r} must hold {{mask}} once: where the label word goes.')
    if arch == 'decoder' and MASK in names and t.split('{mask}')[1].strip():
      raise ValueError(f'{field}={t!r}: a decoder scores the label word as the continuation of the text before '
                       '{mask}, so nothing may follow {mask}; end the template there.')
  return templates


class PromptExamples:
  """record -> one prompt example (see the module docstring); `pool` holds the demonstrations' records.

  Field names a template may use: text_a, text_b, and the aliases `fields` maps to them (the task's columns)."""

  def __init__(self, tokenizer: Tokenizer, spec: PromptSpec, *, seq_len: int, label_names: Sequence[str],
               fields: Mapping[str, str], pool: Optional[Sequence[Mapping[str, Any]]] = None):
    if spec.arch == 'encoder':
      tokenizer.require('cls', 'sep', 'mask')
    if spec.demonstrations and not pool:
      raise ValueError('config.finetune.demonstrations > 0 needs training records to draw them from '
                       '(config.data.train).')
    self.tok, self.spec, self.seq_len, self.pool = tokenizer, spec, int(seq_len), list(pool or ())
    self.label_names, self.fields = list(label_names), {'text_a': 'text_a', 'text_b': 'text_b', **dict(fields)}
    self.pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    prefix = spec.word_prefix if spec.arch == 'decoder' else ''
    # Candidates: (template k, label l, token ids of one word); groups: one input row per distinct key.
    self.candidates, self.group_keys = [], []
    for k in range(len(spec.templates)):
      for label, words in enumerate(spec.verbalizer):
        for word in words:
          ids = tokenizer.encode(prefix + word)
          if not ids:
            raise ValueError(f'config.finetune.verbalizer: word {word!r} of label {self.label_names[label]!r} '
                             'encodes to no tokens.')
          key = self._key(k, ids)
          if key not in self.group_keys:
            self.group_keys.append(key)
          self.candidates.append((k, label, ids))
    self.by_label = {}
    for i, r in enumerate(self.pool):
      self.by_label.setdefault(self.label_names.index(r['label']), []).append(i)
    self.width = max(len(ids) for _, _, ids in self.candidates)

  def _key(self, template: int, ids) -> tuple:
    """The input row a word reads: encoders one per mask count, decoders one per continuation prefix."""
    return (template, len(ids)) if self.spec.arch == 'encoder' else (template, tuple(ids[:-1]))

  @property
  def groups(self) -> int:
    return len(self.group_keys)

  # ------------------------------------------------------------------------------------------------ text

  def _values(self, record):
    return {name: str(record.get(key) or '') for name, key in self.fields.items()}

  def _parts(self, template: str, values: Mapping[str, str], word: str = '') -> tuple[str, str]:
    """(text before the mask, text after it) with the fields filled; `word` fills the mask of a demonstration."""
    head, _, tail = template.partition('{mask}')
    head, tail = head.format_map(values), tail.format_map(values)
    return (head + word + tail, '') if word else (head, tail)

  def _shortened(self, values: dict, excess: int) -> dict:
    """values with the longest field cut by `excess` tokens (at a token boundary)."""
    name = max(values, key=lambda n: len(self.tok.encode(values[n])))
    ids, offsets = self.tok.encode_with_offsets(values[name])
    keep = max(0, len(ids) - excess)
    return {**values, name: values[name][:offsets[keep - 1][1]] if keep else ''}

  def _demonstrations(self, index: int) -> list[str]:
    spec = self.spec
    if not spec.demonstrations:
      return []
    rng = np.random.default_rng([spec.seed, index])
    if spec.balanced:
      each = max(1, spec.demonstrations // len(self.label_names))
      picks = [
          i for label in sorted(self.by_label)
          for i in rng.choice(self.by_label[label], size=min(each, len(self.by_label[label])), replace=False)
      ]
      picks = [picks[j] for j in rng.permutation(len(picks))]
    else:
      picks = list(rng.choice(len(self.pool), size=min(spec.demonstrations, len(self.pool)), replace=False))
    template, prefix = spec.templates[0], spec.word_prefix
    return [
        self._parts(template, self._values(self.pool[i]),
                    prefix + spec.verbalizer[self.label_names.index(self.pool[i]['label'])][0])[0] for i in picks
    ]

  # ------------------------------------------------------------------------------------------------ rows

  def _encoder_row(self, template: str, values: dict, masks: int) -> tuple[list[int], int]:
    """[CLS] head [MASK]*masks tail [SEP] fitted to seq_len, and the position of its first mask."""
    for _ in range(8):
      head, tail = self._parts(template, values)
      left, right = self.tok.encode(head), self.tok.encode(tail)
      excess = len(left) + masks + len(right) + 2 - self.seq_len
      if excess <= 0:
        break
      values = self._shortened(values, excess)
    else:
      raise ValueError(f'config.data.seq_len={self.seq_len} cannot hold template {template!r} with {masks} mask(s) '
                       'even with its fields emptied; raise seq_len or shorten the template.')
    ids = [self.tok.cls_id, *left, *[self.tok.mask_id] * masks, *right, self.tok.sep_id]
    return ids, 1 + len(left)

  def _context(self, template: str, values: dict, demos: list[str]) -> list[int]:
    """[BOS] demonstrations and the query's context, fitted to seq_len - room for the longest continuation."""
    budget = self.seq_len - self.width + 1
    bos = [self.tok.bos_id] if self.spec.bos and self.tok.bos_id is not None else []
    for _ in range(8 + len(demos)):
      text = ''.join(d + self.spec.separator for d in demos) + self._parts(template, values)[0]
      ids = bos + self.tok.encode(text)
      excess = len(ids) - budget
      if excess <= 0:
        return ids
      if demos:
        demos = demos[1:]
      else:
        values = self._shortened(values, excess)
    raise ValueError(f'config.data.seq_len={self.seq_len} cannot hold template {template!r} and a '
                     f'{self.width}-token verbalizer word; raise seq_len or shorten the template.')

  def __call__(self, record: Mapping[str, Any], rng=None, *, index: int = 0) -> dict[str, np.ndarray]:
    values, spec = self._values(record), self.spec
    demos = self._demonstrations(index) if spec.arch == 'decoder' else []
    rows, starts, contexts = [], {}, {}
    for key in self.group_keys:
      template = spec.templates[key[0]]
      if spec.arch == 'encoder':
        ids, starts[key] = self._encoder_row(template, values, key[1])
      else:
        if key[0] not in contexts:
          contexts[key[0]] = self._context(template, values, demos)
        ids, starts[key] = contexts[key[0]] + list(key[1]), len(contexts[key[0]]) - 1
      rows.append(ids)
    c, p, t = len(self.candidates), self.width, self.seq_len
    out = {
        k: np.zeros((c, p), dtype)
        for k, dtype in (('score_positions', np.int32), ('score_ids', np.int32), ('score_weights', np.float32))
    }
    for i, (k, _, ids) in enumerate(self.candidates):
      n = len(ids)
      out['score_positions'][i, :n] = starts[self._key(k, ids)] + np.arange(n)
      out['score_ids'][i, :n] = ids
      out['score_weights'][i, :n] = 1.0 / n if spec.length_norm else 1.0
    seg = np.stack([(np.arange(t) < len(r)).astype(np.int32) for r in rows])
    out.update(
        tokens=np.stack([pad_to(r, t, self.pad) for r in rows]), segment_ids=seg,
        positions=np.stack([segment_positions(s) for s in seg]),
        score_group=np.asarray([self.group_keys.index(self._key(k, ids)) for k, _, ids in self.candidates],
                               np.int32), score_label=np.asarray([label for _, label, _ in self.candidates], np.int32),
        score_template=np.asarray([k for k, _, _ in self.candidates],
                                  np.int32), label=np.int32(self.label_names.index(record['label'])))
    if spec.arch == 'encoder':
      out['token_type_ids'] = np.zeros_like(out['tokens'])
    return out


PROVIDES = ('tokens', 'segment_ids', 'positions', 'score_group', 'score_positions', 'score_ids', 'score_weights',
            'score_label', 'score_template', 'label')

# ------------------------------------------------------------------------------------------------- soft prompt

# Arrays with one entry per input position (last axis T) that make room for the soft prompt, and arrays whose values
# are input positions (moved along with the tokens).
_PER_POSITION = ('tokens', 'segment_ids', 'token_type_ids')
_POSITION_VALUED = ('score_positions',)


class SoftPromptSlots:
  """Wraps an example builder so each input holds `length` placeholder tokens right after its first `offset` tokens
  ([CLS] or BOS): soft_prompt_slots marks them 1..length, and the model adds its learned vectors there (the
  placeholder is the pad token, whose embedding the learned vectors absorb). The wrapped builder gets seq_len - length
  positions; positions restart at 0 over the whole row, so the real tokens sit after the prompt as in Lester et al."""

  def __init__(self, build, *, length: int, offset: int):
    self.build, self.length, self.offset = build, int(length), int(offset)

  def __call__(self, record, rng=None, **kw):
    return self.insert(self.build(record, rng, **kw))

  def insert(self, example: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out, n, at = dict(example), self.length, self.offset
    for key in _PER_POSITION:
      if key in out:
        fill = 1 if key == 'segment_ids' else 0
        out[key] = np.insert(out[key], [at] * n, fill, axis=-1)
    out['segment_ids'] = np.where(out['segment_ids'] > 0, 1, 0).astype(np.int32)
    slots = np.zeros(out['tokens'].shape, np.int32)
    slots[..., at:at + n] = np.arange(1, n + 1)
    out['soft_prompt_slots'] = slots
    out['positions'] = np.apply_along_axis(segment_positions, -1, out['segment_ids']).astype(np.int32)
    for key in _POSITION_VALUED:
      if key in out:
        out[key] = np.where(out[key] >= at, out[key] + n, out[key]).astype(np.int32)
    return out


# --------------------------------------------------------------------------- a task record, reworded as a prompt
# train/core/resolve.py `run_task` applies these to a classification record when config.finetune says so.


def with_soft_prompt(task, n: int, offset: int):
  """The record with n soft-prompt slots in every input after its first `offset` tokens (SoftPromptSlots)."""
  if task.heads not in (('classifier',), ('prompt',)):
    raise ValueError(f"config.finetune.strategy='soft_prompt' serves classification (a classifier head or "
                     f'finetune.prompt); task {task.name!r} reads head(s) {task.heads}.')
  inner_examples, inner_eval = task.examples, task.eval_examples
  shorter = lambda data: type(data)({**data.to_dict(), 'seq_len': int(data.seq_len) - n})

  def examples(records, tokenizer, data):
    transform, source = inner_examples(records, tokenizer, shorter(data))
    return SoftPromptSlots(transform, length=n, offset=offset), source

  def eval_examples(records, tokenizer, data):
    slots = SoftPromptSlots(None, length=n, offset=offset)
    return [slots.insert(e) for e in inner_eval(records, tokenizer, shorter(data))]

  return dataclasses.replace(task, examples=examples, eval_examples=eval_examples, provides=task.provides +
                             ('soft_prompt_slots',))


def as_prompt_task(task, config, arch: str):
  """The classification record as a cloze (encoder) or continuation (decoder) over the 'prompt' head."""
  if task.heads != ('classifier',) or task.labels is None or task.labels.field != 'label_names':
    raise ValueError(f'config.finetune.prompt=True rewords a classification task as a cloze or a continuation; '
                     f'task {task.name!r} reads head(s) {task.heads}. Turn prompt off for it.')
  if arch not in ('encoder', 'decoder'):
    raise ValueError(f"config.finetune.prompt=True needs an encoder (MLM head) or a decoder (LM head); arch={arch!r} "
                     'classifies by the text of each label (finetune.prompt=False).')
  examples = lambda records, tokenizer, data: (prompt_builder(task, config, arch, tokenizer, data), records)

  def eval_examples(records, tokenizer, data):
    builder = prompt_builder(task, config, arch, tokenizer, data)
    return [builder(r, index=i) for i, r in enumerate(records)]

  return dataclasses.replace(task, heads=('prompt',), examples=examples, eval_examples=eval_examples,
                             provides=PROVIDES + (('token_type_ids',) if arch == 'encoder' else ()))


def prompt_spec(task, config, arch: str, label_names):
  """config.finetune's prompt fields (or the task's default prompt for arch) as a checked PromptSpec."""
  ft = config.finetune
  default = task.prompts.get(arch, ('', ''))
  template, verbalizer = ft.get('template') or default[0], ft.get('verbalizer') or default[1]
  if not template or not verbalizer:
    raise ValueError(f'task {task.name!r} has no default prompt for arch={arch!r}; set config.finetune.template '
                     "(e.g. '{sentence} It was {mask}.') and config.finetune.verbalizer (e.g. '0:bad;1:good').")
  demos = int(ft.get('demonstrations') or 0)
  if demos < 0 or (demos and arch != 'decoder'):
    raise ValueError(f'config.finetune.demonstrations={demos}: in-context demonstrations are >= 0 and for decoders '
                     '(an encoder fine-tunes on its few examples instead).')
  fields = _template_fields(task, config.data)
  options = dict(length_norm=bool(ft.get('length_norm', False)), word_prefix=str(ft.get('word_prefix', ' ')),
                 bos=bool(ft.get('bos', False)), balanced=bool(ft.get('balanced', True)),
                 seed=int(ft.get('demonstration_seed') or 0), separator=str(ft.get('separator', '\n\n')))
  templates, words = parse_templates(template, fields, arch), parse_verbalizer(verbalizer, list(label_names))
  return PromptSpec(templates=templates, verbalizer=words, arch=arch, demonstrations=demos, **options)


def _template_fields(task, data) -> dict[str, str]:
  """The names a template may use for the record's texts: text_a, text_b and the task's text columns."""
  text, _ = classification.columns_of(task.columns or ('sentence', 'label'), data)
  return {'text_a': 'text_a', 'text_b': 'text_b', **{c: k for c, k in zip(text, ('text_a', 'text_b'))}}


def prompt_builder(task, config, arch: str, tokenizer, data):
  spec = prompt_spec(task, config, arch, data.label_names)
  pool = None
  if spec.demonstrations:
    from train.data import pipeline  # pylint: disable=g-import-not-at-top
    pool = task.read(pipeline.sources(data.train, data), data)
  return PromptExamples(tokenizer, spec, seq_len=data.seq_len, label_names=data.label_names,
                        fields=_template_fields(task, data), pool=pool)
