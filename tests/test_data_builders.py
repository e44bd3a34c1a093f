"""TFDS builders for local files: each format builds offline into tmp_path and reads back by random access; bad
input gives one DataError line naming file, line and problem before TFDS writes anything (or is skipped and counted);
an end-to-end pipeline from built files through the loader is deterministic."""
import json
import logging
from pathlib import Path

import numpy as np
import pytest

from train.data import builders as B
from train.data import examples as E
from train.data import tokenizers as T
from train.data.errors import DataError
from train.data.loader import Loader

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _write(path, text, mode="w"):
  path.parent.mkdir(parents=True, exist_ok=True)
  if mode == "wb":
    path.write_bytes(text)
  else:
    path.write_text(text, encoding="utf-8")
  return path


def _all(source):
  return [source[i] for i in range(len(source))]


def test_text_corpus_keeps_documents_passages_and_sentences(tmp_path):
  a = _write(tmp_path / "books" / "a.txt", "One fish. Two fish!\n\nRed fish? Blue fish.\n")
  _write(tmp_path / "books" / "b.txt", "Mr. Smith went home. He slept.\n")
  _write(tmp_path / "books" / "notes.md", "not text corpus\n")
  src = B.build("text", name="books", data_dir=tmp_path / "tfds", splits={"train": tmp_path / "books"}, max_chars=22)
  recs = sorted(_all(src["train"]), key=lambda r: (r["document_id"], r["passage_index"]))
  assert [r["sentences"] for r in recs] == [["One fish.", "Two fish!"], ["Red fish?", "Blue fish."],
                                            ["Mr. Smith went home."], ["He slept."]]
  assert [r["document_id"] for r in recs] == [0, 0, 1, 1]
  assert [r["passage_index"] for r in recs] == [0, 1, 0, 1]
  assert any(".array_record" in p.name for p in (tmp_path / "tfds").rglob("*"))
  # A changed file is noticed and the dataset rebuilt.
  _write(a, "Only one sentence here.\n")
  src = B.build("text", name="books", data_dir=tmp_path / "tfds", splits={"train": tmp_path / "books"})
  assert sorted(r["text"] for r in _all(src["train"])) == ["Mr. Smith went home. He slept.", "Only one sentence here."]


def test_verbatim_text_keeps_every_character_and_splits_by_position(tmp_path):
  import ml_collections
  from train.data import pipeline
  text = "First Citizen:\nBefore we proceed,  hear me.\n\nAll:\n  Speak, speak.\n"
  path = _write(tmp_path / "input.txt", text)
  src = B.build("text", name="chars", data_dir=tmp_path / "tfds", splits={"train": path}, document_split="verbatim")
  assert [r["text"] for r in _all(src["train"])] == [text]  # newlines and runs of spaces kept
  data = ml_collections.ConfigDict(
      dict(source="files", path=str(path), name="chars", document_split="verbatim", eval_fraction=0.25))
  split = pipeline._records(data, str(tmp_path))
  n = int(len(text) * 0.75)
  assert [r["text"] for r in split["train"]] == [text[:n]]
  assert [r["text"] for r in split["validation"]] == [text[n:]]
  with pytest.raises(ValueError, match="document_split must be one of .*'verbatim'"):
    B.build("text", name="x", data_dir=tmp_path / "tfds", splits={"train": path}, document_split="chars")


def test_classification_pairs_from_tsv_csv_and_jsonl(tmp_path):
  tsv = _write(tmp_path / "train.tsv", 'id\tpremise\thypothesis\tlabel\n0\tA "quoted\tB\tyes\n1\tC\tD\tno\n')
  csv = _write(tmp_path / "dev.csv", 'premise,hypothesis,label\n"E, e",F,no\n')
  jsonl = _write(tmp_path / "test.jsonl", '{"premise": "G", "hypothesis": "H", "label": "yes"}\n')
  src = B.build("classification", name="nli", data_dir=tmp_path / "tfds", splits={
      "train": tsv,
      "dev": csv,
      "test": jsonl
  }, text_columns=["premise", "hypothesis"])
  train = sorted(_all(src["train"]), key=lambda r: r["idx"])
  assert [(r["text_a"], r["text_b"], r["label"]) for r in train] == [('A "quoted', "B", 1), ("C", "D", 0)]
  assert [(r["text_a"], r["label"]) for r in _all(src["dev"])] == [("E, e", 0)]  # labels sorted: no=0, yes=1
  assert _all(src["test"])[0]["label"] == 1


