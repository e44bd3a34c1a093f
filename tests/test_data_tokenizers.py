"""Tokenizers: each kind trains in seconds, round-trips text, keeps special tokens whole, saves and loads; a BERT
vocab.txt and a tokenizer.json load with their special-token roles."""
from pathlib import Path

import numpy as np
import pytest

from train.data import tokenizers as T

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
TEXT = ("The quick brown fox jumps over the lazy dog. A tokenizer splits text into pieces; decoding joins them again. "
        "Numbers like 1234 and punctuation (commas, colons: semicolons;) appear too. ")


@pytest.fixture(scope="module")
def corpus():
  words = TEXT.split()
  rng = np.random.default_rng(0)
  # Enough varied text for a few hundred merges: shuffled sentences of the same words, plus the text itself.
  return [TEXT] * 20 + [" ".join(rng.permutation(words)) for _ in range(400)]


@pytest.fixture(scope="module")
def trained(corpus):
  return {kind: T.train_tokenizer(kind, corpus, vocab_size=600) for kind in T.KINDS}


def test_bpe_round_trips_any_text_exactly(trained):
  tok = trained["bpe"]
  for s in [TEXT, "  odd   spacing\tand tabs\n", "unicode: café, 東京, emoji 🙂"]:
    assert tok.decode(tok.encode(s)) == s


def test_unigram_round_trips_text_with_byte_fallback(trained):
  tok = trained["unigram"]
  for s in [TEXT.strip(), "unseen characters: café 東京 🙂"]:
    ids = tok.encode(s)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == s


def test_wordpiece_round_trips_up_to_normalization(trained):
  tok = trained["wordpiece"]
  ids = tok.encode(TEXT)
  decoded = tok.decode(ids)
  assert tok.encode(decoded) == ids
  assert decoded.replace(" ", "") == TEXT.lower().replace(" ", "")


@pytest.mark.parametrize("kind", T.KINDS)
def test_special_tokens_are_single_ids_and_pad_is_zero(trained, kind):
  tok = trained[kind]
  assert tok.pad_id == 0
  for role, token in tok.special_tokens.items():
    assert tok.encode(token) == [tok.token_to_id(token)], role
    assert tok.token_to_id(token) in tok.special_ids
  assert len(set(tok.special_ids.tolist())) == len(tok.special_ids)


def test_unigram_has_t5_sentinels(trained):
  tok = trained["unigram"]
  ids = tok.sentinel_ids
  assert len(ids) == 100 and len(set(ids)) == 100
  assert tok.id_to_token(ids[7]) == "<extra_id_7>"
  assert tok.eos_id is not None and tok.mask_id is None


def test_word_start_table_marks_continuations(trained):
  tok = trained["wordpiece"]
  table = tok.word_start_table()
  assert table.shape == (tok.vocab_size,)
  for i in range(tok.vocab_size):
    assert table[i] == (not tok.id_to_token(i).startswith("##"))


@pytest.mark.parametrize("kind", T.KINDS)
def test_save_and_load_give_the_same_tokenizer(trained, kind, tmp_path):
  tok = trained[kind]
  tok.save(tmp_path / kind)
  again = T.Tokenizer.load(tmp_path / kind)
  assert again.kind == kind and again.special_tokens == tok.special_tokens
  assert again.encode(TEXT) == tok.encode(TEXT)
  assert np.array_equal(again.special_ids, tok.special_ids)
  # The bare tokenizer.json (as another program would ship it) loads too, with roles guessed from names.
  bare = T.Tokenizer.load(tmp_path / kind / "tokenizer.json")
  assert bare.encode(TEXT) == tok.encode(TEXT) and bare.pad_id == tok.pad_id


def test_a_tokenizer_json_saved_with_padding_and_truncation_encodes_unpadded(trained, tmp_path):
  # sentence-transformers checkpoints (all-MiniLM-L6-v2) ship tokenizer.json padded to 128 and truncated there;
  # the example builders place [SEP] and padding themselves, so encode must return the text's ids only.
  import tokenizers as hf
  tok = trained["wordpiece"]
  backend = hf.Tokenizer.from_str(tok.backend.to_str())
  backend.enable_padding(length=128, pad_id=tok.pad_id, pad_token="[PAD]")
  backend.enable_truncation(max_length=4)
  (tmp_path / "tokenizer.json").write_text(backend.to_str())
  assert len(hf.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(TEXT).ids) == 128
  loaded = T.Tokenizer.load(tmp_path / "tokenizer.json")
  assert loaded.encode(TEXT) == tok.encode(TEXT) and len(tok.encode(TEXT)) > 4
  assert loaded.encode_batch([TEXT, "a"]) == [tok.encode(TEXT), tok.encode("a")]


