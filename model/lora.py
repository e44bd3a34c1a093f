"""LoRA (Hu et al. 2021): low-rank adapters beside the model's projections, and the pytree surgery around them.

A targeted `layers.Dense` (cfg.lora_rank > 0 and its path matched by cfg.lora_targets) holds, beside its kernel
[*in, *out], `lora_a` [*in, R] and `lora_b` [R, *out] and computes x.W + (alpha / R) * (dropout(x).A).B. This file
decides which Dense modules are targets and turns adapter params into plain ones and back: `merge` folds the update
into the kernel (an export or a fast inference model), `unmerge` takes it out again, `split` separates the adapters
(what a LoRA fine-tune trains and saves). It is pure jnp on params dicts, so export and the trainer share it.

Letters: L stacked layers (a scanned stack), I the flattened input axes, O the flattened output axes, R the rank.
"""
from __future__ import annotations

import fnmatch
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp

from model import pytree
from model.config import ModelConfig

ADAPTER_KEYS = ('lora_a', 'lora_b')


def _matches(pattern: str, path: str) -> bool:
  """A pattern matches a module when it matches the end of its '/'-joined path ('query', 'self_attn/query',
  'mlp/*'), or all of it ('*/mlp/*'), as a glob or as a full regex: train/core/optim.py's rule, read from the other end
  (there a pattern names a subtree, here the module itself)."""
  parts = path.split('/')
  for i in range(len(parts)):
    suffix = '/'.join(parts[i:])
    if fnmatch.fnmatchcase(suffix, pattern):
      return True
    try:
      if re.fullmatch(pattern, suffix):
        return True
    except re.error:
      pass
  return False


def is_target(path: Sequence[str] | str, targets: Sequence[str]) -> bool:
  """Whether the Dense at `path` (a module path tuple or '/'-joined) gets adapters. 'layers_<i>' reads as 'layers',
  so a scanned and an unrolled stack put adapters on the same projections."""
  parts = path.split('/') if isinstance(path, str) else [str(p) for p in path]
  joined = '/'.join('layers' if pytree.layer_index(p) is not None else p for p in parts)
  return any(_matches(t, joined) for t in targets)


def scale(cfg: ModelConfig) -> float:
  """alpha / rank, as peft: changing the rank keeps the update's size, so a learning rate carries over."""
  return cfg.lora_alpha / cfg.lora_rank


def _modules(params, prefix: str = ''):
  """(path, the dict of a Dense) for every Dense holding adapters, depth first."""
  if not isinstance(params, dict):
    return
  if 'lora_a' in params:
    yield prefix, params
  for k, v in params.items():
    yield from _modules(v, f'{prefix}/{k}' if prefix else k)


def lora_paths(params) -> list[str]:
  """The '/'-joined paths of the Dense modules that hold adapters: 'transformer/stack/layers/self_attn/query'."""
  return [path for path, _ in _modules(params)]


def count_adapter_params(params) -> int:
  """How many numbers the adapters hold (what a LoRA fine-tune trains, besides a fresh head)."""
  return sum(math.prod(m[k].shape) for _, m in _modules(params) for k in ADAPTER_KEYS)


def split(params) -> tuple[dict, dict]:
  """params -> (base without any adapter leaf, the adapters alone in the same nesting); `join` undoes it."""
  flat = pytree.flatten(params)
  adapter = lambda p: p.rsplit('/', 1)[-1] in ADAPTER_KEYS
  base = pytree.unflatten({p: v for p, v in flat.items() if not adapter(p)})
  adapters = pytree.unflatten({p: v for p, v in flat.items() if adapter(p)})
  return base, adapters


def join(base, adapters) -> dict:
  """The inverse of split: base with the adapter leaves put back beside their kernels."""
  return pytree.unflatten({**pytree.flatten(base), **pytree.flatten(adapters)})


def _delta(kernel, a, b, s: float):
  """s * A.B in float32 at the kernel's shape: A [*L, *in, R], B [*L, R, *out] -> [*L, *in, *out] (L: scanned layers,
  read off the ranks: kernel.ndim = lead + in + out, a.ndim = lead + in + 1, b.ndim = lead + 1 + out)."""
  lead = a.ndim + b.ndim - 2 - kernel.ndim
  n_in = a.ndim - 1 - lead
  shape_l = kernel.shape[:lead]
  a2 = jnp.reshape(a.astype(jnp.float32), shape_l + (math.prod(a.shape[lead:lead + n_in]), a.shape[-1]))  # [*L,I,R]
  b2 = jnp.reshape(b.astype(jnp.float32), shape_l + (b.shape[lead], -1))  # [*L,R,O]
  d = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST)  # [*L,I,O]
  return (s * d).reshape(kernel.shape)


def _check_rank(cfg: ModelConfig, path: str, a):
  if a.shape[-1] != cfg.lora_rank:
    raise ValueError(f'{path}/lora_a has rank {a.shape[-1]} but ModelConfig.lora_rank={cfg.lora_rank}; pass the '
                     'config the adapters were trained with (the scale is lora_alpha / lora_rank).')


def _shifted(path: str, kernel, adapter: dict, cfg: ModelConfig, sign: float):
  """kernel + sign * scale * A.B, computed in float32 and stored back in the kernel's dtype."""
  _check_rank(cfg, path, adapter['lora_a'])
  d = _delta(kernel, adapter['lora_a'], adapter['lora_b'], sign * scale(cfg))
  return (kernel.astype(jnp.float32) + d).astype(kernel.dtype)


def merge(params, cfg: ModelConfig) -> dict:
  """params with every adapter folded into its kernel (W + alpha/R * A.B) and the adapter leaves removed: the params
  of the same model under cfg.replace(lora_rank=0) (`merged_config`). Params without adapters come back unchanged."""
  flat = pytree.flatten(params)
  for path, m in _modules(params):
    flat[f'{path}/kernel'] = _shifted(path, m['kernel'], m, cfg, 1.0)
    del flat[f'{path}/lora_a'], flat[f'{path}/lora_b']
  return pytree.unflatten(flat)


def unmerge(merged_params, lora_params, cfg: ModelConfig) -> dict:
  """The inverse of merge: lora_params' adapters (the adapters of split, or whole params holding them) subtracted
  from merged_params' kernels and put back beside them, so training can go on from a merged model."""
  adapters = split(lora_params)[1]
  flat = pytree.flatten(merged_params)
  for path, m in _modules(adapters):
    if f'{path}/kernel' not in flat:
      raise ValueError(f'the adapters at {path} have no kernel {path}/kernel in the merged params.')
    flat[f'{path}/kernel'] = _shifted(path, flat[f'{path}/kernel'], m, cfg, -1.0)
    flat[f'{path}/lora_a'], flat[f'{path}/lora_b'] = m['lora_a'], m['lora_b']
  return pytree.unflatten(flat)


def merged_config(cfg: ModelConfig) -> ModelConfig:
  """The config that applies merge(params, cfg): the same model with no adapters."""
  return cfg.replace(lora_rank=0)
