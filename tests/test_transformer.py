"""The backbones' contracts on tiny presets of every family: causality, padding, packing, scan == unroll, remat keeps
gradients, chunked == plain inside the model, bfloat16 sanity, published parameter counts and config validation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.heads import LanguageModel, count_params, init_params
from model.transformer import ModelConfig, inference_layout, preset, stack_layers, unstack_layers
from model_params import random_params

FAMILIES = ('bert-tiny', 'gpt2-tiny', 'llama-tiny', 't5-tiny')
DECODERS = ('gpt2-tiny', 'llama-tiny', 't5-tiny')
V = 101


def tiny(name, **kw) -> ModelConfig:
  return preset(name, vocab_size=V, dropout_rate=0.0, attention_dropout_rate=0.0, mlp_dropout_rate=0.0, max_len=64,
                **kw)


def model(cfg):
  return LanguageModel(cfg, heads=('mlm',) if cfg.arch == 'encoder' else ('lm',))


def logits_key(cfg):
  return 'mlm_logits' if cfg.arch == 'encoder' else 'lm_logits'


def make_batch(cfg, tokens, segs, dec_tokens=None, dec_segs=None):
  """numpy [B,T] tokens and segment ids -> the model's batch (encoder-decoder: decoder side as given or the same)."""
  if cfg.arch == 'encoder_decoder':
    dec_tokens = tokens if dec_tokens is None else dec_tokens
    dec_segs = segs if dec_segs is None else dec_segs
    return {
        'encoder_tokens': jnp.asarray(tokens, jnp.int32),
        'encoder_segment_ids': jnp.asarray(segs, jnp.int32),
        'decoder_tokens': jnp.asarray(dec_tokens, jnp.int32),
        'decoder_segment_ids': jnp.asarray(dec_segs, jnp.int32)
    }
  return {'tokens': jnp.asarray(tokens, jnp.int32), 'segment_ids': jnp.asarray(segs, jnp.int32)}


@functools.lru_cache(maxsize=None)
def params_for(name):
  """Scanned float32 params of the tiny preset (shared by every variant that has the same parameter tree)."""
  cfg = tiny(name)
  return random_params(model(cfg), make_batch(cfg, np.ones((1, 4)), np.ones((1, 4))), cfg.init_std)


@functools.lru_cache(maxsize=None)
def apply_fn(cfg):
  return jax.jit(lambda params, batch: model(cfg).apply({'params': params}, batch))


def run(cfg, params, batch):
  return jax.tree.map(np.asarray, apply_fn(cfg)(params, batch))


def tokens(shape, seed=0):
  return np.random.default_rng(seed).integers(3, V, size=shape)


# ------------------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize('name', DECODERS)
def test_causality(name):
  cfg = tiny(name)
  params = params_for(name)
  t, cut = 12, 5
  toks = tokens((2, t))
  changed = toks.copy()
  shift = 1 + np.random.default_rng(1).integers(0, V - 4, size=(2, t - cut - 1))
  changed[:, cut + 1:] = 3 + (toks[:, cut + 1:] - 3 + shift) % (V - 3)
  assert (changed[:, cut + 1:] != toks[:, cut + 1:]).all()
  segs = np.ones((2, t))
  if cfg.arch == 'encoder_decoder':  # the decoder side changes; the encoder input is fixed
    enc = tokens((2, t), 2)
    a = run(cfg, params, make_batch(cfg, enc, segs, toks, segs))
    b = run(cfg, params, make_batch(cfg, enc, segs, changed, segs))
    np.testing.assert_array_equal(a['encoded'], b['encoded'])
  else:
    a = run(cfg, params, make_batch(cfg, toks, segs))
    b = run(cfg, params, make_batch(cfg, changed, segs))
  for key in ('hidden', 'lm_logits'):
    np.testing.assert_allclose(b[key][:, :cut + 1], a[key][:, :cut + 1], atol=1e-6, rtol=0, err_msg=key)
    assert np.abs(b[key][:, cut + 1:] - a[key][:, cut + 1:]).max(axis=-1).min() > 1e-4, key


# --------------------------------------------------------------------------------------------------- padding


