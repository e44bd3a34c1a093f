"""Example construction: MLM masking rates and 80/10/10, whole-word masking, NSP balance and document rule, span
corruption that reconstructs its input, packing that attention cannot see across, and the task examples."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from model.attention import segment_mask
from train.data import examples as E
from train.data import task_examples as TE
from train.data import tokenizers as T

WORDS = [f"w{i}" for i in range(40)]


def _vocab_tokenizer(tmp_path, extra=()):
  """A WordPiece tokenizer over a known vocab, so tokens can be read back as the words that made them."""
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  pieces = ["##a", "##b", "##c", "."] + WORDS + list(extra)
  path = tmp_path / "vocab.txt"
  path.write_text("\n".join(specials + pieces) + "\n")
  return T.Tokenizer.load(path)


def _corpus(num_docs=12, sentences=30, seed=0):
  rng = np.random.default_rng(seed)
  return [{
      "text": " ".join(s),
      "sentences": list(s),
      "document_id": d,
      "passage_index": 0
  }
          for d in range(num_docs)
          for s in [[" ".join(rng.choice(WORDS, rng.integers(3, 9))) + " ." for _ in range(sentences)]]]


@pytest.fixture
def tok(tmp_path):
  return _vocab_tokenizer(tmp_path)


def _originals(ex):
  orig = ex["tokens"].copy()
  w = ex["masked_weights"] > 0
  orig[ex["masked_positions"][w]] = ex["masked_ids"][w]
  return orig


@pytest.mark.parametrize("whole_word", [False, True])
def test_mlm_masks_15_percent_with_80_10_10(tmp_path, whole_word):
  tok = _vocab_tokenizer(tmp_path)
  # Words with continuations ("w3##a##b") so whole-word masking has multi-token words to group.
  rng = np.random.default_rng(1)
  recs = [{
      "text": " ".join(w + rng.choice(["", "", "a", "ab", "bc"]) for w in rng.choice(WORDS, 400)),
      "document_id": d
  } for d in range(40)]
  stream = E.TokenStream.from_records(recs, tok, doc_end_id=tok.sep_id)
  sp = E.Specials.from_tokenizer(tok)
  mlm = E.MaskedLM(stream, sp, seq_len=128, whole_word=whole_word)
  cand = chosen = as_mask = same = rand = 0
  for i in range(mlm.num_windows):
    ex = mlm(i, E.example_rng(3, i))
    orig = _originals(ex)
    w = ex["masked_weights"] > 0
    pos = ex["masked_positions"][w]
    assert not np.isin(orig[pos], sp.special_ids).any(), "a special token was masked"
    cand += (~np.isin(orig, sp.special_ids)).sum()
    chosen += len(pos)
    got = ex["tokens"][pos]
    as_mask += (got == sp.mask).sum()
    same += (got == orig[pos]).sum()
    rand += ((got != sp.mask) & (got != orig[pos])).sum()
    if whole_word:  # a masked word is masked whole: a masked token's continuation is masked too
      masked = np.zeros(len(orig), bool)
      masked[pos] = True
      cont = ~sp.word_start[orig[1:]] & ~np.isin(orig[:-1], sp.special_ids)
      assert np.all(masked[1:][cont] == masked[:-1][cont])
  assert cand > 20000
  assert abs(chosen / cand - 0.15) < 0.01
  assert abs(as_mask / chosen - 0.8) < 0.02
  assert abs(same / chosen - 0.1) < 0.02
  assert abs(rand / chosen - 0.1) < 0.02


def test_mlm_is_deterministic_in_seed_and_index(tok):
  stream = E.TokenStream.from_records(_corpus(), tok, doc_end_id=tok.sep_id)
  mlm = E.MaskedLM(stream, E.Specials.from_tokenizer(tok), seq_len=64)
  a, b, c = mlm(5, E.example_rng(0, 5)), mlm(5, E.example_rng(0, 5)), mlm(5, E.example_rng(1, 5))
  assert all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(a["masked_positions"], c["masked_positions"])


def test_nsp_is_balanced_and_random_b_comes_from_another_document(tmp_path):
  # Every word names its document and sentence ("d3 s17"), so A and B can be traced back.
  docs, sents = 10, 40
  extra = [f"d{d}" for d in range(docs)] + [f"s{s}" for s in range(sents)]
  tok = _vocab_tokenizer(tmp_path, extra)
  recs = [{"sentences": [f"d{d} s{s} d{d} s{s} ." for s in range(sents)], "document_id": d} for d in range(docs)]
  recs = [dict(r, text=" ".join(r["sentences"])) for r in recs]
  nsp = E.NextSentence(recs, tok, seq_len=128)
  labels = []
  for i in range(2000):
    ex = nsp(i % len(nsp), E.example_rng(7, i))
    orig = _originals(ex)
    n = int(ex["segment_ids"].sum())
    words = [tok.id_to_token(t) for t in orig[:n]]
    assert words[0] == "[CLS]" and words[-1] == "[SEP]"
    seps = [j for j, w in enumerate(words) if w == "[SEP]"]
    assert len(seps) == 2
    a, b = words[1:seps[0]], words[seps[0] + 1:-1]
    assert np.all(ex["token_type_ids"][:seps[0] + 1] == 0) and np.all(ex["token_type_ids"][seps[0] + 1:n] == 1)
    doc_a = {w for w in a if w.startswith("d")}
    doc_b = {w for w in b if w.startswith("d")}
    assert len(doc_a) == 1 and len(doc_b) == 1
    label = int(ex["nsp_labels"])
    labels.append(label)
    if label == 1:
      assert doc_a != doc_b, "a 'random' B came from A's own document"
    else:
      assert doc_a == doc_b
      last_a = max(int(w[1:]) for w in a if w.startswith("s"))
      first_b = min(int(w[1:]) for w in b if w.startswith("s"))
      assert first_b == last_a + 1, "a true B must be the very next sentence"
  assert abs(np.mean(labels) - 0.5) < 0.03


def test_nsp_needs_two_documents(tok):
  recs = [dict(r, document_id=0) for r in _corpus(num_docs=2)]
  with pytest.raises(ValueError, match="two documents"):
    E.NextSentence(recs, tok, seq_len=64)


def _reconstruct(inputs, targets, sentinel_ids):
  """Put each sentinel's span (from targets) back into inputs."""
  sent = set(sentinel_ids.tolist())
  spans, cur = {}, None
  for t in targets[:-1]:  # drop EOS
    if t in sent:
      cur = t
      spans[cur] = []
    else:
      spans[cur].append(t)
  out = []
  for t in inputs[:-1]:
    out.extend(spans[t] if t in sent else [t])
  return np.array(out)


