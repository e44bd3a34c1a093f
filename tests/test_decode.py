"""KV-cache decoding: cached logits equal a full forward pass; greedy equals beam size 1 and a cache-free loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import decode as dc
from model import heads as hd
from model import transformer as tr

V = 53
_step = jax.jit(dc.decode_step, static_argnames='model')


def _model(name, **kw):
  kw = {'eos_id': 3, **kw}
  cfg = tr.preset(name, vocab_size=V, dropout_rate=0.0, attention_dropout_rate=0.0, mlp_dropout_rate=0.0, **kw)
  return hd.LanguageModel(cfg, heads=('lm',))


def _tokens(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(4, V, shape), jnp.int32)


@pytest.mark.parametrize('name,scan', [('gpt2-tiny', True), ('llama-tiny', False), ('t5-tiny', True)])
def test_cached_logits_equal_full_forward(name, scan):
  model = _model(name, scan_layers=scan)
  b, p, n = 2, 4, 5
  tokens = _tokens((b, p + n))
  if model.cfg.arch == 'encoder_decoder':
    enc = _tokens((b, 6), seed=1)
    enc_seg = jnp.array([[1] * 6, [1] * 4 + [0] * 2])
    batch = dict(encoder_tokens=enc, encoder_segment_ids=enc_seg, decoder_tokens=tokens)
    params = hd.init_params(model, jax.random.key(0), batch)
    encoded = model.apply({'params': params}, batch, method=hd.LanguageModel.encode)
    extra = dict(encoded=encoded, encoder_segment_ids=enc_seg)
  else:
    batch = dict(tokens=tokens)
    params = hd.init_params(model, jax.random.key(0), batch)
    extra = {}
  full = model.apply({'params': params}, batch)['lm_logits']
  cache = dc.init_cache(model, params, b, p + n, **extra)
  pos = jnp.broadcast_to(jnp.arange(p + n), (b, p + n))
  logits, cache = _step(model, params, cache, tokens[:, :p], positions=pos[:, :p], **extra)
  steps = [logits]
  for i in range(p, p + n):
    logits, cache = _step(model, params, cache, tokens[:, i:i + 1], positions=pos[:, i:i + 1], **extra)
    steps.append(logits)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(steps, axis=1)), np.asarray(full), atol=2e-5, rtol=0)


def _no_cache_greedy(model, params, prompt, n):
  """Full forward passes over a fixed-size buffer: causal, so the zeros after position t never matter."""
  p = len(prompt)
  buf = np.zeros((1, p + n), np.int32)
  buf[0, :p] = np.asarray(prompt)
  forward = jax.jit(lambda t: model.apply({'params': params}, dict(tokens=t))['lm_logits'])
  for i in range(p, p + n):
    buf[0, i] = int(jnp.argmax(forward(jnp.asarray(buf))[0, i - 1]))
  return buf[0, p:].tolist()


@pytest.mark.parametrize('name', ['gpt2-tiny', 'llama-tiny'])
def test_greedy_matches_no_cache_loop_with_padded_prompts(name):
  model = _model(name, eos_id=None)
  prompt = _tokens((2, 5), seed=2)
  mask = jnp.array([[1] * 5, [1] * 3 + [0] * 2])
  params = hd.init_params(model, jax.random.key(1), dict(tokens=prompt))
  out, _ = dc.generate(model, params, prompt, prompt_mask=mask, config=dc.DecodeConfig(max_new_tokens=6, eos_id=-1))
  assert out[0].tolist() == _no_cache_greedy(model, params, prompt[0], 6)
  assert out[1].tolist() == _no_cache_greedy(model, params, prompt[1, :3], 6)


@pytest.mark.parametrize('name', ['gpt2-tiny', 'llama-tiny', 't5-tiny'])
def test_greedy_equals_beam_size_one(name):
  model = _model(name)
  params, kw = _params_and_inputs(model)
  greedy, _ = dc.generate(model, params, config=dc.DecodeConfig(max_new_tokens=7), **kw)
  beam, _ = dc.generate(model, params, config=dc.DecodeConfig(method='beam', num_beams=1, max_new_tokens=7), **kw)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(beam))


def _params_and_inputs(model):
  if model.cfg.arch == 'encoder_decoder':
    enc = _tokens((2, 6), seed=3)
    params = hd.init_params(model, jax.random.key(2), dict(encoder_tokens=enc, decoder_tokens=enc))
    return params, dict(encoder_tokens=enc)
  prompt = _tokens((2, 4), seed=3)
  return hd.init_params(model, jax.random.key(2), dict(tokens=prompt)), dict(prompt=prompt)


def test_beam_search_scores_and_eos_padding():
  model = _model('t5-tiny')
  params, kw = _params_and_inputs(model)
  greedy, greedy_logp = dc.generate(model, params, config=dc.DecodeConfig(max_new_tokens=6, eos_id=-1), **kw)
  beam, beam_score = dc.generate(model, params, config=dc.DecodeConfig(method='beam', num_beams=4, max_new_tokens=6,
                                                                       eos_id=-1), **kw)
  # With no EOS and no length penalty, beam search scores sequences by total log-prob: never below greedy's.
  assert np.all(np.asarray(beam_score) >= np.asarray(greedy_logp) - 1e-4)
  # Stopping at EOS: declare greedy's 3rd token EOS; everything after it is padding.
  eos = int(greedy[0, 2])
  out, _ = dc.generate(model, params, config=dc.DecodeConfig(max_new_tokens=6, eos_id=eos), **kw)
  first = out[0].tolist().index(eos)
  assert first <= 2 and all(t == model.cfg.pad_id for t in out[0].tolist()[first + 1:])


def test_sampling_top_k_one_is_greedy_and_seeds_differ():
  model = _model('gpt2-tiny', eos_id=None)
  params, kw = _params_and_inputs(model)
  greedy, _ = dc.generate(model, params, config=dc.DecodeConfig(max_new_tokens=6, eos_id=-1), **kw)
  top1, _ = dc.generate(model, params, config=dc.DecodeConfig(method='sample', top_k=1, max_new_tokens=6, eos_id=-1),
                        rng=jax.random.key(5), **kw)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(top1))
  hot = dc.DecodeConfig(method='sample', temperature=5.0, max_new_tokens=8, eos_id=-1)
  a, _ = dc.generate(model, params, config=hot, rng=jax.random.key(0), **kw)
  b, _ = dc.generate(model, params, config=hot, rng=jax.random.key(1), **kw)
  assert not np.array_equal(np.asarray(a), np.asarray(b))


def test_filter_logits_top_k_and_top_p_against_numpy():
  logits = jnp.log(jnp.array([[0.5, 0.05, 0.3, 0.15]]))
  kept = np.asarray(dc.filter_logits(logits, top_k=2)) > -1e8
  np.testing.assert_array_equal(kept, [[True, False, True, False]])
  # Nucleus 0.75: sorted probs 0.5, 0.3, ... reach 0.8 >= 0.75 after two tokens.
  kept = np.asarray(dc.filter_logits(logits, top_p=0.75)) > -1e8
  np.testing.assert_array_equal(kept, [[True, False, True, False]])
  kept = np.asarray(dc.filter_logits(logits, top_p=0.85)) > -1e8
  np.testing.assert_array_equal(kept, [[True, False, True, True]])


def test_bad_decode_config_names_the_field():
  with pytest.raises(ValueError, match='method'):
    dc.DecodeConfig(method='nucleus').validate()
  with pytest.raises(ValueError, match='top_p'):
    dc.DecodeConfig(top_p=0.0).validate()


def test_bfloat16_decoding_compiles_without_loop_invariant_motion_and_decodes_the_same():
  """On a CPU, decoding in bfloat16 is compiled without while-loop invariant code motion (model/transformer.py
  forward_compiler_options; faster there), float32 with it; the option changes no token: generate equals the same
  loop jitted with XLA's default passes."""
  assert tr.forward_compiler_options('float32') == {}
  assert 'while-loop-invariant-code-motion' in tr.forward_compiler_options('bfloat16').get('xla_disable_hlo_passes', '')
  model = _model('llama-tiny', eos_id=None, dtype='bfloat16', param_dtype='bfloat16')
  prompt = _tokens((2, 5), seed=3)
  mask = jnp.array([[1] * 5, [1] * 4 + [0]])
  params = hd.init_params(model, jax.random.key(2), dict(tokens=prompt))
  config = dc.DecodeConfig(max_new_tokens=6, eos_id=-1)
  out, scores = dc.generate(model, params, prompt, prompt_mask=mask, config=config)
  plain = jax.jit(dc._sample_loop, static_argnames=('model', 'dcfg'))  # pylint: disable=protected-access
  ref, ref_scores = plain(model, params, prompt, mask, None, None, jax.random.key(0), config)
  assert out.tolist() == ref.tolist()
  np.testing.assert_allclose(np.asarray(scores), np.asarray(ref_scores), rtol=1e-2)
