"""train/tasks/losses.py: each loss against float64 numpy written from its formula, masking, ELECTRA's corruption and
labels, the combinator's gradients (weighted sum of the parts') and its refusals."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.heads import Electra, LanguageModel
from model.heads import init_params as _init_params
from model.transformer import preset
from train.tasks import losses as obj
from train import tasks

V = 101


def init_params(model, rng, batch):
  # jitted: eager Flax init dispatches op by op and is several times slower on a loaded 2-core machine
  return jax.jit(lambda r: _init_params(model, r, batch))(rng)


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_ce(logits, targets, weights):
  lp = np_log_softmax(logits)
  nll = -np.take_along_axis(lp, np.asarray(targets)[..., None], -1)[..., 0]
  w = np.asarray(weights, np.float64)
  return (nll * w).sum() / w.sum()


# Fixed small numbers, so a reader can redo the arithmetic.
LOGITS = np.array([[[2.0, 0.5, -1.0, 0.0], [0.1, 0.2, 0.3, 0.4], [1.0, 1.0, 1.0, 1.0]],
                   [[-2.0, 3.0, 0.5, 0.5], [0.0, 0.0, 5.0, 0.0], [4.0, -4.0, 0.0, 1.0]]], np.float32)  # [B=2,P=3,V=4]
LABELS = np.array([[0, 3, 2], [1, 0, 0]], np.int32)
WEIGHTS = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 0.5]], np.float32)


def test_cross_entropy_matches_numpy():
  loss, m = obj.cross_entropy(logits=jnp.asarray(LOGITS), targets=jnp.asarray(LABELS), weights=jnp.asarray(WEIGHTS))
  expected = np_ce(LOGITS, LABELS, WEIGHTS)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m['perplexity'], np.exp(expected), rtol=1e-6)
  # argmax hits: [0,0] yes, [0,1] yes (0.4 is max at 3), [1,0] yes, [1,1] no (2), [1,2] yes (0); weights 1,1,1,1,.5
  np.testing.assert_allclose(m['accuracy'], (1 + 1 + 1 + 0 + 0.5) / 4.5, rtol=1e-6)
  assert float(m['weight_sum']) == 4.5


@pytest.mark.parametrize('eps,c', [(0.0, 0.0), (0.1, 1e-2)])
def test_cross_entropy_gradient_matches_numpy(eps, c):
  """The hand-written VJP: d loss / d logits = w/W [(1-eps)(p - onehot) + eps (p - 1/V) + 2 c log_z p], float64."""
  grad = jax.grad(lambda x: obj.cross_entropy(logits=x, targets=jnp.asarray(LABELS), weights=jnp.asarray(WEIGHTS),
                                              label_smoothing=eps, z_loss=c)[0])(jnp.asarray(LOGITS))
  x = LOGITS.astype(np.float64)
  p = np.exp(np_log_softmax(x))
  onehot = np.eye(x.shape[-1])[LABELS]
  log_z = np.log(np.exp(x).sum(-1, keepdims=True))
  w = WEIGHTS.astype(np.float64)[..., None] / WEIGHTS.sum()
  expected = w * ((1 - eps) * (p - onehot) + eps * (p - 1 / x.shape[-1]) + 2 * c * log_z * p)
  np.testing.assert_allclose(grad, expected, atol=1e-6)
  assert np.all(np.asarray(grad)[0, 2] == 0)  # a weight-0 target sends no gradient


def test_label_smoothing_and_z_loss_match_numpy():
  eps, c = 0.1, 1e-2
  loss, m = obj.cross_entropy(logits=jnp.asarray(LOGITS), targets=jnp.asarray(LABELS), weights=jnp.asarray(WEIGHTS),
                              label_smoothing=eps, z_loss=c)
  lp = np_log_softmax(LOGITS)
  nll = -np.take_along_axis(lp, LABELS[..., None], -1)[..., 0]
  log_z = np.log(np.exp(LOGITS.astype(np.float64)).sum(-1))
  per = (1 - eps) * nll + eps * (-lp.mean(-1)) + c * log_z ** 2
  w = WEIGHTS.astype(np.float64)
  np.testing.assert_allclose(loss, (per * w).sum() / w.sum(), rtol=1e-6)
  np.testing.assert_allclose(m['perplexity'], np.exp((nll * w).sum() / w.sum()), rtol=1e-6)  # plain NLL


def test_mlm_clm_seq2seq_tagging_are_weighted_ce():
  args = dict(logits=jnp.asarray(LOGITS), weights=jnp.asarray(WEIGHTS))
  expected = np_ce(LOGITS, LABELS, WEIGHTS)
  for loss, _ in (obj.mlm_loss(labels=jnp.asarray(LABELS), **args), obj.clm_loss(targets=jnp.asarray(LABELS), **args),
                  obj.seq2seq_loss(targets=jnp.asarray(LABELS),
                                   **args), obj.tagging_loss(labels=jnp.asarray(LABELS), **args)):
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_nsp_and_classification():
  logits = np.array([[1.0, -1.0], [0.3, 0.2], [-2.0, 2.0]], np.float32)
  labels = np.array([0, 1, 1], np.int32)
  expected = np_ce(logits, labels, np.ones(3))
  # by hand, row 0: -log(e^1 / (e^1 + e^-1)) = log(1 + e^-2)
  np.testing.assert_allclose(-np_log_softmax(logits)[0, 0], np.log1p(np.exp(-2.0)), rtol=1e-12)
  loss, m = obj.nsp_loss(logits=jnp.asarray(logits), labels=jnp.asarray(labels))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m['accuracy'], 2 / 3, rtol=1e-6)
  loss, _ = obj.classification_loss(logits=jnp.asarray(logits), labels=jnp.asarray(labels))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_rtd_loss_is_sigmoid_ce():
  logits = np.array([[2.0, -1.0, 0.5, 3.0], [-0.5, 0.0, 1.5, -3.0]], np.float32)
  labels = np.array([[1, 0, 0, 1], [1, 1, 0, 0]], np.int32)
  weights = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  x = logits.astype(np.float64)
  s = 1 / (1 + np.exp(-x))
  per = -(labels * np.log(s) + (1 - labels) * np.log(1 - s))
  loss, m = obj.rtd_loss(logits=jnp.asarray(logits), labels=jnp.asarray(labels), weights=jnp.asarray(weights))
  np.testing.assert_allclose(loss, (per * weights).sum() / weights.sum(), rtol=1e-6)
  # predictions logit > 0: [1,0,1,(1)], [0,0,1,0] vs labels -> right: 1,1,0,(.),0,0,0,1 -> 3 of 7
  np.testing.assert_allclose(m['accuracy'], 3 / 7, rtol=1e-6)
  assert float(m['weight_sum']) == 7


def test_span_qa_and_regression():
  start = np.array([[0.0, 2.0, 1.0, -1.0], [1.0, 0.0, 0.0, 3.0]], np.float32)
  end = np.array([[0.0, 0.0, 2.0, 1.0], [5.0, 0.0, 0.0, 0.0]], np.float32)
  sp, ep = np.array([1, 3]), np.array([2, 3])
  loss, m = obj.span_qa_loss(start_logits=jnp.asarray(start), end_logits=jnp.asarray(end),
                             start_positions=jnp.asarray(sp), end_positions=jnp.asarray(ep))
  expected = 0.5 * (np_ce(start, sp, np.ones(2)) + np_ce(end, ep, np.ones(2)))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m['exact_match'], 0.5)  # row 0 both right, row 1 end wrong
  pred, target = np.array([0.5, 2.0, -1.0], np.float32), np.array([1.0, 2.0, 1.0], np.float32)
  loss, _ = obj.regression_loss(predictions=jnp.asarray(pred)[:, None], targets=jnp.asarray(target))
  np.testing.assert_allclose(loss, (0.25 + 0 + 4) / 3, rtol=1e-6)


def test_mlm_ignores_unmasked_positions():
  base, _ = obj.mlm_loss(logits=jnp.asarray(LOGITS), labels=jnp.asarray(LABELS), weights=jnp.asarray(WEIGHTS))
  changed = LOGITS.copy()
  changed[0, 2] = [100.0, -50.0, 3.0, np.inf]  # weight-0 slot: even inf must not leak
  labels = LABELS.copy()
  labels[0, 2] = 12345  # and an out-of-range id there is harmless
  loss, m = obj.mlm_loss(logits=jnp.asarray(changed), labels=jnp.asarray(labels), weights=jnp.asarray(WEIGHTS))
  assert float(loss) == float(base)
  assert np.isfinite(float(m['perplexity']))
  zero, _ = obj.mlm_loss(logits=jnp.asarray(LOGITS), labels=jnp.asarray(LABELS), weights=jnp.zeros((2, 3)))
  assert float(zero) == 0.0


# ------------------------------------------------------------------------------------------------------ ELECTRA


def test_rtd_labels_are_exactly_token_differs():
  original = jnp.array([[2, 10, 11, 12, 13, 3, 0, 0]])
  masked = jnp.array([[2, 4, 11, 4, 4, 3, 0, 0]])  # 4 = [MASK] at positions 1, 3, 4
  positions = jnp.array([[1, 3, 4, 0]])  # last slot is padding (position 0, weight 0)
  weights = jnp.array([[1.0, 1.0, 1.0, 0.0]])
  # the generator samples: a different token at 1, the original token at 3 (-> label 0), another at 4
  sampled = jnp.array([[50, 12, 60, 99]])
  corrupted = obj.scatter_at_positions(tokens=masked, positions=positions, values=sampled, weights=weights)
  np.testing.assert_array_equal(corrupted, [[2, 50, 11, 12, 60, 3, 0, 0]])  # padding slot wrote nothing at 0
  restored = obj.scatter_at_positions(tokens=masked, positions=positions, values=jnp.array([[10, 12, 13, 0]]),
                                      weights=weights)
  np.testing.assert_array_equal(restored, original)
  segment_ids = jnp.array([[1, 1, 1, 1, 1, 1, 0, 0]])
  labels, w = obj.rtd_labels(corrupted=corrupted, original=original, segment_ids=segment_ids)
  np.testing.assert_array_equal(labels, [[0, 1, 0, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(w, segment_ids.astype(np.float32))


@functools.cache
def _electra_setup():
  disc = preset('bert-tiny', vocab_size=V, max_len=16, dropout_rate=0.0, attention_dropout_rate=0.0, num_layers=1)
  gen = disc.replace(d_model=64, num_heads=1, d_ff=128, embed_dim=128)
  model = Electra(gen, disc)
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, V, (2, 8)).astype(np.int32)
  segment_ids = np.ones((2, 8), np.int32)
  segment_ids[1, 6:] = 0
  positions = np.array([[1, 3, 5], [2, 4, 0]], np.int32)
  mweights = np.array([[1, 1, 1], [1, 1, 0]], np.float32)
  masked_ids = np.take_along_axis(tokens, positions, 1)
  masked = tokens.copy()
  np.put_along_axis(masked, positions, 4, 1)
  masked[1, 0] = tokens[1, 0]  # the padding slot points at 0, which is not masked
  batch = dict(tokens=jnp.asarray(masked), segment_ids=jnp.asarray(segment_ids),
               masked_positions=jnp.asarray(positions), masked_ids=jnp.asarray(masked_ids),
               masked_weights=jnp.asarray(mweights), token_type_ids=jnp.zeros((2, 8), jnp.int32))
  params = init_params(model, jax.random.key(0), batch)
  return model, params, batch


def test_electra_labels_follow_the_generator_sample():
  model, params, batch = _electra_setup()
  loss_fn = jax.jit(tasks.build_loss_fn(model.discriminator_cfg, {'rtd': 1.0}),
                    static_argnames=('model', 'deterministic'))
  real = float(batch['segment_ids'].sum())
  # A generator bias that puts all mass on one id: the original id at every masked slot -> nothing replaced.
  ids = np.asarray(batch['masked_ids'])
  same = jax.tree.map(lambda x: x, params)
  bias = np.zeros(V, np.float32)
  same_batch = dict(batch, masked_ids=jnp.full_like(batch['masked_ids'], 7))
  bias[7] = 1e4
  same['mlm']['bias'] = jnp.asarray(bias)
  _, m = loss_fn(same, same_batch, jax.random.key(1), model=model, deterministic=True)
  assert float(m['rtd/discriminator/positive_fraction']) == 0.0
  assert float(m['rtd/discriminator/weight_sum']) == real
  # ... and all mass on an id no masked slot holds: every real masked slot is replaced.
  other = int(next(i for i in range(5, V) if i not in ids[np.asarray(batch['masked_weights']) > 0]))
  bias = np.zeros(V, np.float32)
  bias[other] = 1e4
  same['mlm']['bias'] = jnp.asarray(bias)
  loss, m = loss_fn(same, batch, jax.random.key(1), model=model, deterministic=True)
  np.testing.assert_allclose(m['rtd/discriminator/positive_fraction'], 5 / real, rtol=1e-6)
  np.testing.assert_allclose(loss, m['rtd/generator/loss'] + 50.0 * m['rtd/discriminator/loss'], rtol=1e-6)


def test_electra_generator_gets_no_gradient_through_the_sample():
  model, params, batch = _electra_setup()
  loss_fn = tasks.build_loss_fn(model.discriminator_cfg, {'rtd': 1.0})
  grads = jax.jit(jax.grad(lambda p: loss_fn(p, batch, jax.random.key(3), model=model, deterministic=True)[0]))(params)

  def gen_only(p):
    logits = model.apply({'params': p}, batch, method=Electra.generate)
    return obj.mlm_loss(logits=logits, labels=batch['masked_ids'], weights=batch['masked_weights'])[0]

  expected = jax.jit(jax.grad(gen_only))(params)
  for key in ('generator', 'mlm'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads[key], expected[key])
  # the shared embedding table learns from both
  assert float(jnp.abs(grads['embed']['token']['embedding'] - expected['embed']['token']['embedding']).max()) > 0


# ---------------------------------------------------------------------------------------------- the combinator


@functools.cache
def _bert_setup():
  cfg = preset('bert-tiny', vocab_size=V, max_len=16, dropout_rate=0.0, attention_dropout_rate=0.0, num_layers=1)
  model = LanguageModel(cfg, heads=tasks.heads_for({'mlm': 1.0, 'nsp': 1.0}))
  rng = np.random.default_rng(1)
  batch = dict(tokens=jnp.asarray(rng.integers(5, V, (2, 8)), jnp.int32), segment_ids=jnp.ones(
      (2, 8), jnp.int32), token_type_ids=jnp.asarray([[0] * 4 + [1] * 4] * 2, jnp.int32),
               masked_positions=jnp.asarray([[1, 2, 6], [3, 5, 0]],
                                            jnp.int32), masked_ids=jnp.asarray(rng.integers(5, V, (2, 3)), jnp.int32),
               masked_weights=jnp.asarray([[1, 1, 1], [1, 1, 0]], jnp.float32), nsp_labels=jnp.asarray([0, 1],
                                                                                                       jnp.int32))
  return cfg, model, init_params(model, jax.random.key(0), batch), batch


def test_heads_for():
  assert tasks.heads_for({'nsp': 1.0, 'mlm': 1.0}) == ('mlm', 'nsp')
  assert tasks.heads_for({'clm': 1.0}) == ('lm',)
  assert tasks.heads_for({'span': 1.0}) == ('lm',)
  assert tasks.heads_for(['qa', 'classification']) == ('classifier', 'qa')


def test_combined_gradient_is_weighted_sum_of_parts():
  cfg, model, params, batch = _bert_setup()
  rng = jax.random.key(0)

  def grad_of(objectives, p):
    fn = tasks.build_loss_fn(cfg, objectives)
    return jax.grad(lambda p: fn(p, batch, rng, model=model, deterministic=True), has_aux=True)(p)

  @jax.jit  # one compilation for the three, to keep the test fast
  def grads(p):
    return grad_of({'mlm': 0.7, 'nsp': 2.0}, p), grad_of({'mlm': 1.0}, p), grad_of({'nsp': 1.0}, p)

  (g_both, metrics), (g_mlm, m_mlm), (g_nsp, m_nsp) = grads(params)
  jax.tree.map(lambda b, m, n: np.testing.assert_allclose(b, 0.7 * m + 2.0 * n, rtol=1e-4, atol=1e-7), g_both, g_mlm,
               g_nsp)
  np.testing.assert_allclose(metrics['loss'], 0.7 * m_mlm['mlm/loss'] + 2.0 * m_nsp['nsp/loss'], rtol=1e-6)
  for key in ('mlm/loss', 'mlm/accuracy', 'mlm/perplexity', 'mlm/weight_sum', 'nsp/loss', 'nsp/accuracy'):
    assert key in metrics
  assert float(metrics['mlm/weight_sum']) == 5.0


def test_clm_runs_end_to_end():
  gpt = preset('gpt2-tiny', vocab_size=V, max_len=16, pad_id=0, bos_id=1, eos_id=1, num_layers=1)
  model = LanguageModel(gpt, heads=tasks.heads_for({'clm': 1.0}))
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) + 5
  batch = dict(tokens=tokens, targets=tokens + 1, weights=jnp.ones((2, 8)), segment_ids=jnp.ones((2, 8), jnp.int32))
  params = init_params(model, jax.random.key(0), batch)
  loss, m = jax.jit(tasks.build_loss_fn(gpt, {'clm': 1.0}), static_argnames='model')(params, batch, jax.random.key(1),
                                                                                     model=model)
  assert np.isfinite(
      float(loss)) and abs(float(m['clm/perplexity']) - np.exp(float(loss))) < 1e-3 * float(m['clm/perplexity'])


def test_span_runs_end_to_end():
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) + 5
  t5 = preset('t5-tiny', vocab_size=V, max_len=16, num_layers=1)
  model = LanguageModel(t5, heads=tasks.heads_for({'span': 1.0}))
  batch = dict(encoder_tokens=tokens, encoder_segment_ids=jnp.ones((2, 8), jnp.int32), decoder_tokens=tokens[:, :4],
               decoder_targets=tokens[:, 1:5], decoder_weights=jnp.ones((2, 4)), decoder_segment_ids=jnp.ones(
                   (2, 4), jnp.int32))
  params = init_params(model, jax.random.key(0), batch)
  loss, m = jax.jit(tasks.build_loss_fn(t5, {'span': 1.0}), static_argnames='model')(params, batch, jax.random.key(1),
                                                                                     model=model)
  assert np.isfinite(float(loss)) and set(m) >= {'span/loss', 'span/accuracy', 'span/weight_sum', 'loss'}


@pytest.mark.parametrize('arch, objectives, names', [
    ('decoder', {
        'nsp': 1.0
    }, ['nsp', 'decoder']),
    ('decoder', {
        'mlm': 1.0
    }, ['mlm', 'decoder', 'clm']),
    ('encoder', {
        'clm': 1.0
    }, ['clm', 'encoder', 'mlm']),
    ('encoder', {
        'span': 1.0
    }, ['span', 'encoder', 'encoder_decoder']),
    ('encoder', {
        'seq2seq': 1.0
    }, ['seq2seq', 'encoder', 'decoder']),
    ('decoder', {
        'rtd': 1.0
    }, ['rtd', 'decoder', 'Electra']),
    ('encoder', {
        'rtd': 1.0,
        'nsp': 1.0
    }, ['rtd', 'nsp']),
    ('encoder', {
        'mlm': 1.0,
        'sop': 1.0
    }, ['sop', 'mlm', 'nsp', 'clm', 'span']),
    ('encoder', {
        'mlm': -1.0
    }, ['mlm', '-1.0']),
    ('encoder', {}, ['mlm']),
])
def test_refusals_name_objective_arch_and_fix(arch, objectives, names):
  with pytest.raises(ValueError) as e:
    tasks.build_loss_fn(arch, objectives)
  for name in names:
    assert name in str(e.value), (name, str(e.value))


def test_refusals_at_call_name_model_and_batch_problems():
  cfg, model, params, batch = _bert_setup()
  with pytest.raises(ValueError, match=r"'rtd'.*Electra"):
    tasks.build_loss_fn(cfg, {'rtd': 1.0})(params, batch, jax.random.key(0), model=model)
  with pytest.raises(ValueError, match=r"\['tagger'\].*heads_for"):
    tasks.build_loss_fn(cfg, {'tagging': 1.0})(params, batch, jax.random.key(0), model=model)
  loss, _ = tasks.build_loss_fn(cfg, {'mlm': 1.0})(params, batch, None, model=model, deterministic=True)
  assert np.isfinite(float(loss))
  with pytest.raises(ValueError, match=r"'nsp'.*nsp_labels"):
    tasks.build_loss_fn(cfg, {'nsp': 1.0})(params, {
        k: v for k, v in batch.items() if k != 'nsp_labels'
    }, jax.random.key(0), model=model)