def test_span_corruption_reconstructs_the_original_and_matches_t5_rates():
  sentinels = np.arange(1000, 1100, dtype=np.int32)
  noise, spans, total = 0, 0, 0
  for i in range(300):
    rng = E.example_rng(0, i)
    length = int(rng.integers(20, 600))
    tokens = rng.integers(10, 900, length).astype(np.int32)
    inputs, targets = E.span_corruption(tokens, rng=rng, sentinel_ids=sentinels, eos_id=1)
    assert inputs[-1] == 1 and targets[-1] == 1
    np.testing.assert_array_equal(_reconstruct(inputs, targets, sentinels), tokens)
    n_spans = int(np.isin(inputs, sentinels).sum())
    noise += len(targets) - 1 - n_spans
    spans += n_spans
    total += length
  assert abs(noise / total - 0.15) < 0.01
  assert abs(noise / spans - 3.0) < 0.3


def test_span_corruption_windows_fill_inputs_length_exactly(tmp_path):
  tok = T.train_unigram([" ".join(r["sentences"]) for r in _corpus()] * 3, vocab_size=500)
  stream = E.TokenStream.from_records(_corpus(), tok, doc_end_id=tok.eos_id)
  sc = E.SpanCorruption(stream, E.Specials.from_tokenizer(tok), inputs_length=64)
  for i in range(min(20, sc.num_windows)):
    ex = sc(i, E.example_rng(0, i))
    assert ex["encoder_segment_ids"].sum() == 64
    assert ex["decoder_weights"].sum() <= sc.targets_length
    np.testing.assert_array_equal(ex["decoder_tokens"][1:], ex["decoder_targets"][:-1])
    assert ex["decoder_tokens"][0] == tok.pad_id


