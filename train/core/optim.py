"""Optimizers for lmlab: one optax chain built from a small ConfigDict, its learning-rate schedule, and the parameter
masks it needs. `make_optimizer(cfg)` gives clip-by-global-norm -> AdamW / Adafactor / SGD -> decoupled weight decay on
kernels and embeddings only (`decay_mask`) -> layer-wise learning-rate decay (ELECTRA fine-tuning; scanned stacks are
scaled per slice of their leading layer axis) -> the warmup + decay schedule (`learning_rate_fn`), wrapped in
optax.MultiSteps for gradient accumulation, and finally split by `trainable_mask` so frozen subtrees get exactly zero
updates and hold no optimizer state (fine-tuning strategies such as head-only, LoRA or soft prompts build on this).
Everything is decided from parameter paths and shapes, so the transformation needs no params until `init`. The fields
are listed, with defaults and meaning, in `default_config()`; an unknown or invalid field fails with its name.
"""
from __future__ import annotations

import fnmatch
import re
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import optax

from model import pytree

OPTIMIZERS = ('adamw', 'adafactor', 'sgd')
DECAYS = ('linear', 'cosine', 'inverse_sqrt', 'constant')
# Leaf names that get weight decay; norm scales, biases and everything else do not.
DECAYED_LEAVES = ('kernel', 'embedding', 'rel_embedding')


def default_config() -> ml_collections.ConfigDict:
  """Every field make_optimizer reads, with its default. A config may set any subset."""
  # yapf: disable (a table: one field per line, its meaning aligned beside it)
  return ml_collections.ConfigDict(dict(
      optimizer='adamw',        # 'adamw' | 'adafactor' | 'sgd' (plain SGD with optional momentum; tests, debugging)
      learning_rate=1e-4,       # peak learning rate, reached at the end of warmup
      warmup_steps=0,           # linear warmup from 0 over this many optimizer steps
      decay='linear',           # after warmup: 'linear' | 'cosine' (to end_lr * peak at total_steps),
                                # 'inverse_sqrt' (peak * sqrt(warmup / step)) | 'constant'
      total_steps=10_000,       # optimizer steps (not micro-steps) of the whole run; linear/cosine end here
      #                           (the configs set 0: the trainer takes train.steps / grad_accum_steps)
      end_lr=0.0,               # final learning rate as a fraction of the peak (linear, cosine)
      b1=0.9, b2=0.999, eps=1e-6,  # AdamW moments (eps 1e-6 as BERT)
      weight_decay=0.01,        # decoupled, multiplied by the learning rate, on decay_mask leaves only
      clip_norm=1.0,            # global gradient-norm clipping; 0 or None: off
      grad_accum_steps=1,       # micro-batches averaged per optimizer step (optax.MultiSteps); 1: off
      layerwise_lr_decay=1.0,   # in (0, 1]: embeddings x d^(L+1), layer i x d^(L-i), heads x 1; 1.0: off
      momentum=0.0,             # SGD only
      adafactor_decay_rate=0.8,  # Adafactor second-moment decay exponent
      adafactor_param_scale=True,  # Adafactor: scale updates by parameter RMS (T5's relative step size)
      adafactor_momentum=0.0,   # Adafactor first moment (EMA of updates); 0: none, as T5 (saves a params-sized copy)
      trainable=(),             # path patterns (glob or regex, '/'-joined) of what trains; empty: everything
      frozen=(),                # path patterns of what gets exactly zero update and no optimizer state
  ))
  # yapf: enable


def _config(cfg) -> dict[str, Any]:
  """cfg (ConfigDict or dict) over the defaults, validated; raises ValueError naming the field and the fix."""
  given = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg or {})
  defaults = default_config().to_dict()
  unknown = sorted(set(given) - set(defaults))
  if unknown:
    raise ValueError(f'unknown optimizer config field(s) {unknown}; known: {sorted(defaults)}.')
  c = {**defaults, **given}

  def bad(field, why):
    raise ValueError(f'optimizer config {field}={c[field]!r}: {why}')

  if c['optimizer'] not in OPTIMIZERS:
    bad('optimizer', f'must be one of {OPTIMIZERS}.')
  if c['decay'] not in DECAYS:
    bad('decay', f'must be one of {DECAYS}.')
  if not 0 < c['learning_rate'] < float('inf'):
    bad('learning_rate', 'must be a positive finite number.')
  if c['warmup_steps'] < 0:
    bad('warmup_steps', 'must be >= 0.')
  if c['decay'] in ('linear', 'cosine') and 0 < c['total_steps'] <= c['warmup_steps']:
    bad('total_steps', f"must exceed warmup_steps={c['warmup_steps']} for {c['decay']!r} decay.")
  if not 0 <= c['end_lr'] <= 1:
    bad('end_lr', 'is a fraction of the peak learning rate, in [0, 1].')
  if int(c['grad_accum_steps']) != c['grad_accum_steps'] or c['grad_accum_steps'] < 1:
    bad('grad_accum_steps', 'must be an integer >= 1.')
  if not 0 < c['layerwise_lr_decay'] <= 1:
    bad('layerwise_lr_decay', 'must be in (0, 1]; 1.0 turns it off.')
  if c['clip_norm'] is not None and c['clip_norm'] < 0:
    bad('clip_norm', 'must be >= 0 (0 or None: no clipping).')
  if c['weight_decay'] < 0:
    bad('weight_decay', 'must be >= 0.')
  for field in ('trainable', 'frozen'):
    if isinstance(c[field], str):
      c[field] = (c[field],)
  return c


