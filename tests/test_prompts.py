"""Prompt-based classification (train/finetune/prompts.py, the 'prompt' head) and soft prompts.

Label scores equal a float64 hand computation from the plain MLM / LM heads, and the same scores computed by
transformers + torch from the same Hugging Face checkpoint through the zero-shot evaluate job, for single- and
multi-token verbalizers on an encoder and a decoder; PET-style fine-tuning learns a task; in-context demonstrations
are drawn per query and seed, balanced and packed into the sequence; soft prompts sit where their slots say; bad
templates and verbalizers fail in one line naming the field.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import finetune as finetune_config
from model import transformer
from model.heads import LanguageModel, init_params
from train import tasks
from train.core import resolve
from train.finetune import prompts
from train.data import tokenizers

REPO = Path(__file__).resolve().parents[1]
VOCAB = REPO.parent / 'shared' / 'data' / 'bert_uncased_vocab' / 'vocab.txt'
RECORDS = [{
    'text_a': 'a fine and moving film',
    'text_b': '',
    'label': '1',
    'idx': 0
}, {
    'text_a': 'dull , long and boring',
    'text_b': '',
    'label': '0',
    'idx': 1
}, {
    'text_a': 'the actors were wonderful',
    'text_b': '',
    'label': '1',
    'idx': 2
}]
# One multi-token word (two words, several pieces) next to single-token ones, and two words for one label.
VERBALIZER = '0:terrible|bad;1:great|wonderful movie'


def _bpe(tmp_path):
  text = ' '.join(r['text_a'] for r in RECORDS) + ' review sentiment terrible bad great wonderful movie it was'
  return tokenizers.train_bpe([text] * 20, vocab_size=300)


def _wordpiece():
  return tokenizers.from_vocab_txt(VOCAB)


def _config(verbalizer=VERBALIZER, **finetune):
  c = finetune_config.get_config('task=sst2,strategy=prompt,runlocal')
  c.data.label_names = ('0', '1')
  c.finetune.verbalizer = verbalizer
  for k, v in finetune.items():
    c.finetune[k] = v
  return c


def _examples(arch, tok, config, records=RECORDS):
  task = resolve.run_task(tasks.get('sst2'), config, arch)
  return task.eval_examples(records, tok, config.data)


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _hand_scores(model_cfg, params, example, arch):
  """Each label's score from a separate plain forward per candidate word (the MLM or LM head over every position)."""
  plain = LanguageModel(model_cfg, heads=('mlm',) if arch == 'encoder' else ('lm',))
  words = []
  for c in range(len(example['score_label'])):
    g = example['score_group'][c]
    out = plain.apply({'params': params}, {
        'tokens': example['tokens'][g][None],
        'segment_ids': example['segment_ids'][g][None]
    })
    lp = _log_softmax64(out['mlm_logits' if arch == 'encoder' else 'lm_logits'][0])
    n = int((example['score_weights'][c] > 0).sum())
    total = sum(lp[example['score_positions'][c, j], example['score_ids'][c, j]] for j in range(n))
    words.append(total / n if example['score_weights'][c, 0] < 1 else total)
  labels = example['score_label']
  return [np.log(np.mean(np.exp([w for w, lab in zip(words, labels) if lab == k]))) for k in range(2)]


@pytest.mark.parametrize('arch,length_norm', [('encoder', False), ('encoder', True), ('decoder', False),
                                              ('decoder', True)])
def test_label_scores_equal_a_hand_computation(tmp_path, arch, length_norm):
  if arch == 'encoder' and not VOCAB.exists():
    pytest.skip(f'{VOCAB} is not here')
  tok = _wordpiece() if arch == 'encoder' else _bpe(tmp_path)
  config = _config(length_norm=length_norm)
  examples = _examples(arch, tok, config)
  words = [ids for _, _, ids in prompts.prompt_builder(tasks.get('sst2'), config, arch, tok, config.data).candidates]
  assert max(map(len, words)) > 1, 'the verbalizer must hold a multi-token word'
  cfg = transformer.preset('bert-tiny' if arch == 'encoder' else 'llama-tiny', vocab_size=tok.vocab_size)
  model = LanguageModel(cfg, heads=('prompt',), num_labels=2)
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  params = init_params(model, jax.random.key(0), batch)
  out = model.apply({'params': params}, batch)
  for i, example in enumerate(examples):
    hand = _hand_scores(cfg, params, example, arch)
    np.testing.assert_allclose(np.asarray(out['label_scores'][i, 0]), hand, rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(out['cls_logits'][i]), hand - np.logaddexp(*hand), atol=2e-5)