def test_packed_windows_never_attend_across_documents(tok):
  recs = _corpus(num_docs=60, sentences=3)  # short documents: many per window
  stream = E.TokenStream.from_records(recs, tok, doc_end_id=tok.sep_id)
  clm = E.CausalLM(stream, seq_len=64)
  batch = {k: np.stack([clm(i)[k] for i in range(clm.num_windows)]) for k in clm(0)}
  seg = batch["segment_ids"]
  assert seg.max() > 2, "the test needs rows holding several documents"
  allowed = np.asarray(segment_mask(jnp.asarray(seg), jnp.asarray(seg)))[:, 0]  # [B, T, T]
  for r in range(len(seg)):
    doc = stream.doc[r * 65:r * 65 + 64]  # the documents the row's tokens really came from
    q, k = np.nonzero(allowed[r])
    assert np.all(doc[q] == doc[k])
    starts = np.concatenate([[True], doc[1:] != doc[:-1]])
    first = np.maximum.accumulate(np.where(starts, np.arange(64), 0))
    np.testing.assert_array_equal(batch["positions"][r], np.arange(64) - first)
    np.testing.assert_array_equal(batch["targets"][r], stream.tokens[r * 65 + 1:r * 65 + 65])
    nxt = stream.doc[r * 65 + 1:r * 65 + 65]
    np.testing.assert_array_equal(batch["weights"][r], (nxt == doc).astype(np.float32))


def _start_of(stream, row):
  """Where in the stream a window's tokens come from (the test corpora have no repeated 20-token runs)."""
  n = len(row)
  hits = [s for s in range(len(stream.tokens) - n + 1) if np.array_equal(stream.tokens[s:s + n], row)]
  assert len(hits) == 1, hits
  return hits[0]


def test_random_start_crops_each_window_inside_its_slot_and_is_a_function_of_the_rng(tok):
  stream = E.TokenStream.from_records(_corpus(num_docs=8, sentences=6), tok, doc_end_id=tok.sep_id)
  length = 33  # seq_len 32 + the next-token target
  fixed, crop = E.CausalLM(stream, seq_len=32), E.CausalLM(stream, seq_len=32, random_start=True)
  last = crop.num_windows - 1
  starts = {i: set() for i in (0, 3, last)}
  for i in starts:
    np.testing.assert_array_equal(fixed(i, E.example_rng(0, 7))["tokens"], stream.tokens[i * length:i * length + 32])
    for pos in range(40):  # the same window drawn at 40 stream positions (epochs)
      ex = crop(i, E.example_rng(0, pos))
      s = _start_of(stream, np.concatenate([ex["tokens"], ex["targets"][-1:]]))
      assert i * length <= s < (i + 1) * length and s <= len(stream.tokens) - length
      np.testing.assert_array_equal(ex["targets"], stream.tokens[s + 1:s + length])
      np.testing.assert_array_equal(ex["weights"], (stream.doc[s + 1:s + length] == stream.doc[s:s + 32]))
      np.testing.assert_array_equal(ex["tokens"], crop(i, E.example_rng(0, pos))["tokens"])  # deterministic
      starts[i].add(s)
  assert len(starts[0]) > 15 and len(starts[3]) > 15, "offsets should vary from epoch to epoch"
  assert max(starts[last]) == len(stream.tokens) - length  # the last slot is clipped to the end of the text
  masked = E.MaskedLM(stream, E.Specials.from_tokenizer(tok), seq_len=34, random_start=True)
  rows = [masked(1, E.example_rng(0, pos)) for pos in range(10)]
  assert len({_start_of(stream, _originals(r)[1:-1]) for r in rows}) > 3


