"""Plain-Python parsers for the local file formats we build datasets from: text corpora, TSV/CSV/JSONL tables
(classification, sentence pairs, seq2seq), CoNLL tagging and SQuAD-format QA. They validate as they go and raise
`DataError("file:line: problem")` on the first bad record (invalid UTF-8, empty file, wrong column count, label outside
the label set, answer not in its context), or with `on_error="skip"` drop bad records and log how many. The TFDS builders
run them to completion before any TensorFlow code runs, so a bad file never fails deep inside TFDS. Each yields plain
dict records whose keys are the features of the matching builder."""
from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

from absl import logging

from train.data.errors import DataError

PathLike = str | os.PathLike


class Problems:
  """Raises the first problem (on_error="raise") or counts them (on_error="skip") and logs the count once."""

  def __init__(self, on_error: str, what: str, *, quiet: bool = False):
    if on_error not in ("raise", "skip"):
      raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
    self.skip = on_error == "skip"
    self.what = what
    self.quiet = quiet
    self.count = 0
    self.first: DataError | None = None

  def __call__(self, path: PathLike, line: int | None, problem: str) -> None:
    err = DataError(path, line, problem)
    if not self.skip:
      raise err
    self.count += 1
    self.first = self.first or err

  def report(self) -> None:
    if self.count and not self.quiet:
      logging.warning("%s: skipped %d bad record(s); the first: %s", self.what, self.count, self.first)


def decode_utf8(data: bytes, path: PathLike) -> str:
  """Strict UTF-8 decoding whose error names the line and column of the first bad byte."""
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise DataError(path, line, f"invalid UTF-8 (byte 0x{data[e.start]:02x} at column {col}); re-encode the "
                    "file as UTF-8") from None


def decoded_lines(path: PathLike, problems: Problems) -> Iterator[tuple[int, str]]:
  """(1-based line number, line without its newline) of a UTF-8 file. An empty file is a problem; so is a line
    that is not UTF-8 (skippable line by line)."""
  data = Path(path).read_bytes()
  if not data.strip():
    problems(path, 1, "file is empty")
    return
  if data.startswith(b"\xef\xbb\xbf"):
    data = data[3:]  # a BOM is not text
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    if not problems.skip:
      decode_utf8(data, path)  # raises with line and column
    for i, raw in enumerate(data.split(b"\n"), 1):
      try:
        yield i, raw.decode("utf-8").rstrip("\r")
      except UnicodeDecodeError:
        problems(path, i, "invalid UTF-8")
    return
  for i, line in enumerate(text.split("\n"), 1):
    yield i, line.rstrip("\r")