def test_encoder_masks_one_per_word_piece_and_decoder_continues_the_context(tmp_path):
  if not VOCAB.exists():
    pytest.skip(f'{VOCAB} is not here')
  tok = _wordpiece()
  ex = _examples('encoder', tok, _config())[0]
  # Groups by mask count: 1 mask (terrible, bad, great) and 2 masks (wonderful movie).
  assert ex['tokens'].shape[0] == 2
  for g, masks in enumerate((1, 2)):
    row = ex['tokens'][g]
    assert (row == tok.mask_id).sum() == masks
    text = tok.decode([int(t) for t in row if t not in (tok.pad_id,)], skip_special_tokens=False)
    assert text.startswith('[CLS] a fine and moving film it was [MASK]')
  two = int(np.flatnonzero(ex['score_group'] == 1)[0])
  assert list(ex['score_ids'][two]) == tok.encode('wonderful movie')
  assert list(ex['tokens'][1][ex['score_positions'][two]]) == [tok.mask_id] * 2
  bpe = _bpe(tmp_path)
  dec = _examples('decoder', bpe, _config())[0]
  context = bpe.encode('Review: a fine and moving film\nSentiment:')
  movie = int(np.flatnonzero(ex['score_group'] == 1)[0])
  word = bpe.encode(' wonderful movie')
  row = dec['tokens'][dec['score_group'][movie]]
  assert list(row[:len(context) + len(word) - 1]) == context + word[:-1]
  assert list(dec['score_positions'][movie][:len(word)]) == list(range(len(context) - 1, len(context) - 1 + len(word)))


def test_demonstrations_are_drawn_per_query_and_seed_balanced_and_fit_the_sequence(tmp_path):
  tok = _bpe(tmp_path)
  pool = [{
      'text_a': f'film number {i} was {"great" if i % 2 else "bad"}',
      'text_b': '',
      'label': str(i % 2),
      'idx': i
  } for i in range(40)]
  spec = lambda seed, k=4: prompts.PromptSpec(templates=('Review: {sentence}\nSentiment:',), verbalizer=(
      ('bad',), ('great',)), arch='decoder', demonstrations=k, seed=seed)
  build = lambda seed, seq_len=512, k=4: prompts.PromptExamples(tok, spec(seed, k), seq_len=seq_len, label_names=
                                                                ['0', '1'], fields={'sentence': 'text_a'}, pool=pool)
  demos = build(13)._demonstrations(0)
  assert demos == build(13)._demonstrations(0)  # deterministic per (seed, query)
  assert demos != build(21)._demonstrations(0) and demos != build(13)._demonstrations(1)
  assert sorted(d.endswith(' great') for d in demos) == [False, False, True, True]  # 2 per label
  context = lambda ex: [int(t) for t in ex['tokens'][0][:ex['score_positions'][0, 0] + 1]]  # before the words
  text = tok.decode(context(build(13)(RECORDS[0], index=0)), skip_special_tokens=False)
  assert text == '\n\n'.join(demos) + '\n\nReview: a fine and moving film\nSentiment:'
  # A short sequence keeps the query whole and drops demonstrations from the front.
  query = len(tok.encode('Review: a fine and moving film\nSentiment:'))
  short = build(13, seq_len=query + 20)(RECORDS[0], index=0)
  kept = tok.decode(context(short), skip_special_tokens=False)
  assert kept.endswith('Review: a fine and moving film\nSentiment:') and short['tokens'].shape[-1] == query + 20
  assert kept.count('Sentiment:') < 5


def test_soft_prompt_slots_sit_after_the_first_token_and_move_the_scored_positions():
  if not VOCAB.exists():
    pytest.skip(f'{VOCAB} is not here')
  tok = _wordpiece()
  config = _config()
  config.finetune.strategy, config.finetune.soft_prompt_length = 'soft_prompt', 4
  plain = _examples('encoder', tok, _config())[0]
  soft = _examples('encoder', tok, config)[0]
  assert soft['tokens'].shape == plain['tokens'].shape  # the builder had seq_len - 4 positions
  assert list(soft['soft_prompt_slots'][0, :6]) == [0, 1, 2, 3, 4, 0]
  assert list(soft['tokens'][0, 5:12]) == list(plain['tokens'][0, 1:8])
  np.testing.assert_array_equal(soft['tokens'][1][soft['score_positions'][3]], [tok.mask_id] * 2)
  assert list(soft['positions'][0, :8]) == list(range(8))