def test_tagging_qa_and_seq2seq_build(tmp_path):
  conll = _write(tmp_path / "t.conll", "-DOCSTART- O\n\nJohn\tB-person\nruns\tO\n\nParis\tB-location\n")
  src = B.build("tagging", name="ner", data_dir=tmp_path / "tfds", splits={"train": conll})
  recs = sorted(_all(src["train"]), key=lambda r: r["idx"])
  assert [r["tokens"] for r in recs] == [["John", "runs"], ["Paris"]]
  assert recs[0]["tags"][1] == 0  # "O" is tag 0
  squad = {
      "data": [{
          "title": "t",
          "paragraphs": [{
              "context": "The cat sat on the mat.",
              "qas": [{
                  "id": "q1",
                  "question": "Where?",
                  "answers": [{
                      "text": "on the mat",
                      "answer_start": 12
                  }]
              }]
          }]
      }]
  }
  qa = _write(tmp_path / "qa.json", json.dumps(squad, indent=1))
  rec = _all(B.build("qa", name="qa", data_dir=tmp_path / "tfds", splits={"train": qa})["train"])[0]
  assert rec["context"][rec["answer_start"]:][:len(rec["answer_text"])] == "on the mat"
  pairs = _write(tmp_path / "mt.tsv", "en\tde\nHello.\tHallo.\n")
  rec = _all(
      B.build("seq2seq", name="mt", data_dir=tmp_path / "tfds", splits={"train": pairs}, source_column="en",
              target_column="de")["train"])[0]
  assert (rec["source"], rec["target"]) == ("Hello.", "Hallo.")


_SQUAD_BAD = {
    "data": [{
        "title": "t",
        "paragraphs": [{
            "context": "The cat sat.",
            "qas": [{
                "id": "ok1",
                "question": "Who?",
                "answers": [{
                    "text": "cat",
                    "answer_start": 4
                }]
            }, {
                "id": "bad2",
                "question": "What?",
                "answers": [{
                    "text": "dog",
                    "answer_start": 4
                }]
            }]
        }]
    }]
}

