"""TensorFlow Datasets builders for local files, built offline into a caller-given data_dir as ArrayRecord and read
back by random access with `tfds.data_source` (no TensorFlow needed to read). One builder per format — text corpora
(documents -> passages -> sentences, for MLM/CLM/NSP/span corruption), classification and sentence pairs, CoNLL
tagging, SQuAD QA, seq2seq pairs — each parsing with `readers.py`, which validates every file completely before TFDS
runs so bad input fails as one `DataError` line. `catalog_source` opens any TFDS catalog dataset by name with a field
mapping onto the same record keys. This is the only module of the data package that imports TFDS; import it only
when building or opening datasets."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow_datasets as tfds  # noqa: E402
from absl import logging as absl_logging  # noqa: E402

from train.data import readers  # noqa: E402

Splits = Mapping[str, "str | os.PathLike | Sequence[str | os.PathLike]"]
_FINGERPRINT_FILE = "lmlab_fingerprint.txt"


@dataclasses.dataclass(eq=False)
class LocalFilesConfig(tfds.core.BuilderConfig):
  """`splits`: ((split, (file, ...)), ...); `options`: JSON of the reader's keyword arguments (kept as a string so
    the config stays hashable and is recorded verbatim in dataset_info.json)."""
  splits: tuple = ()
  options: str = "{}"


class _LocalFilesBuilder(tfds.core.GeneratorBasedBuilder):
  """Shared machinery: features from `_features(options)`, records from `_records(paths, options)`."""
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = []  # configs are made per call by `build`
  # TFDS looks for a checksums file beside the builder's code through `importlib_resources`, which tfds does not
  # install; local files have no checksums, so say there is no code path to look in.
  code_path = None

  @property
  def options(self) -> dict:
    return json.loads(self.builder_config.options)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=self._features(self.options),
                                 description=f"lmlab local files: {self.builder_config.description}")

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(paths) for split, paths in self.builder_config.splits}

  def _generate_examples(self, paths):
    # quiet: the validation pass in `_build` already logged any skipped records.
    for i, rec in enumerate(self._records(list(paths), {**self.options, "quiet": True})):
      yield i, rec

  # TFDS announces "Downloading and preparing dataset ..." for every build; nothing is downloaded here.
  def _log_download_bytes(self):
    print(f"building {self.name}/{self.builder_config.name} from local files in {self.data_dir}", flush=True)

  def _log_download_done(self):
    pass

  def _features(self, options: dict):
    raise NotImplementedError

  def _records(self, paths, options: dict):
    raise NotImplementedError


_text = tfds.features.Text
_int64 = lambda: tfds.features.Scalar(dtype=np.int64)  # noqa: E731


class LmlabTextCorpus(_LocalFilesBuilder):

  def _features(self, options):
    return tfds.features.FeaturesDict({
        "text": _text(),
        "sentences": tfds.features.Sequence(_text()),
        "document_id": _int64(),
        "passage_index": _int64()
    })

  def _records(self, paths, options):
    return readers.text_records(paths, **options)


class LmlabClassification(_LocalFilesBuilder):

  def _features(self, options):
    return tfds.features.FeaturesDict({
        "text_a": _text(),
        "text_b": _text(),
        "idx": _int64(),
        "label": tfds.features.ClassLabel(names=options["label_names"])
    })

  def _records(self, paths, options):
    return readers.classification_records(paths, **options)


class LmlabTagging(_LocalFilesBuilder):

  def _features(self, options):
    return tfds.features.FeaturesDict({
        "tokens": tfds.features.Sequence(_text()),
        "idx": _int64(),
        "tags": tfds.features.Sequence(tfds.features.ClassLabel(names=options["tag_names"]))
    })

  def _records(self, paths, options):
    return readers.conll_records(paths, **options)


class LmlabQa(_LocalFilesBuilder):

  def _features(self, options):
    return tfds.features.FeaturesDict({
        "id": _text(),
        "title": _text(),
        "context": _text(),
        "question": _text(),
        "answer_text": _text(),
        "answer_start": _int64(),
        "answers_text": tfds.features.Sequence(_text()),
        "answers_start": tfds.features.Sequence(_int64())
    })

  def _records(self, paths, options):
    return readers.squad_records(paths, **options)


class LmlabSeq2seq(_LocalFilesBuilder):

  def _features(self, options):
    return tfds.features.FeaturesDict({"source": _text(), "target": _text(), "idx": _int64()})

  def _records(self, paths, options):
    return readers.seq2seq_records(paths, **options)


_BUILDERS = {
    "text": (LmlabTextCorpus, readers.text_records),
    "classification": (LmlabClassification, readers.classification_records),
    "tagging": (LmlabTagging, readers.conll_records),
    "qa": (LmlabQa, readers.squad_records),
    "seq2seq": (LmlabSeq2seq, readers.seq2seq_records)
}


class DecodedSource:
  """Random-access view of a TFDS data source: bytes -> str, arrays -> lists, optional renaming of fields
    ({our_key: their_key}); `len()` and `[i]`, which is all grain's MapDataset.source needs."""

  def __init__(self, source, field_map: Mapping[str, str] | None = None,
               transform: Callable[[dict], dict] | None = None):
    self.source = source
    self.field_map = dict(field_map or {})
    self.transform = transform

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    rec = {k: _decode(v) for k, v in self.source[i].items()}
    if self.field_map:
      rec = {ours: _lookup(rec, theirs) for ours, theirs in self.field_map.items()}
    return self.transform(rec) if self.transform else rec

  def __repr__(self):
    return f"DecodedSource({self.source!r}, field_map={self.field_map})"


