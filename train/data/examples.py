"""Example construction for every objective, as pure numpy functions of (record, rng) where the rng comes from
`example_rng(seed, index)`, so an example depends only on the seed and its position in the stream — never on global
state, worker count or how many batches came before (which is what makes resumption and host splitting exact).
Pre-training: `TokenStream` tokenizes a corpus once and cuts it into fixed windows (documents packed back to back, with
segment ids and per-segment positions), feeding `CausalLM`, `MaskedLM` (also ELECTRA's input), `SpanCorruption` (T5)
and, from sentences, `NextSentence` (BERT's NSP + MLM). Downstream tasks build theirs in `task_examples.py`. Each
transform returns a dict of fixed-shape numpy arrays following the batch contract in `train/data/__init__.py`."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from train.data.tokenizers import Tokenizer


def example_rng(seed: int, index: int) -> np.random.Generator:
  """The generator for example `index` of the stream of run `seed` (independent streams via SeedSequence)."""
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])


@dataclasses.dataclass(frozen=True, eq=False)
class Specials:
  """What example construction needs from a tokenizer, as plain ints and arrays (cheap to ship to workers)."""
  vocab_size: int
  pad: int
  cls: int | None
  sep: int | None
  mask: int | None
  eos: int | None
  bos: int | None
  special_ids: np.ndarray  # int32 [S]
  sentinel_ids: np.ndarray  # int32 [n], sentinel_ids[i] = <extra_id_i>
  word_start: np.ndarray  # bool [vocab_size]

  @classmethod
  def from_tokenizer(cls, tok: Tokenizer) -> "Specials":
    return cls(vocab_size=tok.vocab_size, pad=tok.pad_id if tok.pad_id is not None else 0, cls=tok.cls_id,
               sep=tok.sep_id, mask=tok.mask_id, eos=tok.eos_id, bos=tok.bos_id, special_ids=tok.special_ids,
               sentinel_ids=np.array(tok.sentinel_ids, np.int32), word_start=tok.word_start_table())

  @property
  def normal_ids(self) -> np.ndarray:
    """Ids a random replacement may take (everything but special tokens)."""
    keep = np.ones(self.vocab_size, bool)
    keep[self.special_ids] = False
    return np.flatnonzero(keep).astype(np.int32)


def default_max_predictions(seq_len: int, mask_rate: float = 0.15) -> int:
  return int(round(mask_rate * seq_len)) + 1


def segment_positions(segment_ids: np.ndarray) -> np.ndarray:
  """int32 [T]: position of each token within its segment (0 at every segment start; 0 on padding)."""
  seg = np.asarray(segment_ids)
  idx = np.arange(len(seg))
  starts = np.concatenate([[True], seg[1:] != seg[:-1]])
  start_of = np.maximum.accumulate(np.where(starts, idx, 0))
  return np.where(seg > 0, idx - start_of, 0).astype(np.int32)


def pad_to(x: Sequence[int] | np.ndarray, length: int, value: int = 0, dtype=np.int32) -> np.ndarray:
  x = np.asarray(x, dtype)[:length]
  return np.concatenate([x, np.full(length - len(x), value, dtype)]) if len(x) < length else x


# ---- MLM -------------------------------------------------------------------------------------------------------------
def mask_tokens(tokens: np.ndarray, *, rng: np.random.Generator, specials: Specials, max_predictions: int,
                mask_rate: float = 0.15, whole_word: bool = False, valid: np.ndarray | None = None,
                random_ids: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """BERT masking of tokens [T]: round(mask_rate * #candidates) positions (capped at max_predictions) among
    non-special (and `valid`) tokens; of those 80% -> [MASK], 10% -> a random non-special id, 10% unchanged.
    whole_word picks whole words (a word-start token and the continuation tokens after it) as BERT's wwm does.

    Returns tokens [T], masked_positions [P], masked_ids [P], masked_weights [P] float32 (P = max_predictions)."""
  if specials.mask is None:
    raise ValueError("masked LM needs a tokenizer with a mask token (wordpiece, or bpe's <mask>)")
  tokens = np.asarray(tokens, np.int32)
  cand = ~np.isin(tokens, specials.special_ids)
  if valid is not None:
    cand &= valid
  idx = np.flatnonzero(cand)
  num = min(max_predictions, max(1, int(round(len(idx) * mask_rate)))) if len(idx) else 0
  if whole_word and num:
    # A candidate starts a word if its token says so or the token before it is not a candidate ([CLS], a gap).
    starts = specials.word_start[tokens[idx]] | np.concatenate([[True], np.diff(idx) != 1])
    word_of = np.cumsum(starts) - 1
    bounds = np.flatnonzero(np.concatenate([starts, [True]]))
    chosen = []
    for w in rng.permutation(word_of[-1] + 1):
      size = bounds[w + 1] - bounds[w]
      if len(chosen) + size > num:
        continue
      chosen.extend(idx[bounds[w]:bounds[w + 1]])
      if len(chosen) == num:
        break
    chosen = np.sort(np.array(chosen, np.int64))
  else:
    chosen = np.sort(rng.choice(idx, size=num, replace=False)) if num else np.zeros(0, np.int64)
  out = tokens.copy()
  r = rng.random(len(chosen))
  out[chosen[r < 0.8]] = specials.mask
  rand = chosen[r >= 0.9]
  pool = specials.normal_ids if random_ids is None else random_ids
  out[rand] = pool[rng.integers(0, len(pool), size=len(rand))]
  return {
      "tokens": out,
      "masked_positions": pad_to(chosen, max_predictions),
      "masked_ids": pad_to(tokens[chosen], max_predictions),
      "masked_weights": pad_to(np.ones(len(chosen)), max_predictions, 0, np.float32)
  }


# ---- T5 span corruption ----------------------------------------------------------------------------------------------
def random_spans_noise_mask(length: int, *, rng: np.random.Generator, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> np.ndarray:
  """bool [length]: T5's random_spans_noise_mask. round(length * noise_density) noise tokens in
    round(num_noise / mean_noise_span_length) spans; span lengths are random segmentations; never starts with noise."""
  num_noise = int(round(length * noise_density))
  num_noise = min(max(num_noise, 1), length - 1)
  num_spans = max(int(round(num_noise / mean_noise_span_length)), 1)
  num_nonnoise = length - num_noise

  def segmentation(num_items, num_segments):
    # Split num_items into num_segments random non-empty pieces: choose num_segments-1 cut points.
    first = np.concatenate([[0], rng.permutation(np.arange(num_items - 1) < num_segments - 1)]).astype(int)
    return np.bincount(np.cumsum(first), minlength=num_segments)

  noise_lengths = segmentation(num_noise, num_spans)
  nonnoise_lengths = segmentation(num_nonnoise, num_spans)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  span_starts = np.cumsum(interleaved)[:-1]
  indicator = np.zeros(length, int)
  indicator[span_starts] = 1
  return np.cumsum(indicator) % 2 == 1


def _spans_to_sentinels(tokens: np.ndarray, noise_mask: np.ndarray, sentinel_ids: np.ndarray) -> np.ndarray:
  prev = np.concatenate([[False], noise_mask[:-1]])
  first = noise_mask & ~prev
  span = np.cumsum(first) - 1
  if first.sum() > len(sentinel_ids):
    raise ValueError(f"{first.sum()} noise spans but the tokenizer has only {len(sentinel_ids)} sentinels")
  out = np.where(first, sentinel_ids[np.clip(span, 0, None)], tokens)
  return out[~(noise_mask & prev)]


def span_corruption(tokens: np.ndarray, *, rng: np.random.Generator, sentinel_ids: np.ndarray, eos_id: int,
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
  """tokens [L] -> (inputs, targets), each ending in EOS: noise spans become sentinels in inputs; targets list
    each sentinel followed by the span it replaced (T5 span corruption)."""
  tokens = np.asarray(tokens, np.int32)
  mask = random_spans_noise_mask(len(tokens), rng=rng, noise_density=noise_density,
                                 mean_noise_span_length=mean_noise_span_length)
  inputs = _spans_to_sentinels(tokens, mask, sentinel_ids)
  targets = _spans_to_sentinels(tokens, ~mask, sentinel_ids)
  return np.append(inputs, eos_id).astype(np.int32), np.append(targets, eos_id).astype(np.int32)


def span_corruption_lengths(inputs_length: int, *, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """(raw tokens per example, targets length) such that corrupted inputs (+EOS) fit inputs_length exactly
    (T5's random_spans_helper)."""

  def lengths(n):
    noise = int(round(n * noise_density))
    spans = max(int(round(noise / mean_noise_span_length)), 1)
    return n - noise + spans + 1, noise + spans + 1

  n = 2
  while lengths(n + 1)[0] <= inputs_length:
    n += 1
  return n, lengths(n)[1]


# ---- packing ---------------------------------------------------------------------------------------------------------
def pack_sequences(sequences: Sequence[Sequence[int]], *, length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """First-fit packing of variable-length sequences (each truncated to `length`) into rows.

    Returns tokens [R, length], segment_ids [R, length] (1..n per row, 0 = padding), positions [R, length]."""
  rows: list[list[np.ndarray]] = []
  room: list[int] = []
  for seq in sequences:
    seq = np.asarray(seq, np.int32)[:length]
    r = next((i for i, free in enumerate(room) if free >= len(seq)), None)
    if r is None:
      rows.append([])
      room.append(length)
      r = len(rows) - 1
    rows[r].append(seq)
    room[r] -= len(seq)
  tokens = np.full((len(rows), length), pad_id, np.int32)
  segs = np.zeros((len(rows), length), np.int32)
  for r, row in enumerate(rows):
    if row:
      tokens[r, :length - room[r]] = np.concatenate(row)
      segs[r, :length - room[r]] = np.repeat(np.arange(1, len(row) + 1), [len(s) for s in row])
  return {
      "tokens": tokens,
      "segment_ids": segs,
      "positions": np.stack([segment_positions(s) for s in segs]) if len(rows) else segs
  }


# ---- pre-training sources --------------------------------------------------------------------------------------------
def _text_of(rec: Mapping[str, Any]) -> str:
  return rec["text"]


class TokenStream:
  """A corpus tokenized once: documents back to back, each ending in `doc_end_id`, cut into fixed windows.

    tokens int32 [N] and doc int32 [N] (document number of each token). Window i of length L covers
    tokens[i*L:(i+1)*L]; its segment ids number the documents it touches 1..n."""

  def __init__(self, tokens: np.ndarray, doc: np.ndarray):
    self.tokens = np.asarray(tokens, np.int32)
    self.doc = np.asarray(doc, np.int32)

  @classmethod
  def from_records(cls, records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *,
                   doc_end_id: int | None) -> "TokenStream":
    """records with "text" (and, for passages of one document, "document_id" and "passage_index", which keep a
        document's passages together and in order whatever order the source stores them in)."""
    recs = [records[i] for i in range(len(records))]
    key = [(r.get("document_id", i), r.get("passage_index", 0)) for i, r in enumerate(recs)]
    order = sorted(range(len(recs)), key=lambda i: key[i])
    ids = tokenizer.encode_batch([_text_of(recs[i]) for i in order])
    toks, docs, d = [], [], -1
    for j, i in enumerate(order):
      if j == 0 or key[i][0] != key[order[j - 1]][0]:
        if j and doc_end_id is not None:
          toks.append(np.array([doc_end_id], np.int32))
          docs.append(np.array([d], np.int32))
        d += 1
      toks.append(np.asarray(ids[j], np.int32))
      docs.append(np.full(len(ids[j]), d, np.int32))
    if doc_end_id is not None and toks:
      toks.append(np.array([doc_end_id], np.int32))
      docs.append(np.array([d], np.int32))
    if not toks:
      raise ValueError("cannot build a token stream from an empty corpus")
    return cls(np.concatenate(toks), np.concatenate(docs))

  def num_windows(self, length: int) -> int:
    return len(self.tokens) // length

  def window(self, i: int, length: int, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [length], segment_ids [length] numbered 1..n by document).

    With an rng, window i starts at a random offset in [i*L, (i+1)*L) (at most N - L): nanoGPT's random crops, so
    each epoch cuts the text differently while the number of windows per epoch stays N // L."""
    start = i * length
    if rng is not None:
      start = min(start + int(rng.integers(length)), len(self.tokens) - length)
    sl = slice(start, start + length)
    doc = self.doc[sl]
    return self.tokens[sl], (np.concatenate([[1], 1 + np.cumsum(doc[1:] != doc[:-1])])).astype(np.int32)


class CausalLM:
  """GPT-style examples from windows of seq_len + 1 tokens: source = range(num_windows); transform(i, rng).
    targets[t] = tokens[t + 1]; weight 0 where the next token belongs to another document."""

  def __init__(self, stream: TokenStream, *, seq_len: int, random_start: bool = False):
    self.stream, self.seq_len, self.random_start = stream, seq_len, random_start
    self.num_windows = stream.num_windows(seq_len + 1)

  def __call__(self, index: int, rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
    toks, seg = self.stream.window(int(index), self.seq_len + 1, rng if self.random_start else None)
    inputs, inp_seg = toks[:-1], seg[:-1]
    return {
        "tokens": inputs,
        "targets": toks[1:].copy(),
        "weights": (seg[1:] == inp_seg).astype(np.float32),
        "segment_ids": inp_seg,
        "positions": segment_positions(inp_seg)
    }


class MaskedLM:
  """BERT/RoBERTa MLM (and ELECTRA generator input) from windows: [CLS] window [SEP], documents packed with
    segment ids, masked with `mask_tokens`. source = range(num_windows); transform(i, rng)."""

  def __init__(self, stream: TokenStream, specials: Specials, *, seq_len: int, max_predictions: int | None = None,
               mask_rate: float = 0.15, whole_word: bool = False, random_start: bool = False):
    if specials.cls is None or specials.sep is None:
      raise ValueError("masked LM windows need cls and sep tokens")
    self.stream, self.specials, self.seq_len, self.random_start = stream, specials, seq_len, random_start
    self.max_predictions = max_predictions or default_max_predictions(seq_len, mask_rate)
    self.mask_rate, self.whole_word = mask_rate, whole_word
    self.num_windows = stream.num_windows(seq_len - 2)
    self._random_ids = specials.normal_ids

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    toks, seg = self.stream.window(int(index), self.seq_len - 2, rng if self.random_start else None)
    sp = self.specials
    tokens = np.concatenate([[sp.cls], toks, [sp.sep]]).astype(np.int32)
    segment_ids = np.concatenate([seg[:1], seg, seg[-1:]]).astype(np.int32)
    out = mask_tokens(tokens, rng=rng, specials=sp, max_predictions=self.max_predictions, mask_rate=self.mask_rate,
                      whole_word=self.whole_word, random_ids=self._random_ids)
    out.update(segment_ids=segment_ids, positions=segment_positions(segment_ids),
               token_type_ids=np.zeros(self.seq_len, np.int32))
    return out


class SpanCorruption:
  """T5 span corruption from windows of the raw length that corrupts to exactly `inputs_length` (EOS included).
    Like T5, documents are concatenated (EOS between them) and the whole row is one segment."""

  def __init__(self, stream: TokenStream, specials: Specials, *, inputs_length: int, targets_length: int | None = None,
               noise_density: float = 0.15, mean_noise_span_length: float = 3.0, random_start: bool = False):
    if specials.eos is None or not len(specials.sentinel_ids):
      raise ValueError("span corruption needs a tokenizer with EOS and sentinel tokens (kind 'unigram')")
    self.stream, self.specials, self.random_start = stream, specials, random_start
    self.raw_length, needed = span_corruption_lengths(inputs_length, noise_density=noise_density,
                                                      mean_noise_span_length=mean_noise_span_length)
    self.inputs_length, self.targets_length = inputs_length, targets_length or needed
    self.noise_density, self.mean_noise_span_length = noise_density, mean_noise_span_length
    self.num_windows = stream.num_windows(self.raw_length)

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    toks, _ = self.stream.window(int(index), self.raw_length, rng if self.random_start else None)
    sp = self.specials
    inputs, targets = span_corruption(toks, rng=rng, sentinel_ids=sp.sentinel_ids, eos_id=sp.eos,
                                      noise_density=self.noise_density,
                                      mean_noise_span_length=self.mean_noise_span_length)
    out = encoder_decoder_arrays(inputs, targets, inputs_length=self.inputs_length,
                                 targets_length=self.targets_length, pad_id=sp.pad)
    out['decoder_target_roles'] = span_target_roles(targets, sp.sentinel_ids, self.targets_length)
    return out


SPAN_TOKEN, SPAN_SENTINEL, SPAN_EOS = 1, 2, 3


def span_target_roles(targets: np.ndarray, sentinel_ids: np.ndarray, targets_length: int) -> np.ndarray:
  """What each decoder target of a span-corruption pair is, [targets_length] int32: 0 padding, SPAN_TOKEN a token of
  a dropped span, SPAN_SENTINEL a sentinel, SPAN_EOS the final EOS (the loss reports an accuracy per role)."""
  n = min(len(targets), targets_length)
  roles = np.where(np.isin(targets[:n], sentinel_ids), SPAN_SENTINEL, SPAN_TOKEN).astype(np.int32)
  if n == len(targets):  # the EOS survived truncation
    roles[n - 1] = SPAN_EOS
  return pad_to(roles, targets_length, 0)


def encoder_decoder_arrays(inputs: np.ndarray, targets: np.ndarray, *, inputs_length: int, targets_length: int,
                           pad_id: int) -> dict[str, np.ndarray]:
  """Pads/truncates one seq2seq pair; decoder_tokens = targets shifted right with the start id (= pad, as T5)."""
  enc = pad_to(inputs, inputs_length, pad_id)
  dec_t = pad_to(targets, targets_length, pad_id)
  n_in, n_t = min(len(inputs), inputs_length), min(len(targets), targets_length)
  enc_seg = (np.arange(inputs_length) < n_in).astype(np.int32)
  dec_seg = (np.arange(targets_length) < n_t).astype(np.int32)
  return {
      "encoder_tokens": enc,
      "encoder_segment_ids": enc_seg,
      "encoder_positions": segment_positions(enc_seg),
      "decoder_tokens": np.concatenate([[pad_id], dec_t[:-1]]).astype(np.int32),
      "decoder_targets": dec_t,
      "decoder_weights": dec_seg.astype(np.float32),
      "decoder_segment_ids": dec_seg,
      "decoder_positions": segment_positions(dec_seg)
  }


# ---- NSP -------------------------------------------------------------------------------------------------------------
class NextSentence:
  """BERT NSP + MLM: source = range(len(records)); example i starts in passage i (a passage belongs to a document).
    With probability 1/2 segment B is the text right after A (nsp_label 0), else it is taken from a passage of a
    different document (nsp_label 1). [CLS] A [SEP] B [SEP], token_type_ids 0 for A, 1 for B, then masked."""

  def __init__(self, records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, *, seq_len: int,
               max_predictions: int | None = None, mask_rate: float = 0.15, whole_word: bool = False):
    tokenizer.require("cls", "sep", "mask")
    self.specials = Specials.from_tokenizer(tokenizer)
    self.seq_len = seq_len
    self.max_predictions = max_predictions or default_max_predictions(seq_len, mask_rate)
    self.mask_rate, self.whole_word = mask_rate, whole_word
    recs = [records[i] for i in range(len(records))]
    flat = [s for r in recs for s in r["sentences"]]
    ids = tokenizer.encode_batch(flat) if flat else []
    self.sentences: list[list[np.ndarray]] = []
    k = 0
    for r in recs:
      n = len(r["sentences"])
      self.sentences.append([np.asarray(x, np.int32) for x in ids[k:k + n] if len(x)])
      k += n
    self.doc = np.array([r.get("document_id", i) for i, r in enumerate(recs)])
    if len(set(self.doc.tolist())) < 2:
      raise ValueError("NSP needs at least two documents to draw random segments from")
    self._random_ids = self.specials.normal_ids

  def __len__(self):
    return len(self.sentences)

  def __call__(self, index: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    index = int(index)
    sp, budget = self.specials, self.seq_len - 3
    is_random = bool(rng.random() < 0.5)
    sents = self.sentences[index] or [np.array([sp.sep], np.int32)]
    if len(sents) >= 2:
      start = int(rng.integers(0, len(sents) - 1))
      a_end = start + 1 + int(rng.integers(0, max(1, min(len(sents) - 1 - start, 3))))
      a = np.concatenate(sents[start:a_end])
      rest = np.concatenate(sents[a_end:]) if a_end < len(sents) else np.zeros(0, np.int32)
      if not len(rest):  # A took everything: give back its last sentence as the true B
        a, rest = np.concatenate(sents[start:a_end - 1]), sents[a_end - 1]
    else:  # one sentence: its two halves
      half = max(1, len(sents[0]) // 2)
      a, rest = sents[0][:half], sents[0][half:]
    if is_random:
      other = index
      while self.doc[other] == self.doc[index]:  # at least two documents exist, so this ends
        other = int(rng.integers(0, len(self.sentences)))
      osents = self.sentences[other] or [np.array([sp.sep], np.int32)]
      b = np.concatenate(osents[int(rng.integers(0, len(osents))):])
    else:
      b = rest
    a, b = truncate_pair(a, b, budget, rng, keep_join=True)
    tokens = np.concatenate([[sp.cls], a, [sp.sep], b, [sp.sep]]).astype(np.int32)
    n = len(tokens)
    tt = np.concatenate([np.zeros(len(a) + 2, np.int32), np.ones(len(b) + 1, np.int32)])
    out = mask_tokens(pad_to(tokens, self.seq_len, sp.pad), rng=rng, specials=sp, max_predictions=self.max_predictions,
                      mask_rate=self.mask_rate, whole_word=self.whole_word, random_ids=self._random_ids)
    seg = (np.arange(self.seq_len) < n).astype(np.int32)
    out.update(segment_ids=seg, positions=segment_positions(seg), token_type_ids=pad_to(tt, self.seq_len),
               nsp_labels=np.int32(is_random))
    return out


def truncate_pair(a: np.ndarray, b: np.ndarray, budget: int, rng: np.random.Generator | None = None, *,
                  keep_join: bool = False):
  """BERT's truncate_seq_pair in closed form: tokens come off the longer side until both fit (the shorter side is
    kept whole when it fits in half the budget); with an rng each dropped token is from the front or back at random.
    keep_join: cut a only at its front and b only at its back, so that where a ends b still begins (NSP)."""
  a, b = np.asarray(a, np.int32), np.asarray(b, np.int32)
  la, lb = len(a), len(b)
  if la + lb <= budget:
    return a, b
  if min(la, lb) <= budget // 2:
    na, nb = (la, budget - la) if la <= lb else (budget - lb, lb)
  else:  # both longer than half: the one-at-a-time loop ends with a at floor(budget/2), b at ceil
    na, nb = budget // 2, budget - budget // 2

  def cut(x, keep, front_share):
    drop = len(x) - keep
    front = int(rng.binomial(drop, 0.5)) if front_share is None and rng is not None and drop else \
        int(drop * (front_share or 0))
    return x[front:front + keep]

  return cut(a, na, 1 if keep_join else None), cut(b, nb, 0 if keep_join else None)
