"""Tokenizers for every model family we train: WordPiece (BERT), byte-level BPE (GPT-2), Unigram (T5) and characters
(nanoGPT's shakespeare_char: one id per distinct character), trained in seconds on a small corpus with the Rust
`tokenizers` library, or loaded from a Hugging Face `tokenizer.json`, a BERT `vocab.txt` or a SentencePiece `.model`.
One wrapper class, `Tokenizer`, gives the rest of the code what it needs: ids of the special tokens by role (pad, unk,
cls, sep, mask, bos, eos, T5 sentinels), encode/decode (with character offsets and word ids for QA and tagging), and a
per-id "starts a word" table for whole-word masking. `save(dir)` writes the tokenizer next to a checkpoint so the
checkpoint is usable without the training run."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tokenizers as hf
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

KINDS = ("wordpiece", "bpe", "unigram", "char")
ROLES = ("pad", "unk", "cls", "sep", "mask", "bos", "eos")
_META_FILE = "lmlab_tokenizer.json"
_HF_FILE = "tokenizer.json"

# Special tokens of each kind, by role. Kinds without a native [CLS]/[SEP] reuse bos/eos (RoBERTa's <s> ... </s>), so
# that every objective can run with every kind; T5's Unigram has no mask or cls token, as in the original.
_SPECIALS = {
    "wordpiece": {
        "pad": "[PAD]",
        "unk": "[UNK]",
        "cls": "[CLS]",
        "sep": "[SEP]",
        "mask": "[MASK]"
    },
    "bpe": {
        "pad": "<pad>",
        "bos": "<|endoftext|>",
        "eos": "<|endoftext|>",
        "cls": "<|endoftext|>",
        "sep": "<|endoftext|>",
        "mask": "<mask>",
        "unk": "<unk>"
    },
    "unigram": {
        "pad": "<pad>",
        "eos": "</s>",
        "unk": "<unk>",
        "sep": "</s>"
    },
    # Two ids beyond the characters: one end-of-text token that is also bos, pad and (as for bpe) cls/sep, and <unk>
    # for characters the training text did not have. No mask token: masked LM needs another kind.
    "char": {
        "pad": "<|endoftext|>",
        "bos": "<|endoftext|>",
        "eos": "<|endoftext|>",
        "cls": "<|endoftext|>",
        "sep": "<|endoftext|>",
        "unk": "<unk>"
    },
}
_SENTINEL = "<extra_id_{}>"


class Tokenizer:
  """A Hugging Face `tokenizers.Tokenizer` plus the roles of its special tokens.

    Attributes: `kind` ("wordpiece" | "bpe" | "unigram" | "char"), `backend` (the `tokenizers.Tokenizer`),
    `special_tokens` ({role: token string}), `sentinels` (T5 sentinel strings, `<extra_id_0>` first).
    """

  def __init__(self, backend: hf.Tokenizer, *, kind: str, special_tokens: dict[str, str],
               sentinels: Sequence[str] = ()):
    if kind not in KINDS:
      raise ValueError(f"tokenizer kind {kind!r} is not one of {KINDS}")
    # A tokenizer.json saved with padding or truncation (sentence-transformers checkpoints pad every text to 128)
    # would hand back padded ids; the example builders pad and truncate themselves, so both are turned off.
    backend.no_padding()
    backend.no_truncation()
    self.backend = backend
    self.kind = kind
    self.special_tokens = {r: t for r, t in special_tokens.items() if t is not None}
    self.sentinels = list(sentinels)
    for role, tok in self.special_tokens.items():
      if backend.token_to_id(tok) is None:
        raise ValueError(f"special token {tok!r} (role {role}) is not in the vocabulary")
    self._word_start = None

  # ---- ids ---------------------------------------------------------------------------------------------------
  @property
  def vocab_size(self) -> int:
    return self.backend.get_vocab_size(with_added_tokens=True)

  def _role_id(self, role: str) -> int | None:
    tok = self.special_tokens.get(role)
    return None if tok is None else self.backend.token_to_id(tok)

  pad_id = property(lambda self: self._role_id("pad"))
  unk_id = property(lambda self: self._role_id("unk"))
  cls_id = property(lambda self: self._role_id("cls"))
  sep_id = property(lambda self: self._role_id("sep"))
  mask_id = property(lambda self: self._role_id("mask"))
  bos_id = property(lambda self: self._role_id("bos"))
  eos_id = property(lambda self: self._role_id("eos"))

  @property
  def sentinel_ids(self) -> list[int]:
    """sentinel_ids[i] is the id of `<extra_id_i>`."""
    return [self.backend.token_to_id(s) for s in self.sentinels]

  @property
  def special_ids(self) -> np.ndarray:
    """Sorted int32 ids of every special token (roles, sentinels and any other added special token)."""
    ids = {self.backend.token_to_id(t) for t in self.special_tokens.values()}
    ids.update(self.sentinel_ids)
    for i, added in self.backend.get_added_tokens_decoder().items():
      if added.special:
        ids.add(i)
    return np.array(sorted(i for i in ids if i is not None), np.int32)

  def require(self, *roles: str) -> None:
    """Raises a ValueError naming the missing roles, e.g. MLM with a tokenizer that has no mask token."""
    missing = [r for r in roles if self._role_id(r) is None]
    if missing:
      raise ValueError(f"{self.kind} tokenizer has no special token for role(s) {missing}; it has "
                       f"{self.special_tokens}")

  def token_to_id(self, token: str) -> int | None:
    return self.backend.token_to_id(token)

  def id_to_token(self, i: int) -> str | None:
    return self.backend.id_to_token(int(i))

  def word_start_table(self) -> np.ndarray:
    """bool [vocab_size]: True where a token begins a new word (whole-word masking groups a start with the
        continuation tokens after it). Specials count as word starts."""
    if self._word_start is None:
      vocab = self.backend.get_vocab(with_added_tokens=True)
      table = np.ones(self.vocab_size, bool)
      for tok, i in vocab.items():
        if self.kind == "wordpiece":
          table[i] = not tok.startswith("##")
        elif self.kind == "bpe":
          table[i] = tok.startswith("\u0120")  # byte-level BPE marks a leading space with 'Ġ'
        elif self.kind == "char":
          table[i] = tok.isspace()  # as BPE's 'Ġword': a word is a whitespace character and the characters after it
        else:
          table[i] = tok.startswith("\u2581")  # Metaspace marks a leading space with '▁'
      table[self.special_ids] = True
      self._word_start = table
    return self._word_start

  # ---- text <-> ids ------------------------------------------------------------------------------------------
  def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
    return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
    return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """ids and (start, end) character offsets into `text` of each token (no special tokens added)."""
    enc = self.backend.encode(text, add_special_tokens=False)
    return enc.ids, enc.offsets

  def encode_words(self, words: Sequence[str]) -> tuple[list[int], list[int]]:
    """Pre-split words -> (ids, word index of each id). Used to align tag labels to sub-words."""
    if not words:
      return [], []
    enc = self.backend.encode(list(words), is_pretokenized=True, add_special_tokens=False)
    return enc.ids, [-1 if w is None else w for w in enc.word_ids]

  def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
    return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  # ---- persistence -------------------------------------------------------------------------------------------
  def save(self, directory: str | os.PathLike) -> Path:
    """Writes `tokenizer.json` (loadable by any HF tokenizers user) and `lmlab_tokenizer.json` (kind, roles), each
    to a temporary file renamed into place: a crash or a full disk never leaves a half-written tokenizer behind."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    meta = {"kind": self.kind, "special_tokens": self.special_tokens, "sentinels": self.sentinels}
    tmp = (d / f".{_HF_FILE}.tmp", d / f".{_META_FILE}.tmp")
    try:
      self.backend.save(str(tmp[0]))
      tmp[1].write_text(json.dumps(meta, indent=1, sort_keys=True))
      os.replace(tmp[0], d / _HF_FILE)
      os.replace(tmp[1], d / _META_FILE)  # last: a folder with both files is a whole tokenizer
    finally:
      for t in tmp:
        t.unlink(missing_ok=True)
    return d

  @classmethod
  def load(cls, path: str | os.PathLike, **kwargs) -> "Tokenizer":
    """Loads a directory written by `save`, or a directory / file holding `tokenizer.json`, `vocab.txt` or a
        SentencePiece `*.model`. kwargs go to the format-specific loader (e.g. lowercase= for vocab.txt). A file
        that is not such a tokenizer (damaged, or another kind of file) is a ValueError naming it, in one line."""
    p = Path(path)
    if p.is_dir():
      if (p / _META_FILE).exists() and (p / _HF_FILE).exists():
        with _reading(p / _META_FILE):
          meta = json.loads((p / _META_FILE).read_text(encoding="utf-8"))
          kind, special_tokens, sentinels = meta["kind"], meta["special_tokens"], meta.get("sentinels", ())
        with _reading(p / _HF_FILE):
          return cls(hf.Tokenizer.from_file(str(p / _HF_FILE)), kind=kind, special_tokens=special_tokens,
                     sentinels=sentinels)
      for name in (_HF_FILE, "vocab.txt"):
        if (p / name).exists():
          return cls.load(p / name, **kwargs)
      models_ = sorted(p.glob("*.model"))
      if models_:
        return cls.load(models_[0], **kwargs)
      raise FileNotFoundError(f"{p}: no {_HF_FILE}, vocab.txt or *.model in this directory")
    loader = {".json": from_tokenizer_json, ".txt": from_vocab_txt, ".model": from_sentencepiece}.get(p.suffix)
    if loader is None:
      raise ValueError(f"{p}: cannot tell the tokenizer format from the name (want .json, .txt or .model)")
    with _reading(p):
      return loader(p, **kwargs)

  def __repr__(self):
    return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, special_tokens={self.special_tokens})"


