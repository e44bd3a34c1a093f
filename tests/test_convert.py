"""model/convert/ against transformers: random-init HF models of every family, built offline from small configs and
saved with save_pretrained, are imported and must give the same logits (and MLM / NSP / RTD / pooler outputs) on padded
inputs to <= 1e-4 in float32; exported back, transformers loads them with no missing or unexpected tensors and the same
logits. Bad files (truncated safetensors, an unsupported model_type, a shape mismatch) raise one ConversionError
naming the file, field or tensor."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault('HF_HUB_OFFLINE', '1')
torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
transformers.logging.set_verbosity_error()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from model import convert  # noqa: E402
from model import pytree  # noqa: E402
from model.heads import Electra, LanguageModel  # noqa: E402

TOL = 1e-4
V, B, T = 101, 2, 9
REAL = np.array([[1] * T, [1] * 6 + [0] * (T - 6)], np.int32)  # row 1 right-padded


def _ids(rng, pad, avoid=()):
  ids = rng.integers(3, V, size=(B, T)).astype(np.int32)
  for a in avoid:
    ids[ids == a] = a + 1
  return np.where(REAL == 1, ids, pad).astype(np.int32)


def _spice(model, std=0.15):
  """Random init is nearly uniform attention, zero biases and unit norms, which would hide a wrong bias, norm or
  q/k layout; noise on every parameter (ties kept: a tied tensor is one Parameter) makes every weight matter."""
  g = torch.Generator().manual_seed(123)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn(p.shape, generator=g) * std)
  return model


def _save(model, path, spice=True):
  if spice:
    _spice(model)
  model.eval()
  model.save_pretrained(path)
  return path


def _torch(x):
  return torch.tensor(np.asarray(x), dtype=torch.long)


def _apply(conv, batch):
  module = LanguageModel(conv.cfg, heads=conv.heads)
  return jax.jit(module.apply)({'params': conv.params}, {k: jnp.asarray(v) for k, v in batch.items()})


def _diff(ours, theirs, mask=None):
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
  d = np.abs(ours - theirs)
  if mask is not None:
    d = d[mask.astype(bool)]
  return float(d.max())


def _roundtrip(conv, tmp_path, cls, inputs, reference, key, mask):
  """export -> transformers from_pretrained (nothing missing or unexpected) -> the same outputs as the original."""
  out = convert.export_hf(conv, tmp_path / 'exported')
  model, info = cls.from_pretrained(out, output_loading_info=True)
  model.eval()
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  with torch.no_grad():
    got = getattr(model(**inputs), key).numpy()
  d = _diff(got, reference, mask)
  assert d <= TOL, d
  return d


DIFFS = {}


def _record(name, d):
  DIFFS[name] = max(d, DIFFS.get(name, 0.0))
  assert d <= TOL, f'{name}: max abs diff {d}'


# ----------------------------------------------------------------------------------------------------- encoders


def _bert_cfg(**kw):
  return dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
              max_position_embeddings=64, **kw)


@pytest.mark.parametrize('scan', [True, False])
def test_bert_pretraining(tmp_path, scan):
  torch.manual_seed(0)
  hf = _save(transformers.BertForPreTraining(transformers.BertConfig(**_bert_cfg())), tmp_path / 'hf')
  conv = convert.import_hf(hf, scan_layers=scan)
  assert conv.heads == ('mlm', 'nsp') and conv.cfg.scan_layers == scan
  rng = np.random.default_rng(0)
  ids, types = _ids(rng, 0), rng.integers(0, 2, (B, T)).astype(np.int32) * REAL
  model = transformers.BertForPreTraining.from_pretrained(hf).eval()
  inputs = dict(input_ids=_torch(ids), attention_mask=_torch(REAL), token_type_ids=_torch(types))
  with torch.no_grad():
    ref = model(**inputs)
  out = _apply(conv, {'tokens': ids, 'segment_ids': REAL, 'token_type_ids': types})
  _record('bert mlm', _diff(out['mlm_logits'], ref.prediction_logits, REAL))
  _record('bert nsp', _diff(out['nsp_logits'], ref.seq_relationship_logits))
  _record(
      'bert export',
      _roundtrip(conv, tmp_path, transformers.BertForPreTraining, inputs, ref.prediction_logits.numpy(),
                 'prediction_logits', REAL))


def _pooled(conv, hidden):
  from model.heads import Pooler
  return Pooler(conv.cfg).apply({'params': conv.params['pooler']}, hidden)


def test_bert_base_model_hidden_states_and_pooler(tmp_path):
  """BertModel's pooler is imported (params['pooler'], with no head that builds it) and exported back: transformers'
  pooler_output is the same before and after, not a fresh random pooler."""
  torch.manual_seed(1)
  hf = _save(transformers.BertModel(transformers.BertConfig(**_bert_cfg(hidden_act='gelu_new'))), tmp_path / 'hf')
  conv = convert.import_hf(hf)
  assert conv.heads == () and conv.cfg.activation == 'gelu_tanh'
  assert set(pytree.flatten(conv.params['pooler'])) == {'dense/kernel', 'dense/bias'}
  assert not any('pooler' in u for u in conv.unused), conv.unused
  ids = _ids(np.random.default_rng(1), 0)
  inputs = dict(input_ids=_torch(ids), attention_mask=_torch(REAL))
  with torch.no_grad():
    ref = transformers.BertModel.from_pretrained(hf).eval()(**inputs)
  out = _apply(conv, {'tokens': ids, 'segment_ids': REAL})
  _record('bert hidden', _diff(out['hidden'], ref.last_hidden_state, REAL))
  _record('bert pooler', _diff(_pooled(conv, out['hidden']), ref.pooler_output))
  # Through our own layout and back out: the exported BertModel holds the same pooler (nothing missing, unexpected).
  convert.save(conv, tmp_path / 'ours')
  d = _roundtrip(convert.load(tmp_path / 'ours'), tmp_path, transformers.BertModel, inputs, ref.pooler_output.numpy(),
                 'pooler_output', None)
  _record('bert pooler export', d)


def test_bert_classifier_checkpoint_pooler_merges(tmp_path):
  """BertForSequenceClassification ('bert.'-prefixed): the pooler is kept; a LanguageModel with a 'cls'-pooled
  classifier takes it via merge_params, only the classifier stays fresh, and its pooled output equals transformers'."""
  from model.heads import init_params
  from train.core import pretrained
  torch.manual_seed(17)
  hf = _save(transformers.BertForSequenceClassification(transformers.BertConfig(**_bert_cfg(num_labels=3))),
             tmp_path / 'hf')
  conv = convert.import_hf(hf, scan_layers=False)
  assert conv.heads == () and 'pooler' in conv.params
  assert sorted(conv.unused) == ['classifier.bias', 'classifier.weight'], conv.unused
  module = LanguageModel(conv.cfg, heads=('classifier',), num_labels=3, classifier_pooling='cls')
  ids = _ids(np.random.default_rng(17), 0)
  batch = {'tokens': jnp.asarray(ids), 'segment_ids': jnp.asarray(REAL)}
  initial = init_params(module, jax.random.key(0), batch)
  merged, report = pretrained.merge_params(initial, conv.params, where=str(hf), report=True)
  assert report.fresh == ['classifier/bias', 'classifier/kernel'] and not report.unused
  assert 'pooler/dense/kernel' in report.loaded and len(report.loaded) == len(pytree.flatten(conv.params))
  with torch.no_grad():
    ref = transformers.BertModel.from_pretrained(hf).eval()(input_ids=_torch(ids), attention_mask=_torch(REAL))
  hidden = module.apply({'params': merged}, batch)['hidden']
  _record('bert classifier pooler', _diff(_pooled(conv, hidden), ref.pooler_output))