@pytest.mark.parametrize('name', FAMILIES)
def test_padding_changes_no_real_output(name):
  cfg = tiny(name)
  params = params_for(name)
  t, pad = 12, 3
  toks = tokens((2, t), 3)
  base = run(cfg, params, make_batch(cfg, toks, np.ones((2, t))))
  # Appended padding: segment id 0, and deliberately arbitrary token ids (their content must not matter either).
  padded_toks = np.concatenate([toks, tokens((2, pad), 4)], axis=1)
  padded_segs = np.concatenate([np.ones((2, t)), np.zeros((2, pad))], axis=1)
  out = run(cfg, params, make_batch(cfg, padded_toks, padded_segs))
  for key in ('hidden', logits_key(cfg)) + (('encoded',) if cfg.arch == 'encoder_decoder' else ()):
    np.testing.assert_allclose(out[key][:, :t], base[key], atol=1e-5, rtol=0, err_msg=key)


# --------------------------------------------------------------------------------------------------- packing

# Row 0 packs sequences A (7) and B (5); row 1 packs C (5) and D (7); both rows end in 3 padding tokens. T5's decoder
# side packs a (4) + b (8) and c (8) + d (4), so each example pairs encoder and decoder sequences of different lengths.
# "Alone" runs each sequence in its own row, right-padded to 12 (padding invariance is tested above); two shapes serve
# every test here, which keeps compilation (the cost of this file) down.
ENC_LENS = ((7, 5), (5, 7))
DEC_LENS = ((4, 8), (8, 4))
PACKED, ALONE = 15, 12


def _packed(lens, seed):
  toks = tokens((2, PACKED), seed)
  segs = np.array([[1] * a + [2] * b + [0] * (PACKED - a - b) for a, b in lens])
  return toks, segs


def _split(x, lens):
  """Packed [2,T,...] -> the four sequences, in the order A, D (first batch) and B, C (second batch)."""
  (a, b), (c, d) = lens
  return [x[0, :a], x[1, c:c + d]], [x[0, a:a + b], x[1, :c]]


def _alone(seqs):
  """Sequences -> tokens [2, ALONE] right-padded, segment ids, and the real-position mask."""
  toks = np.zeros((len(seqs), ALONE), np.int64)
  segs = np.zeros((len(seqs), ALONE), np.int64)
  for i, seq in enumerate(seqs):
    toks[i, :len(seq)], segs[i, :len(seq)] = seq, 1
  return toks, segs


@pytest.mark.parametrize('name', FAMILIES)
def test_packing_equals_each_sequence_alone(name):
  cfg = tiny(name)
  params = params_for(name)
  enc_toks, enc_segs = _packed(ENC_LENS, 5)
  if cfg.arch == 'encoder_decoder':
    dec_toks, dec_segs = _packed(DEC_LENS, 6)
    packed = run(cfg, params, make_batch(cfg, enc_toks, enc_segs, dec_toks, dec_segs))
    alone = [
        run(cfg, params, make_batch(cfg, *_alone(e), *_alone(d)))
        for e, d in zip(_split(enc_toks, ENC_LENS), _split(dec_toks, DEC_LENS))
    ]
    checks = [('encoded', ENC_LENS), ('hidden', DEC_LENS), ('lm_logits', DEC_LENS)]
  else:
    packed = run(cfg, params, make_batch(cfg, enc_toks, enc_segs))
    alone = [run(cfg, params, make_batch(cfg, *_alone(seqs))) for seqs in _split(enc_toks, ENC_LENS)]
    checks = [('hidden', ENC_LENS), (logits_key(cfg), ENC_LENS)]
  for key, lens in checks:
    for group, out in zip(_split(packed[key], lens), alone):
      for i, got in enumerate(group):
        np.testing.assert_allclose(got, out[key][i, :len(got)], atol=1e-5, rtol=0, err_msg=key)


def test_packing_is_not_vacuous():
  """Without segment ids the same packed row differs: the packing test above would catch a mask that leaked."""
  cfg = tiny('bert-tiny')
  params = params_for('bert-tiny')
  toks, segs = _packed(ENC_LENS, 5)
  packed = run(cfg, params, make_batch(cfg, toks, segs))
  unpacked = run(cfg, params, make_batch(cfg, toks, np.ones(segs.shape)))
  assert np.abs(packed['hidden'] - unpacked['hidden']).max() > 1e-3


# ----------------------------------------------------------------------------------------- scan / unroll / remat


