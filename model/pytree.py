"""Names for places in a params pytree: '/'-joined key paths and the layer index in 'layers_<i>' keys.

Every part of lmlab that addresses parameters by name (trainable masks, sharding errors, checkpoint conversion,
layer-wise learning rates, LoRA targets) reads and writes paths through these helpers, so a path printed in one
error message is the path another part accepts.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import jax

# An unrolled layer's key ('layers_3'); a scanned stack keeps all layers under one 'layers' key, leading axis = layer.
LAYER_KEY = re.compile(r'^layers_(\d+)$')


def key_name(key) -> str:
  """One jax key-path entry as a string: a dict key, an attribute name, a sequence index."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def path_str(keypath) -> str:
  """A jax key path as '/'-joined names: 'transformer/stack/layers/mlp/wi/kernel'."""
  return '/'.join(key_name(k) for k in keypath)


def layer_index(name: str) -> Optional[int]:
  """'layers_3' -> 3; any other key -> None."""
  m = LAYER_KEY.match(name)
  return int(m.group(1)) if m else None


def flatten(tree, prefix: str = '') -> dict[str, Any]:
  """Nested dicts -> {'a/b/c': leaf}."""
  out = {}
  for k, v in tree.items():
    p = f'{prefix}/{k}' if prefix else k
    if isinstance(v, dict):
      out.update(flatten(v, p))
    else:
      out[p] = v
  return out


def unflatten(flat: dict[str, Any]) -> dict:
  """{'a/b/c': leaf} -> nested dicts; the inverse of flatten."""
  out = {}
  for path, v in flat.items():
    node = out
    keys = path.split('/')
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1]] = v
  return out


def leaf_paths(tree) -> list[str]:
  """Every leaf's path, in jax's flattening order."""
  return [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