def test_roberta_mlm(tmp_path):
  torch.manual_seed(2)
  cfg = transformers.RobertaConfig(**_bert_cfg(type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2))
  hf = _save(transformers.RobertaForMaskedLM(cfg), tmp_path / 'hf')
  conv = convert.import_hf(hf)
  assert conv.heads == ('mlm',) and conv.cfg.max_len == 64 - 2
  ids = _ids(np.random.default_rng(2), 1, avoid=(1,))
  model = transformers.RobertaForMaskedLM.from_pretrained(hf).eval()
  inputs = dict(input_ids=_torch(ids), attention_mask=_torch(REAL))
  with torch.no_grad():
    ref = model(**inputs).logits.numpy()
  # Our positions count from 0; the import dropped RoBERTa's pad_id + 1 unused position rows so they line up.
  out = _apply(conv, {'tokens': ids, 'segment_ids': REAL})
  _record('roberta mlm', _diff(out['mlm_logits'], ref, REAL))
  _record('roberta export', _roundtrip(conv, tmp_path, transformers.RobertaForMaskedLM, inputs, ref, 'logits', REAL))


def _electra_cfg(hidden, heads, ff):
  return transformers.ElectraConfig(vocab_size=V, embedding_size=16, hidden_size=hidden, num_hidden_layers=2,
                                    num_attention_heads=heads, intermediate_size=ff, max_position_embeddings=64)


