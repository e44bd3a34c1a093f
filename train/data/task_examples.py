"""Examples for downstream tasks from labeled records, as pure numpy functions of (record, rng): `Classification` (single
texts or pairs), `Tagging` (word tags aligned to first sub-words), `QuestionAnswering` (character answer spans -> token
start/end, with doc-stride windows over long contexts and `postprocess_qa` mapping span logits back to text) and
`Seq2Seq` (encoder-decoder) or `PromptCompletion` (the same pairs on a decoder). Each returns a dict of fixed-shape numpy arrays following the batch contract in `train/data/__init__.py`."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from train.data.examples import pad_to, truncate_pair, encoder_decoder_arrays, segment_positions
from train.data.tokenizers import Tokenizer


# ---- tasks -----------------------------------------------------------------------------------------------------------
def _label_id(value, names: Sequence[str] | None) -> int:
  if isinstance(value, str):
    if names is None:
      raise ValueError(f"label {value!r} is a string but no label names were given")
    return list(names).index(value)
  return int(value)


def _encoder_arrays(tokens: Sequence[int], token_types: Sequence[int], seq_len: int, pad_id: int) -> dict:
  n = min(len(tokens), seq_len)
  seg = (np.arange(seq_len) < n).astype(np.int32)
  return {
      "tokens": pad_to(tokens, seq_len, pad_id),
      "segment_ids": seg,
      "positions": segment_positions(seg),
      "token_type_ids": pad_to(token_types, seq_len)
  }


class Classification:
  """Single texts ([CLS] a [SEP]) or pairs ([CLS] a [SEP] b [SEP]) with a label; records from the classification
    builder ({"text_a", "text_b", "label"}). transform(record, rng)."""

  def __init__(self, tokenizer: Tokenizer, *, seq_len: int, label_names: Sequence[str] | None = None):
    tokenizer.require("cls", "sep")
    self.tok, self.seq_len, self.label_names = tokenizer, seq_len, label_names
    self.cls, self.sep, self.pad = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    a = self.tok.encode(record["text_a"])
    text_b = record.get("text_b") or ""
    if text_b:
      a, b = truncate_pair(a, self.tok.encode(text_b), self.seq_len - 3)
      tokens = [self.cls, *a, self.sep, *b, self.sep]
      types = [0] * (len(a) + 2) + [1] * (len(b) + 1)
    else:
      a = a[:self.seq_len - 2]
      tokens, types = [self.cls, *a, self.sep], [0] * (len(a) + 2)
    out = _encoder_arrays(tokens, types, self.seq_len, self.pad)
    out["label"] = np.int32(_label_id(record["label"], self.label_names))
    return out


class Tagging:
  """Token tagging: words -> sub-words; the first sub-word of each word carries the word's tag (weight 1), the
    other sub-words and the specials weight 0. Records {"tokens", "tags"} from the tagging builder."""

  def __init__(self, tokenizer: Tokenizer, *, seq_len: int, tag_names: Sequence[str] | None = None):
    tokenizer.require("cls", "sep")
    self.tok, self.seq_len, self.tag_names = tokenizer, seq_len, tag_names
    self.cls, self.sep, self.pad = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    ids, words = self.tok.encode_words(list(record["tokens"]))
    ids, words = ids[:self.seq_len - 2], words[:self.seq_len - 2]
    tags = [_label_id(t, self.tag_names) for t in record["tags"]]
    first = [w >= 0 and (j == 0 or words[j - 1] != w) for j, w in enumerate(words)]
    labels = [tags[w] if f else 0 for w, f in zip(words, first)]
    out = _encoder_arrays([self.cls, *ids, self.sep], [0] * (len(ids) + 2), self.seq_len, self.pad)
    out["tag_labels"] = pad_to([0, *labels, 0], self.seq_len)
    out["tag_weights"] = pad_to([0, *map(float, first), 0], self.seq_len, 0, np.float32)
    return out


class QuestionAnswering:
  """Extractive QA: [CLS] question [SEP] context [SEP]; the answer's character span becomes the first and last
    context tokens overlapping it (via token offsets). Also returns offsets [T, 2] (character span of each context
    token, -1 elsewhere) for decoding predictions.

    A call makes one window: the context is truncated and an answer cut off points at [CLS] (0). `windows(record)`
    follows Hugging Face's prepare_train_features / prepare_validation_features instead: a context longer than the
    room left by the question yields several windows, consecutive ones sharing `doc_stride` context tokens (HF's
    tokenizer `stride` and run_qa's --doc_stride; BERT's run_squad.py calls the step between windows doc_stride,
    which here is room - doc_stride), each labeled with the answer if it lies wholly inside, else [CLS]. With
    doc_stride None, `windows` gives the single truncated window. `qa_windows` stacks the windows of many records and
    `postprocess_qa` maps the model's start/end logits of all windows of a question back to answer text."""

  def __init__(self, tokenizer: Tokenizer, *, seq_len: int, max_query_length: int = 64, doc_stride: int | None = None):
    tokenizer.require("cls", "sep")
    self.tok, self.seq_len, self.max_query_length = tokenizer, seq_len, max_query_length
    self.cls, self.sep, self.pad = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
    if doc_stride is not None:
      # Checked for the longest question allowed, so no record can fail later: a window must advance.
      room = seq_len - max_query_length - 3
      if not 0 <= doc_stride < room:
        raise ValueError(f"doc_stride={doc_stride} must be in [0, {room}): the context room of a window is seq_len "
                         f"({seq_len}) - max_query_length ({max_query_length}) - 3 special tokens = {room}; lower "
                         "doc_stride or max_query_length, or raise seq_len")
    self.doc_stride = doc_stride

  def _encode(self, record: Mapping[str, Any]):
    """(question ids, context ids, context offsets, (first, last) context token of the answer or None)."""
    q = self.tok.encode(record["question"])[:self.max_query_length]
    ctx, offs = self.tok.encode_with_offsets(record["context"])
    start_char = int(record.get("answer_start", -1))
    end_char = start_char + len(record.get("answer_text", ""))
    answer = None
    if start_char >= 0:
      hits = [j for j, (s, e) in enumerate(offs) if e > start_char and s < end_char]
      if hits:
        answer = (hits[0], hits[-1])
    return q, ctx, offs, answer

  def _window(self, q, ctx, offs, answer, first: int) -> dict[str, np.ndarray]:
    """The window whose context is ctx[first:first + room]; its answer positions are 0 unless it holds all of it."""
    room = self.seq_len - len(q) - 3
    ctx, offs = ctx[first:first + room], offs[first:first + room]
    base = len(q) + 2  # index of the first context token
    tokens = [self.cls, *q, self.sep, *ctx, self.sep]
    types = [0] * base + [1] * (len(ctx) + 1)
    out = _encoder_arrays(tokens, types, self.seq_len, self.pad)
    start = end = 0
    if answer is not None and first <= answer[0] and answer[1] < first + len(ctx):
      start, end = base + answer[0] - first, base + answer[1] - first
    offsets = np.full((self.seq_len, 2), -1, np.int32)
    if ctx:
      offsets[base:base + len(ctx)] = np.asarray(offs, np.int32)
    out.update(start_positions=np.int32(start), end_positions=np.int32(end), offsets=offsets)
    return out

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    q, ctx, offs, answer = self._encode(record)
    return self._window(q, ctx, offs, answer, 0)

  def window_starts(self, num_question_tokens: int, num_context_tokens: int) -> list[int]:
    """Index of the first context token of each window: 0, step, 2 step, ... (step = room - doc_stride) until a
        window reaches the end of the context; the last window holds the remainder (as HF tokenizers' overflow)."""
    room = self.seq_len - num_question_tokens - 3
    if room <= 0:
      raise ValueError(f"seq_len={self.seq_len} leaves no room for the context after a {num_question_tokens}-token "
                       "question; raise seq_len or lower max_query_length")
    if self.doc_stride is None or num_context_tokens <= room:
      return [0]
    step = room - self.doc_stride
    return list(range(0, num_context_tokens - room + step, step))

  def windows(self, record: Mapping[str, Any], *, example_index: int = 0) -> list[dict[str, np.ndarray]]:
    """Every window of one record: the keys of a call plus `example_index` (int32, the given index of the record,
        shared by all its windows so their predictions can be combined) and `window_index` (int32, 0, 1, ...)."""
    q, ctx, offs, answer = self._encode(record)
    out = []
    for w, first in enumerate(self.window_starts(len(q), len(ctx))):
      ex = self._window(q, ctx, offs, answer, first)
      ex.update(example_index=np.int32(example_index), window_index=np.int32(w))
      out.append(ex)
    return out