def _rich_batch(cfg):
  """Packed rows with trailing padding, length 15 (not a multiple of 4): exercises masks in every path."""
  toks = tokens((2, PACKED), 7)
  segs = np.array([[1] * 7 + [2] * 5 + [0] * 3, [1] * 13 + [0] * 2])
  if cfg.arch == 'encoder_decoder':
    dec_segs = np.array([[1] * 4 + [2] * 6 + [0] * 5, [1] * 15])
    return make_batch(cfg, toks, segs, tokens((2, PACKED), 8), dec_segs), dec_segs != 0
  return make_batch(cfg, toks, segs), segs != 0


@pytest.mark.parametrize('name', FAMILIES)
def test_scanned_equals_unrolled(name):
  cfg = tiny(name)
  params = params_for(name)
  unrolled_cfg = cfg.replace(scan_layers=False)
  unrolled = unstack_layers(params)
  # The converted tree is exactly what an unrolled model initializes.
  batch, real = _rich_batch(cfg)
  shapes = jax.eval_shape(lambda: init_params(model(unrolled_cfg), jax.random.key(0), batch))
  assert jax.tree.structure(shapes) == jax.tree.structure(unrolled)
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, unrolled)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(unrolled)]
  assert any("['layers_1']" in p for p in paths) and not any("['layers']" in p for p in paths)
  restacked = stack_layers(unrolled)
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((np.asarray(a) == np.asarray(b)).all()), restacked, params))

  a = run(cfg, params, batch)
  b = run(unrolled_cfg, unrolled, batch)
  for key in ('hidden', logits_key(cfg)):
    np.testing.assert_allclose(b[key][real], a[key][real], atol=1e-5, rtol=0, err_msg=key)


def test_inference_layout_unrolls_only_a_stack_that_runs_in_one_iteration():
  """A small scanned stack comes back unrolled with its params unstacked (the same outputs); one whose loop runs a
  layer an iteration (scan_unroll=1) comes back as it was, every leaf the same array."""
  cfg = tiny('gpt2-tiny')
  params = params_for('gpt2-tiny')
  assert cfg.layers_per_iteration(cfg.num_layers) == cfg.num_layers
  small_cfg, small = inference_layout(cfg, params)
  assert not small_cfg.scan_layers and 'layers_0' in small['transformer']['stack']
  batch, real = _rich_batch(cfg)
  a, b = run(cfg, params, batch), run(small_cfg, small, batch)
  np.testing.assert_allclose(b[logits_key(cfg)][real], a[logits_key(cfg)][real], atol=1e-5, rtol=0)
  looped = cfg.replace(scan_unroll=1)
  same_cfg, same = inference_layout(looped, params)
  assert same_cfg == looped and same is params
  t5 = tiny('t5-tiny', num_decoder_layers=6, scan_unroll=0, d_model=512)  # its decoder stack would loop
  assert inference_layout(t5, {'x': 1})[0] == t5


def _grads(cfg, params, batch, weights):
  key = logits_key(cfg)

  def loss(p):
    return (model(cfg).apply({'params': p}, batch)[key] * weights).sum()

  return jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(params))


@pytest.mark.parametrize('name,scan,policies', [('llama-tiny', True, ('full',)), ('gpt2-tiny', False, ('dots',)),
                                                ('gpt2-tiny', True, ('projections',))])
def test_remat_changes_no_gradient(name, scan, policies):
  cfg = tiny(name, scan_layers=scan, remat_policy='none')
  params = params_for(name) if scan else unstack_layers(params_for(name))
  batch, _ = _rich_batch(cfg)
  weights = np.random.default_rng(0).normal(size=(2, PACKED, V)).astype(np.float32)
  base = _grads(cfg, params, batch, weights)
  assert max(np.abs(g).max() for g in jax.tree.leaves(base)) > 0
  for policy in policies:
    remat_cfg = cfg.replace(remat_policy=policy)
    jaxpr = str(jax.make_jaxpr(lambda p: model(remat_cfg).apply({'params': p}, batch))(params))
    assert 'checkpoint' in jaxpr or 'remat' in jaxpr, policy  # the policy really wraps the layers
    got = _grads(remat_cfg, params, batch, weights)
    for path, g0 in jax.tree_util.tree_leaves_with_path(base):
      g1 = functools.reduce(lambda t, k: t[k.key], path, got)
      scale = max(np.abs(g0).max(), 1e-12)
      assert np.abs(g1 - g0).max() <= 1e-6 * scale, (policy, jax.tree_util.keystr(path))