BAD_CASES = {
    # name: (kind, file name, content, build options, expected line, words of the problem)
    "invalid utf-8": ("text", "a.txt", b"fine line\nstill fine\nbad \xff byte\n", {}, 3, "invalid UTF-8"),
    "empty file": ("text", "a.txt", b"", {}, 1, "empty"),
    "label outside set": ("classification", "a.tsv", b"sentence\tlabel\nok\tpos\nhmm\tmaybe\n", {
        "label_names": ["neg", "pos"]
    }, 3, "not in the label set"),
    "conll columns": ("tagging", "a.conll", b"John\tB-per\nruns\tO\textra\n", {}, 2, "expected 2 columns"),
    "qa answer": ("qa", "a.json", json.dumps(_SQUAD_BAD, indent=1).encode(), {},
                  next(i for i, ln in enumerate(json.dumps(_SQUAD_BAD, indent=1).split("\n"), 1) if '"bad2"' in ln),
                  "not in its context"),
    "tsv field count": ("seq2seq", "a.tsv", b"source\ttarget\na\tb\nc\n", {}, 3, "expected 2 tab-separated"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_is_one_line_naming_file_line_and_problem(tmp_path, case):
  kind, name, content, options, line, problem = BAD_CASES[case]
  path = _write(tmp_path / "in" / name, content, "wb")
  with pytest.raises(DataError) as err:
    B.build(kind, name="bad", data_dir=tmp_path / "tfds", splits={"train": path}, **options)
  msg = str(err.value)
  assert "\n" not in msg
  assert msg.startswith(f"{path.resolve()}:{line}: "), msg
  assert problem in msg
  assert not list((tmp_path / "tfds").rglob("*.array_record*")), "TFDS wrote data before the error"


def test_bad_records_are_skipped_and_counted_when_asked(tmp_path, caplog):
  path = _write(tmp_path / "a.tsv", "sentence\tlabel\nok\tpos\nhmm\tmaybe\nno\tneg\nuh\tperhaps\n")
  with caplog.at_level(logging.WARNING):
    src = B.build("classification", name="skip", data_dir=tmp_path / "tfds", splits={"train": path},
                  label_names=["neg", "pos"], on_error="skip")
  assert sorted(r["text_a"] for r in _all(src["train"])) == ["no", "ok"]
  assert "skipped 2 bad record(s)" in caplog.text


def test_pipeline_from_built_files_through_the_loader_is_deterministic(tmp_path):
  rng = np.random.default_rng(0)
  words = [f"word{i}" for i in range(50)]
  for d in range(4):
    _write(tmp_path / "c" / f"{d}.txt", "\n\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(40)))
  src = B.build("text", name="c", data_dir=tmp_path / "tfds", splits={"train": tmp_path / "c"})["train"]
  tok = T.train_wordpiece([r["text"] for r in _all(src)], vocab_size=200)
  mlm = E.MaskedLM(E.TokenStream.from_records(src, tok, doc_end_id=tok.sep_id), E.Specials.from_tokenizer(tok),
                   seq_len=32)
  make = lambda seed: Loader(
      range(mlm.num_windows),
      mlm,
      batch_size=4,
      seed=seed,
      process_index=0,  # noqa: E731
      process_count=1)
  a, b, c = make(0), make(0), make(1)
  for _ in range(5):
    x, y, z = next(a), next(b), next(c)
    assert x["tokens"].shape == (4, 32) and x["masked_positions"].shape == (4, 6)
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(x["tokens"], z["tokens"])


@pytest.mark.skipif(not (SHARED / "sst2").exists(), reason="needs ../shared/data")
def test_real_glue_tsv_builds_with_every_row(tmp_path):
  src = B.build("classification", name="sst2", data_dir=tmp_path, label_names=["0", "1"], splits={
      "train": SHARED / "sst2" / "train.tsv",
      "dev": SHARED / "sst2" / "dev.tsv"
  })
  for split, f in [("train", "train.tsv"), ("dev", "dev.tsv")]:
    rows = (SHARED / "sst2" / f).read_text(encoding="utf-8").strip().split("\n")[1:]
    assert len(src[split]) == len(rows)


# ---- TFDS splits read as labeled tables (tfds:NAME:SPLIT in config.data.train / dev) ---------------------------------
def _no_idx(records):
  return sorted((json.dumps({k: v for k, v in r.items() if k != "idx"}, sort_keys=True) for r in records))


def test_tfds_splits_read_like_the_files_they_were_built_from(tmp_path):
  from train.data import readers as R
  tsv = _write(tmp_path / "cls.tsv", "sentence\tlabel\n" + "".join(f"text {i}\t{'ab'[i % 2]}\n" for i in range(9)))
  conll = _write(tmp_path / "ner.conll", "Paris\tB-LOC\nis\tO\n\nBob\tB-PER\nran\tO\n")
  d = tmp_path / "tfds"
  B.build("classification", name="cls", data_dir=d, splits={"train": tsv}, label_column="label")
  B.build("tagging", name="ner", data_dir=d, splits={"train": conll}, num_columns=None)
  cls = B.CatalogSplit.parse("tfds:lmlab_classification/cls:train", str(d))
  from_tfds = R.classification_records([cls], text_columns=["text_a"], label_column="label", label_names=["a", "b"])
  from_file = R.classification_records([tsv], text_columns=["sentence"], label_column="label", label_names=["a", "b"])
  assert _no_idx(from_tfds) == _no_idx(from_file)  # ClassLabel ids come back as their names
  assert R.infer_labels([cls], label_column="label") == ["a", "b"]
  ner = B.CatalogSplit.parse("tfds:lmlab_tagging/ner:train", str(d))
  assert _no_idx(R.conll_records([ner], tag_feature="tags",
                                 num_columns=None)) == _no_idx(R.conll_records([conll], num_columns=None))
  with pytest.raises(DataError, match=r"tfds:lmlab_classification/cls:train: has no feature\(s\) \['sentence'\]"):
    list(R.classification_records([cls], text_columns=["sentence"], label_column="label", label_names=["a", "b"]))
  with pytest.raises(DataError, match="tfds:lmlab_tagging/ner:train:[0-9]+: tag"):
    list(R.conll_records([ner], tag_feature="tags", tag_names=["O", "B-LOC"]))
  with pytest.raises(DataError, match="tfds:no_such_dataset:train: cannot open"):
    list(R.classification_records([B.CatalogSplit.parse("tfds:no_such_dataset:train", str(d))], label_names=["a"]))


def test_a_squad_layout_tfds_split_gives_squad_records(tmp_path):
  # TFDS's squad / xquad features: answers is a Sequence of {text, answer_start} (dict of lists once decoded).
  import tensorflow_datasets as tfds
  from train.data import readers as R
  rows = [("q1", "Paris is in France.", "where is paris ?", "France", 12),
          ("q2", "Bob ran home.", "who ran ?", "Bob", 0), ("q3", "A b c.", "bad ?", "zzz", 2)]

  class SquadLike(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "id": tfds.features.Text(),
              "title": tfds.features.Text(),
              "context": tfds.features.Text(),
              "question": tfds.features.Text(),
              "answers": tfds.features.Sequence({
                  "text": tfds.features.Text(),
                  "answer_start": np.int32
              })
          }))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for qid, context, question, text, start in rows:
        yield qid, {
            "id": qid,
            "title": "t",
            "context": context,
            "question": question,
            "answers": {
                "text": [text],
                "answer_start": [start]
            }
        }

  SquadLike(data_dir=str(tmp_path), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  split = B.CatalogSplit.parse("tfds:squad_like:train", str(tmp_path))
  with pytest.raises(DataError, match=r"tfds:squad_like:train:[0-9]+: question 'q3': answer 'zzz' is not in its"):
    list(R.squad_records([split]))
  got = {r["id"]: r for r in R.squad_records([split], on_error="skip", quiet=True)}
  assert sorted(got) == ["q1", "q2"]
  assert got["q1"]["answer_text"] == "France" and got["q1"]["answer_start"] == 12
  assert got["q2"]["answers_text"] == ["Bob"] and got["q2"]["context"] == "Bob ran home."


def test_random_start_crops_train_windows_and_leaves_eval_windows_on_the_grid(tmp_path):
  from configs import gpt
  from train import tasks
  from train.data import pipeline
  c = gpt.get_config("runlocal")
  c.data.tokenizer_train_records = 200
  c.data.random_start = True
  task = tasks.pretraining_task(c.objectives)
  pipeline.check_config(c.data, task)
  data = pipeline.build(c.data, task, workdir=str(tmp_path), seed=0)
  length = c.data.seq_len + 1

  def starts(loader, steps):
    stream, found = loader.transform.stream, []
    for step in range(steps):
      for row, tgt in zip(loader[step]["tokens"], loader[step]["targets"]):
        window = np.concatenate([row, tgt[-1:]])
        found.append(next(s for s in range(len(stream.tokens) - length + 1)
                          if np.array_equal(stream.tokens[s:s + length], window)))
    return np.array(found)

  train, evaluation = starts(data.train, 2), starts(data.eval, 1)
  assert np.mean(train % length != 0) > 0.8  # cut anywhere in their slots
  assert np.all(evaluation % length == 0)  # the held-out windows are the same every evaluation
  np.testing.assert_array_equal(data.train[1]["tokens"], data.train[1]["tokens"])  # batch k is a pure function of k