def _decode(v):
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if isinstance(v, dict):
    return {k: _decode(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)) or (isinstance(v, np.ndarray) and v.dtype == object):
    return [_decode(x) for x in v]
  if isinstance(v, np.ndarray):
    return v.tolist()
  if isinstance(v, np.generic):
    return v.item()
  return v


def _lookup(rec: dict, dotted: str):
  for part in dotted.split("/"):  # nested TFDS features, e.g. "answers/text"
    rec = rec[part]
  return rec


def _fingerprint(kind: str, splits: Sequence[tuple[str, tuple[str, ...]]], options: dict) -> str:
  """Changes when a file (size or mtime), the file list or an option changes, so a stale build is rebuilt."""
  h = hashlib.sha256(json.dumps([kind, splits, options], sort_keys=True).encode())
  for _, paths in splits:
    for p in paths:
      st = os.stat(p)
      h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
  return h.hexdigest()[:16]


def build(kind: str, *, name: str, data_dir: str | os.PathLike, splits: Splits,
          **options: Any) -> dict[str, DecodedSource]:
  """Validates the files, builds `<data_dir>/lmlab_<kind>/<name>/1.0.0` (ArrayRecord) unless an identical build is
    there, and returns {split: DecodedSource}. kind: "text", "classification", "tagging", "qa", "seq2seq"; options
    are the keyword arguments of the matching reader in readers.py (e.g. text_columns=, label_names=, on_error=)."""
  if kind not in _BUILDERS:
    raise ValueError(f"dataset kind {kind!r} is not one of {sorted(_BUILDERS)}")
  builder_cls, reader = _BUILDERS[kind]
  pattern = options.get("pattern", "*.json" if kind == "qa" else "*.txt" if kind == "text" else "*")
  file_splits = tuple(
      (split, tuple(str(p.resolve()) for p in readers.expand_paths(paths, pattern))) for split, paths in splits.items())
  # Label sets come from the first split (normally train) so that every split shares one id mapping.
  first_files = list(file_splits[0][1])
  if kind == "classification" and options.get("label_names") is None:
    options["label_names"] = readers.infer_labels(first_files, label_column=options.get("label_column", "label"),
                                                  on_error=options.get("on_error", "raise"))
  if kind == "tagging" and options.get("tag_names") is None:
    tag_kw = {k: options[k] for k in ("token_column", "tag_column", "num_columns", "on_error") if k in options}
    options["tag_names"] = readers.infer_tags(first_files, **tag_kw)
  for key in ("label_names", "tag_names"):
    if key in options and not options[key]:
      raise readers.DataError(first_files[0], None, f"no {key.split('_')[0]}s found to build a label set from")
  for key in ("label_names", "tag_names", "text_columns"):
    if key in options:
      options[key] = list(options[key])

  fingerprint = _fingerprint(kind, file_splits, options)
  config = LocalFilesConfig(name=name, splits=file_splits, options=json.dumps(options, sort_keys=True),
                            description=f"{kind} {fingerprint}")
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # TFDS warns "Using custom data configuration" for every build
  try:
    builder = builder_cls(config=config, data_dir=os.fspath(data_dir), file_format="array_record")
  finally:
    absl_logging.set_verbosity(verbosity)
  stamp = Path(builder.data_dir) / _FINGERPRINT_FILE
  fresh = stamp.exists() and stamp.read_text() == fingerprint
  if not fresh:
    # Parse everything first, in plain Python: a bad file raises DataError here, never inside TFDS.
    for _, paths in file_splits:
      for _ in reader(list(paths), **options):
        pass
    tfds.disable_progress_bar()
    # REUSE_CACHE_IF_EXISTS regenerates the dataset (there is nothing to download): a stale build is replaced.
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, download_mode=tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS))
    stamp.write_text(fingerprint)
  return {split: DecodedSource(src) for split, src in builder.as_data_source().items()}


