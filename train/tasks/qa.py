"""Extractive question answering: the `qa` kind and the squad and xquad datasets.

What a QA record reads: SQuAD-format JSON (contexts, questions, answers with character offsets). A long context is cut
into doc-stride windows (config.data.doc_stride tokens shared by neighbours, config.data.max_query_length question
tokens); the QA head scores a start and an end per position, and the scorer picks the best span over every window of
a question (at most config.data.max_answer_length tokens) and maps it back to text for SQuAD's exact match and F1.
"""
from __future__ import annotations

import numpy as np

from train.data import readers
from train.data import task_examples as tex
from train.tasks import losses
from train.tasks import metrics as metrics_lib
from train.tasks import registry
from train.tasks import scoring
from train.tasks.registry import ENCODER, Task


def read(paths, data):
  return list(readers.squad_records(paths))


def _builder(data, tokenizer):
  return tex.QuestionAnswering(tokenizer, seq_len=data.seq_len, max_query_length=int(data.get('max_query_length', 64)),
                               doc_stride=data.get('doc_stride'))


def windows(records, tokenizer, data):
  """Every doc-stride window of every record, in order (each knows its record: example_index)."""
  qa = _builder(data, tokenizer)
  return [w for i, r in enumerate(records) for w in qa.windows(r, example_index=i)]


def examples(records, tokenizer, data):
  return (lambda window, rng=None: window), windows(records, tokenizer, data)


def _loss(out, batch, opts):
  return losses.span_qa_loss(start_logits=out['start_logits'], end_logits=out['end_logits'],
                             start_positions=batch['start_positions'], end_positions=batch['end_positions'],
                             weights=batch.get('label_weights'))


def score(outputs, examples_, records, data, tokenizer=None) -> scoring.Scored:
  """SQuAD exact match and F1 of the best span over every doc-stride window of each question."""
  answers = tex.postprocess_qa(start_logits=outputs['start_logits'], end_logits=outputs['end_logits'],
                               offsets=np.stack([e['offsets'] for e in examples_]),
                               example_index=np.asarray([int(e['example_index']) for e in examples_]),
                               contexts=[r['context'] for r in records],
                               max_answer_length=int(data.get('max_answer_length') or 30))
  golds = [list(r['answers_text']) or [r['answer_text']] for r in records]
  scores = metrics_lib.squad_metrics(predictions=answers, references=golds)
  rows = [{
      'id': r['id'],
      'question': r['question'],
      'prediction': a,
      'answers': g
  } for r, a, g in zip(records, answers, golds)]
  return scores, rows


registry.register(
    Task('qa', ('encoder', 'decoder'), ('qa',), ('start_positions', 'end_positions'), _loss,
         "use an encoder for extractive QA, or 'seq2seq' for generative QA", examples,
         ENCODER + ('start_positions', 'end_positions', 'offsets'), 'wordpiece',
         ('loss', 'start_accuracy', 'end_accuracy', 'exact_match', 'weight_sum'), read=read, eval_examples=windows,
         score=score, outputs=('start_logits', 'end_logits'), best='f1'))
for _name in ('squad', 'xquad'):
  registry.register(registry.dataset('qa', _name))
