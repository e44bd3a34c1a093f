"""The data half of the task records in train/tasks.py: for each kind of task, how files become records (readers,
label sets) and how records become examples (builders), as the `read`, `labels`, `examples` and `eval_examples` fields of
a `Task` name them. Pure functions over records, a tokenizer and config.data; no registry.
"""
from train.data import examples as ex
from train.data import readers
from train.data import task_examples as tex

# ------------------------------------------------------------------------------------------- example builders


def _stream(records, tokenizer, doc_end_id):
  return ex.TokenStream.from_records(records, tokenizer, doc_end_id=doc_end_id)


def _max_predictions(data):
  return data.max_predictions or None


def _random_start(data):
  return bool(data.get('random_start', False)) if hasattr(data, 'get') else False


def causal_examples(records, tokenizer, data):
  t = ex.CausalLM(_stream(records, tokenizer, tokenizer.eos_id), seq_len=data.seq_len,
                  random_start=_random_start(data))
  return t, range(t.num_windows)


def masked_examples(records, tokenizer, data):
  t = ex.MaskedLM(_stream(records, tokenizer,
                          tokenizer.sep_id), ex.Specials.from_tokenizer(tokenizer), seq_len=data.seq_len,
                  max_predictions=_max_predictions(data), mask_rate=data.mask_rate, whole_word=data.whole_word,
                  random_start=_random_start(data))
  return t, range(t.num_windows)


def next_sentence_examples(records, tokenizer, data):
  t = ex.NextSentence(records, tokenizer, seq_len=data.seq_len, max_predictions=_max_predictions(data),
                      mask_rate=data.mask_rate, whole_word=data.whole_word)
  return t, range(len(records))


def span_examples(records, tokenizer, data):
  t = ex.SpanCorruption(_stream(records, tokenizer, tokenizer.eos_id), ex.Specials.from_tokenizer(tokenizer),
                        inputs_length=data.seq_len, targets_length=data.targets_len or None,
                        random_start=_random_start(data))
  return t, range(t.num_windows)


def _names(data, field):
  names = data.get(field) if hasattr(data, 'get') else None
  return list(names) if names else None


def classification_examples(records, tokenizer, data):
  return tex.Classification(tokenizer, seq_len=data.seq_len, label_names=_names(data, 'label_names')), records


def _label_text(tokenizer, data):
  return tex.LabelText(tokenizer, inputs_length=data.seq_len, targets_length=int(data.get('targets_len') or 8),
                       label_names=_names(data, 'label_names'))


def label_text_examples(records, tokenizer, data):
  """Classification on an encoder-decoder: the label's name is the target text."""
  return _label_text(tokenizer, data), records


def label_text_candidates(records, tokenizer, data):
  """Its evaluation examples: each record with every label's name as a candidate target, to be scored."""
  builder = _label_text(tokenizer, data)
  return [builder.candidates(r) for r in records]


def tagging_examples(records, tokenizer, data):
  return tex.Tagging(tokenizer, seq_len=data.seq_len, tag_names=_names(data, 'tag_names')), records


def _qa_builder(data, tokenizer):
  return tex.QuestionAnswering(tokenizer, seq_len=data.seq_len, max_query_length=int(data.get('max_query_length', 64)),
                               doc_stride=data.get('doc_stride'))


def qa_windows(records, tokenizer, data):
  qa = _qa_builder(data, tokenizer)
  return [w for i, r in enumerate(records) for w in qa.windows(r, example_index=i)]


def qa_examples(records, tokenizer, data):
  return (lambda window, rng=None: window), qa_windows(records, tokenizer, data)


def each_record(examples):
  """An eval_examples function: `examples`' transform applied to every record (one example per record)."""

  def build(records, tokenizer, data):
    transform, _ = examples(records, tokenizer, data)
    return [transform(r) for r in records]

  return build


def seq2seq_examples(records, tokenizer, data):
  return tex.Seq2Seq(tokenizer, inputs_length=data.seq_len, targets_length=data.targets_len or data.seq_len), records


def _completion_builder(tokenizer, data):
  return tex.PromptCompletion(tokenizer, seq_len=data.seq_len,
                              targets_length=tex.completion_length(data.seq_len,
                                                                   data.get('targets_len') or 0),
                              template=data.get('source_template') or '{source}\n')


def completion_examples(records, tokenizer, data):
  return _completion_builder(tokenizer, data), records


def completion_prompts(records, tokenizer, data):
  builder = _completion_builder(tokenizer, data)
  return [builder.prompt_example(r) for r in records]


# ------------------------------------------------------------------------------------------------- readers


def columns_of(task_columns, data):
  """(text columns, label column): config.data's when set, else the task's own."""
  text = tuple(data.get('text_columns') or ()) or task_columns[:-1]
  return text, data.get('label_column') or task_columns[-1]


def read_classification(columns):

  def read(paths, data):
    text, label = columns_of(columns, data)
    return list(
        readers.classification_records(paths, text_columns=text, label_column=label,
                                       label_names=list(data.label_names)))

  return read


def classification_labels(columns):
  return lambda paths, data: readers.infer_labels(paths, label_column=columns_of(columns, data)[1])


def _sequence_features(data) -> dict[str, str]:
  """A TFDS tagging split's token and tag features: data.text_columns[0] and data.label_column when set."""
  text = tuple(data.get('text_columns') or ())
  return {'token_feature': text[0] if text else 'tokens', 'tag_feature': data.get('label_column') or 'ner_tags'}


def read_conll(paths, data):
  return list(readers.conll_records(paths, tag_names=list(data.tag_names), num_columns=None,
                                    **_sequence_features(data)))


def conll_tags(paths, data):
  return readers.infer_tags(paths, num_columns=None, **_sequence_features(data))


def read_seq2seq(columns):

  def read(paths, data):
    return list(
        readers.seq2seq_records(paths, source_column=data.get('source_column') or columns[0],
                                target_column=data.get('target_column') or columns[1]))

  return read


def read_squad(paths, data):
  return list(readers.squad_records(paths))
