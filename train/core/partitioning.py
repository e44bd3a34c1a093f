"""Device meshes, logical-axis rules and the shardings of params, optimizer state and batches.

The model names its parameter axes (embed, heads, kv_heads, kv, mlp, vocab, layers, ...); a short rule list maps those
names to the axes of a 3-axis mesh (data, fsdp, tensor). Pure data parallelism is the mesh (N, 1, 1); FSDP shards
parameters and optimizer state over `fsdp` (N-way memory saving) while the batch is split over (data, fsdp); tensor
parallelism splits heads and MLP width over `tensor`. Everything is checked before compiling: mesh sizes against the
device count, the batch against the data-parallel degree, every sharded dimension against its mesh axes. Joining the
processes of a multi-host run is train/core/distributed.py.
"""
from __future__ import annotations

import math
import operator
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from model import pytree

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')

# Logical name -> mesh axes. Unlisted names (kv, length, embed_in, layers, None) stay replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ('batch', BATCH_AXES),
    ('vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('mlp', 'tensor'),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """Fills one -1 with "the rest of the devices"; errors name the field and the fix."""
  try:
    shape = tuple(operator.index(s) for s in shape)  # an int, not a float and not a string such as 'abc'
  except TypeError:
    raise ValueError(f'config.mesh.shape={tuple(shape)!r}: give one integer size per mesh axis {MESH_AXES}, e.g. '
                     '--config.mesh.shape="(1,-1,1)" (-1: the rest of the devices).') from None
  if len(shape) != len(MESH_AXES):
    raise ValueError(f'config.mesh.shape={shape}: give one size per mesh axis {MESH_AXES}.')
  if shape.count(-1) > 1:
    raise ValueError(f'config.mesh.shape={shape}: at most one axis may be -1 ("the rest").')
  known = math.prod(s for s in shape if s != -1)
  if known <= 0 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f'config.mesh.shape={shape}: sizes must be positive (or -1 once).')
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f'config.mesh.shape={shape}: the fixed sizes multiply to {known}, which does not divide the '
                       f'{num_devices} devices; choose sizes whose product divides {num_devices}.')
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f'config.mesh.shape={shape}: multiplies to {math.prod(shape)} but there are {num_devices} '
                     f'devices; make the product {num_devices} or use -1 for one axis.')
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all, across hosts), with Auto axis types."""
  devices = jax.devices() if devices is None else list(devices)
  shape = resolve_mesh_shape(shape, len(devices))
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules) -> tuple[tuple[str, Any], ...]:
  """Config rules ([[name, axes], ...] with axes a mesh axis, a list of them or None) -> flax's tuple form; a rule of
  another shape, or an axis the mesh does not have, is a ValueError naming config.mesh.rules (flax would ignore it)."""
  if rules is None:
    return DEFAULT_RULES
  example = '--config.mesh.rules="[[\'embed\', \'fsdp\'], [\'mlp\', \'tensor\']]"'
  out = []
  for rule in rules:
    if isinstance(rule, str) or not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(f'config.mesh.rules: {rule!r} is not a [logical axis, mesh axes] pair; write the rules as '
                       f'pairs, e.g. {example}.')
    name, axes = rule
    named = tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)
    wrong = [a for a in named if a not in MESH_AXES and not (a is None and len(named) == 1)]
    if wrong:
      raise ValueError(f'config.mesh.rules: the rule {list(rule)!r} maps {name!r} to {wrong[0]!r}, which is not a mesh '
                       f'axis; use one of {MESH_AXES}, a list of them, or None (replicated), e.g. {example}.')
    out.append((name, named if isinstance(axes, (list, tuple)) else axes))
  return tuple(out)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch_size(batch_size: int, mesh: Mesh):
  dp = data_parallel_size(mesh)
  if batch_size % dp:
    raise ValueError(f'config.data.batch_size={batch_size} is not divisible by the data-parallel degree {dp} '
                     f'(mesh data x fsdp = {mesh.shape["data"]} x {mesh.shape["fsdp"]}); use a multiple of {dp}.')


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over (data, fsdp); other axes replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_shardings(logical_specs, shapes, mesh: Mesh, rules=DEFAULT_RULES):
  """Logical PartitionSpecs + abstract shapes -> NamedShardings, after checking divisibility of every sharded dim."""
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)

  def check(path, spec, shape):
    for dim, axes in zip(shape.shape, tuple(spec) + (None,) * (len(shape.shape) - len(spec))):
      if axes is None:
        continue
      size = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
      if dim % size:
        raise ValueError(f'parameter {pytree.path_str(path)} has a dimension of {dim} sharded over mesh axes {axes} of '
                         f'size {size}, which does not divide it; change config.mesh.shape or the rule for that '
                         f'axis in config.mesh.rules.')
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(check, mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def _dict_keys(path) -> tuple[str, ...]:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def like_params_shardings(tree_shapes, params_shapes, params_shardings, mesh: Mesh):
  """Shardings for a pytree that holds copies of the params somewhere inside (optimizer moments, EMA, ...).

  A leaf whose dict-key path ends with a parameter's path and has its shape takes that parameter's sharding; anything
  else (counts, scalars, factored Adafactor statistics) is replicated.
  """
  by_path = {}
  for (path, shape), sharding in zip(
      jax.tree_util.tree_flatten_with_path(params_shapes)[0], jax.tree.leaves(params_shardings)):
    by_path[_dict_keys(path)] = (shape.shape, sharding)
  longest = max((len(k) for k in by_path), default=0)

  def pick(path, leaf):
    keys = _dict_keys(path)
    for n in range(min(len(keys), longest), 0, -1):
      hit = by_path.get(keys[-n:])
      if hit is not None and hit[0] == getattr(leaf, 'shape', None):
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree_shapes)


def per_device_bytes(tree) -> int:
  """Bytes of `tree` held on the first local device (what FSDP is meant to shrink)."""
  dev = jax.local_devices()[0]
  total = 0
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, 'addressable_shards', []):
      if shard.device == dev:
        total += shard.data.nbytes
  return total


def total_bytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))
