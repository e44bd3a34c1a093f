"""train/core/optim.py: schedules against their formulas, where weight decay applies, frozen subtrees (zero update, no
state), gradient accumulation, clipping and layer-wise learning-rate decay, on small hand-made param trees shaped like
the model's (a scanned stack with a leading layer axis, unrolled layers, norms, biases, heads)."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from model import pytree
from train.core import optim

L = 3


def params_tree(seed=0):
  r = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(r.normal(size=s), jnp.float32)  # noqa: E731
  return {
      'embed': {
          'token': {
              'embedding': f(11, 4)
          },
          'norm': {
              'scale': f(4),
              'bias': f(4)
          }
      },
      'transformer': {
          'stack': {
              'layers': {
                  'mlp': {
                      'wi': {
                          'kernel': f(L, 4, 8),
                          'bias': f(L, 8)
                      }
                  },
                  'mlp_norm': {
                      'scale': f(L, 4),
                      'bias': f(L, 4)
                  }
              },
              'final_norm': {
                  'scale': f(4)
              }
          }
      },
      'mlm': {
          'transform': {
              'kernel': f(4, 4),
              'bias': f(4)
          },
          'bias': f(11)
      },
  }


def cfg(**kw):
  base = dict(optimizer='adamw', learning_rate=0.1, warmup_steps=0, decay='constant', total_steps=100, weight_decay=0.0,
              clip_norm=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def step(tx, params, grads_list):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g in grads_list:
    u, state = update(g, state, params)
    params = optax.apply_updates(params, u)
  return params, state


def flat(tree):
  return {pytree.path_str(kp): np.asarray(v) for kp, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ------------------------------------------------------------------------------------------------ schedules


def test_linear_schedule_formula():
  c = cfg(learning_rate=1.0, warmup_steps=10, decay='linear', total_steps=110, end_lr=0.1)
  lr = optim.learning_rate_fn(c)
  for s in (0, 5, 10, 60, 110, 200):
    expected = s / 10 if s < 10 else 1.0 + (0.1 - 1.0) * min(s - 10, 100) / 100
    np.testing.assert_allclose(lr(s), expected, rtol=1e-6, err_msg=str(s))


def test_cosine_schedule_formula():
  c = cfg(learning_rate=2.0, warmup_steps=4, decay='cosine', total_steps=24, end_lr=0.0)
  lr = optim.learning_rate_fn(c)
  for s in (2, 4, 9, 14, 24):
    expected = 2.0 * s / 4 if s < 4 else 2.0 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 20))
    np.testing.assert_allclose(lr(s), expected, rtol=1e-5, atol=1e-7, err_msg=str(s))


def test_inverse_sqrt_and_constant_formulas():
  lr = optim.learning_rate_fn(cfg(learning_rate=0.01, warmup_steps=100, decay='inverse_sqrt'))
  for s in (50, 100, 400, 10_000):
    expected = 0.01 * s / 100 if s < 100 else 0.01 * math.sqrt(100 / s)
    np.testing.assert_allclose(lr(s), expected, rtol=1e-6, err_msg=str(s))
  lr = optim.learning_rate_fn(cfg(learning_rate=0.3, warmup_steps=3, decay='constant'))
  np.testing.assert_allclose([lr(s) for s in (0, 1, 3, 50)], [0.0, 0.1, 0.3, 0.3], rtol=1e-6)


def test_schedule_drives_sgd_updates():
  c = cfg(optimizer='sgd', learning_rate=1.0, warmup_steps=2, decay='linear', total_steps=4)
  tx = optim.make_optimizer(c)
  p = {'w': jnp.zeros(())}
  state = tx.init(p)
  seen = []
  for _ in range(4):
    u, state = tx.update({'w': jnp.ones(())}, state, p)
    seen.append(-float(u['w']))
  np.testing.assert_allclose(seen, [0.0, 0.5, 1.0, 0.5], rtol=1e-6)


# --------------------------------------------------------------------------------------------- weight decay


def test_decay_mask_kernels_and_embeddings_only():
  mask = flat(optim.decay_mask(params_tree()))
  assert [p for p, m in mask.items() if m
         ] == ['embed/token/embedding', 'mlm/transform/kernel', 'transformer/stack/layers/mlp/wi/kernel']


def test_weight_decay_skips_norms_and_biases():
  params = params_tree()
  zeros = jax.tree.map(jnp.zeros_like, params)
  new, _ = step(optim.make_optimizer(cfg(weight_decay=0.1)), params, [zeros])
  before, after = flat(params), flat(new)
  for path in before:
    if path.endswith(('kernel', 'embedding')):
      np.testing.assert_allclose(after[path], before[path] * (1 - 0.1 * 0.1), rtol=1e-6)  # p - lr * wd * p
    else:
      np.testing.assert_array_equal(after[path], before[path])


# --------------------------------------------------------------------------------------------------- freezing


def test_trainable_mask_patterns():
  params = params_tree()
  mask = flat(optim.trainable_mask(params, frozen=['embed', r'transformer/stack/layers/mlp_.*']))
  assert not mask['embed/token/embedding'] and not mask['embed/norm/scale']
  assert not mask['transformer/stack/layers/mlp_norm/scale'] and mask['transformer/stack/layers/mlp/wi/kernel']
  head_only = flat(optim.trainable_mask(params, trainable=['mlm/*']))
  assert [p for p, m in head_only.items() if m] == ['mlm/bias', 'mlm/transform/bias', 'mlm/transform/kernel']
  with pytest.raises(ValueError, match=r"frozen pattern 'embeddings'.*matches no parameter"):
    optim.trainable_mask(params, frozen=['embeddings'])


def test_frozen_subtree_gets_zero_update_and_no_state():
  params = params_tree()
  tx = optim.make_optimizer(cfg(weight_decay=0.1, clip_norm=1.0, frozen=['embed', 'transformer/stack/layers/mlp']))
  grads = [params_tree(seed) for seed in (1, 2, 3)]
  new, state = step(tx, params, grads)
  before, after = flat(params), flat(new)
  frozen = [p for p in before if p.startswith(('embed/', 'transformer/stack/layers/mlp/'))]
  assert len(frozen) == 5
  for path in before:
    if path in frozen:
      np.testing.assert_array_equal(after[path], before[path])
    else:
      assert np.abs(after[path] - before[path]).max() > 0, path
  # Adam's moments exist for trainable leaves only; frozen ones are MaskedNode (no memory).
  adam = [
      s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
      if isinstance(s, optax.ScaleByAdamState)
  ]
  assert len(adam) == 1
  mu = adam[0].mu
  masked = jax.tree.leaves(mu, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
  assert sum(isinstance(x, optax.MaskedNode) for x in masked) == len(frozen)
  state_floats = sum(x.size for x in jax.tree.leaves(state))
  params_floats = sum(x.size for x in jax.tree.leaves(params))
  frozen_floats = sum(before[p].size for p in frozen)
  assert state_floats < 2 * (params_floats - frozen_floats) + 10


# --------------------------------------------------------------------------------------- accumulation, clipping


def test_grad_accumulation_equals_one_step_on_mean_gradient():
  params = params_tree()
  micro = [params_tree(seed) for seed in (4, 5, 6, 7)]
  mean = jax.tree.map(lambda *g: sum(g) / len(g), *micro)
  kw = dict(weight_decay=0.01, clip_norm=1.0, decay='linear', total_steps=10)
  accumulated, _ = step(optim.make_optimizer(cfg(grad_accum_steps=4, **kw)), params, micro)
  direct, _ = step(optim.make_optimizer(cfg(**kw)), params, [mean])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), accumulated, direct)
  assert float(jnp.abs(direct['mlm']['bias'] - params['mlm']['bias']).max()) > 1e-3
  # after only 3 micro-steps nothing has moved
  partial, _ = step(optim.make_optimizer(cfg(grad_accum_steps=4, **kw)), params, micro[:3])
  jax.tree.map(np.testing.assert_array_equal, partial, params)


def test_clipping_bounds_the_update_norm():
  params = params_tree()
  big = jax.tree.map(lambda x: 100.0 * x, params_tree(9))
  tx = optim.make_optimizer(cfg(optimizer='sgd', learning_rate=0.5, clip_norm=2.0))
  u, _ = tx.update(big, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(u), 0.5 * 2.0, rtol=1e-5)
  small = jax.tree.map(lambda x: 1e-3 * x, params_tree(9))
  u, _ = tx.update(small, tx.init(params), params)
  np.testing.assert_allclose(optax.tree.norm(u), 0.5 * optax.tree.norm(small), rtol=1e-5)  # untouched


# ------------------------------------------------------------------------------------------ layer-wise LR decay


def test_layerwise_lr_decay_scales_each_layer():
  d = 0.5
  params = params_tree()
  ones = jax.tree.map(jnp.ones_like, params)
  tx = optim.make_optimizer(cfg(optimizer='sgd', learning_rate=1.0, layerwise_lr_decay=d))
  u = flat(tx.update(ones, tx.init(params), params)[0])
  kernel = u['transformer/stack/layers/mlp/wi/kernel']  # [L, 4, 8]: slice i scaled by d^(L-i)
  for i in range(L):
    np.testing.assert_allclose(kernel[i], -d ** (L - i), rtol=1e-6)
    np.testing.assert_allclose(u['transformer/stack/layers/mlp_norm/bias'][i], -d ** (L - i), rtol=1e-6)
  np.testing.assert_allclose(u['embed/token/embedding'], -d ** (L + 1), rtol=1e-6)
  np.testing.assert_allclose(u['embed/norm/scale'], -d ** (L + 1), rtol=1e-6)
  np.testing.assert_allclose(u['mlm/transform/kernel'], -1.0)
  np.testing.assert_allclose(u['transformer/stack/final_norm/scale'], -1.0)


def test_layerwise_lr_decay_unrolled_layers_by_index():
  unrolled = {
      'embed': {
          'token': {
              'embedding': jnp.ones((5, 2))
          }
      },
      'transformer': {
          'stack': {
              f'layers_{i}': {
                  'mlp': {
                      'wo': {
                          'kernel': jnp.ones((2, 2))
                      }
                  }
              } for i in range(4)
          }
      },
      'qa': {
          'kernel': jnp.ones((2, 2))
      }
  }
  s = flat(optim.layerwise_lr_scales(unrolled, 0.8))
  for i in range(4):
    np.testing.assert_allclose(s[f'transformer/stack/layers_{i}/mlp/wo/kernel'], 0.8 ** (4 - i), rtol=1e-6)
  np.testing.assert_allclose(s['embed/token/embedding'], 0.8 ** 5, rtol=1e-6)
  np.testing.assert_allclose(s['qa/kernel'], 1.0)


def test_adafactor_runs_and_config_errors_name_the_field():
  params = params_tree()
  new, _ = step(optim.make_optimizer(cfg(optimizer='adafactor', learning_rate=0.01, weight_decay=0.01)), params,
                [params_tree(1)])
  assert all(np.isfinite(v).all() for v in flat(new).values())
  for bad, field in ((dict(optimizer='adam'), 'optimizer'), (dict(decay='exp'), 'decay'),
                     (dict(decay='linear', warmup_steps=100,
                           total_steps=50), 'total_steps'), (dict(grad_accum_steps=0), 'grad_accum_steps'),
                     (dict(layerwise_lr_decay=1.5), 'layerwise'), (dict(learning_rat=1.0), 'learning_rat')):
    with pytest.raises(ValueError, match=field):
      optim.make_optimizer(cfg(**bad))