class TokenizerFileError(ValueError):
  """A tokenizer file this module read and found wrong; its message already names the file."""


@contextlib.contextmanager
def _reading(path: Path):
  """Whatever a tokenizer file's parser raises (the Rust library's bare Exception, a UnicodeDecodeError, a missing
  key, a protobuf error) -> one ValueError line naming the file."""
  try:
    yield
  except TokenizerFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    what = " ".join(str(e).split())[:200] or type(e).__name__
    raise TokenizerFileError(
        f"{path}: not a readable tokenizer file ({type(e).__name__}: {what}); give a "
        "tokenizer.json, a BERT vocab.txt or a SentencePiece .model (or a folder holding one)") from None


# ---- training ------------------------------------------------------------------------------------------------------
def _specials_in_order(kind: str, num_sentinels: int) -> tuple[list[str], list[str]]:
  seen = []
  for tok in _SPECIALS[kind].values():
    if tok not in seen:
      seen.append(tok)
  # pad first so that pad_id == 0 for every kind we train (the model and losses never need to be told otherwise).
  pad = _SPECIALS[kind]["pad"]
  seen.remove(pad)
  sentinels = [_SENTINEL.format(i) for i in range(num_sentinels)]
  return [pad] + seen, sentinels


def train_wordpiece(texts: Iterable[str], *, vocab_size: int = 8000, lowercase: bool = True,
                    min_frequency: int = 2) -> Tokenizer:
  """A BERT WordPiece tokenizer ([PAD]=0, [UNK], [CLS], [SEP], [MASK]) trained on `texts`."""
  specials, _ = _specials_in_order("wordpiece", 0)
  tok = hf.Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
  tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None, clean_text=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                      continuing_subword_prefix="##", show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  # The trainer numbers its initial alphabet in hash-map order, which changes from process to process; renumber
  # (specials first, then by string) so the same text always gives the same ids.
  vocab = tok.get_vocab()
  ordered = specials + sorted(t for t in vocab if t not in set(specials))
  tok.model = models.WordPiece(vocab={
      t: i for i, t in enumerate(ordered)
  }, unk_token="[UNK]", max_input_chars_per_word=100)
  _bert_post_processor(tok, "[CLS]", "[SEP]")
  return Tokenizer(tok, kind="wordpiece", special_tokens=_SPECIALS["wordpiece"])


