"""An embedded default corpus that needs no files and no network, so `make demo` and the colabs run anywhere: real
English text from the docstrings of the running Python's standard library (read with `ast`, nothing imported, nothing
copied into this repository), a code corpus from the same modules' source, and labeled tasks derived from the
docstrings — which top-level package a docstring comes from (classification), whether a summary line belongs to a
docstring body (sentence pairs), and a docstring's summary line from its body (seq2seq). Records have the same keys as
the matching TFDS builders' (see readers.py), so every example transform works on both. Deterministic for a given
Python version: files are walked in sorted order and splits are chosen by a hash of each item's name. Parsing takes a
few seconds; the result is cached in memory per process."""
from __future__ import annotations

import ast
import functools
import sysconfig
import zlib
from pathlib import Path

import numpy as np

from train.data.readers import pack_pieces, passages

# Tests, demos and tools of the stdlib repeat other modules' text or are not documentation.
_SKIP = {
    "site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo", "ensurepip",
    "pydoc_data", "__pycache__", "__phello__"
}
NUM_PACKAGES = 8  # classes of the package-classification task: the packages with the most docstrings


@functools.lru_cache(maxsize=1)
def _modules() -> tuple[tuple[str, str, tuple[tuple[str, str], ...]], ...]:
  """((module name, source, ((qualified name, docstring), ...)), ...) for every stdlib .py file, sorted by path."""
  root = Path(sysconfig.get_paths()["stdlib"])
  out = []
  for path in sorted(root.rglob("*.py")):
    rel = path.relative_to(root)
    if _SKIP.intersection(rel.parts) or rel.name.startswith("test_"):
      continue
    try:
      source = path.read_text(encoding="utf-8")
      tree = ast.parse(source)
    except (UnicodeDecodeError, SyntaxError, ValueError):
      continue  # a few files are deliberately not valid Python or UTF-8
    module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
    docs = []
    stack = [(tree, module)]
    while stack:  # depth-first in source order, so qualified names read naturally
      node, qual = stack.pop()
      doc = ast.get_docstring(node, clean=True)
      if doc:
        docs.append((qual, doc))
      children = [
          c for c in ast.iter_child_nodes(node) if isinstance(c, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
      ]
      stack.extend((c, f"{qual}.{c.name}") for c in reversed(children))
    out.append((module, source, tuple(docs)))
  return tuple(out)


def _split_of(name: str, validation_percent: int) -> str:
  return "validation" if zlib.crc32(name.encode()) % 100 < validation_percent else "train"


def _paragraphs(doc: str) -> list[str]:
  return [" ".join(p.split()) for p in doc.split("\n\n") if p.strip()]


def corpus(kind: str = "docs", *, max_chars: int = 2000, validation_percent: int = 5) -> dict[str, list[dict]]:
  """{"train", "validation"} -> passage records {"text", "sentences", "document_id", "passage_index"}.

    kind "docs": each module is a document, its docstrings in order are its paragraphs (about 1.5 MB of text on
    CPython 3.11). kind "code": each module's source, in passages of whole lines (about 10 MB)."""
  if kind not in ("docs", "code"):
    raise ValueError(f"embedded corpus kind must be 'docs' or 'code', not {kind!r}")
  splits: dict[str, list[dict]] = {"train": [], "validation": []}
  for doc_id, (module, source, docs) in enumerate(_modules()):
    split = splits[_split_of(module, validation_percent)]
    if kind == "docs":
      paras = [p for _, d in docs for p in _paragraphs(d)]
      chunks = passages(paras, max_chars=max_chars)
    else:
      chunks = _code_chunks(source, max_chars)
    for k, sents in enumerate(chunks):
      split.append({
          "text": (" " if kind == "docs" else "\n").join(sents),
          "sentences": sents,
          "document_id": doc_id,
          "passage_index": k
      })
  return splits


def _code_chunks(source: str, max_chars: int):
  return pack_pieces(source.splitlines(), max_chars=max_chars)


def texts(kind: str = "docs") -> list[str]:
  """All passages' text (train and validation), e.g. to train a tokenizer."""
  c = corpus(kind)
  return [r["text"] for split in ("train", "validation") for r in c[split]]


def _docstrings():
  for module, _, docs in _modules():
    for qual, doc in docs:
      yield module.split(".")[0], qual, doc


def _summary_and_body(doc: str) -> tuple[str, str] | None:
  paras = doc.split("\n\n", 1)
  summary = " ".join(paras[0].split())
  body = " ".join(paras[1].split()) if len(paras) > 1 else ""
  if "\n" in paras[0].strip() or not summary.endswith(".") or len(body.split()) < 12 or len(summary) < 12:
    return None
  return summary, body


def task(name: str, *, validation_percent: int = 10, max_chars: int = 1500) -> dict[str, list[dict]]:
  """{"train", "validation"} -> records of a task derived from the docstrings:

    "package": {"text_a", "text_b": "", "label"} — which of the NUM_PACKAGES top-level packages with the most
      docstrings (e.g. email, asyncio, tkinter) a docstring comes from; labels are package names (see `labels`).
    "summary_match": {"text_a": summary line, "text_b": body, "label": "match" | "mismatch"} — half the pairs take
      the summary of another docstring (chosen by a fixed rng).
    "summary": {"source": body, "target": summary line} — seq2seq.
    """
  splits: dict[str, list[dict]] = {"train": [], "validation": []}
  if name == "package":
    names = labels("package")
    for pkg, qual, doc in _docstrings():
      if pkg in names and len(doc) >= 40:
        splits[_split_of(qual, validation_percent)].append({
            "text_a": " ".join(doc.split())[:max_chars],
            "text_b": "",
            "label": pkg
        })
  elif name in ("summary", "summary_match"):
    pairs = [(qual, *sb) for _, qual, doc in _docstrings() if (sb := _summary_and_body(doc))]
    rng = np.random.default_rng(0)
    for i, (qual, summary, body) in enumerate(pairs):
      rec = {"source": body[:max_chars], "target": summary}
      if name == "summary_match":
        label = "match"
        if rng.random() < 0.5:
          j = (i + 1 + int(rng.integers(0, len(pairs) - 1))) % len(pairs)  # any other docstring
          summary, label = pairs[j][1], "mismatch"
        rec = {"text_a": summary, "text_b": body[:max_chars], "label": label}
      splits[_split_of(qual, validation_percent)].append(rec)
  else:
    raise ValueError(f"embedded task must be 'package', 'summary_match' or 'summary', not {name!r}")
  for split in splits.values():
    for i, rec in enumerate(split):
      rec["idx"] = i
  return splits


def labels(name: str) -> list[str]:
  """Label names of a classification task, in id order."""
  if name == "package":
    packages = {m.split(".")[0] for m, _, _ in _modules() if "." in m}  # folders, not single-file modules
    counts: dict[str, int] = {}
    for pkg, _, doc in _docstrings():
      if pkg in packages and len(doc) >= 40:
        counts[pkg] = counts.get(pkg, 0) + 1
    top = sorted(counts, key=lambda p: (-counts[p], p))[:NUM_PACKAGES]
    return sorted(top)
  if name == "summary_match":
    return ["match", "mismatch"]
  raise ValueError(f"embedded task {name!r} has no labels")