def test_electra_generator_discriminator_and_combined(tmp_path):
  torch.manual_seed(3)
  gen_hf = _save(transformers.ElectraForMaskedLM(_electra_cfg(24, 2, 40)), tmp_path / 'gen')
  torch.manual_seed(4)
  disc_model = _spice(transformers.ElectraForPreTraining(_electra_cfg(32, 4, 48)))
  # ELECTRA shares one embedding table between the two; make the random checkpoints do so too.
  disc_model.electra.embeddings.load_state_dict(
      transformers.ElectraForMaskedLM.from_pretrained(gen_hf).electra.embeddings.state_dict())
  disc_hf = _save(disc_model, tmp_path / 'disc', spice=False)
  gen, disc = convert.import_hf(gen_hf), convert.import_hf(disc_hf)
  assert gen.heads == ('mlm',) and disc.heads == ('rtd',) and gen.cfg.embed_dim == 16
  rng = np.random.default_rng(3)
  ids, types = _ids(rng, 0), rng.integers(0, 2, (B, T)).astype(np.int32) * REAL
  inputs = dict(input_ids=_torch(ids), attention_mask=_torch(REAL), token_type_ids=_torch(types))
  with torch.no_grad():
    ref_mlm = transformers.ElectraForMaskedLM.from_pretrained(gen_hf).eval()(**inputs).logits.numpy()
    ref_rtd = transformers.ElectraForPreTraining.from_pretrained(disc_hf).eval()(**inputs).logits.numpy()
  batch = {'tokens': ids, 'segment_ids': REAL, 'token_type_ids': types}
  _record('electra generator mlm', _diff(_apply(gen, batch)['mlm_logits'], ref_mlm, REAL))
  _record('electra discriminator rtd', _diff(_apply(disc, batch)['rtd_logits'], ref_rtd, REAL))
  _record('electra generator export',
          _roundtrip(gen, tmp_path / 'g', transformers.ElectraForMaskedLM, inputs, ref_mlm, 'logits', REAL))
  _record('electra discriminator export',
          _roundtrip(disc, tmp_path / 'd', transformers.ElectraForPreTraining, inputs, ref_rtd, 'logits', REAL))
  # Both halves as one models.heads.Electra.
  gcfg, dcfg, params = convert.electra_params(gen, disc)
  positions = np.tile(np.arange(T, dtype=np.int32), (B, 1))
  batch_all = {**batch, 'masked_positions': positions}
  out = Electra(gcfg, dcfg).apply({'params': params}, {k: jnp.asarray(v) for k, v in batch_all.items()})
  _record('electra combined mlm', _diff(out['mlm_logits'], ref_mlm, REAL))
  _record('electra combined rtd', _diff(out['rtd_logits'], ref_rtd, REAL))


