"""Token tagging (NER, POS): the `tagging` kind and the wnut17 dataset.

What a tagging record reads: CoNLL files (one token and its tag per line, blank lines between sentences; BIO tags) or
a TFDS split with a token and a tag feature (config.data.text_columns[0] / label_column). The first sub-word of each
word carries the word's tag; the tagger head scores every position, and the scorer reads the first sub-words back into
word tags for entity-level precision, recall and F1 (seqeval, conlleval's rules).
"""
from __future__ import annotations

import numpy as np

from train.data import readers
from train.data import task_examples as tex
from train.tasks import losses
from train.tasks import metrics as metrics_lib
from train.tasks import registry
from train.tasks import scoring
from train.tasks.registry import ENCODER, Labels, Task


def _sequence_features(data) -> dict[str, str]:
  """A TFDS tagging split's token and tag features: data.text_columns[0] and data.label_column when set."""
  text = tuple(data.get('text_columns') or ())
  return {'token_feature': text[0] if text else 'tokens', 'tag_feature': data.get('label_column') or 'ner_tags'}


def read(paths, data):
  return list(readers.conll_records(paths, tag_names=list(data.tag_names), num_columns=None,
                                    **_sequence_features(data)))


def _tags(paths, data):
  return readers.infer_tags(paths, num_columns=None, **_sequence_features(data))


def examples(records, tokenizer, data):
  names = data.get('tag_names') if hasattr(data, 'get') else None
  return tex.Tagging(tokenizer, seq_len=data.seq_len, tag_names=list(names) if names else None), records


def _eval_examples(records, tokenizer, data):
  transform, _ = examples(records, tokenizer, data)
  return [transform(r) for r in records]


def _loss(out, batch, opts):
  return losses.tagging_loss(logits=out['tag_logits'], labels=batch['tag_labels'], weights=batch['tag_weights'])


def score(outputs, examples_, records, data, tokenizer=None) -> scoring.Scored:
  """Entity-level precision/recall/F1 (seqeval, conlleval rules) of the per-word tags read off first sub-words."""
  names = scoring.label_names(data, 'tag_names')
  weights = np.stack([e['tag_weights'] for e in examples_])
  predicted = metrics_lib.word_tags(predictions=outputs['tag_logits'], tag_weights=weights, tag_names=names,
                                    num_words=[len(r['tokens']) for r in records])
  scores = metrics_lib.tagging_metrics(predictions=predicted, references=[list(r['tags']) for r in records])
  rows = [{
      'idx': r.get('idx', i),
      'tokens': list(r['tokens']),
      'tags': list(r['tags']),
      'prediction': p
  } for i, (r, p) in enumerate(zip(records, predicted))]
  return scores, rows


registry.register(
    Task('tagging', ('encoder', 'decoder'), ('tagger',), ('tag_labels', 'tag_weights'), _loss,
         'use an encoder for token classification', examples, ENCODER + ('tag_labels', 'tag_weights'), 'wordpiece',
         ('loss', 'accuracy', 'weight_sum'), read=read, eval_examples=_eval_examples, score=score,
         outputs=('tag_logits',), best='f1', labels=Labels(_tags, 'tag_names')))
registry.register(registry.dataset('tagging', 'wnut17'))