def train_bpe(texts: Iterable[str], *, vocab_size: int = 8000, min_frequency: int = 2) -> Tokenizer:
  """A GPT-2 byte-level BPE tokenizer (<pad>=0, <|endoftext|> as bos/eos, <mask>, <unk>) trained on `texts`."""
  specials, _ = _specials_in_order("bpe", 0)
  tok = hf.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(texts, trainer=trainer)
  # Offsets in raw-text characters (not counting the Ġ marker) so QA spans map back onto the context.
  tok.post_processor = processors.ByteLevel(trim_offsets=True)
  return Tokenizer(tok, kind="bpe", special_tokens=_SPECIALS["bpe"])


def train_unigram(texts: Iterable[str], *, vocab_size: int = 8000, num_sentinels: int = 100,
                  byte_fallback: bool = True) -> Tokenizer:
  """A T5-style SentencePiece Unigram tokenizer (<pad>=0, </s>=1, <unk>=2, <extra_id_0..n-1>) trained on `texts`
    by the `sentencepiece` trainer (C++, seconds on a few MB; the Rust Unigram trainer is ~5x slower here), then
    converted to a `tokenizers` model so that offsets and word ids work as for the other kinds. With byte_fallback
    (default) characters unseen in training become byte tokens instead of <unk>, so any text round-trips."""
  import io
  import sentencepiece as spm
  sentinels = [_SENTINEL.format(i) for i in range(num_sentinels)]
  proto = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=proto, vocab_size=vocab_size,
                                 model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                 user_defined_symbols=sentinels, byte_fallback=byte_fallback,
                                 num_threads=os.cpu_count() or 1, minloglevel=2, max_sentence_length=1 << 20,
                                 hard_vocab_limit=False, train_extremely_large_corpus=False)
  return _from_spm_proto(proto.getvalue(), special_tokens=_SPECIALS["unigram"])


