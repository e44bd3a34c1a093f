"""Classification of single texts and sentence pairs: the `classification` kind and the datasets built on it (sst2,
trec, trec_fine, rte, snli).

What a classification record reads: a TSV/CSV/JSONL file (or a TFDS split) with one or two text columns and a label
column, named by the record's `columns` (config.data.text_columns / label_column override them); the label set is
found in the training file (config.data.label_names fixes its order). Encoders and decoders get a classifier head
(the [CLS] pooler, the mean, or a decoder's last token: config.model.classifier_pooling); an encoder-decoder writes
the label's name as target text and is scored by ranking each label's text by its log-probability. Every kind can also
classify by prompt (train/finetune/prompts.py), with the default templates and words below.
"""
from __future__ import annotations

import numpy as np

from train.data import readers
from train.data import task_examples as tex
from train.tasks import losses
from train.tasks import metrics as metrics_lib
from train.tasks import registry
from train.tasks import scoring
from train.tasks.registry import ENCODER, SEQ2SEQ, Labels, Task

# ------------------------------------------------------------------------------------------- reading records


def columns_of(task_columns, data):
  """(text columns, label column): config.data's when set, else the task's own."""
  text = tuple(data.get('text_columns') or ()) or task_columns[:-1]
  return text, data.get('label_column') or task_columns[-1]


def reader(columns):
  """read(paths, data) for a classification file with these default (text..., label) columns."""

  def read(paths, data):
    text, label = columns_of(columns, data)
    return list(
        readers.classification_records(paths, text_columns=text, label_column=label,
                                       label_names=list(data.label_names)))

  return read


def labels(columns) -> Labels:
  """The label set: the sorted labels found in the training file's label column."""
  return Labels(lambda paths, data: readers.infer_labels(paths, label_column=columns_of(columns, data)[1]),
                'label_names')


# ------------------------------------------------------------------------------------------- examples


def _label_names(data):
  names = data.get('label_names') if hasattr(data, 'get') else None
  return list(names) if names else None


def classifier_examples(records, tokenizer, data):
  return tex.Classification(tokenizer, seq_len=data.seq_len, label_names=_label_names(data)), records


def _label_text(tokenizer, data):
  return tex.LabelText(tokenizer, inputs_length=data.seq_len, targets_length=int(data.get('targets_len') or 8),
                       label_names=_label_names(data))


def label_text_examples(records, tokenizer, data):
  """Classification on an encoder-decoder: the label's name is the target text."""
  return _label_text(tokenizer, data), records


def label_text_candidates(records, tokenizer, data):
  """Its evaluation examples: each record with every label's name as a candidate target, to be scored."""
  builder = _label_text(tokenizer, data)
  return [builder.candidates(r) for r in records]


def each_record(examples):
  """An eval_examples function: `examples`' transform applied to every record (one example per record)."""

  def build(records, tokenizer, data):
    transform, _ = examples(records, tokenizer, data)
    return [transform(r) for r in records]

  return build


# ------------------------------------------------------------------------------------------- loss and scorer


def _loss(out, batch, opts):
  return losses.classification_loss(logits=out['cls_logits'], labels=batch['label'], weights=batch.get('label_weights'))


def _label_text_loss(out, batch, opts):
  return losses.seq2seq_loss(logits=out['lm_logits'], targets=batch['decoder_targets'],
                             weights=batch['decoder_weights'], label_smoothing=opts.label_smoothing,
                             z_loss=opts.z_loss)


def score(outputs, examples, records, data, tokenizer=None) -> scoring.Scored:
  """accuracy, macro_f1 (and f1 of label 1 with two classes) over argmax(cls_logits)."""
  names = scoring.label_names(data, 'label_names')
  logits = outputs['cls_logits'].astype(np.float64)
  pred = logits.argmax(-1)
  ref = np.asarray([int(e['label']) for e in examples])
  scores = metrics_lib.classification_metrics(predictions=pred, references=ref, num_classes=len(names))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  rows = [{
      'idx': r.get('idx', i),
      'text_a': r['text_a'],
      'text_b': r.get('text_b', ''),
      'label': names[ref[i]],
      'prediction': names[pred[i]],
      'probabilities': {
          n: round(float(p), 6) for n, p in zip(names, probs[i])
      }
  } for i, r in enumerate(records)]
  return scores, rows


# ------------------------------------------------------------------------------------------- records

# Classification on an encoder-decoder (T5's way): the label's name is the target text (LM head, seq2seq loss), and
# evaluation ranks every label by the log-probability of its text (LanguageModel.label_text_scores -> cls_logits).
LABEL_TEXT = dict(heads=('lm',), batch_keys=('encoder_tokens',) + SEQ2SEQ[3:6], loss=_label_text_loss,
                  examples=label_text_examples, provides=SEQ2SEQ + ('label',), tokenizer_kind='unigram',
                  eval_examples=label_text_candidates)

_COLUMNS = ('sentence', 'label')
registry.register(
    Task('classification', ('encoder', 'decoder', 'encoder_decoder'), ('classifier',), ('label',), _loss, '',
         classifier_examples, ENCODER + ('label',), 'wordpiece', ('loss', 'accuracy', 'weight_sum'),
         read=reader(_COLUMNS), eval_examples=each_record(classifier_examples), score=score, outputs=('cls_logits',),
         labels=labels(_COLUMNS), columns=_COLUMNS, arch_fields={'encoder_decoder': LABEL_TEXT}))


def dataset(name: str, columns: tuple[str, ...], prompts=None) -> Task:
  """A classification dataset: the kind under `name`, reading these (text..., label) columns by default."""
  return registry.dataset('classification', name, read=reader(columns), labels=labels(columns), columns=columns,
                          prompts=prompts)


# Default prompts (encoders: LM-BFF's manual templates and words; decoders: a plain question-and-answer form).
_TREC_WORDS = 'ABBR:{};DESC:{};ENTY:{};HUM:{};LOC:{};NUM:{}'
PROMPTS = {
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
for _task in (
    dataset('sst2', ('sentence', 'label'), PROMPTS['sst2']),
    dataset('trec', ('question', 'coarse_label'), PROMPTS['trec']),
    dataset('trec_fine', ('question', 'fine_label')),
    dataset('rte', ('sentence1', 'sentence2', 'label'), PROMPTS['rte']),
    dataset('snli', ('premise', 'hypothesis', 'label'), PROMPTS['snli']),
):  # yapf: disable (one dataset per line)
  registry.register(_task)