def test_pack_sequences_keeps_each_sequence_whole_and_separate():
  rng = np.random.default_rng(0)
  seqs = [rng.integers(1, 50, rng.integers(1, 30)) for _ in range(100)]
  packed = E.pack_sequences(seqs, length=32)
  seg = packed["segment_ids"]
  assert len(seg) < len(seqs)
  allowed = np.asarray(segment_mask(jnp.asarray(seg), jnp.asarray(seg)))[:, 0]
  found = []
  for r in range(len(seg)):
    for s in range(1, seg[r].max() + 1):
      idx = np.flatnonzero(seg[r] == s)
      assert np.all(np.diff(idx) == 1)
      np.testing.assert_array_equal(packed["positions"][r, idx], np.arange(len(idx)))
      found.append(tuple(packed["tokens"][r, idx]))
      outside = seg[r] != s
      assert not allowed[r][np.ix_(idx, np.flatnonzero(outside))].any()
  assert sorted(found) == sorted(tuple(s) for s in seqs)


def test_tagging_labels_the_first_subword_of_each_word(tok):
  words = ["w1", "w2abc", "w3", "w4ab"]  # w2abc -> w2 ##a ##b ##c
  record = {"tokens": words, "tags": [3, 1, 0, 2]}
  ex = TE.Tagging(tok, seq_len=16)(record)
  weighted = np.flatnonzero(ex["tag_weights"])
  assert len(weighted) == len(words)
  np.testing.assert_array_equal(ex["tag_labels"][weighted], record["tags"])
  for p in weighted:
    assert not tok.id_to_token(ex["tokens"][p]).startswith("##")
  assert ex["tag_weights"][0] == 0  # [CLS]
  assert int(ex["segment_ids"].sum()) == 2 + 1 + 4 + 1 + 3  # specials + sub-words: continuations were made


def test_qa_maps_the_answer_span_to_tokens(tok):
  context = "w1 w2 w3 w4 w5 w6 w7 w8 w9 w10"
  qa = TE.QuestionAnswering(tok, seq_len=32)
  for answer in ["w4 w5", "w9", "w1 w2 w3"]:
    start = context.index(answer)
    ex = qa({"question": "w20 w21", "context": context, "answer_text": answer, "answer_start": start})
    s, e = int(ex["start_positions"]), int(ex["end_positions"])
    assert tok.decode(ex["tokens"][s:e + 1]) == answer
    assert context[ex["offsets"][s, 0]:ex["offsets"][e, 1]] == answer
  # Cut off by truncation: points at [CLS].
  ex = TE.QuestionAnswering(tok, seq_len=10)({
      "question": "w20",
      "context": context,
      "answer_text": "w9",
      "answer_start": context.index("w9")
  })
  assert ex["start_positions"] == 0 and ex["end_positions"] == 0


def test_classification_pairs_have_token_types(tok):
  ex = TE.Classification(tok, seq_len=16, label_names=["no", "yes"])({
      "text_a": "w1 w2",
      "text_b": "w3",
      "label": "yes"
  })
  assert ex["label"] == 1
  assert [tok.id_to_token(t) for t in ex["tokens"][:6]] == ["[CLS]", "w1", "w2", "[SEP]", "w3", "[SEP]"]
  np.testing.assert_array_equal(ex["token_type_ids"][:7], [0, 0, 0, 0, 1, 1, 0])
  np.testing.assert_array_equal(ex["segment_ids"][:7], [1, 1, 1, 1, 1, 1, 0])


# ---- QA with doc stride ----------------------------------------------------------------------------------------------
CONTEXT = " ".join(WORDS) + " ."  # 41 tokens, one per word: token j of the context is WORDS[j]


def _strided(tok, **kw):
  # room = 16 - 2 (question) - 3 = 11 context tokens a window; doc_stride 4 -> windows start every 7 tokens.
  return TE.QuestionAnswering(tok, seq_len=16, max_query_length=4, doc_stride=4, **kw)