def qa_windows(qa: QuestionAnswering, records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
  """The windows of all records stacked into arrays [W, ...] (W = total windows); example_index [W] is the position
    of each window's record in `records`."""
  rows = [ex for i in range(len(records)) for ex in qa.windows(records[i], example_index=i)]
  if not rows:
    raise ValueError("qa_windows: no records")
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def best_answer_span(*, start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray,
                     max_answer_length: int = 30) -> tuple[int, int, float] | None:
  """The best answer of one question over all its windows: (start_char, end_char, score) maximizing
    start_logits[w, i] + end_logits[w, j] over context tokens i <= j < i + max_answer_length of one window w (tokens
    with offsets >= 0); None when no window has a context token.

    start_logits, end_logits: [W, T]; offsets: int [W, T, 2]. This is the exact maximum, not Hugging Face's search
    over the n_best top starts and ends (which can miss it)."""
  start_logits = np.asarray(start_logits, np.float64)
  end_logits = np.asarray(end_logits, np.float64)
  offsets = np.asarray(offsets)
  if start_logits.ndim == 1:
    start_logits, end_logits, offsets = start_logits[None], end_logits[None], offsets[None]
  if not start_logits.shape == end_logits.shape == offsets.shape[:2]:
    raise ValueError(f"best_answer_span: start_logits {start_logits.shape}, end_logits {end_logits.shape} and "
                     f"offsets {offsets.shape} must be [W, T], [W, T] and [W, T, 2]")
  best = None
  t = start_logits.shape[1]
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  span_ok = (j >= i) & (j - i < max_answer_length)  # [T, T]
  for w in range(len(start_logits)):
    ctx = offsets[w, :, 0] >= 0  # [T]
    ok = span_ok & ctx[:, None] & ctx[None, :]
    if not ok.any():
      continue
    scores = np.where(ok, start_logits[w][:, None] + end_logits[w][None, :], -np.inf)  # [T(start), T(end)]
    s, e = np.unravel_index(np.argmax(scores), scores.shape)
    if best is None or scores[s, e] > best[2]:
      best = (int(offsets[w, s, 0]), int(offsets[w, e, 1]), float(scores[s, e]))
  return best


def postprocess_qa(*, start_logits: np.ndarray, end_logits: np.ndarray, offsets: np.ndarray, example_index: np.ndarray,
                   contexts: Sequence[str], max_answer_length: int = 30) -> list[str]:
  """Answer text of every question from the logits of all windows: windows are grouped by example_index, the best
    span over a question's windows (`best_answer_span`) is cut out of its original context by character offsets.

    start_logits, end_logits: [W, T]; offsets [W, T, 2]; example_index [W] (from `qa_windows`); contexts[i] is the
    context of question i. Returns one string per context ("" for a question without windows or context tokens)."""
  example_index = np.asarray(example_index)
  if len(example_index) and (example_index.min() < 0 or example_index.max() >= len(contexts)):
    raise ValueError(f"postprocess_qa: example_index runs up to {int(example_index.max())} but only {len(contexts)} "
                     "contexts were given; pass the contexts of all records that made the windows, in order")
  answers = [""] * len(contexts)
  for i in np.unique(example_index):
    rows = np.flatnonzero(example_index == i)
    span = best_answer_span(start_logits=np.asarray(start_logits)[rows], end_logits=np.asarray(end_logits)[rows],
                            offsets=np.asarray(offsets)[rows], max_answer_length=max_answer_length)
    if span is not None:
      answers[int(i)] = contexts[int(i)][span[0]:span[1]]
  return answers


class Seq2Seq:
  """Source/target pairs ({"source", "target"}) for encoder-decoder models: both end in EOS."""

  def __init__(self, tokenizer: Tokenizer, *, inputs_length: int, targets_length: int):
    tokenizer.require("eos")
    self.tok, self.inputs_length, self.targets_length = tokenizer, inputs_length, targets_length
    self.eos, self.pad = tokenizer.eos_id, tokenizer.pad_id

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    src = self.tok.encode(record["source"])[:self.inputs_length - 1] + [self.eos]
    tgt = self.tok.encode(record["target"])[:self.targets_length - 1] + [self.eos]
    return encoder_decoder_arrays(np.array(src), np.array(tgt), inputs_length=self.inputs_length,
                                  targets_length=self.targets_length, pad_id=self.pad)


class LabelText:
  """Classification on an encoder-decoder, T5's way: the text (a pair joined by EOS) in, the label's name as target
  text out ({"text_a", "text_b", "label"} records, as Classification reads). `__call__` is a training pair;
  `candidates` adds every label's name as a scored target ([L, targets_length] decoder arrays under 'label_*' keys),
  so evaluation ranks the labels by the log-probability of their text instead of decoding freely (a free decode may
  start with anything, a sentinel included, and score nothing by exact match)."""

  def __init__(self, tokenizer: Tokenizer, *, inputs_length: int, targets_length: int, label_names: Sequence[str]):
    tokenizer.require("eos")
    if not label_names:
      raise ValueError("classification on an encoder-decoder needs the label names (config.data.label_names)")
    self.tok, self.inputs_length, self.targets_length = tokenizer, inputs_length, targets_length
    self.eos, self.pad, self.label_names = tokenizer.eos_id, tokenizer.pad_id, list(label_names)
    self.targets = [self.tok.encode(str(n))[:targets_length - 1] + [self.eos] for n in self.label_names]

  def _source(self, record) -> list[int]:
    src = self.tok.encode(record["text_a"])
    if record.get("text_b"):
      src = src + [self.eos] + self.tok.encode(record["text_b"])
    return src[:self.inputs_length - 1] + [self.eos]

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    label = _label_id(record["label"], self.label_names)
    out = encoder_decoder_arrays(np.array(self._source(record)), np.array(self.targets[label]),
                                 inputs_length=self.inputs_length, targets_length=self.targets_length, pad_id=self.pad)
    out["label"] = np.int32(label)
    return out

  def candidates(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    out = self(record)
    rows = [encoder_decoder_arrays(np.array([self.eos]), np.array(t), inputs_length=1,
                                   targets_length=self.targets_length, pad_id=self.pad) for t in self.targets]
    for key in ("decoder_tokens", "decoder_targets", "decoder_weights", "decoder_segment_ids", "decoder_positions"):
      out["label_" + key] = np.stack([r[key] for r in rows])  # [L, targets_length]
    return out


def completion_length(seq_len: int, targets_len: int = 0) -> int:
  """Target tokens (EOS included) a decoder-only seq2seq example holds: data.targets_len, else half of seq_len."""
  return int(targets_len) if targets_len else max(1, int(seq_len) // 2)


class PromptCompletion:
  """Source/target pairs ({"source", "target"}) for decoder-only models: one sequence [BOS] prompt target EOS, where
  the prompt is the source written into `template` ("{source}" marks where); the loss reads only the target's
  tokens. `prompt_example` gives the prompt alone, right-padded with its mask, for KV-cache generation.

  The sequence holds seq_len + 1 tokens (inputs and shifted targets are seq_len long): the target keeps at most
  targets_length of them, the source is cut to fit the rest."""

  def __init__(self, tokenizer: Tokenizer, *, seq_len: int, targets_length: int, template: str = "{source}\n"):
    tokenizer.require("eos")
    if template.count("{source}") != 1:
      raise ValueError(f"config.data.source_template={template!r} must contain '{{source}}' exactly once: the place "
                       "of the source text in the decoder's prompt, e.g. 'English: {source}\\nGerman:'")
    head, tail = template.split("{source}")
    self.tok, self.seq_len, self.targets_length = tokenizer, int(seq_len), int(targets_length)
    self.eos, self.pad = tokenizer.eos_id, tokenizer.pad_id if tokenizer.pad_id is not None else 0
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    self.head, self.tail = bos + (tokenizer.encode(head) if head else []), tokenizer.encode(tail) if tail else []
    self.prompt_length = self.seq_len + 1 - self.targets_length
    if self.prompt_length < len(self.head) + len(self.tail) + 1:
      raise ValueError(f"config.data.seq_len={seq_len} leaves {self.prompt_length} prompt tokens after "
                       f"targets_len={targets_length}, fewer than the template's {len(self.head) + len(self.tail)} "
                       "plus one source token; raise seq_len or lower data.targets_len.")

  def prompt(self, record: Mapping[str, Any]) -> list[int]:
    room = self.prompt_length - len(self.head) - len(self.tail)
    return self.head + self.tok.encode(record["source"])[:room] + self.tail

  def __call__(self, record: Mapping[str, Any], rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    prompt = self.prompt(record)
    seq = prompt + self.tok.encode(record["target"])[:self.targets_length - 1] + [self.eos]
    n = len(seq) - 1  # input positions: each predicts the next token
    at = np.arange(self.seq_len)
    seg = (at < n).astype(np.int32)
    return {
        "tokens": pad_to(seq[:-1], self.seq_len, self.pad),
        "targets": pad_to(seq[1:], self.seq_len, self.pad),
        "weights": ((at >= len(prompt) - 1) & (at < n)).astype(np.float32),  # the target tokens and EOS
        "segment_ids": seg,
        "positions": segment_positions(seg)
    }

  def prompt_example(self, record: Mapping[str, Any]) -> dict[str, np.ndarray]:
    prompt = self.prompt(record)
    return {
        "prompt": pad_to(prompt, self.prompt_length, self.pad),
        "prompt_mask": (np.arange(self.prompt_length) < len(prompt)).astype(np.int32)
    }
