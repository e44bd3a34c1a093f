"""The embedded stdlib corpus: no files needed, deterministic, at least 1 MB of text, splits by module without
overlap, and the derived tasks carry labels from their label sets."""
import hashlib
import json

from train.data import embedded


def _digest(obj):
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def test_corpus_is_large_deterministic_and_split_by_module():
  first = embedded.corpus("docs")
  embedded._modules.cache_clear()  # parse the stdlib again from scratch
  second = embedded.corpus("docs")
  assert _digest(first) == _digest(second)
  size = sum(len(r["text"]) for split in first.values() for r in split)
  assert size >= 1_000_000
  docs = {split: {r["document_id"] for r in recs} for split, recs in first.items()}
  assert docs["train"] and docs["validation"] and not docs["train"] & docs["validation"]
  assert all(r["sentences"] and r["text"].startswith(r["sentences"][0]) for r in first["train"][:200])


def test_code_corpus_is_source_text():
  code = embedded.corpus("code")
  text = "\n".join(r["text"] for r in code["train"][:500])
  assert "def " in text and "import " in text


def test_tasks_have_labels_in_their_label_sets():
  names = embedded.labels("package")
  assert len(names) == embedded.NUM_PACKAGES
  pkg = embedded.task("package")
  assert len(pkg["train"]) > 500 and len(pkg["validation"]) > 20
  assert {r["label"] for r in pkg["train"]} == set(names)
  match = embedded.task("summary_match")
  frac = sum(r["label"] == "match" for r in match["train"]) / len(match["train"])
  assert 0.4 < frac < 0.6
  summ = embedded.task("summary")
  assert all(r["target"].endswith(".") and r["source"] for r in summ["train"])
  # Matching pairs are the summary of their own body.
  pairs = {(r["target"], r["source"]) for split in summ.values() for r in split}
  assert all((r["text_a"], r["text_b"]) in pairs for r in match["train"] if r["label"] == "match")
  assert sum((r["text_a"], r["text_b"]) in pairs for r in match["train"] if r["label"] == "mismatch") < 10