def expand_paths(paths: PathLike | Sequence[PathLike], pattern: str = "*") -> list[Path]:
  """Files, or the files matching `pattern` in folders (sorted, so builds are deterministic)."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for p in paths:
    if hasattr(p, "rows"):  # a table that is not a file (builders.CatalogSplit: a TFDS split)
      out.append(p)
      continue
    p = Path(p)
    if p.is_dir():
      found = sorted(f for f in p.rglob(pattern) if f.is_file())
      if not found:
        raise DataError(p, None, f"folder has no files matching {pattern!r}")
      out.extend(found)
    elif p.is_file():
      out.append(p)
    else:
      raise DataError(p, None, "no such file or folder")
  return out


# ---- plain text ------------------------------------------------------------------------------------------------------
# A sentence ends at . ! or ? (optionally followed by a closing quote or bracket) before whitespace and an upper-case
# letter, digit or opening quote. Good enough to pair sentences for NSP; not a linguistic tool.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'“‘(\[A-Z0-9])|(?<=[.!?][\"'”’)\]])\s+(?=[\"'“‘(\[A-Z0-9])")

_ABBREVIATION = re.compile(r"(?:\b(?:Mr|Mrs|Ms|Dr|St|Mme|Mlle|Prof|Capt|Col|Gen|Sr|Jr|vs|etc|e\.g|i\.e)|\b[A-Z])\.$")


def split_sentences(paragraph: str) -> list[str]:
  out = []
  for piece in (x.strip() for x in _SENTENCE_END.split(paragraph)):
    if not piece:
      continue
    if out and _ABBREVIATION.search(out[-1]):  # "Mr. Darcy" is one sentence
      out[-1] = f"{out[-1]} {piece}"
    else:
      out.append(piece)
  return out


def _paragraphs(lines: list[str]) -> list[str]:
  paras, cur = [], []
  for line in lines:
    if line.strip():
      cur.append(line.strip())
    elif cur:
      paras.append(" ".join(cur))
      cur = []
  if cur:
    paras.append(" ".join(cur))
  return paras


def pack_pieces(pieces: Iterable[str], *, max_chars: int) -> Iterator[list[str]]:
  """Consecutive pieces grouped into lists of at most ~max_chars characters (a longer piece stands alone)."""
  cur, size = [], 0
  for piece in pieces:
    if cur and size + len(piece) + 1 > max_chars:
      yield cur
      cur, size = [], 0
    cur.append(piece)
    size += len(piece) + 1
  if cur:
    yield cur


def passages(paragraphs: Sequence[str], *, max_chars: int) -> Iterator[list[str]]:
  """Groups consecutive paragraphs' sentences into passages of at most ~max_chars characters (a longer sentence
    stands alone). Passages keep sentence order so NSP can take a true next segment from within one."""
  return pack_pieces((sent for para in paragraphs for sent in split_sentences(para)), max_chars=max_chars)


DOCUMENT_SPLITS = ("file", "blank_line", "line", "verbatim")


def text_records(paths: PathLike | Sequence[PathLike], *, document_split: str = "file", max_chars: int = 4000,
                 pattern: str = "*.txt", on_error: str = "raise", quiet: bool = False) -> Iterator[dict]:
  """Text files -> passage records {"text", "sentences", "document_id", "passage_index"}.

    document_split: "file" (each file is a document: books), "blank_line" (each blank-line separated block),
    "line" (each non-empty line), "verbatim" (each file is one record whose text is the file as it is, newlines and
    spaces kept: character-level language modelling). NSP draws its "random" segment from a different document_id.
    """
  if document_split not in DOCUMENT_SPLITS:
    raise ValueError(f"document_split must be one of {', '.join(map(repr, DOCUMENT_SPLITS))}, not {document_split!r}")
  problems = Problems(on_error, "text corpus", quiet=quiet)
  doc_id = 0
  for path in expand_paths(paths, pattern):
    lines = [line for _, line in decoded_lines(path, problems)]
    if lines and not any(ch.isprintable() and not ch.isspace() for line in lines for ch in line):
      # A binary or control-character file decodes as UTF-8 and would train a tokenizer on nothing readable.
      problems(path, None, "holds no text, only control characters and whitespace; give a UTF-8 text file")
      continue
    if document_split == "verbatim":
      if any(line.strip() for line in lines):
        text = "\n".join(lines)
        yield {"text": text, "sentences": [text], "document_id": doc_id, "passage_index": 0}
        doc_id += 1
      continue
    if document_split == "file":
      docs = [_paragraphs(lines)]
    elif document_split == "blank_line":
      docs = [[p] for p in _paragraphs(lines)]
    else:
      docs = [[line.strip()] for line in lines if line.strip()]
    for paras in docs:
      emitted = False
      for k, sents in enumerate(passages(paras, max_chars=max_chars)):
        yield {"text": " ".join(sents), "sentences": sents, "document_id": doc_id, "passage_index": k}
        emitted = True
      doc_id += emitted
  problems.report()


# ---- tables (TSV / CSV / JSONL) --------------------------------------------------------------------------------------
def table_rows(path: PathLike, problems: Problems, *, columns: Sequence[str]) -> Iterator[tuple[int, dict]]:
  """(line, {column: value}) of a .tsv (tab-separated, no quoting, header row), .csv (header row) or .jsonl file,
    checking that each named column exists and each row has the header's number of fields. A table that is not a
    file (builders.CatalogSplit) gives its own rows."""
  if hasattr(path, "rows"):
    yield from path.rows(columns, problems)
    return
  path = Path(path)
  fmt = path.suffix.lower().lstrip(".")
  if fmt not in ("tsv", "csv", "jsonl", "json"):
    raise DataError(path, None, "unknown table format; use a .tsv, .csv or .jsonl file")
  lines = list(decoded_lines(path, problems))
  if fmt in ("jsonl", "json"):
    for i, line in lines:
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        problems(path, i, f"invalid JSON ({e.msg} at column {e.colno})")
        continue
      missing = [c for c in columns if not isinstance(row, dict) or c not in row]
      if missing:
        problems(path, i, f"record has no field(s) {missing}")
        continue
      yield i, {c: row[c] for c in columns}
    return
  content = [(i, line) for i, line in lines if line.strip()]
  if not content:
    return
  # GLUE TSVs contain unbalanced quotes, so TSV is read without quoting; CSV uses normal quoting rules.
  reader_kw = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if fmt == "tsv" else {}
  (hline, header_line), body = content[0], content[1:]
  try:
    header = next(csv.reader([header_line], **reader_kw))
  except csv.Error as e:
    raise DataError(path, hline, f"unreadable header ({e})") from None
  missing = [c for c in columns if c not in header]
  if missing:
    raise DataError(path, hline, f"header has no column(s) {missing}; it has {header}")
  idx = [header.index(c) for c in columns]
  sep = "tab-separated" if fmt == "tsv" else "comma-separated"
  for i, line in body:
    try:
      fields = next(csv.reader([line], **reader_kw))
    except csv.Error as e:  # e.g. a carriage return inside a field
      problems(path, i, f"unreadable row ({e})")
      continue
    if len(fields) != len(header):
      problems(path, i, f"expected {len(header)} {sep} fields (as in the header), found {len(fields)}")
      continue
    yield i, {c: fields[j] for c, j in zip(columns, idx)}


def infer_labels(paths: PathLike | Sequence[PathLike], *, label_column: str, on_error: str = "raise") -> list[str]:
  """The sorted set of label strings found in the files (used when no label set is given)."""
  labels = set()
  problems = Problems(on_error, "label inference", quiet=True)
  for path in expand_paths(paths):
    for _, row in table_rows(path, problems, columns=[label_column]):
      labels.add(str(row[label_column]).strip())
  return sorted(labels)


def classification_records(paths: PathLike | Sequence[PathLike], *, text_columns: Sequence[str] = ("sentence",),
                           label_column: str = "label", label_names: Sequence[str], on_error: str = "raise",
                           quiet: bool = False) -> Iterator[dict]:
  """Rows -> {"text_a", "text_b" ("" for single sentences), "label" (a string in label_names), "idx"}."""
  if not 1 <= len(text_columns) <= 2:
    raise ValueError(f"text_columns must name one or two columns, not {text_columns}")
  problems = Problems(on_error, "classification data", quiet=quiet)
  names = set(label_names)
  idx = 0
  for path in expand_paths(paths):
    for line, row in table_rows(path, problems, columns=[*text_columns, label_column]):
      label = str(row[label_column]).strip()
      if label not in names:
        problems(path, line, f"label {label!r} is not in the label set {list(label_names)}")
        continue
      texts = [str(row[c]) for c in text_columns]
      yield {"text_a": texts[0], "text_b": texts[1] if len(texts) > 1 else "", "label": label, "idx": idx}
      idx += 1
  problems.report()


def seq2seq_records(paths: PathLike | Sequence[PathLike], *, source_column: str = "source",
                    target_column: str = "target", on_error: str = "raise", quiet: bool = False) -> Iterator[dict]:
  """Rows -> {"source", "target", "idx"}; an empty source or target is a bad record."""
  problems = Problems(on_error, "seq2seq data", quiet=quiet)
  idx = 0
  for path in expand_paths(paths):
    for line, row in table_rows(path, problems, columns=[source_column, target_column]):
      src, tgt = str(row[source_column]), str(row[target_column])
      if not src.strip() or not tgt.strip():
        problems(path, line, f"empty {source_column if not src.strip() else target_column!r}")
        continue
      yield {"source": src, "target": tgt, "idx": idx}
      idx += 1
  problems.report()


# ---- CoNLL -----------------------------------------------------------------------------------------------------------
def conll_records(paths: PathLike | Sequence[PathLike], *, token_column: int = 0, tag_column: int = -1,
                  num_columns: int | None = 2, tag_names: Sequence[str] | None = None, on_error: str = "raise",
                  quiet: bool = False, token_feature: str = "tokens", tag_feature: str = "ner_tags") -> Iterator[dict]:
  """CoNLL files (one token per line, whitespace- or tab-separated columns, blank line between sentences,
    -DOCSTART- lines ignored) -> {"tokens", "tags", "idx"}. num_columns=None takes the first line's count. A table
    that is not a file (a TFDS split) gives one sentence per row, its token and tag sequences in token_feature and
    tag_feature."""
  problems = Problems(on_error, "CoNLL data", quiet=quiet)
  names = None if tag_names is None else set(tag_names)
  idx = 0
  for path in expand_paths(paths):
    if hasattr(path, "rows"):
      for rec in _sequence_rows(path, problems, token_feature, tag_feature, names):
        yield {**rec, "idx": idx}
        idx += 1
      continue
    expected = num_columns
    tokens, tags, bad = [], [], False
    for line, text in [*decoded_lines(path, problems), (-1, "")]:
      if not text.strip():
        if tokens and not bad:
          yield {"tokens": tokens, "tags": tags, "idx": idx}
          idx += 1
        tokens, tags, bad = [], [], False
        continue
      if text.startswith("-DOCSTART-"):
        continue
      cols = text.split("\t") if "\t" in text else text.split()
      expected = expected or len(cols)
      if len(cols) != expected:
        problems(path, line, f"expected {expected} columns (token and tag), found {len(cols)}")
        bad = True  # the whole sentence is dropped when skipping
        continue
      tag = cols[tag_column].strip()
      if names is not None and tag not in names:
        problems(path, line, f"tag {tag!r} is not in the tag set {sorted(names)}")
        bad = True
        continue
      tokens.append(cols[token_column].strip())
      tags.append(tag)
  problems.report()


def _sequence_rows(table, problems, token_feature: str, tag_feature: str, names) -> Iterator[dict]:
  for line, row in table.rows([token_feature, tag_feature], problems):
    tokens, tags = [str(t) for t in row[token_feature]], [str(t) for t in row[tag_feature]]
    if len(tokens) != len(tags):
      problems(table, line, f"{len(tokens)} tokens but {len(tags)} tags")
    elif names is not None and set(tags) - names:
      problems(table, line, f"tag(s) {sorted(set(tags) - names)} not in the tag set {sorted(names)}")
    elif tokens:
      yield {"tokens": tokens, "tags": tags}


def infer_tags(paths: PathLike | Sequence[PathLike], *, on_error: str = "raise", **kwargs) -> list[str]:
  """The sorted tag set of CoNLL files ("O" first when present, as tag 0)."""
  tags = set()
  for rec in conll_records(paths, on_error=on_error, quiet=True, **kwargs):
    tags.update(rec["tags"])
  return sorted(tags, key=lambda t: (t != "O", t))


# ---- SQuAD -----------------------------------------------------------------------------------------------------------
def squad_records(paths: PathLike | Sequence[PathLike], *, on_error: str = "raise",
                  quiet: bool = False) -> Iterator[dict]:
  """SQuAD v1.1/v2 JSON -> one record per question: {"id", "title", "context", "question", "answer_text",
    "answer_start" (-1 when unanswerable), "answers_text", "answers_start"}. Each answer must occur in its context at
    answer_start."""
  problems = Problems(on_error, "QA data", quiet=quiet)
  for path in expand_paths(paths, "*.json"):
    if hasattr(path, "rows"):  # a TFDS split with SQuAD's features (squad, xquad/en, ...)
      columns = ["id", "title", "context", "question", "answers/text", "answers/answer_start"]
      for line, row in path.rows(columns, problems):
        answers = [{"text": t, "answer_start": a} for t, a in zip(row["answers/text"], row["answers/answer_start"])]
        qa = {"id": row["id"], "question": row["question"], "answers": answers}
        rec, bad = _qa_record(qa, str(row["title"]), row["context"])
        if bad:
          problems(path, line, bad)
        elif rec:
          yield rec
      continue
    data = Path(path).read_bytes()
    if not data.strip():
      problems(path, 1, "file is empty")
      continue
    raw = decode_utf8(data, path)
    try:
      doc = json.loads(raw)
    except json.JSONDecodeError as e:
      problems(path, e.lineno, f"invalid JSON ({e.msg} at column {e.colno})")
      continue
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
      problems(path, 1, 'not SQuAD format: no top-level "data" list')
      continue

    def line_of(qid, _raw=raw):
      # json.load keeps no positions; the question id is unique, so its first occurrence gives the line.
      pos = _raw.find(json.dumps(str(qid)))
      return _raw.count("\n", 0, pos) + 1 if pos >= 0 else None

    for article in doc["data"]:
      title = str(article.get("title", ""))
      for para in article.get("paragraphs", []):
        for qa in para.get("qas", []):
          rec, bad = _qa_record(qa, title, para.get("context", ""))
          if bad:
            problems(path, line_of(qa.get("id", "")), bad)
          else:
            yield rec
  problems.report()


def _qa_record(qa: Mapping, title: str, context: str) -> tuple[dict | None, str | None]:
  """(record, None) for a well-formed question, or (None, what is wrong with it)."""
  qid = str(qa.get("id", ""))
  answers = qa.get("answers", [])
  if not answers and not qa.get("is_impossible", False):
    return None, f"question {qid!r} has no answers"
  for a in answers:
    start, text = a.get("answer_start", -1), a.get("text", "")
    if not isinstance(start, int) or context[start:start + len(text)] != text:
      found = context.find(text) if text else -1
      hint = f" (it occurs at {found})" if found >= 0 else " (it does not occur there at all)"
      return None, f"question {qid!r}: answer {text!r} is not in its context at {start}{hint}"
  return {
      "id": qid,
      "title": title,
      "context": context,
      "question": qa.get("question", ""),
      "answer_text": answers[0]["text"] if answers else "",
      "answer_start": answers[0]["answer_start"] if answers else -1,
      "answers_text": [a["text"] for a in answers],
      "answers_start": [a["answer_start"] for a in answers]
  }, None
