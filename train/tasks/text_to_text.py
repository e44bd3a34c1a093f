"""Text-to-text: the `seq2seq` kind (any source -> target text) and the translation dataset (en -> de).

What a text-to-text record reads: a TSV/CSV/JSONL file with a source and a target column (config.data.source_column /
target_column; the record's `columns` by default). An encoder-decoder reads the source and learns the target; a
decoder continues a prompt holding the source (config.data.source_template) and learns only the target's tokens.
Evaluation decodes with the KV cache (greedy, or beam with config.data.num_beams) and scores corpus BLEU and chrF
(sacrebleu).
"""
from __future__ import annotations

import jax

from model.transformer import forward_compiler_options
from train.data import readers
from train.data import task_examples as tex
from train.tasks import losses
from train.tasks import metrics as metrics_lib
from train.tasks import registry
from train.tasks import scoring
from train.tasks.registry import CAUSAL, SEQ2SEQ, Task


def reader(columns):
  """read(paths, data) for a file with these default (source, target) columns."""

  def read(paths, data):
    return list(
        readers.seq2seq_records(paths, source_column=data.get('source_column') or columns[0],
                                target_column=data.get('target_column') or columns[1]))

  return read


def examples(records, tokenizer, data):
  return tex.Seq2Seq(tokenizer, inputs_length=data.seq_len, targets_length=data.targets_len or data.seq_len), records


def _eval_examples(records, tokenizer, data):
  transform, _ = examples(records, tokenizer, data)
  return [transform(r) for r in records]


def _completion_builder(tokenizer, data):
  return tex.PromptCompletion(tokenizer, seq_len=data.seq_len,
                              targets_length=tex.completion_length(data.seq_len,
                                                                   data.get('targets_len') or 0),
                              template=data.get('source_template') or '{source}\n')


def completion_examples(records, tokenizer, data):
  """On a decoder: one sequence [BOS] prompt target EOS per record; the loss reads the target's tokens only."""
  return _completion_builder(tokenizer, data), records


def completion_prompts(records, tokenizer, data):
  builder = _completion_builder(tokenizer, data)
  return [builder.prompt_example(r) for r in records]


def _loss(out, batch, opts):
  return losses.seq2seq_loss(logits=out['lm_logits'], targets=batch['decoder_targets'],
                             weights=batch['decoder_weights'], label_smoothing=opts.label_smoothing,
                             z_loss=opts.z_loss)


def _completion_loss(out, batch, opts):
  return losses.clm_loss(logits=out['lm_logits'], targets=batch['targets'], weights=batch['weights'],
                         label_smoothing=opts.label_smoothing, z_loss=opts.z_loss)


def generate_fn(model, data):
  """jit(params, batch) -> {'generated': [B, L] token ids}: greedy (or config.data.num_beams > 1: beam) KV-cache
  decoding, up to the task's target length, from the batch's encoder input (encoder-decoder) or from its prompt
  (decoder: batch['prompt'] right-padded, batch['prompt_mask'])."""
  from model import decode  # pylint: disable=g-import-not-at-top
  beams = int(data.get('num_beams') or 1)
  decoder = model.cfg.arch == 'decoder'
  length = tex.completion_length(data.seq_len,
                                 data.get('targets_len') or 0) if decoder else int(
                                     data.get('targets_len') or data.seq_len)
  config = decode.DecodeConfig(method='beam' if beams > 1 else 'greedy', num_beams=max(beams, 1), max_new_tokens=length)

  def fwd(params, batch):
    if decoder:
      tokens, _ = decode.generate(model, params, batch['prompt'], prompt_mask=batch['prompt_mask'], config=config)
    else:
      tokens, _ = decode.generate(model, params, encoder_tokens=batch['encoder_tokens'],
                                  encoder_segment_ids=batch['encoder_segment_ids'], config=config)
    return {'generated': tokens}

  return jax.jit(fwd, compiler_options=forward_compiler_options(model.cfg.dtype) or None)  # decoding's options


def score(outputs, examples_, records, data, tokenizer=None) -> scoring.Scored:
  """Corpus BLEU and chrF (sacrebleu) of the decoded outputs against the targets."""
  stop = {i for i in (tokenizer.eos_id, tokenizer.pad_id) if i is not None}
  texts = []
  for row in outputs['generated']:
    ids = [int(t) for t in row]
    ids = ids[:next((j for j, t in enumerate(ids) if t in stop), len(ids))]
    texts.append(tokenizer.decode(ids).strip())
  scores = metrics_lib.generation_metrics(predictions=texts, references=[r['target'] for r in records])
  rows = [{
      'idx': r.get('idx', i),
      'source': r['source'],
      'target': r['target'],
      'prediction': t
  } for i, (r, t) in enumerate(zip(records, texts))]
  return scores, rows


_COLUMNS = ('source', 'target')
registry.register(
    Task('seq2seq', ('encoder_decoder', 'decoder'), ('lm',), ('encoder_tokens',) + SEQ2SEQ[3:6], _loss,
         'use an encoder-decoder (source in, target out) or a decoder (source in a prompt, target after it)', examples,
         SEQ2SEQ, 'unigram', registry.TOKEN_METRICS, read=reader(_COLUMNS), eval_examples=_eval_examples, score=score,
         outputs=('generated',), best='bleu', forward=generate_fn, columns=_COLUMNS, arch_fields={
             'decoder': dict(batch_keys=('targets', 'weights'), loss=_completion_loss, examples=completion_examples,
                             provides=CAUSAL, tokenizer_kind='bpe', eval_examples=completion_prompts)
         }))
registry.register(registry.dataset('seq2seq', 'translation', read=reader(('en', 'de')), columns=('en', 'de')))