# ----------------------------------------------------------------------------------------------------- decoders


def _decoder_parity(tmp_path, model, name, cls, pad):
  hf = _save(model, tmp_path / 'hf')
  conv = convert.import_hf(hf)
  assert conv.heads == ('lm',), conv.heads
  ids = _ids(np.random.default_rng(5), pad)
  inputs = dict(input_ids=_torch(ids), attention_mask=_torch(REAL))
  with torch.no_grad():
    ref = cls.from_pretrained(hf).eval()(**inputs).logits.numpy()
  out = _apply(conv, {'tokens': ids, 'segment_ids': REAL})
  _record(f'{name} lm', _diff(out['lm_logits'], ref, REAL))
  _record(f'{name} export', _roundtrip(conv, tmp_path, cls, inputs, ref, 'logits', REAL))
  return conv


def test_gpt2(tmp_path):
  torch.manual_seed(6)
  cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                                eos_token_id=0)
  conv = _decoder_parity(tmp_path, transformers.GPT2LMHeadModel(cfg), 'gpt2', transformers.GPT2LMHeadModel, 0)
  assert conv.cfg.activation == 'gelu_tanh' and conv.cfg.tie_embeddings


def _llama_cfg(**kw):
  return dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=40, max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
              pad_token_id=0, **kw)


def test_llama_gqa_untied(tmp_path):
  torch.manual_seed(7)
  cfg = transformers.LlamaConfig(**_llama_cfg(rope_theta=500.0))
  conv = _decoder_parity(tmp_path, transformers.LlamaForCausalLM(cfg), 'llama', transformers.LlamaForCausalLM, 0)
  assert conv.cfg.kv_heads == 2 and not conv.cfg.tie_embeddings and conv.cfg.rope_theta == 500.0


def test_smollm2_style_tied(tmp_path):
  torch.manual_seed(8)
  cfg = transformers.LlamaConfig(**_llama_cfg(tie_word_embeddings=True, head_dim=16))  # head_dim != D / N
  conv = _decoder_parity(tmp_path, transformers.LlamaForCausalLM(cfg), 'llama tied', transformers.LlamaForCausalLM, 0)
  assert conv.cfg.tie_embeddings and conv.cfg.head_width == 16


def test_mistral(tmp_path):
  torch.manual_seed(9)
  cfg = transformers.MistralConfig(**_llama_cfg(sliding_window=32))
  conv = _decoder_parity(tmp_path, transformers.MistralForCausalLM(cfg), 'mistral', transformers.MistralForCausalLM, 0)
  assert conv.family == 'mistral' and conv.cfg.max_len == 32  # exact up to the sliding window


# ------------------------------------------------------------------------------------------------------------- T5


@pytest.mark.parametrize('version', ['v1_0', 'v1_1'])
def test_t5(tmp_path, version):
  torch.manual_seed(10)
  kw = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_decoder_layers=3, num_heads=4,
            relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)
  if version == 'v1_1':
    kw.update(feed_forward_proj='gated-gelu', tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw))
  hf = _save(model, tmp_path / 'hf')
  if version == 'v1_1':
    # T5 v1.1 checkpoints have their own lm_head (transformers 5 writes a tied one; give it a distinct one).
    from safetensors.numpy import load_file, save_file
    sd = load_file(str(hf / 'model.safetensors'))
    sd['lm_head.weight'] = np.random.default_rng(0).normal(0, 1, sd['shared.weight'].shape).astype(np.float32)
    save_file(sd, str(hf / 'model.safetensors'), metadata={'format': 'pt'})
  conv = convert.import_hf(hf)
  assert conv.cfg.gated_mlp == (version == 'v1_1') and conv.cfg.decoder_layers == 3
  assert conv.cfg.tie_embeddings == (version == 'v1_0')
  assert conv.cfg.scale_tied_logits == (version == 'v1_0')
  rng = np.random.default_rng(10)
  enc, dec = _ids(rng, 0), _ids(rng, 0)
  dec_real = np.array([[1] * 4 + [0] * (T - 4), [1] * T], np.int32)  # pad the other row on the decoder side
  dec = np.where(dec_real == 1, dec, 0).astype(np.int32)
  inputs = dict(input_ids=_torch(enc), attention_mask=_torch(REAL), decoder_input_ids=_torch(dec),
                decoder_attention_mask=_torch(dec_real))
  with torch.no_grad():
    ref = transformers.T5ForConditionalGeneration.from_pretrained(hf).eval()(**inputs).logits.numpy()
  out = _apply(conv, {
      'encoder_tokens': enc,
      'encoder_segment_ids': REAL,
      'decoder_tokens': dec,
      'decoder_segment_ids': dec_real
  })
  _record(f't5 {version} lm', _diff(out['lm_logits'], ref, dec_real))
  _record(f't5 {version} export',
          _roundtrip(conv, tmp_path, transformers.T5ForConditionalGeneration, inputs, ref, 'logits', dec_real))