def open_built(path: str | os.PathLike, *, split: str) -> DecodedSource:
  """A split of an already built dataset, from its version folder (e.g. `.../lmlab_text_corpus/books/1.0.0`)."""
  return DecodedSource(tfds.builder_from_directory(os.fspath(path)).as_data_source(split=split))


TFDS_PREFIX = "tfds:"


@dataclasses.dataclass(frozen=True)
class CatalogSplit:
  """A split of a TFDS catalog dataset read as a labeled table: `tfds:NAME:SPLIT` in config.data.train / dev (e.g.
    `tfds:glue/sst2:validation`), with the columns mapped by config.data (text_columns, label_column, ...). The
    readers of readers.py take it wherever they take a file: rows come out with ClassLabel ids turned into their
    names and bytes into text, and errors name the spec and the row as they name a file and line."""
  name: str
  split: str
  data_dir: str = ""

  @classmethod
  def parse(cls, spec: str, data_dir: str = "") -> "CatalogSplit":
    body = spec[len(TFDS_PREFIX):]
    name, _, split = body.rpartition(":")
    if not name or not split:
      raise ValueError(f"{spec!r}: a TFDS split is written tfds:NAME:SPLIT, e.g. tfds:glue/sst2:train")
    return cls(name, split, data_dir)

  def __fspath__(self) -> str:
    return f"{TFDS_PREFIX}{self.name}:{self.split}"

  def _source(self):
    try:
      return tfds.data_source(self.name, split=self.split, data_dir=self.data_dir or None,
                              builder_kwargs={"file_format": "array_record"})
    except Exception as e:  # tfds raises many kinds (not found, no network, no array_record files)
      raise readers.DataError(
          self, None, f"cannot open this TFDS split ({type(e).__name__}: {str(e)[:300]}); "
          "prepare it with tfds (ArrayRecord) and set config.data.tfds_data_dir") from None

  def rows(self, columns, problems):
    """(row number from 1, {column: value}) for the named columns; "a/b" reaches into nested features."""
    src = self._source()
    features = src.dataset_info.features
    missing = [c for c in columns if c.split("/")[0] not in features]
    if missing:
      raise readers.DataError(self, None, f"has no feature(s) {missing}; it has {sorted(features)}")
    names = {c: _class_names(features, c) for c in columns}
    for i in range(len(src)):
      rec = {k: _decode(v) for k, v in src[i].items()}
      row = {}
      for c in columns:
        value = _lookup(rec, c)
        row[c] = _named(value, names[c])
      yield i + 1, row


def _class_names(features, column: str):
  """The ClassLabel names of a feature (or of a sequence's elements), or None."""
  feature = features
  for part in column.split("/"):
    feature = feature[part]
  feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) -> ClassLabel
  return list(feature.names) if isinstance(feature, tfds.features.ClassLabel) else None


def _named(value, names):
  if names is None:
    return value
  if isinstance(value, list):
    return [names[v] for v in value]
  return names[value] if isinstance(value, int) and value >= 0 else str(value)  # -1: an unlabeled test split


def catalog_source(name: str, *, split: str, data_dir: str | os.PathLike | None = None,
                   field_map: Mapping[str, str] | None = None, download: bool = True) -> DecodedSource:
  """Any TFDS catalog dataset (e.g. "glue/sst2") in ArrayRecord form, its fields renamed onto our record keys:
    `field_map={"text_a": "sentence", "label": "label"}` ("a/b" reaches into nested features). Needs the network the
    first time (ArrayRecord is prepared locally, since GCS copies are TFRecord)."""
  try:
    src = tfds.data_source(name, split=split, data_dir=None if data_dir is None else os.fspath(data_dir),
                           download=download, builder_kwargs={"file_format": "array_record"})
  except tfds.core.registered.DatasetNotFoundError:  # its message lists every dataset TFDS knows, on one line
    import difflib  # pylint: disable=g-import-not-at-top
    close = difflib.get_close_matches(name.split("/")[0], tfds.list_builders(), n=3)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    raise ValueError(f"no dataset {name!r} in the TFDS catalog; {hint}the catalog: "
                     "https://www.tensorflow.org/datasets/catalog") from None
  return DecodedSource(src, field_map=field_map)
