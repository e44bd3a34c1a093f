"""The parameters the cost model counts: every leaf the Flax modules create (path, shape, dtype, logical axes),
built from a ModelConfig and the heads without tracing, and which of them train (train/core/cost.py)."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from model import lora as lora_lib
from model import pytree
from model.config import ModelConfig
from model.heads import HEADS

_F32 = 4


# ------------------------------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class _Leaf:
  shape: tuple[int, ...]
  axes: tuple[Optional[str], ...]  # logical axis names, as model/layers.py's with_logical_partitioning gives them
  itemsize: int

  @property
  def size(self) -> int:
    return math.prod(self.shape)


Leaves = dict[str, _Leaf]  # '/'-joined path (model/pytree.py) -> leaf


def _dense(cfg: ModelConfig, path: str, ins: tuple, outs: tuple, in_axes: tuple, out_axes: tuple,
           use_bias: Optional[bool] = None) -> Leaves:
  """layers.Dense: kernel [*in,*out], bias [*out] (use_bias, default cfg.use_bias), LoRA A [*in,R] and B [R,*out]
  where cfg.lora_targets names the module."""
  it = cfg.jnp_param_dtype.itemsize
  out = {f'{path}/kernel': _Leaf(ins + outs, in_axes + out_axes, it)}
  if cfg.use_bias if use_bias is None else use_bias:
    out[f'{path}/bias'] = _Leaf(outs, out_axes, it)
  if cfg.lora_rank and lora_lib.is_target(path, cfg.lora_targets):
    out[f'{path}/lora_a'] = _Leaf(ins + (cfg.lora_rank,), in_axes + (None,), it)
    out[f'{path}/lora_b'] = _Leaf((cfg.lora_rank,) + outs, (None,) + out_axes, it)
  return out


def _norm(cfg: ModelConfig, path: str, width: int, axis: str = 'embed') -> Leaves:
  it = cfg.jnp_param_dtype.itemsize
  out = {f'{path}/scale': _Leaf((width,), (axis,), it)}
  if cfg.norm == 'layernorm':
    out[f'{path}/bias'] = _Leaf((width,), (axis,), it)
  return out


def _embeddings(cfg: ModelConfig, path: str) -> Leaves:
  e, it = cfg.embed_width, cfg.jnp_param_dtype.itemsize
  out = {f'{path}/token/embedding': _Leaf((cfg.vocab_size, e), ('vocab', 'embed'), it)}
  if cfg.position == 'learned':
    out[f'{path}/position/embedding'] = _Leaf((cfg.max_len, e), ('length', 'embed'), it)
  if cfg.type_vocab_size:
    out[f'{path}/token_type/embedding'] = _Leaf((cfg.type_vocab_size, e), (None, 'embed'), it)
  if cfg.embed_norm:
    out.update(_norm(cfg, f'{path}/norm', e))
  return out


def _attention(cfg: ModelConfig, path: str) -> Leaves:
  d, n, k, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_width
  return {
      **_dense(cfg, f'{path}/query', (d,), (n, h), ('embed',), ('heads', 'kv')),
      **_dense(cfg, f'{path}/key', (d,), (k, h), ('embed',), ('kv_heads', 'kv')),
      **_dense(cfg, f'{path}/value', (d,), (k, h), ('embed',), ('kv_heads', 'kv')),
      **_dense(cfg, f'{path}/out', (n, h), (d,), ('heads', 'kv'), ('embed',)),
  }


def _block(cfg: ModelConfig, path: str, cross: bool) -> Leaves:
  out = {}
  for name in ('self_attn', 'cross_attn') if cross else ('self_attn',):
    out.update(_attention(cfg, f'{path}/{name}'))
    out.update(_norm(cfg, f'{path}/{name}_norm', cfg.d_model))
  for wi in ('wi_0', 'wi_1') if cfg.gated_mlp else ('wi',):
    out.update(_dense(cfg, f'{path}/mlp/{wi}', (cfg.d_model,), (cfg.d_ff,), ('embed',), ('mlp',)))
  out.update(_dense(cfg, f'{path}/mlp/wo', (cfg.d_ff,), (cfg.d_model,), ('mlp',), ('embed',)))
  out.update(_norm(cfg, f'{path}/mlp_norm', cfg.d_model))
  return out


def _stack(cfg: ModelConfig, path: str, num_layers: int, cross: bool = False) -> Leaves:
  """transformer.Stack: the relative-position table, the layers (scanned: one leaf [L, ...] each), the final norm."""
  out = {}
  if cfg.position == 'relative':
    out[f'{path}/relative_bias/rel_embedding'] = _Leaf((cfg.relative_buckets, cfg.num_heads), (None, 'heads'),
                                                       cfg.jnp_param_dtype.itemsize)
  if cfg.scan_layers:
    for p, leaf in _block(cfg, f'{path}/layers', cross).items():
      out[p] = _Leaf((num_layers,) + leaf.shape, ('layers',) + leaf.axes, leaf.itemsize)
  else:
    for i in range(num_layers):
      out.update(_block(cfg, f'{path}/layers_{i}', cross))
  if cfg.has_final_norm:
    out.update(_norm(cfg, f'{path}/final_norm', cfg.d_model))
  return out


def _encoder(cfg: ModelConfig, path: str) -> Leaves:
  out = {}
  if cfg.embed_width != cfg.d_model:
    out.update(_dense(cfg, f'{path}/embed_proj', (cfg.embed_width,), (cfg.d_model,), ('embed_in',), ('embed',), True))
  out.update(_stack(cfg, f'{path}/stack', cfg.num_layers))
  return out


def _backbone(cfg: ModelConfig) -> Leaves:
  if cfg.arch == 'encoder':
    return _encoder(cfg, 'transformer')
  if cfg.arch == 'decoder':
    return _stack(cfg, 'transformer/stack', cfg.num_layers)
  return {
      **_encoder(cfg, 'transformer/encoder'),
      **_stack(cfg, 'transformer/decoder/stack', cfg.decoder_layers, cross=True)
  }


def _mlm_head(cfg: ModelConfig, path: str) -> Leaves:
  return {
      **_dense(cfg, f'{path}/transform', (cfg.d_model,), (cfg.embed_width,), ('embed',), ('embed_in',), True),
      **_norm(cfg, f'{path}/norm', cfg.embed_width, 'embed_in'),
      f'{path}/bias': _Leaf((cfg.vocab_size,), ('vocab',), cfg.jnp_param_dtype.itemsize),
  }


def _rtd_head(cfg: ModelConfig, path: str) -> Leaves:
  return {
      **_dense(cfg, f'{path}/dense', (cfg.d_model,), (cfg.d_model,), ('embed',), ('mlp',), True),
      **_dense(cfg, f'{path}/out', (cfg.d_model,), (1,), ('mlp',), (None,), True),
  }


@dataclasses.dataclass(frozen=True)
class _Model:
  """What the trainer builds: heads.LanguageModel(cfg, heads, **its task arguments), or heads.Electra (generator)."""
  cfg: ModelConfig
  heads: tuple[str, ...]
  num_labels: int = 2
  num_tags: int = 2
  classifier_pooling: Optional[str] = None
  backbone_deterministic: bool = False
  soft_prompt_length: int = 0
  generator: Optional[ModelConfig] = None

  @property
  def pooling(self) -> str:
    return self.classifier_pooling or ('cls' if self.cfg.arch == 'encoder' else 'last')

  def builds(self, head: str) -> bool:
    """Whether LanguageModel.setup builds this head module (the pooler and the prompt head's MLM / LM included)."""
    h, arch = set(self.heads), self.cfg.arch
    return {
        'mlm': 'mlm' in h or ('prompt' in h and arch == 'encoder'),
        'lm': 'lm' in h or ('prompt' in h and arch == 'decoder'),
        'pooler': 'nsp' in h or ('classifier' in h and self.pooling == 'cls' and arch == 'encoder'),
    }.get(head, head in h)


def _model(cfg: ModelConfig, heads: Sequence[str], generator: Optional[ModelConfig], kw: Mapping[str, Any]) -> _Model:
  unknown = sorted(set(heads) - set(HEADS))
  if unknown:
    raise ValueError(f'heads {unknown} are unknown; known heads: {HEADS}.')
  fields = {f.name for f in dataclasses.fields(_Model)} - {'cfg', 'heads', 'generator'}
  if set(kw) - fields:
    raise ValueError(f'model_kw {sorted(set(kw) - fields)} are not LanguageModel task arguments; use {sorted(fields)}.')
  if 'prompt' in heads and cfg.arch == 'encoder_decoder':
    raise ValueError("heads=('prompt',) needs an encoder (MLM head) or a decoder (LM head), not an encoder-decoder.")
  if generator is not None:
    if tuple(heads) != ('rtd',):
      raise ValueError(f"generator_cfg is ELECTRA's generator: give heads=('rtd',), not {tuple(heads)}.")
    shared = lambda c: (c.vocab_size, c.embed_width, c.max_len)
    if shared(generator) != shared(cfg):
      raise ValueError(f'ELECTRA generator and discriminator must agree on vocab_size, embed_dim and max_len; got '
                       f'generator {shared(generator)}, discriminator {shared(cfg)}.')
  return _Model(cfg, tuple(heads), generator=generator, **kw)


def _leaves(m: _Model) -> Leaves:
  cfg, it = m.cfg, m.cfg.jnp_param_dtype.itemsize
  if m.generator is not None:  # heads.Electra
    return {
        **_embeddings(cfg, 'embed'),
        **_encoder(m.generator, 'generator'),
        **_mlm_head(m.generator, 'mlm'),
        **_encoder(cfg, 'discriminator'),
        **_rtd_head(cfg, 'rtd')
    }
  d = cfg.d_model
  out = {'soft_prompt': _Leaf((m.soft_prompt_length, cfg.embed_width), (None, 'embed'), it)} if m.soft_prompt_length else {}
  out.update(_embeddings(cfg, 'embed'))
  out.update(_backbone(cfg))
  if m.builds('mlm'):
    out.update(_mlm_head(cfg, 'mlm'))
  if m.builds('pooler'):
    out.update(_dense(cfg, 'pooler/dense', (d,), (d,), ('embed',), ('mlp',), True))
  if m.builds('lm') and not cfg.tie_embeddings:
    out.update(_dense(cfg, 'lm/out', (d,), (cfg.vocab_size,), ('embed',), ('vocab',), False))
  if m.builds('rtd'):
    out.update(_rtd_head(cfg, 'rtd'))
  for head, width in (('nsp', 2), ('classifier', m.num_labels), ('tagger', m.num_tags), ('qa', 2)):
    if head in m.heads:
      out.update(_dense(cfg, head, (d,), (width,), ('embed',), (None,), True))
  return out


def param_shapes(model_cfg: ModelConfig, heads: Sequence[str], *, generator_cfg: Optional[ModelConfig] = None,
                 **model_kw) -> dict[str, tuple[int, ...]]:
  """Every parameter's '/'-joined path -> shape, as heads.LanguageModel(model_cfg, heads, **model_kw) (or, with
  generator_cfg, heads.Electra(generator_cfg, model_cfg)) creates them. model_kw: num_labels, num_tags,
  classifier_pooling, soft_prompt_length."""
  return {p: leaf.shape for p, leaf in _leaves(_model(model_cfg, heads, generator_cfg, model_kw)).items()}


# ---------------------------------------------------------------------------------------------------- trains


Trainable = Union[None, str, Sequence[str], Callable[[str], bool], Any]


def _trains(leaves: Leaves, trainable: Trainable, frozen: Sequence[str]) -> dict[str, bool]:
  """path -> whether the optimizer updates it. trainable: None (all), path patterns (train/core/optim.py trainable_mask:
  globs or regexes covering subtrees, with `frozen` patterns taken out), a callable(path) -> bool, or a bool pytree
  shaped like the params."""
  frozen = (frozen,) if isinstance(frozen, str) else tuple(frozen or ())
  if isinstance(trainable, str):
    trainable = (trainable,)
  if trainable is None or isinstance(trainable, (tuple, list)):
    if not trainable and not frozen:
      return {p: True for p in leaves}
    from train.core import optim  # pylint: disable=g-import-not-at-top
    tree = pytree.unflatten({p: jax.ShapeDtypeStruct(leaf.shape, jnp.float32) for p, leaf in leaves.items()})
    return {p: bool(t) for p, t in pytree.flatten(optim.trainable_mask(tree, trainable, frozen)).items()}
  if frozen:
    raise ValueError('frozen patterns go with trainable patterns (or None); fold them into the callable or pytree.')
  if callable(trainable):
    return {p: bool(trainable(p)) for p in leaves}
  flat = {pytree.path_str(kp): bool(v) for kp, v in jax.tree_util.tree_flatten_with_path(trainable)[0]}
  if set(flat) != set(leaves):
    odd = sorted(set(flat) ^ set(leaves))
    raise ValueError(f'trainable: a bool pytree must hold one flag per parameter; {len(odd)} paths differ, e.g. '
                     f'{", ".join(odd[:3])}; build it over the params (jax.tree.map) or pass patterns or a callable.')
  return flat