# ------------------------------------------------------------------------------------------------------- GGUF


def _write_gguf(path, model, tokens):
  """A tiny LLaMA GGUF file as llama.cpp's converter writes it (q/k rows permuted; F32, F16, Q8_0 and Q4_0 tensors)."""
  gguf = pytest.importorskip('gguf')
  cfg = model.config
  w = gguf.GGUFWriter(str(path), 'llama')
  w.add_block_count(cfg.num_hidden_layers)
  w.add_context_length(cfg.max_position_embeddings)
  w.add_embedding_length(cfg.hidden_size)
  w.add_feed_forward_length(cfg.intermediate_size)
  w.add_head_count(cfg.num_attention_heads)
  w.add_head_count_kv(cfg.num_key_value_heads)
  w.add_rope_freq_base(10_000.0)
  w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  w.add_vocab_size(cfg.vocab_size)
  w.add_tokenizer_model('gpt2')
  w.add_token_list(tokens)
  w.add_token_types([3 if t.startswith('<|') else 1 for t in tokens])
  w.add_token_merges([])
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  names = {
      'model.embed_tokens.weight': 'token_embd.weight',
      'model.norm.weight': 'output_norm.weight',
      'lm_head.weight': 'output.weight'
  }
  layer = {v: k for k, v in convert.GGUF_LAYER_TENSORS.items()}
  quant = [gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0]
  for i, (name, t) in enumerate(model.state_dict().items()):
    a = t.numpy().astype(np.float32)
    if name.startswith('model.layers.'):
      idx, rest = name[len('model.layers.'):].split('.', 1)
      rest = rest[:-len('.weight')]
      gname = f'blk.{idx}.{layer[rest]}.weight'
      if rest == 'self_attn.q_proj':
        a = convert.to_gguf_layout(a, cfg.num_attention_heads)
      elif rest == 'self_attn.k_proj':
        a = convert.to_gguf_layout(a, cfg.num_key_value_heads)
    else:
      gname = names[name]
    if a.ndim == 2:
      q = quant[i % 3]
      data = gguf.quants.quantize(a, q)
      w.add_tensor(gname, data, raw_shape=data.shape, raw_dtype=q)
    else:
      w.add_tensor(gname, a)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()