def test_auto_remat_is_projections_for_a_cpu_loop_and_none_unrolled():
  """remat_policy='auto' (the default) wraps a stack run as a loop in 'projections' ('dots' if post-norm) on CPU and leaves one that runs all its
  layers in one iteration alone; an explicit policy is kept; the gradients are those of no remat."""
  cfg = tiny('gpt2-tiny')
  n = cfg.num_layers
  assert cfg.remat_policy == 'auto' and n > 1
  looped = cfg.replace(scan_unroll=1)
  assert cfg.remat_for(n) == 'none' and cfg.replace(scan_layers=False).remat_for(n) == 'none'
  assert looped.remat_for(n) == ('projections' if jax.default_backend() == 'cpu' else 'none')
  post_norm = tiny('bert-tiny').replace(scan_unroll=1)
  assert post_norm.remat_for(post_norm.num_layers) == ('dots' if jax.default_backend() == 'cpu' else 'none')
  assert looped.replace(remat_policy='full').remat_for(n) == 'full' and looped.remat_for(n, 'none') == 'none'
  with pytest.raises(ValueError, match="remat_policy='dot'.*'auto'"):
    cfg.replace(remat_policy='dot')
  params = params_for('gpt2-tiny')
  batch, _ = _rich_batch(cfg)
  jaxpr = lambda c: str(jax.make_jaxpr(lambda p: model(c).apply({'params': p}, batch))(params))
  assert 'checkpoint' in jaxpr(looped) or 'remat' in jaxpr(looped)
  assert 'checkpoint' not in jaxpr(cfg) and 'remat' not in jaxpr(cfg)
  weights = np.random.default_rng(1).normal(size=(2, PACKED, V)).astype(np.float32)
  base, got = (_grads(c, params, batch, weights) for c in (looped.replace(remat_policy='none'), looped))
  for g0, g1 in zip(jax.tree.leaves(base), jax.tree.leaves(got)):
    assert np.abs(g1 - g0).max() <= 1e-6 * max(np.abs(g0).max(), 1e-12)


# ------------------------------------------------------------------------------------ chunked, bfloat16


@pytest.mark.parametrize('name', FAMILIES)
def test_chunked_attention_in_model_equals_plain(name):
  cfg = tiny(name)  # 'auto': the plain path on CPU (and for float32 anywhere); reuses the padding test's compile
  params = params_for(name)
  batch, real = _rich_batch(cfg)
  a = run(cfg, params, batch)
  b = run(cfg.replace(attention_impl='chunked', attention_chunk=4), params, batch)
  for key in ('hidden', logits_key(cfg)):
    np.testing.assert_allclose(b[key][real], a[key][real], atol=1e-5, rtol=0, err_msg=key)


@pytest.mark.parametrize('name', FAMILIES)
def test_bfloat16_compute_close_to_float32(name):
  cfg = tiny(name)
  params = params_for(name)
  batch = make_batch(cfg, tokens((2, 12), 9), np.ones((2, 12)))
  a = run(cfg, params, batch)
  b = apply_fn(cfg.replace(dtype='bfloat16'))(params, batch)
  key = logits_key(cfg)
  assert b['hidden'].dtype == jnp.bfloat16
  got = np.asarray(b[key], np.float32)
  assert np.isfinite(got).all()
  rel = np.linalg.norm(got - a[key]) / np.linalg.norm(a[key])
  assert rel < 5e-2, rel


@pytest.mark.parametrize('name', FAMILIES)
def test_bfloat16_gradients_close_to_float32(name):
  """bfloat16 compute over float32 parameters (on a CPU every dense layer's products run row-major in float32
  accumulation, its bias gradient as a ones-vector product: model/layers.py): each parameter's gradient stays
  within bfloat16's error of float32's (measured before those paths existed: largest relative error 0.016 bert,
  0.009 gpt2, 0.011 llama, 0.090 t5, whose unscaled attention logits amplify rounding; a transposed or misplaced
  product gives ~1)."""
  cfg = tiny(name)
  params = params_for(name)
  batch = make_batch(cfg, tokens((2, 12), 9), np.ones((2, 12)))
  key = logits_key(cfg)

  def grads(c):
    loss = lambda p: jnp.mean(jax.nn.log_softmax(model(c).apply({'params': p}, batch)[key].astype(jnp.float32))[..., 3])
    return jax.tree.map(np.asarray, jax.jit(jax.grad(loss))(params))

  a, b = grads(cfg), grads(cfg.replace(dtype='bfloat16'))
  flat_a, flat_b = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)
  for (path, ga), gb in zip(flat_a, flat_b):
    assert gb.dtype == ga.dtype == np.float32, path
    scale = np.linalg.norm(ga)
    if scale > 1e-6:
      rel = np.linalg.norm(gb - ga) / scale
      assert rel < (0.15 if cfg.arch == 'encoder_decoder' else 3e-2), (jax.tree_util.keystr(path), rel)