# ------------------------------------------------------------------------------------------------- schedule


def learning_rate_fn(cfg) -> optax.Schedule:
  """step (optimizer steps, from 0) -> learning rate: linear warmup 0 -> peak over warmup_steps, then `decay`."""
  c = _config(cfg)
  peak, warmup, total = c['learning_rate'], int(c['warmup_steps']), int(c['total_steps'])
  if total <= 0 and c['decay'] in ('linear', 'cosine'):
    raise ValueError(f"optimizer config total_steps={total}: a {c['decay']!r} schedule needs its length; the trainer "
                     'sets 0 to the run\'s steps (train.steps / grad_accum_steps), a direct caller passes it.')
  end = peak * c['end_lr']
  if c['decay'] == 'linear':
    after = optax.linear_schedule(peak, end, total - warmup)
  elif c['decay'] == 'cosine':
    after = optax.cosine_decay_schedule(peak, total - warmup, alpha=c['end_lr'])
  elif c['decay'] == 'inverse_sqrt':
    # T5/Transformer rsqrt: continuous with the warmup at its end; without warmup, peak / sqrt(step + 1).
    w = max(warmup, 1)
    after = lambda s: peak * jnp.sqrt(w / (s + w))  # noqa: E731 - s counts from the end of warmup
  else:
    after = optax.constant_schedule(peak)
  if warmup == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


# ------------------------------------------------------------------------------------------------------ paths


def _map_paths(fn, tree):
  """fn('/'-joined path as model.pytree writes it, leaf) over every leaf, so masks name what errors print."""
  return jax.tree_util.tree_map_with_path(lambda kp, leaf: fn(pytree.path_str(kp), leaf), tree)


def decay_mask(params):
  """True for the leaves weight decay applies to (kernels and embedding tables), False for norm scales and biases."""
  return _map_paths(lambda path, _: path.rsplit('/', 1)[-1] in DECAYED_LEAVES, params)


def _matches(pattern: str, path: str) -> bool:
  """A pattern matches a leaf when it matches its path or any ancestor ('embed' covers 'embed/token/embedding'),
  as a glob or as a full regex (whichever the pattern was written as; both are tried)."""
  parts = path.split('/')
  for i in range(1, len(parts) + 1):
    prefix = '/'.join(parts[:i])
    if fnmatch.fnmatchcase(prefix, pattern):
      return True
    try:
      if re.fullmatch(pattern, prefix):
        return True
    except re.error:
      pass
  return False


def trainable_mask(params, trainable: Optional[Sequence[str]] = None, frozen: Optional[Sequence[str]] = None):
  """True for the leaves that train: those matching a `trainable` pattern (all when none is given) and no `frozen`
  pattern. Patterns are globs or regexes over '/'-joined paths and cover whole subtrees ('transformer/stack',
  'mlm/*', r'transformer/stack/layers_[0-5]'). A pattern that matches nothing raises ValueError (a typo would
  otherwise silently train or freeze the wrong thing)."""
  trainable, frozen = tuple(trainable or ()), tuple(frozen or ())
  paths = pytree.leaf_paths(params)
  for field, patterns in (('trainable', trainable), ('frozen', frozen)):
    for pattern in patterns:
      if not any(_matches(pattern, p) for p in paths):
        raise ValueError(f'{field} pattern {pattern!r} matches no parameter; paths look like '
                         f'{", ".join(paths[:4])}, ... ({len(paths)} in all).')

  def trains(path, _):
    if trainable and not any(_matches(p, path) for p in trainable):
      return False
    return not any(_matches(p, path) for p in frozen)

  return _map_paths(trains, params)