def test_gguf_llama(tmp_path):
  gguf = pytest.importorskip('gguf')
  torch.manual_seed(11)
  cfg = transformers.LlamaConfig(**{
      **_llama_cfg(), 'hidden_size': 64,
      'intermediate_size': 64,
      'vocab_size': 96,
      'head_dim': 16
  })
  model = _spice(transformers.LlamaForCausalLM(cfg)).eval()
  tokens = ['<|unk|>', '<|bos|>', '<|eos|>'] + [chr(ord('a') + i % 26) * (1 + i // 26) for i in range(93)]
  path = tmp_path / 'tiny.gguf'
  _write_gguf(path, model, tokens)
  conv = convert.import_gguf(path)
  assert conv.family == 'llama' and not conv.cfg.tie_embeddings and conv.cfg.kv_heads == 2
  # Reference: the same dequantized weights in the HF layout, loaded into transformers.
  reader = gguf.GGUFReader(str(path))
  deq = {
      t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))
      for t in reader.tensors
  }
  sd = {}
  for name in model.state_dict():
    if name.startswith('model.layers.'):
      idx, rest = name[len('model.layers.'):].split('.', 1)
      rest = rest[:-len('.weight')]
      a = deq[f'blk.{idx}.{ {v: k for k, v in convert.GGUF_LAYER_TENSORS.items()}[rest]}.weight']
      n = {'self_attn.q_proj': cfg.num_attention_heads, 'self_attn.k_proj': cfg.num_key_value_heads}.get(rest)
      a = convert.from_gguf_layout(a, n) if n else a
    else:
      a = deq[{
          'model.embed_tokens.weight': 'token_embd.weight',
          'model.norm.weight': 'output_norm.weight',
          'lm_head.weight': 'output.weight'
      }[name]]
    sd[name] = torch.tensor(np.asarray(a, np.float32))
  model.load_state_dict(sd)
  ids = _ids(np.random.default_rng(11), 0)
  ids = np.minimum(ids, 95)
  with torch.no_grad():
    ref = model(input_ids=_torch(ids), attention_mask=_torch(REAL)).logits.numpy()
  out = _apply(conv, {'tokens': ids, 'segment_ids': REAL})
  _record('gguf llama (F16/Q8_0/Q4_0)', _diff(out['lm_logits'], ref, REAL))
  # Without the q/k un-permutation the logits would differ: the permutation is real, not a no-op.
  assert not np.allclose(deq['blk.0.attn_q.weight'], sd['model.layers.0.self_attn.q_proj.weight'].numpy())
  # Its tokenizer, from the metadata.
  tok = conv.tokenizer
  assert tok.get_vocab_size() == 96 and tok.token_to_id('<|eos|>') == 2
  assert tok.encode('<|bos|>', add_special_tokens=False).ids == [1]
  # Saved in our layout, the params and the tokenizer (via train/data/tokenizers.py) load back.
  convert.save(conv, tmp_path / 'ours')
  again = convert.load(tmp_path / 'ours')
  assert again.cfg == conv.cfg and again.heads == conv.heads
  for path, a in pytree.flatten(conv.params).items():
    np.testing.assert_array_equal(pytree.flatten(again.params)[path], a, err_msg=path)
  tokenizers = pytest.importorskip('train.data.tokenizers')
  wrapped = tokenizers.Tokenizer.load(tmp_path / 'ours')
  assert wrapped.vocab_size == 96 and wrapped.encode('<|eos|>') == [2]
  # And it exports as a HF LLaMA checkpoint.
  _record(
      'gguf llama export',
      _roundtrip(conv, tmp_path, transformers.LlamaForCausalLM, dict(input_ids=_torch(ids),
                                                                     attention_mask=_torch(REAL)), ref, 'logits', REAL))


# ------------------------------------------------------------------------------------------ save / load and CLI