@pytest.mark.parametrize('transposed', [False, True])
@pytest.mark.parametrize('rows, e, v', [(12, 16, 40), (5, 7, 9), (1, 16, 40), (300, 16, 40)])
def test_bfloat16_projection_and_bias_gradients_against_float64(transposed, rows, e, v):
  """model/layers.py's projection (and the bias add) in bfloat16, forward and VJP, against the float64 formulas
  y = x w (x w^T for a tied table), dx = g w^T, dw = x^T g (g^T x), db = sum g; odd sizes take the transpose's
  fallback; 1, 12 and 300 rows take the tied table's three forward forms (_mm_transposed)."""
  from model import layers
  rng = np.random.default_rng(0)
  x = rng.standard_normal((rows, e))
  w = rng.standard_normal((v, e) if transposed else (e, v))
  b = rng.standard_normal(v)
  g = rng.standard_normal((rows, v))
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  fwd = lambda x, w, b: layers._add_bias(layers.projection(x, w, transposed), b, 1)
  y, vjp = jax.vjp(fwd, bf(x), bf(w), bf(b))
  dx, dw, db = vjp(bf(g))
  wm = w.T if transposed else w
  want = {'y': (y, x @ wm + b), 'dx': (dx, g @ wm.T), 'dw': (dw, (x.T @ g).T if transposed else x.T @ g),
          'db': (db, g.sum(0))}
  for k, (got, ref) in want.items():
    assert got.dtype == jnp.bfloat16 and got.shape == ref.shape, k
    rel = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
    assert rel < 2e-2, (k, rel)


# ---------------------------------------------------------------------------------------------- param counts


def _count(name, heads):
  cfg = preset(name)
  if cfg.arch == 'encoder_decoder':
    batch = {'encoder_tokens': jnp.zeros((1, 8), jnp.int32), 'decoder_tokens': jnp.zeros((1, 8), jnp.int32)}
  else:
    batch = {'tokens': jnp.zeros((1, 8), jnp.int32)}
  shapes = jax.eval_shape(lambda: init_params(LanguageModel(cfg, heads=heads), jax.random.key(0), batch))
  return count_params(shapes)


@pytest.mark.parametrize(
    'name,heads,published,exact',
    [
        # BERT paper: 110M. HF BertForPreTraining: BertModel 109,482,240 (embeddings 23,837,184 + 12 x 7,087,872 +
        # pooler 590,592) + MLM transform/norm/bias 622,650 + NSP 1,538 = 110,106,428.
        ('bert-base', ('mlm', 'nsp'), 110e6, 110_106_428),
        ('gpt2-small', ('lm',), 124e6, 124_439_808),  # HF GPT2LMHeadModel (tied)
        ('smollm2-135m', ('lm',), 135e6, 134_515_008),  # HF SmolLM2-135M (tied)
        ('t5-small', ('lm',), 60e6, 60_506_624),  # HF T5ForConditionalGeneration t5-small
    ])
def test_parameter_counts_match_published(name, heads, published, exact):
  n = _count(name, heads)
  assert abs(n - published) / published < 0.01, n
  if exact is not None:
    assert n == exact


# -------------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize('overrides,field', [
    (dict(d_model=130, num_heads=4), 'd_model'),
    (dict(num_heads=4, num_kv_heads=3), 'num_kv_heads'),
    (dict(arch='rnn'), 'arch'),
    (dict(position='alibi'), 'position'),
])
def test_config_validation_names_the_field(overrides, field):
  with pytest.raises(ValueError, match=rf'\b{field}\b'):
    ModelConfig(**overrides)
  with pytest.raises(ValueError, match=rf'\b{field}\b'):
    preset('bert-tiny', **overrides)


def test_preset_unknown_field_and_name():
  with pytest.raises(ValueError, match='num_hedas'):
    preset('bert-tiny', num_hedas=4)
  with pytest.raises(ValueError, match='bert-huge'):
    preset('bert-huge')
  assert preset('bert-tiny', num_layers=3).num_layers == 3