# ---------------------------------------------------------------------------------------- layer-wise LR decay


def _depth_of(path: str, leaf) -> tuple[str, Any]:
  """('embed', None) | ('layer', index or None for a scanned stack) | ('head', None)."""
  parts = path.split('/')
  for i, part in enumerate(parts):
    index = pytree.layer_index(part)
    if index is not None:
      return 'layer', index
    if part == 'layers' and i > 0 and parts[i - 1] == 'stack':
      return 'layer', None
  # Embedding tables, their norm and projection, and T5's relative-position table (shared by all layers) sit below
  # the first layer; so does everything else of a backbone that is not a stack's final norm.
  if parts[0] == 'embed' or 'embed_proj' in parts or 'relative_bias' in parts or 'embed' in parts[:-1]:
    return 'embed', None
  return 'head', None


def _num_layers(tree) -> int:
  n = 0
  for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    kind, index = _depth_of(pytree.path_str(kp), leaf)
    if kind == 'layer':
      n = max(n, leaf.shape[0] if index is None else index + 1)
  return n


def layerwise_lr_scales(params, decay: float):
  """Per-leaf learning-rate factors: embeddings decay^(L+1), layer i (0-based) decay^(L-i), everything above the
  stacks (heads, pooler, final norms) 1. Scanned leaves ('.../stack/layers/...', leading axis = layer) get an array
  [L, 1, ...] that scales each layer's slice; unrolled 'layers_i' get a scalar. L = the deepest stack's layer count."""
  n = _num_layers(params)

  def scale(path, leaf):
    kind, index = _depth_of(path, leaf)
    if kind == 'embed':
      return jnp.asarray(decay ** (n + 1), jnp.float32)
    if kind == 'head':
      return jnp.asarray(1.0, jnp.float32)
    if index is not None:
      return jnp.asarray(decay ** (n - index), jnp.float32)
    depth = leaf.shape[0]
    per_layer = decay ** (n - jnp.arange(depth, dtype=jnp.float32))
    return per_layer.reshape((depth,) + (1,) * (leaf.ndim - 1))

  return _map_paths(scale, params)


def scale_by_layerwise_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies each update by layerwise_lr_scales (stateless; factors come from the updates' paths and shapes)."""

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    scales = layerwise_lr_scales(updates, decay)
    return jax.tree.map(lambda u, s: (u * s).astype(u.dtype), updates, scales), state

  return optax.GradientTransformation(init, update)


# ------------------------------------------------------------------------------------------------- the chain


def make_optimizer(cfg, schedule: Optional[optax.Schedule] = None) -> optax.GradientTransformation:
  """The optax chain for cfg (fields: default_config). Pass params to its update: weight decay reads them.

  schedule: learning_rate_fn(cfg) when the caller has built it already (it is built from cfg otherwise)."""
  c = _config(cfg)
  parts = []
  if c['clip_norm']:
    parts.append(optax.clip_by_global_norm(c['clip_norm']))
  if c['optimizer'] == 'adamw':
    parts.append(optax.scale_by_adam(b1=c['b1'], b2=c['b2'], eps=c['eps']))
  elif c['optimizer'] == 'adafactor':
    parts.append(optax.scale_by_factored_rms(decay_rate=c['adafactor_decay_rate']))
    parts.append(optax.clip_by_block_rms(1.0))
    if c['adafactor_param_scale']:
      parts.append(optax.scale_by_param_block_rms())
    if c['adafactor_momentum']:
      parts.append(optax.ema(c['adafactor_momentum'], debias=False))
  elif c['momentum']:
    parts.append(optax.trace(decay=c['momentum']))
  if c['weight_decay']:
    parts.append(optax.add_decayed_weights(c['weight_decay'], mask=decay_mask))
  if c['layerwise_lr_decay'] != 1.0:
    parts.append(scale_by_layerwise_decay(c['layerwise_lr_decay']))
  parts.append(optax.scale_by_learning_rate(schedule if schedule is not None else learning_rate_fn(c)))
  tx = optax.chain(*parts)
  if c['grad_accum_steps'] > 1:
    # Inside the freezing split below, so accumulators exist for trainable leaves only.
    tx = optax.MultiSteps(tx, every_k_schedule=int(c['grad_accum_steps']))
  if c['trainable'] or c['frozen']:
    trainable, frozen = c['trainable'], c['frozen']
    labels = lambda params: jax.tree.map(  # noqa: E731
        lambda t: 'train' if t else 'freeze', trainable_mask(params, trainable, frozen))
    tx = optax.multi_transform({'train': tx, 'freeze': optax.set_to_zero()}, labels)
  return tx