@pytest.mark.parametrize('field,value,match', [
    ('template', '{sentense} It was {mask}.', r"config\.finetune\.template=.*\['sentense'\]"),
    ('template', '{sentence} It was good.', r'\{mask\} once'),
    ('verbalizer', '0:bad', r"no word for label\(s\) \['1'\]"),
    ('verbalizer', '0:bad;2:good', r"label '2' is not one of"),
    ('verbalizer', '0 bad;1:good', r'not LABEL:WORD'),
])
def test_bad_templates_and_verbalizers_name_the_field(field, value, match):
  if not VOCAB.exists():
    pytest.skip(f'{VOCAB} is not here')
  config = _config()
  config.finetune[field] = value
  with pytest.raises(ValueError, match=match):
    _examples('encoder', _wordpiece(), config)


def test_a_decoder_template_must_end_at_the_mask(tmp_path):
  config = _config()
  config.finetune.template = 'Review: {sentence} Sentiment: {mask}. Thanks'
  with pytest.raises(ValueError, match='nothing may follow'):
    _examples('decoder', _bpe(tmp_path), config)


# ------------------------------------------------------------------------------ the zero-shot job against torch


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return env


def _torch_scores(model, tok_fn, example_texts):
  """label log-probs from torch: per word the summed log p of its tokens; per label log mean exp."""
  import torch
  out = []
  with torch.no_grad():
    for rows in example_texts:
      words = []
      for ids, positions, targets in rows:
        logits = model(torch.tensor([ids])).logits[0].double()
        lp = torch.log_softmax(logits, -1)
        words.append(float(sum(lp[p, t] for p, t in zip(positions, targets))))
      out.append(words)
  return out