def test_cli_import_export_roundtrip(tmp_path):
  torch.manual_seed(12)
  _save(transformers.BertForMaskedLM(transformers.BertConfig(**_bert_cfg())), tmp_path / 'hf')
  (tmp_path / 'hf'
   / 'vocab.txt').write_text('\n'.join(['[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]'] + [f'w{i}' for i in range(V - 5)])
                             + '\n')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for cmd in (['import', f'--from={tmp_path / "hf"}',
               f'--to={tmp_path / "ours"}'], ['export', f'--from={tmp_path / "ours"}', f'--to={tmp_path / "back"}']):
    r = subprocess.run([sys.executable, '-m', 'model.convert', *cmd], cwd=root, env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
  ours = convert.load(tmp_path / 'ours')
  assert ours.heads == ('mlm',) and ours.cfg.scan_layers
  assert (tmp_path / 'ours' / 'vocab.txt').exists() and (tmp_path / 'back' / 'vocab.txt').exists()
  from safetensors.numpy import load_file
  a, b = load_file(str(tmp_path / 'hf' / 'model.safetensors')), load_file(str(tmp_path / 'back' / 'model.safetensors'))
  assert set(b) <= set(a)
  for k in b:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # The tokenizer that came with the checkpoint loads with it.
  tokenizers = pytest.importorskip('train.data.tokenizers')
  tok = tokenizers.Tokenizer.load(tmp_path / 'ours')
  assert tok.encode('w3 w7') == [8, 12] and tok.mask_id == 4


# --------------------------------------------------------------------------------------------------- bad files


def test_truncated_safetensors(tmp_path):
  torch.manual_seed(13)
  hf = _save(
      transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2,
                                                           n_positions=16)), tmp_path / 'hf')
  f = hf / 'model.safetensors'
  data = f.read_bytes()
  f.write_bytes(data[:len(data) // 2])
  with pytest.raises(convert.ConversionError, match='model.safetensors.*truncated'):
    convert.import_hf(hf)
  f.write_bytes(data[:5])
  with pytest.raises(convert.ConversionError, match='model.safetensors'):
    convert.import_hf(hf)


def test_unsupported_family(tmp_path):
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'falcon', 'hidden_size': 8}))
  with pytest.raises(convert.ConversionError, match="model_type='falcon' is not supported"):
    convert.import_hf(tmp_path)
  (tmp_path / 'config.json').write_text(json.dumps({'hidden_size': 8}))
  with pytest.raises(convert.ConversionError, match='no model_type'):
    convert.import_hf(tmp_path)


