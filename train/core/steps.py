"""The pure train and eval steps over the state pytree {'params', 'opt_state', 'step', 'rng', 'nonfinite_step'}.

`train_step(state, batch, *, ...)` and `eval_step` are module-level pure functions, jitted by train/core/trainer.py with
in/out shardings and donation. A step whose loss or gradient is not finite leaves params and optimizer state as they
were and records its number; the per-step rng is fold_in(run rng, step). `summarize` averages a window of per-step
metrics the way the loop logs them.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

State = dict

# ------------------------------------------------------------------------------------------------ the pure steps


def _grads_of_trainable(loss_fn, trainable, params, *args, **kw):
  """value_and_grad of loss_fn over the trainable leaves only: the frozen ones enter as constants, so JAX builds no
  backward pass for what only they feed (a frozen backbone). -> ((loss, aux), grads like params, 0 where frozen)."""
  leaves, treedef = jax.tree.flatten(params)
  flags = jax.tree.leaves(trainable)

  def of_trainable(train_leaves, frozen_leaves):
    it_train, it_frozen = iter(train_leaves), iter(frozen_leaves)
    merged = [next(it_train) if f else next(it_frozen) for f in flags]
    return loss_fn(jax.tree.unflatten(treedef, merged), *args, **kw)

  train_leaves = [x for x, f in zip(leaves, flags) if f]
  frozen_leaves = [x for x, f in zip(leaves, flags) if not f]
  out, train_grads = jax.value_and_grad(of_trainable, has_aux=True)(train_leaves, frozen_leaves)
  it = iter(train_grads)
  return out, jax.tree.unflatten(treedef, [next(it) if f else jnp.zeros_like(x) for x, f in zip(leaves, flags)])


def train_step(state: State, batch, *, model, loss_fn, optimizer: optax.GradientTransformation,
               lr_fn: Optional[Callable] = None, trainable=None):
  """One optimizer (micro-)step: -> (new state, metrics). Non-finite loss or gradients leave the state unchanged.

  trainable: None (everything trains) or a bool pytree like the params; False leaves are not differentiated and come
  out bitwise unchanged."""
  step = state['step']
  rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)
  loss_of = functools.partial(loss_fn, model=model, deterministic=False)
  if trainable is None:
    (loss, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(state['params'], batch, rng)
  else:
    (loss, metrics), grads = _grads_of_trainable(loss_of, trainable, state['params'], batch, rng)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  def update(_):
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    if trainable is not None:
      params = jax.tree.map(lambda t, new, old: new if t else old, trainable, params, state['params'])
    return params, opt_state

  # One branch or the other: selecting between new and old state leaf by leaf was an extra pass over params and both
  # Adam moments every step, and a fusion per leaf to compile (benchmarks/train_throughput.py: +3-13% tokens/s).
  params, opt_state = jax.lax.cond(finite, update, lambda _: (state['params'], state['opt_state']), None)
  new_state = dict(state, params=params, opt_state=opt_state, step=step + 1, nonfinite_step=jnp.where(
      (state['nonfinite_step'] < 0) & ~finite, step, state['nonfinite_step']))
  metrics = dict(metrics, grad_norm=grad_norm)
  if lr_fn is not None:
    metrics['learning_rate'] = lr_fn(step)
  return new_state, metrics


def eval_step(params, batch, rng, *, model, loss_fn):
  """Metrics of one batch without dropout."""
  _, metrics = loss_fn(params, batch, rng, model=model, deterministic=True)
  return metrics


def summarize(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Averages a window of per-step metrics: token-weighted by '<objective>/weight_sum' where present."""
  history = [jax.device_get(m) for m in history]
  out = {}
  for key in history[0]:
    values = np.array([float(m[key]) for m in history], np.float64)
    prefix, _, name = key.rpartition('/')
    weights = None
    if prefix and name != 'weight_sum' and f'{prefix}/weight_sum' in history[0]:
      weights = np.array([float(m[f'{prefix}/weight_sum']) for m in history], np.float64)
    if name == 'weight_sum':
      out[key] = float(values.sum())
    elif name == 'perplexity':
      logs = np.log(np.maximum(values, 1e-30))
      out[key] = float(
          np.exp(np.average(logs, weights=weights) if weights is not None and weights.sum() else logs.mean()))
    elif weights is not None and weights.sum() > 0:
      out[key] = float(np.average(values, weights=weights))
    else:
      out[key] = float(values.mean())
  return out
