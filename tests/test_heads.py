"""Heads against numpy on the backbone's hidden states: MLM (gathered, tied), NSP, LM (tied / untied / scaled),
classifier pooling, and ELECTRA's shared embedding table."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.heads import Electra, LanguageModel
from model.transformer import preset
from model_params import random_params

V = 101


def tiny(name, **kw):
  return preset(name, vocab_size=V, dropout_rate=0.0, attention_dropout_rate=0.0, mlp_dropout_rate=0.0, max_len=64,
                **kw)


def perturbed(params, path, seed=1, size=0.05):
  """A copy of params with the leaf at `path` (a tuple of keys) moved by noise."""
  noise = lambda x: x + size * jnp.asarray(np.random.default_rng(seed).normal(size=x.shape), x.dtype)
  out = jax.tree.map(lambda x: x, params)
  node = out
  for key in path[:-1]:
    node = node[key]
  node[path[-1]] = noise(node[path[-1]])
  return out


@functools.lru_cache(maxsize=None)
def _jitted(module):
  return jax.jit(lambda p, b: module.apply({'params': p}, b))


def apply(module, params, batch):
  return jax.tree.map(np.asarray, _jitted(module)(params, batch))


def f64(x):
  return np.asarray(x, np.float64)


def np_layernorm(x, scale, bias, eps):
  mu = x.mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * f64(scale) + f64(bias)


np_erf = np.vectorize(math.erf)


def np_gelu(x):
  return 0.5 * x * (1.0 + np_erf(x / math.sqrt(2.0)))


TOKENS = np.random.default_rng(0).integers(3, V, size=(2, 12))
MASKED = np.array([[1, 4, 7], [11, 0, 3]])


@functools.lru_cache(maxsize=None)
def bert():
  cfg = tiny('bert-tiny')
  module = LanguageModel(cfg, heads=('mlm', 'nsp'))
  batch = {'tokens': jnp.asarray(TOKENS), 'masked_positions': jnp.asarray(MASKED)}
  return cfg, module, random_params(module, batch, cfg.init_std), batch


# ------------------------------------------------------------------------------------------------- MLM / NSP


def test_mlm_at_masked_positions_equals_gathered_full_logits():
  cfg, module, params, batch = bert()
  gathered = apply(module, params, batch)
  full = apply(module, params, {'tokens': batch['tokens']})
  assert full['mlm_logits'].shape == (2, 12, V) and gathered['mlm_logits'].shape == (2, 3, V)
  want = np.take_along_axis(full['mlm_logits'], MASKED[..., None], axis=1)
  np.testing.assert_allclose(gathered['mlm_logits'], want, atol=1e-5, rtol=0)


def test_mlm_logits_are_the_tied_embedding_formula():
  cfg, module, params, batch = bert()
  assert set(params['mlm']) == {'transform', 'norm', 'bias'}  # no output kernel of its own
  assert [leaf.shape for leaf in jax.tree.leaves(params['mlm']) if V in leaf.shape] == [(V,)]
  out = apply(module, params, batch)
  h = np.take_along_axis(f64(out['hidden']), MASKED[..., None], axis=1)  # [B,P,D]
  m = params['mlm']
  t = np_gelu(h @ f64(m['transform']['kernel']) + f64(m['transform']['bias']))
  t = np_layernorm(t, m['norm']['scale'], m['norm']['bias'], cfg.norm_eps)
  want = t @ f64(params['embed']['token']['embedding']).T + f64(m['bias'])
  np.testing.assert_allclose(out['mlm_logits'], want, atol=1e-4, rtol=1e-4)

  # Moving the input embedding table moves the MLM logits (it is their output projection too).
  moved = apply(module, perturbed(params, ('embed', 'token', 'embedding')), batch)
  assert np.abs(moved['mlm_logits'] - out['mlm_logits']).max() > 1e-2


def test_nsp_logits_read_the_pooled_cls():
  cfg, module, params, batch = bert()
  out = apply(module, params, batch)
  pooled = np.tanh(
      f64(out['hidden'])[:, 0] @ f64(params['pooler']['dense']['kernel']) + f64(params['pooler']['dense']['bias']))
  want = pooled @ f64(params['nsp']['kernel']) + f64(params['nsp']['bias'])
  np.testing.assert_allclose(out['nsp_logits'], want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------------- LM


@pytest.mark.parametrize('name', ['gpt2-tiny', 'llama-tiny', 't5-tiny'])
def test_lm_head_tied_or_untied(name):
  cfg = tiny(name)
  module = LanguageModel(cfg, heads=('lm',))
  if cfg.arch == 'encoder_decoder':
    batch = {'encoder_tokens': jnp.asarray(TOKENS), 'decoder_tokens': jnp.asarray(TOKENS[:, :8])}
  else:
    batch = {'tokens': jnp.asarray(TOKENS)}
  params = random_params(module, batch, cfg.init_std)
  out = apply(module, params, batch)
  hidden = f64(out['hidden'])
  table = f64(params['embed']['token']['embedding'])
  if name == 'llama-tiny':
    assert not cfg.tie_embeddings
    kernel = params['lm']['out']['kernel']
    assert kernel.shape == (cfg.d_model, V)
    want = hidden @ f64(kernel)
    perturb = ('lm', 'out', 'kernel')
  else:
    assert cfg.tie_embeddings and 'lm' not in params
    scale = cfg.d_model ** -0.5 if cfg.scale_tied_logits else 1.0
    assert cfg.scale_tied_logits == (name == 't5-tiny')
    want = (hidden * scale) @ table.T
    perturb = ('embed', 'token', 'embedding')
  np.testing.assert_allclose(out['lm_logits'], want, atol=1e-4, rtol=1e-4)
  moved = apply(module, perturbed(params, perturb), batch)
  assert np.abs(moved['lm_logits'] - out['lm_logits']).max() > 1e-3
  if name == 'llama-tiny':  # the untied output kernel leaves the backbone alone
    np.testing.assert_array_equal(moved['hidden'], out['hidden'])


# ------------------------------------------------------------------------------------------------ classifier

SEGS = np.array([[1] * 9 + [0] * 3, [1] * 12])


@pytest.mark.parametrize('name,pooling', [('bert-tiny', 'cls'), ('bert-tiny', 'mean'), ('bert-tiny', 'last'),
                                          ('gpt2-tiny', None)])
def test_classifier_pooling(name, pooling):
  cfg = tiny(name)
  module = LanguageModel(cfg, heads=('classifier',), num_labels=3, classifier_pooling=pooling)
  batch = {'tokens': jnp.asarray(TOKENS), 'segment_ids': jnp.asarray(SEGS)}
  params = random_params(module, batch, cfg.init_std)
  out = apply(module, params, batch)
  h = f64(out['hidden'])
  lengths = SEGS.sum(1)
  how = pooling or 'last'  # decoders pool the last real token by default
  assert ('pooler' in params) == (how == 'cls')
  if how == 'cls':
    pooled = np.tanh(h[:, 0] @ f64(params['pooler']['dense']['kernel']) + f64(params['pooler']['dense']['bias']))
  elif how == 'mean':
    pooled = np.stack([h[b, :lengths[b]].mean(0) for b in range(2)])
  else:
    pooled = np.stack([h[b, lengths[b] - 1] for b in range(2)])
  want = pooled @ f64(params['classifier']['kernel']) + f64(params['classifier']['bias'])
  assert out['cls_logits'].shape == (2, 3)
  np.testing.assert_allclose(out['cls_logits'], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('frozen', [False, True])
def test_backbone_deterministic_keeps_dropout_in_the_head_only(frozen):
  # The head strategy's frozen backbone is a feature extractor in eval mode; the classifier's dropout still acts.
  cfg = preset('bert-tiny', vocab_size=V, dropout_rate=0.3, attention_dropout_rate=0.3, max_len=64)
  module = LanguageModel(cfg, heads=('classifier',), num_labels=3, classifier_pooling='mean',
                         backbone_deterministic=frozen)
  batch = {'tokens': jnp.asarray(TOKENS), 'segment_ids': jnp.asarray(SEGS)}
  params = random_params(module, batch, cfg.init_std)
  run = lambda seed: module.apply({'params': params}, batch, deterministic=False, rngs=
                                  {'dropout': jax.random.key(seed)})
  (a, b), evaluated = (run(1), run(2)), module.apply({'params': params}, batch)
  assert np.array_equal(a['hidden'], b['hidden']) == frozen
  assert np.array_equal(a['hidden'], evaluated['hidden']) == frozen
  assert not np.allclose(a['cls_logits'], b['cls_logits'])


# ---------------------------------------------------------------------------------------------------- ELECTRA


def test_electra_generator_and_discriminator_share_one_embedding():
  gen = tiny('electra-small-generator', num_layers=2)
  disc = tiny('electra-small-discriminator', num_layers=2)
  module = Electra(gen, disc)
  batch = {'tokens': jnp.asarray(TOKENS), 'masked_positions': jnp.asarray(MASKED)}
  params = random_params(module, batch, disc.init_std)
  assert set(params) == {'embed', 'generator', 'mlm', 'discriminator', 'rtd'}
  for side in ('generator', 'discriminator'):
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(params[side])]
    assert not any('embedding' in p for p in paths), side  # no table of its own
  assert params['embed']['token']['embedding'].shape == (V, 128)

  out = apply(module, params, batch)
  assert out['mlm_logits'].shape == (2, 3, V) and out['rtd_logits'].shape == (2, 12)
  moved = apply(module, perturbed(params, ('embed', 'token', 'embedding')), batch)
  assert np.abs(moved['mlm_logits'] - out['mlm_logits']).max() > 1e-3
  assert np.abs(moved['rtd_logits'] - out['rtd_logits']).max() > 1e-3
  # The two encoders are otherwise independent: moving the generator leaves the discriminator alone.
  gen_moved = jax.tree.map(lambda x: x * 1.1, params['generator'])
  other = apply(module, {**params, 'generator': gen_moved}, batch)
  assert np.abs(other['mlm_logits'] - out['mlm_logits']).max() > 1e-3
  np.testing.assert_array_equal(other['rtd_logits'], out['rtd_logits'])


@pytest.mark.parametrize('vocab_first', [True, False])
def test_projection_gradients_equal_the_plain_einsums(vocab_first):
  """Every one-axis dense layer's own VJP (weight gradient as x^T g) against autodiff of the plain einsum, float64-close."""
  from model.layers import projection
  x = jax.random.normal(jax.random.key(0), (3, 5, 8))
  w = jax.random.normal(jax.random.key(1), (11, 8) if vocab_first else (8, 11))
  g = jax.random.normal(jax.random.key(2), (3, 5, 11))
  plain = lambda x, w: jnp.einsum('...e,ve->...v' if vocab_first else '...e,ev->...v', x, w)
  out, vjp = jax.vjp(lambda x, w: projection(x, w, vocab_first), x, w)
  ref, ref_vjp = jax.vjp(plain, x, w)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  for mine, theirs in zip(vjp(g), ref_vjp(g)):
    assert mine.shape == theirs.shape
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)