def test_zero_shot_job_matches_transformers_on_an_encoder_and_a_decoder(tmp_path):
  """The evaluate job's label probabilities for a BertForMaskedLM and a LlamaForCausalLM checkpoint equal those
  computed by transformers + torch from the same files; the checkpoints are left as they were."""
  if not VOCAB.exists():
    pytest.skip(f'{VOCAB} is not here')
  import torch
  import transformers
  torch.manual_seed(0)
  data = tmp_path / 'dev.tsv'
  data.write_text('sentence\tlabel\n' + ''.join(f"{r['text_a']}\t{r['label']}\n" for r in RECORDS))
  bert_dir = tmp_path / 'bert'
  bert = transformers.BertForMaskedLM(
      transformers.BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=128, max_position_embeddings=64)).eval()
  bert.save_pretrained(bert_dir)
  (bert_dir / 'vocab.txt').write_bytes(VOCAB.read_bytes())
  before = {p.name: p.read_bytes() for p in bert_dir.iterdir()}
  out = tmp_path / 'zs_bert'
  r = subprocess.run([
      sys.executable, '-m', 'train.evaluate', f'--from={bert_dir}',
      '--config=configs/finetune.py:task=sst2,strategy=prompt,runlocal', f'--data={data}', f'--out={out}',
      f'--config.finetune.verbalizer={VERBALIZER}'
  ], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert {p.name: p.read_bytes() for p in bert_dir.iterdir()} == before
  rows = [json.loads(line) for line in (out / 'predictions.jsonl').read_text().splitlines()]
  tok = _wordpiece()
  words = [('terrible', 0), ('bad', 0), ('great', 1), ('wonderful movie', 1)]
  texts = []
  for rec in RECORDS:
    cands = []
    for word, _ in words:
      ids = tok.encode(word)
      left = tok.encode(f"{rec['text_a']} It was")
      seq = [tok.cls_id, *left, *[tok.mask_id] * len(ids), *tok.encode('.'), tok.sep_id]
      cands.append((seq, [1 + len(left) + j for j in range(len(ids))], ids))
    texts.append(cands)
  for row, scores in zip(rows, _torch_scores(bert, None, texts)):
    label = [np.log(np.mean(np.exp([s for s, (_, lab) in zip(scores, words) if lab == k]))) for k in range(2)]
    probs = np.exp(np.asarray(label) - np.logaddexp(*label))
    np.testing.assert_allclose([row['probabilities']['0'], row['probabilities']['1']], probs, atol=1e-4)


def test_zero_shot_job_matches_transformers_on_a_decoder(tmp_path):
  import torch
  import transformers
  torch.manual_seed(0)
  tok = _bpe(tmp_path)
  data = tmp_path / 'dev.tsv'
  data.write_text('sentence\tlabel\n' + ''.join(f"{r['text_a']}\t{r['label']}\n" for r in RECORDS))
  llama_dir = tmp_path / 'llama'
  llama = transformers.LlamaForCausalLM(
      transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                               tie_word_embeddings=False)).eval()
  llama.save_pretrained(llama_dir)
  tok.save(llama_dir)
  out = tmp_path / 'zs_llama'
  r = subprocess.run([
      sys.executable, '-m', 'train.evaluate', f'--from={llama_dir}',
      '--config=configs/finetune.py:task=sst2,strategy=prompt,runlocal', f'--data={data}', f'--out={out}',
      f'--config.finetune.verbalizer={VERBALIZER}', '--config.finetune.length_norm'
  ], cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [json.loads(line) for line in (out / 'predictions.jsonl').read_text().splitlines()]
  words = [('terrible', 0), ('bad', 0), ('great', 1), ('wonderful movie', 1)]
  texts = []
  for rec in RECORDS:
    context = tok.encode(f"Review: {rec['text_a']}\nSentiment:")
    cands = []
    for word, _ in words:
      ids = tok.encode(' ' + word)
      cands.append((context + ids[:-1], [len(context) - 1 + j for j in range(len(ids))], ids))
    texts.append(cands)
  for row, scores, cands in zip(rows, _torch_scores(llama, None, texts), texts[0:1] * len(rows)):
    per_word = [s / len(c[2]) for s, c in zip(scores, cands)]  # length-normalized
    label = [np.log(np.mean(np.exp([s for s, (_, lab) in zip(per_word, words) if lab == k]))) for k in range(2)]
    probs = np.exp(np.asarray(label) - np.logaddexp(*label))
    np.testing.assert_allclose([row['probabilities']['0'], row['probabilities']['1']], probs, atol=1e-4)


def test_templates_ensemble_as_the_mean_of_their_label_log_probabilities(tmp_path):
  tok = _bpe(tmp_path)
  one, two = 'Review: {sentence}\nSentiment:', '{sentence} It was'
  arrays = lambda template: _examples('decoder', tok, _config(template=template))
  cfg = transformer.preset('llama-tiny', vocab_size=tok.vocab_size)
  model = LanguageModel(cfg, heads=('prompt',), num_labels=2)
  stack = lambda examples: {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  both = stack(arrays(one + prompts.TEMPLATE_SEPARATOR + two))
  params = init_params(model, jax.random.key(0), both)
  logits = lambda batch: np.asarray(model.apply({'params': params}, batch)['cls_logits'])
  expected = (logits(stack(arrays(one))) + logits(stack(arrays(two)))) / 2
  np.testing.assert_allclose(logits(both), expected, atol=1e-5)


def test_a_decoder_soft_prompt_leads_the_context_and_its_vectors_enter_the_scores(tmp_path):
  tok = _bpe(tmp_path)
  config = _config()
  config.finetune.strategy, config.finetune.soft_prompt_length = 'soft_prompt', 3
  examples = _examples('decoder', tok, config)
  plain = _examples('decoder', tok, _config())
  assert list(examples[0]['soft_prompt_slots'][0, :4]) == [1, 2, 3, 0]  # no BOS: the prompt comes first
  assert list(examples[0]['tokens'][0, 3:10]) == list(plain[0]['tokens'][0, :7])
  cfg = transformer.preset('llama-tiny', vocab_size=tok.vocab_size)
  model = LanguageModel(cfg, heads=('prompt',), num_labels=2, soft_prompt_length=3)
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  params = init_params(model, jax.random.key(0), batch)
  moved = dict(params, soft_prompt=params['soft_prompt'] + 1.0)
  out = lambda p: np.asarray(model.apply({'params': p}, batch)['label_scores'][:, 0])
  assert np.abs(out(params) - out(moved)).max() > 1e-4