def test_unknown_kind_is_an_error(corpus):
  with pytest.raises(ValueError, match="not one of"):
    T.train_tokenizer("bytes", corpus)


@pytest.mark.skipif(not (SHARED / "bert_uncased_vocab" / "vocab.txt").exists(), reason="needs ../shared/data")
def test_bert_vocab_txt_loads_with_bert_ids():
  path = SHARED / "bert_uncased_vocab" / "vocab.txt"
  lines = path.read_text(encoding="utf-8").splitlines()
  tok = T.Tokenizer.load(path)
  assert tok.vocab_size == len(lines)
  for role, name in [("pad", "[PAD]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("mask", "[MASK]"), ("unk", "[UNK]")]:
    assert getattr(tok, f"{role}_id") == lines.index(name)
  assert tok.encode("Hello World") == [lines.index("hello"), lines.index("world")]  # uncased: lower-cased
  assert tok.decode(tok.encode("Hello World")) == "hello world"


def test_wordpiece_training_is_deterministic_across_processes():
  """Each process hashes differently; the same text must still give the same ids (resumed and fresh runs agree)."""
  import subprocess
  import sys
  code = ("from train.data import tokenizers as t, embedded; import json; "
          "tok = t.train_wordpiece(embedded.texts()[:300], vocab_size=600); "
          "print(json.dumps(sorted(tok.backend.get_vocab().items())))")
  runs = [
      subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)
  ]
  assert runs[0] == runs[1]


def test_a_save_cut_short_leaves_the_saved_tokenizer_whole(trained, tmp_path, monkeypatch):
  # A full disk during a re-save (here: the second file fails) keeps the earlier tokenizer loadable and whole.
  import errno
  import pathlib
  old, new = trained["wordpiece"], trained["bpe"]
  old.save(tmp_path / "tok")
  before = {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()}

  def full_disk(self, *a, **k):
    raise OSError(errno.ENOSPC, "No space left on device", str(self))

  monkeypatch.setattr(pathlib.Path, "write_text", full_disk)
  with pytest.raises(OSError, match="No space"):
    new.save(tmp_path / "tok")
  monkeypatch.undo()
  assert {p.name: p.read_bytes() for p in (tmp_path / "tok").iterdir()} == before  # no temporary files either
  assert T.Tokenizer.load(tmp_path / "tok").encode(TEXT) == old.encode(TEXT)


# ---- char (nanoGPT's shakespeare_char) -------------------------------------------------------------------------------
CHAR_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak,  speak.\t(tab)\n"


def test_char_vocab_is_two_specials_then_the_sorted_characters():
  tok = T.train_tokenizer("char", [CHAR_TEXT[:30], CHAR_TEXT[30:]])
  chars = sorted(set(CHAR_TEXT))  # nanoGPT's data/shakespeare_char/prepare.py
  assert tok.kind == "char" and tok.vocab_size == len(chars) + 2
  assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == ["<|endoftext|>", "<unk>"] + chars
  assert tok.pad_id == tok.bos_id == tok.eos_id == tok.cls_id == tok.sep_id == 0 and tok.unk_id == 1
  assert tok.mask_id is None and tok.special_ids.tolist() == [0, 1]
  assert tok.encode("hear") == [2 + chars.index(c) for c in "hear"]  # 2 + nanoGPT's id


def test_char_round_trips_newlines_runs_of_spaces_and_tabs_exactly():
  tok = T.train_tokenizer("char", [CHAR_TEXT])
  for s in [CHAR_TEXT, "\n\n\n", "  Speak   \n  speak  ", "", " "]:
    ids = tok.encode(s)
    assert len(ids) == len(s) and tok.unk_id not in ids
    assert tok.decode(ids) == s
  assert tok.encode_batch([CHAR_TEXT, "a b"]) == [tok.encode(CHAR_TEXT), tok.encode("a b")]
  ids, offsets = tok.encode_with_offsets("we  me")
  assert offsets == [(i, i + 1) for i in range(6)] and len(ids) == 6


def test_char_maps_unseen_characters_to_unk():
  tok = T.train_tokenizer("char", [CHAR_TEXT])
  ids = tok.encode("Speak, café 東京!")
  assert len(ids) == len("Speak, café 東京!")
  assert [i for i in ids if i == tok.unk_id] == [tok.unk_id] * 4  # 'é', '東', '京', '!'
  assert tok.decode(ids) == "Speak, caf "
  assert tok.decode(ids, skip_special_tokens=False) == "Speak, caf<unk> <unk><unk><unk>"


def test_char_vocab_size_caps_by_frequency():
  tok = T.train_tokenizer("char", ["aaaa bbb cc d"], vocab_size=5)  # 2 specials + the 3 most frequent characters
  assert [tok.id_to_token(i) for i in range(tok.vocab_size)] == ["<|endoftext|>", "<unk>", " ", "a", "b"]
  assert tok.encode("ab c") == [3, 4, 2, 1]


def test_char_word_starts_are_whitespace_as_bpe_leading_spaces():
  tok = T.train_tokenizer("char", [CHAR_TEXT])
  table = tok.word_start_table()
  assert table.shape == (tok.vocab_size,)
  assert table[tok.encode(" \n\t")].all() and not table[tok.encode("Speak,")].any() and table[tok.special_ids].all()


def test_char_save_and_load_keep_kind_and_ids(tmp_path):
  tok = T.train_tokenizer("char", [CHAR_TEXT])
  tok.save(tmp_path / "char")
  again = T.Tokenizer.load(tmp_path / "char")
  assert again.kind == "char" and again.special_tokens == tok.special_tokens
  assert again.backend.get_vocab() == tok.backend.get_vocab()
  assert again.encode(CHAR_TEXT) == tok.encode(CHAR_TEXT) and again.decode(again.encode(CHAR_TEXT)) == CHAR_TEXT
  # The bare tokenizer.json is recognised as a character tokenizer, with the same roles guessed from the names.
  bare = T.Tokenizer.load(tmp_path / "char" / "tokenizer.json")
  assert bare.kind == "char" and bare.encode(CHAR_TEXT) == tok.encode(CHAR_TEXT)
  assert {r: bare.special_tokens[r] for r in tok.special_tokens} == tok.special_tokens and bare.mask_id is None


def test_a_word_level_tokenizer_json_is_not_taken_for_char(tmp_path):
  import tokenizers as hf
  from tokenizers import models, pre_tokenizers
  backend = hf.Tokenizer(models.WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.save(str(tmp_path / "tokenizer.json"))
  assert T.Tokenizer.load(tmp_path / "tokenizer.json").kind == "bpe"  # the fallback for foreign models, as before


def test_a_clm_config_trains_a_char_tokenizer_through_the_pipeline(tmp_path):
  """config.data.tokenizer_kind='char' is how a run picks it: the causal LM's windows are characters."""
  from configs import gpt
  from train import tasks
  from train.data import pipeline
  c = gpt.get_config("runlocal")
  c.data.tokenizer_kind = "char"
  c.data.tokenizer_train_records = 200
  task = tasks.pretraining_task(c.objectives)
  pipeline.check_config(c.data, task)
  data = pipeline.build(c.data, task, workdir=str(tmp_path), seed=0)
  tok = data.tokenizer
  assert tok.kind == "char" and T.Tokenizer.load(tmp_path / "tokenizer").kind == "char"
  assert tok.vocab_size < 300  # characters, not c.data.vocab_size merges
  batch = data.train[0]
  assert batch["tokens"].shape == (c.data.batch_size, c.data.seq_len)
  row, targets = batch["tokens"][0], batch["targets"][0]
  assert np.array_equal(row[1:], targets[:-1])  # next-character targets
  special = set(tok.special_ids.tolist())
  assert all(len(tok.id_to_token(i)) == 1 for i in row.tolist() if i not in special)  # one character per id