def _from_spm_proto(data: bytes, *, special_tokens: dict[str, str] | None) -> Tokenizer:
  """A serialized SentencePiece Unigram ModelProto -> our Tokenizer, tokenizing exactly as sentencepiece does for
    the nmt_nfkc normalizer (up to spm's trimming of leading/trailing spaces)."""
  from sentencepiece import sentencepiece_model_pb2 as pb
  m = pb.ModelProto()
  m.ParseFromString(data)
  unk_id = next(i for i, p in enumerate(m.pieces) if p.type == pb.ModelProto.SentencePiece.UNKNOWN)
  tok = hf.Tokenizer(
      models.Unigram([(p.piece, p.score) for p in m.pieces], unk_id=unk_id, byte_fallback=m.trainer_spec.byte_fallback))
  tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(hf.Regex(" {2,}"), " ")])
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
  tok.decoder = decoders.Sequence(
      [decoders.ByteFallback(),
       decoders.Metaspace(replacement="\u2581", prepend_scheme="always")])
  kinds = pb.ModelProto.SentencePiece
  tok.add_special_tokens([p.piece for p in m.pieces if p.type in (kinds.UNKNOWN, kinds.CONTROL, kinds.USER_DEFINED)])
  wrapped = _wrap_foreign(tok, special_tokens)
  if wrapped.eos_id is not None:
    eos = wrapped.special_tokens["eos"]
    tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}", pair=f"$A {eos} $B:1 {eos}:1",
                                                       special_tokens=[(eos, wrapped.eos_id)])
  return wrapped


_ANY_CHARACTER = r"[\s\S]"  # every character is its own pre-token: spaces, newlines and tabs included


def train_char(texts: Iterable[str], *, vocab_size: int = 8000) -> Tokenizer:
  """A character tokenizer as nanoGPT's shakespeare_char: <|endoftext|>=0 (pad, bos, eos, cls, sep), <unk>=1, then
    every distinct character of `texts` (Unicode code points, no normalization) in sorted order, so that the id of a
    character is 2 + its nanoGPT id. vocab_size caps the vocabulary: when the texts have more distinct characters
    than vocab_size - 2, the most frequent ones are kept (ties by character) and the others become <unk>.

    encode gives one id per character and decode concatenates, so any text made of known characters round-trips
    exactly (runs of spaces, newlines, tabs). As for every kind, the special tokens' own strings in a text encode to
    their ids."""
  import collections
  specials, _ = _specials_in_order("char", 0)
  counts = collections.Counter()
  for text in texts:
    counts.update(text)
  room = max(0, int(vocab_size) - len(specials))
  chars = list(counts)
  if len(chars) > room:
    chars = [c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:room]
  vocab = {t: i for i, t in enumerate(specials + sorted(chars))}
  tok = hf.Tokenizer(models.WordLevel(vocab, unk_token=_SPECIALS["char"]["unk"]))
  tok.pre_tokenizer = pre_tokenizers.Split(hf.Regex(_ANY_CHARACTER), behavior="isolated")
  tok.decoder = decoders.Fuse()
  tok.add_special_tokens(specials)
  return Tokenizer(tok, kind="char", special_tokens=_SPECIALS["char"])


def train_tokenizer(kind: str, texts: Iterable[str], *, vocab_size: int = 8000, **kwargs) -> Tokenizer:
  """Dispatches on kind: "wordpiece" (BERT, ELECTRA), "bpe" (GPT-2), "unigram" (T5), "char" (one id per character;
    vocab_size only caps it)."""
  fns = {"wordpiece": train_wordpiece, "bpe": train_bpe, "unigram": train_unigram, "char": train_char}
  if kind not in fns:
    raise ValueError(f"tokenizer kind {kind!r} is not one of {KINDS}")
  return fns[kind](texts, vocab_size=vocab_size, **kwargs)