def _window_tokens(ex):
  """The context text of each context token one window holds."""
  inside = ex["offsets"][:, 0] >= 0
  return [CONTEXT[s:e] for s, e in ex["offsets"][inside]]


def test_qa_windows_cover_the_context_with_the_stride_overlap(tok):
  qa = _strided(tok)
  wins = qa.windows({"question": "w20 w21", "context": CONTEXT}, example_index=5)
  assert len(wins) > 3
  held = [_window_tokens(w) for w in wins]
  flat = [t for h in held for t in h]
  assert set(flat) == set(CONTEXT.split()), "a context token is in no window"
  assert held[0][0] == "w0" and held[-1][-1] == "."
  for a, b in itertools.pairwise(held):
    assert a[-4:] == b[:4], "consecutive windows must share exactly doc_stride tokens"
    assert len(a) == 11
  for w, ex in enumerate(wins):
    assert ex["example_index"] == 5 and ex["window_index"] == w
    assert int(ex["segment_ids"].sum()) == 2 + 3 + len(held[w])
    n = int(ex["segment_ids"].sum())
    assert [tok.id_to_token(t) for t in ex["tokens"][[0, 3, n - 1]]] == ["[CLS]", "[SEP]", "[SEP]"]
    assert all(ex[k].shape == (16,) for k in ("tokens", "segment_ids", "positions", "token_type_ids"))
    assert ex["offsets"].shape == (16, 2)
    np.testing.assert_array_equal(ex["offsets"][:4], -1)  # [CLS] question [SEP] are not context
  # Without doc_stride: the one truncated window of a plain call.
  single = TE.QuestionAnswering(tok, seq_len=16, max_query_length=4).windows({
      "question": "w20 w21",
      "context": CONTEXT
  })
  plain = TE.QuestionAnswering(tok, seq_len=16, max_query_length=4)({"question": "w20 w21", "context": CONTEXT})
  assert len(single) == 1 and all(np.array_equal(single[0][k], plain[k]) for k in plain)
  assert all(np.array_equal(wins[0][k], plain[k]) for k in plain)


@pytest.mark.parametrize("answer", ["w30 w31", "w10 w11", "w39 ."])
def test_qa_window_holding_the_answer_labels_it_and_others_point_at_cls(tok, answer):
  qa = _strided(tok)
  record = {"question": "w20 w21", "context": CONTEXT, "answer_text": answer, "answer_start": CONTEXT.index(answer)}
  wins = qa.windows(record)
  assert answer.split()[0] not in _window_tokens(wins[0]) or answer.split()[-1] not in _window_tokens(wins[0])
  labeled = 0
  for ex in wins:
    s, e = int(ex["start_positions"]), int(ex["end_positions"])
    held = _window_tokens(ex)
    if all(t in held for t in answer.split()):
      labeled += 1
      assert CONTEXT[ex["offsets"][s, 0]:ex["offsets"][e, 1]] == answer
      assert tok.decode(ex["tokens"][s:e + 1]) == answer.replace(" .", ".")
    else:  # not in this window, or cut by its edge ("w10 w11" straddles the first one)
      assert s == 0 and e == 0
  assert labeled >= 1


def test_qa_postprocess_recovers_the_answer_text_from_peaked_logits(tok):
  qa = _strided(tok)
  answer = "w30 w31"
  record = {"question": "w20 w21", "context": CONTEXT, "answer_text": answer, "answer_start": CONTEXT.index(answer)}
  feats = TE.qa_windows(qa, [record])
  w = int(np.flatnonzero(feats["start_positions"] > 0)[0])
  s, e = int(feats["start_positions"][w]), int(feats["end_positions"][w])
  rng = np.random.default_rng(0)
  start = rng.normal(0, 0.1, feats["tokens"].shape)
  end = rng.normal(0, 0.1, feats["tokens"].shape)
  start[w, s] += 5.0
  end[w, e] += 5.0
  # Higher-scoring spans that are not allowed: on [CLS] and question tokens, end before start, too long.
  start[:, :4] += 50.0
  end[:, :4] += 50.0
  end[w, s - 1] += 20.0  # (s, s - 1) would score 25; no start before s may pair with it
  start[w, 4:s] -= 100.0
  start[0, 4] += 8.0
  end[0, 4 + 5] += 8.0  # a 6-token span, longer than max_answer_length=5
  got = TE.postprocess_qa(start_logits=start, end_logits=end, offsets=feats["offsets"],
                          example_index=feats["example_index"], contexts=[CONTEXT], max_answer_length=5)
  assert got == [answer]
  span = TE.best_answer_span(start_logits=start[w], end_logits=end[w], offsets=feats["offsets"][w], max_answer_length=5)
  assert CONTEXT[span[0]:span[1]] == answer