def test_unsupported_field(tmp_path):
  torch.manual_seed(14)
  hf = _save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama_cfg())), tmp_path / 'hf')
  cfg = json.loads((hf / 'config.json').read_text())
  cfg['rope_parameters'] = {'rope_type': 'yarn', 'rope_theta': 10000.0, 'factor': 4.0}
  (hf / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(convert.ConversionError, match="rope_type='yarn'"):
    convert.import_hf(hf)


def test_shape_mismatch_names_tensor(tmp_path):
  torch.manual_seed(15)
  hf = _save(transformers.BertForMaskedLM(transformers.BertConfig(**_bert_cfg())), tmp_path / 'hf')
  cfg = json.loads((hf / 'config.json').read_text())
  cfg['intermediate_size'] = 38
  (hf / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(
      convert.ConversionError, match=r"'bert.encoder.layer.0.intermediate.dense.weight' has shape "
      r"\(37, 32\).*transformer/stack/layers_0/mlp/wi/kernel"):
    convert.import_hf(hf)


def test_missing_tensor_names_it(tmp_path):
  from safetensors.numpy import load_file, save_file
  torch.manual_seed(16)
  hf = _save(transformers.LlamaForCausalLM(transformers.LlamaConfig(**_llama_cfg())), tmp_path / 'hf')
  sd = load_file(str(hf / 'model.safetensors'))
  del sd['model.layers.1.mlp.up_proj.weight']
  save_file(sd, str(hf / 'model.safetensors'))
  with pytest.raises(convert.ConversionError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
    convert.import_hf(hf)


def test_bad_gguf(tmp_path):
  p = tmp_path / 'bad.gguf'
  p.write_bytes(b'GGUF' + b'\0' * 10)
  with pytest.raises(convert.ConversionError, match='bad.gguf'):
    convert.import_gguf(p)


# ------------------------------------------------------------------------------ lmlab-trained models -> transformers


@pytest.mark.parametrize('family,preset,heads,cls', [
    ('bert', 'bert-tiny', ('mlm', 'nsp'), 'BertForPreTraining'),
    ('gpt2', 'gpt2-tiny', ('lm',), 'GPT2LMHeadModel'),
    ('llama', 'llama-tiny', ('lm',), 'LlamaForCausalLM'),
    ('t5', 't5-tiny', ('lm',), 'T5ForConditionalGeneration'),
])
def test_export_lmlab_model(tmp_path, family, preset, heads, cls):
  """A model initialized (as if trained) in lmlab, with no HF config to start from, exports and runs the same."""
  from model.heads import init_params
  from model.transformer import preset as make
  extra = {'max_len': 32, 'num_layers': 2} if family != 't5' else {'num_layers': 1}
  if family == 'gpt2':
    extra.update(pad_id=0, bos_id=0, eos_id=0)
  cfg = make(preset, vocab_size=V, **extra)
  rng = np.random.default_rng(20)
  if cfg.arch == 'encoder_decoder':
    batch = {
        'encoder_tokens': _ids(rng, 0),
        'encoder_segment_ids': REAL,
        'decoder_tokens': _ids(rng, 0),
        'decoder_segment_ids': REAL
    }
  else:
    batch = {'tokens': _ids(rng, cfg.pad_id), 'segment_ids': REAL}
  module = LanguageModel(cfg, heads=heads)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  params = jax.jit(lambda b: init_params(module, jax.random.key(0), b))(batch)
  # Larger, non-zero weights everywhere (biases and norms included), so that every tensor matters.
  noise = np.random.default_rng(1)
  params = jax.tree.map(lambda l: np.asarray(l) + np.float32(0.15) * noise.standard_normal(l.shape, np.float32), params)
  ours = jax.jit(module.apply)({'params': params}, batch)
  conv = convert.Converted(cfg=cfg, params=params, heads=heads, family=family)
  out = convert.export_hf(conv, tmp_path / 'hf')
  model, info = getattr(transformers, cls).from_pretrained(out, output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  model.eval()
  with torch.no_grad():
    if family == 't5':
      ref = model(input_ids=_torch(batch['encoder_tokens']), attention_mask=_torch(REAL),
                  decoder_input_ids=_torch(batch['decoder_tokens']), decoder_attention_mask=_torch(REAL))
    else:
      ref = model(input_ids=_torch(batch['tokens']), attention_mask=_torch(REAL))
  if family == 'bert':
    _record('lmlab bert -> hf mlm', _diff(ours['mlm_logits'], ref.prediction_logits, REAL))
    _record('lmlab bert -> hf nsp', _diff(ours['nsp_logits'], ref.seq_relationship_logits))
  else:
    _record(f'lmlab {family} -> hf', _diff(ours['lm_logits'], ref.logits, REAL))
  # And back in: the same params.
  back = convert.import_hf(out, scan_layers=cfg.scan_layers)
  assert back.heads == heads
  for path, a in pytree.flatten(jax.tree.map(np.asarray, params)).items():
    np.testing.assert_allclose(pytree.flatten(back.params)[path], a, rtol=0, atol=0, err_msg=path)


def test_pytorch_bin_and_bfloat16(tmp_path):
  torch.manual_seed(21)
  model = _spice(
      transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2,
                                                           n_positions=16)))
  model.eval()
  model.config.save_pretrained(tmp_path)
  torch.save(model.state_dict(), tmp_path / 'pytorch_model.bin')
  conv = convert.import_hf(tmp_path)
  ids = _ids(np.random.default_rng(21), 0)
  with torch.no_grad():
    ref = model(input_ids=_torch(ids), attention_mask=_torch(REAL)).logits.numpy()
  _record('gpt2 from pytorch_model.bin',
          _diff(_apply(conv, {
              'tokens': ids,
              'segment_ids': REAL
          })['lm_logits'], ref, REAL))
  half = convert.import_hf(tmp_path, param_dtype='bfloat16')
  assert half.cfg.param_dtype == 'bfloat16'
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree.leaves(half.params))


def test_report_diffs():
  """Prints the max abs differences measured above (pytest -s shows them)."""
  for k, v in sorted(DIFFS.items()):
    print(f'{k:34s} {v:.2e}')