def _bert_post_processor(tok: hf.Tokenizer, cls: str, sep: str) -> None:
  tok.post_processor = processors.TemplateProcessing(
      single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1", special_tokens=[(cls, tok.token_to_id(cls)),
                                                                                     (sep, tok.token_to_id(sep))])


# ---- loading other formats -----------------------------------------------------------------------------------------
def from_vocab_txt(path: str | os.PathLike, *, lowercase: bool | None = None) -> Tokenizer:
  """A BERT `vocab.txt` (one token per line). Lowercasing is inferred from the vocab when not given: a vocab with
    no upper-case word is an uncased one."""
  path = Path(path)
  vocab = path.read_text(encoding="utf-8").splitlines()
  spaced = next((i for i, t in enumerate(vocab, 1) if " " in t), None)  # WordPiece splits at spaces first
  if spaced is not None or "[UNK]" not in vocab:
    why = f"line {spaced} is not one token: {vocab[spaced - 1][:40]!r}" if spaced else "it has no [UNK] token"
    raise TokenizerFileError(f"{path}: not a BERT vocab.txt ({why}); a vocab.txt holds one token per line, [UNK] "
                             "among them")
  if lowercase is None:
    lowercase = not any("A" <= t[:1] <= "Z" for t in vocab)
  tok = hf.Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=None, clean_text=True)
  tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tok.decoder = decoders.WordPiece(prefix="##")
  present = [t for t in _SPECIALS["wordpiece"].values() if t in vocab]
  tok.add_special_tokens(present)
  if "[CLS]" in present and "[SEP]" in present:  # a vocab without them encodes text without the BERT frame
    _bert_post_processor(tok, "[CLS]", "[SEP]")
  roles = {r: t for r, t in _SPECIALS["wordpiece"].items() if t in present}
  return Tokenizer(tok, kind="wordpiece", special_tokens=roles)


# Names the common model families give their special tokens; the first one present in the vocab wins.
_ROLE_GUESSES = {
    "pad": ["[PAD]", "<pad>", "<|pad|>", "<|endoftext|>"],
    "unk": ["[UNK]", "<unk>", "<|unk|>"],
    "cls": ["[CLS]", "<s>", "<|endoftext|>"],
    "sep": ["[SEP]", "</s>", "<|endoftext|>"],
    "mask": ["[MASK]", "<mask>"],
    "bos": ["<s>", "<|begin_of_text|>", "<|endoftext|>", "<|im_start|>"],
    "eos": ["</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"],
}


def _guess_kind(backend: hf.Tokenizer) -> str:
  model_type = json.loads(backend.to_str())["model"]["type"]
  if model_type == "WordLevel" and _is_char_level(backend):
    return "char"
  return {"WordPiece": "wordpiece", "BPE": "bpe", "Unigram": "unigram"}.get(model_type, "bpe")


def _is_char_level(backend: hf.Tokenizer) -> bool:
  """A word-level vocabulary whose every entry but the special tokens is one character: a character tokenizer
    (ours, saved as a bare tokenizer.json, or another program's)."""
  specials = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
  regular = [t for t in backend.get_vocab(with_added_tokens=False) if t not in specials]
  return bool(regular) and all(len(t) == 1 for t in regular)


def from_tokenizer_json(path: str | os.PathLike, *, special_tokens: dict[str, str] | None = None) -> Tokenizer:
  """A Hugging Face `tokenizer.json`. Roles are guessed from common names unless `special_tokens` gives them."""
  backend = hf.Tokenizer.from_file(str(path))
  return _wrap_foreign(backend, special_tokens)


def from_sentencepiece(path: str | os.PathLike, *, special_tokens: dict[str, str] | None = None) -> Tokenizer:
  """A SentencePiece Unigram `.model` (e.g. T5's spiece.model), converted to a `tokenizers` Unigram model."""
  return _from_spm_proto(Path(path).read_bytes(), special_tokens=special_tokens)


def _wrap_foreign(backend: hf.Tokenizer, special_tokens: dict[str, str] | None) -> Tokenizer:
  vocab = backend.get_vocab(with_added_tokens=True)
  kind = _guess_kind(backend)
  roles = dict(special_tokens or {})
  for role, names in _ROLE_GUESSES.items():
    if role not in roles:
      roles[role] = next((n for n in names if n in vocab), None)
  sentinels = []
  while _SENTINEL.format(len(sentinels)) in vocab:
    sentinels.append(_SENTINEL.format(len(sentinels)))
  return Tokenizer(backend, kind=kind, special_tokens=roles, sentinels=sentinels)