def test_qa_postprocess_of_oracle_logits_gives_every_gold_answer(tok):
  qa = _strided(tok)
  rng = np.random.default_rng(1)
  records = []
  for _ in range(20):
    words = list(rng.choice(WORDS, int(rng.integers(3, 60))))
    context = "  ".join(words)  # double spaces: the answer must come from the original text, not a decode
    a = int(rng.integers(0, len(words)))
    b = min(len(words), a + int(rng.integers(1, 4)))
    start = len("  ".join(words[:a])) + (2 if a else 0)
    records.append({
        "question": "w1 w2 w3",
        "context": context,
        "answer_text": "  ".join(words[a:b]),
        "answer_start": start
    })
  feats = TE.qa_windows(qa, records)
  assert len(feats["tokens"]) > len(records)
  onehot = lambda pos: 10.0 * (np.arange(16)[None] == pos[:, None])
  got = TE.postprocess_qa(start_logits=onehot(feats["start_positions"]), end_logits=onehot(feats["end_positions"]),
                          offsets=feats["offsets"], example_index=feats["example_index"],
                          contexts=[r["context"] for r in records])
  assert got == [r["answer_text"] for r in records]


def test_qa_doc_stride_must_leave_a_window_room_to_advance(tok):
  with pytest.raises(ValueError, match="doc_stride=9 must be in"):
    TE.QuestionAnswering(tok, seq_len=16, max_query_length=4, doc_stride=9)


def test_prompt_completion_learns_only_the_target_and_prompts_match_training():
  # Decoder-only seq2seq: [BOS] head source tail target EOS; the loss weights cover the target and EOS only.
  words = WORDS[:6]
  tok = T.train_tokenizer("bpe", [" ".join(WORDS)] * 20, vocab_size=300)
  pc = TE.PromptCompletion(tok, seq_len=24, targets_length=8, template=f"{words[0]} {{source}} {words[1]}")
  ex = pc({"source": " ".join(words[2:4]), "target": " ".join(words[4:6])})
  prompt = pc.prompt({"source": " ".join(words[2:4])})
  target = tok.encode(" ".join(words[4:6])) + [tok.eos_id]
  assert len(target) <= 8
  seq = prompt + target
  n = len(seq) - 1
  np.testing.assert_array_equal(ex["tokens"][:n], seq[:-1])
  np.testing.assert_array_equal(ex["targets"][:n], seq[1:])
  np.testing.assert_array_equal(ex["targets"][np.flatnonzero(ex["weights"])], target)  # exactly the target tokens
  assert ex["segment_ids"].sum() == n and ex["weights"].sum() == len(target)
  p = pc.prompt_example({"source": " ".join(words[2:4])})
  assert p["prompt"].shape == (24 + 1 - 8,) and p["prompt_mask"].sum() == len(prompt)
  np.testing.assert_array_equal(p["prompt"][:len(prompt)], ex["tokens"][:len(prompt)])  # what generation continues
  # A long source is cut to leave the target its room; the template stays whole.
  long = pc({"source": " ".join(WORDS * 3), "target": " ".join(words[4:6])})
  assert long["weights"].sum() == len(target) and long["targets"][np.flatnonzero(long["weights"])][-1] == tok.eos_id
  with pytest.raises(ValueError, match="source_template"):
    TE.PromptCompletion(tok, seq_len=24, targets_length=8, template="no placeholder")
