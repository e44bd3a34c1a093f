"""ModelConfig, the named presets, and the three backbones: Encoder, Decoder and EncoderDecoder.

One frozen dataclass describes the whole architecture, so a preset, an override from the command line and a converted
Hugging Face checkpoint all produce the same kind of object. Layers are stacked by `Stack`, which scans one Block over
depth (compile time flat in depth) or unrolls it, with optional rematerialization. Relative-position biases and rotary
tables are computed once per stack and broadcast into every layer.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import attention as attn
from model.layers import Block, Embeddings, Norm, dense

ARCHS = ('encoder', 'decoder', 'encoder_decoder')
POSITIONS = ('learned', 'sinusoidal', 'rope', 'relative', 'none')
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The architecture. Defaults are a tiny BERT; presets below fill in published shapes."""
  arch: str = 'encoder'
  vocab_size: int = 30522
  d_model: int = 128
  num_heads: int = 2
  num_layers: int = 2
  d_ff: int = 512
  num_kv_heads: Optional[int] = None      # None: = num_heads; fewer: grouped-query; 1: multi-query
  head_dim: Optional[int] = None          # None: d_model // num_heads
  num_decoder_layers: Optional[int] = None  # encoder_decoder only; None: = num_layers
  embed_dim: Optional[int] = None         # factorized embeddings (ELECTRA/ALBERT): E != D adds a projection
  max_len: int = 512
  position: str = 'learned'
  rope_theta: float = 10_000.0
  relative_buckets: int = 32
  relative_max_distance: int = 128
  type_vocab_size: int = 0
  activation: str = 'gelu'
  gated_mlp: bool = False                 # SwiGLU (silu) / GeGLU (gelu_tanh)
  norm: str = 'layernorm'
  norm_eps: float = 1e-12
  pre_norm: bool = False
  embed_norm: bool = False
  final_norm: Optional[bool] = None       # None: = pre_norm
  use_bias: bool = True
  attention_scale: Optional[float] = None  # None: 1/sqrt(head_dim); T5 folds it into the init and uses 1.0
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  mlp_dropout_rate: float = 0.0
  tie_embeddings: bool = True
  scale_tied_logits: bool = False         # T5 v1.0 multiplies the decoder output by d_model**-0.5 before tied logits
  pad_id: int = 0
  bos_id: Optional[int] = None
  eos_id: Optional[int] = None
  decoder_start_id: int = 0
  init_std: float = 0.02
  dtype: str = 'float32'
  param_dtype: str = 'float32'
  scan_layers: bool = True
  remat_policy: str = 'none'
  attention_impl: str = 'auto'
  attention_chunk: int = 128

  def __post_init__(self):
    self.validate()

  def validate(self):
    """Raises ValueError naming the field and the fix; called on construction, so before anything compiles."""
    def bad(field, why):
      raise ValueError(f'ModelConfig.{field}={getattr(self, field)!r}: {why}')
    if self.arch not in ARCHS:
      bad('arch', f'must be one of {ARCHS}.')
    if self.position not in POSITIONS:
      bad('position', f'must be one of {POSITIONS}.')
    if self.norm not in ('layernorm', 'rmsnorm'):
      bad('norm', "must be 'layernorm' or 'rmsnorm'.")
    if self.activation not in ('gelu', 'gelu_tanh', 'relu', 'silu'):
      bad('activation', "must be one of 'gelu', 'gelu_tanh', 'relu', 'silu'.")
    if self.remat_policy not in REMAT_POLICIES:
      bad('remat_policy', f'must be one of {tuple(REMAT_POLICIES)}.')
    if self.attention_impl not in ('auto', 'plain', 'chunked', 'cudnn'):
      bad('attention_impl', "must be 'auto', 'plain', 'chunked' or 'cudnn'.")
    for f in ('vocab_size', 'd_model', 'num_heads', 'num_layers', 'd_ff', 'max_len'):
      if getattr(self, f) <= 0:
        bad(f, 'must be positive.')
    if self.head_dim is None and self.d_model % self.num_heads:
      bad('d_model', f'is not divisible by num_heads={self.num_heads}; change one of them or set head_dim.')
    if self.num_heads % self.kv_heads:
      bad('num_kv_heads', f'must divide num_heads={self.num_heads} (grouped-query attention).')
    if self.position == 'rope' and self.head_width % 2:
      bad('head_dim', 'must be even for rotary position embeddings.')
    if self.dtype not in ('float32', 'bfloat16', 'float16') or self.param_dtype not in ('float32', 'bfloat16'):
      bad('dtype', "dtype must be float32/bfloat16/float16 and param_dtype float32/bfloat16.")

  # Derived values, so modules never repeat the defaulting rules.
  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_width(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def embed_width(self) -> int:
    return self.embed_dim or self.d_model

  @property
  def decoder_layers(self) -> int:
    return self.num_decoder_layers or self.num_layers

  @property
  def has_final_norm(self) -> bool:
    return self.pre_norm if self.final_norm is None else self.final_norm

  @property
  def jnp_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def jnp_param_dtype(self):
    return jnp.dtype(self.param_dtype)

  def replace(self, **kw) -> 'ModelConfig':
    return dataclasses.replace(self, **kw)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def _bert(layers, d, **kw):
  base = dict(arch='encoder', vocab_size=30522, d_model=d, num_heads=max(d // 64, 2), num_layers=layers, d_ff=4 * d,
              max_len=512, position='learned', type_vocab_size=2, activation='gelu', norm='layernorm',
              norm_eps=1e-12, pre_norm=False, embed_norm=True, pad_id=0)
  base.update(kw)
  return base


def _gpt2(layers, d, heads, **kw):
  return dict(arch='decoder', vocab_size=50257, d_model=d, num_heads=heads, num_layers=layers, d_ff=4 * d,
              max_len=1024, position='learned', activation='gelu_tanh', norm='layernorm', norm_eps=1e-5,
              pre_norm=True, bos_id=50256, eos_id=50256, pad_id=50256, **kw)


def _llama(layers, d, heads, kv, ff, **kw):
  base = dict(arch='decoder', vocab_size=32000, d_model=d, num_heads=heads, num_kv_heads=kv, num_layers=layers,
              d_ff=ff, max_len=2048, position='rope', activation='silu', gated_mlp=True, norm='rmsnorm',
              norm_eps=1e-5, pre_norm=True, use_bias=False, tie_embeddings=False, dropout_rate=0.0,
              attention_dropout_rate=0.0, bos_id=1, eos_id=2, pad_id=0)
  base.update(kw)
  return base


def _t5(layers, d, heads, ff, v11=False, **kw):
  base = dict(arch='encoder_decoder', vocab_size=32128, d_model=d, num_heads=heads, head_dim=64, num_layers=layers,
              d_ff=ff, max_len=512, position='relative', activation='gelu_tanh' if v11 else 'relu', gated_mlp=v11,
              norm='rmsnorm', norm_eps=1e-6, pre_norm=True, use_bias=False, attention_scale=1.0,
              attention_dropout_rate=0.1, mlp_dropout_rate=0.1, tie_embeddings=not v11, scale_tied_logits=not v11,
              pad_id=0, eos_id=1, decoder_start_id=0, init_std=1.0 / d ** 0.5)
  base.update(kw)
  return base


def _electra(d, heads, ff, **kw):
  return _bert(12, d, embed_dim=128, num_heads=heads, d_ff=ff, **kw)


PRESETS: dict[str, dict[str, Any]] = {
    # BERT and Google's BERT miniatures (Turc et al. 2019): heads = width / 64.
    'bert-tiny': _bert(2, 128),
    'bert-mini': _bert(4, 256),
    'bert-small': _bert(4, 512),
    'bert-base': _bert(12, 768),
    'roberta-base': dict(_bert(12, 768), vocab_size=50265, max_len=514, type_vocab_size=1, norm_eps=1e-5, pad_id=1),
    'gpt2-tiny': _gpt2(2, 128, 2),
    'gpt2-small': _gpt2(12, 768, 12),
    'llama-tiny': _llama(2, 128, 4, 2, 344),
    # SmolLM2-135M's exact shape (HuggingFaceTB/SmolLM2-135M config.json).
    'smollm2-135m': _llama(30, 576, 9, 3, 1536, vocab_size=49152, max_len=8192, rope_theta=100_000.0,
                           tie_embeddings=True, bos_id=1, eos_id=2, pad_id=2),
    't5-tiny': _t5(2, 128, 2, 512),
    't5-small': _t5(6, 512, 8, 2048),
    't5-v1_1-small': _t5(8, 512, 6, 1024, v11=True),
    # ELECTRA-small: discriminator and its 1/4-width generator share 128-wide embeddings.
    'electra-small-discriminator': _electra(256, 4, 1024),
    'electra-small-generator': _electra(64, 1, 256),
}


def preset(name: str, **overrides) -> ModelConfig:
  """A named preset, with fields overridden: preset('bert-tiny', vocab_size=1000)."""
  if name not in PRESETS:
    raise ValueError(f'unknown model preset {name!r}; known: {", ".join(sorted(PRESETS))}.')
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f'unknown ModelConfig field(s) {sorted(unknown)}; known: {sorted(fields)}.')
  return ModelConfig(**{**PRESETS[name], **overrides})


# --------------------------------------------------------------------------------------------------------- stacks


class RelativePositionBias(nn.Module):
  """T5's learned bias per (bucket of key_pos - query_pos, head): positions [B,T], [B,S] -> [B,N,T,S]."""
  cfg: ModelConfig
  bidirectional: bool

  @nn.compact
  def __call__(self, q_positions, kv_positions):
    cfg = self.cfg
    table = self.param('rel_embedding', nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                                     (None, 'heads')),
                       (cfg.relative_buckets, cfg.num_heads), cfg.jnp_param_dtype)
    buckets = attn.t5_relative_position_bucket(kv_positions[:, None, :] - q_positions[:, :, None],
                                               bidirectional=self.bidirectional, num_buckets=cfg.relative_buckets,
                                               max_distance=cfg.relative_max_distance)
    return jnp.transpose(jnp.take(table, buckets, axis=0), (0, 3, 1, 2)).astype(jnp.float32)


class Stack(nn.Module):
  """num_layers Blocks (scanned or unrolled, optionally rematerialized), position tables, final norm: [B,T,D] -> same."""
  cfg: ModelConfig
  num_layers: int
  causal: bool = False
  cross: bool = False

  @nn.compact
  def __call__(self, x, *, mask_info, positions, kv_positions=None, cross_x=None, cross_mask_info=None,
               cache_index=None, deterministic: bool = True, decode: bool = False):
    """positions [B,T] of the queries; kv_positions [B,S] of the keys (the cache when decoding; default: positions)."""
    cfg = self.cfg
    kv_positions = positions if kv_positions is None else kv_positions
    bias = rope = None
    if cfg.position == 'relative':
      bias = RelativePositionBias(cfg, bidirectional=not self.causal, name='relative_bias')(positions, kv_positions)
    elif cfg.position == 'rope':
      rope = attn.rope_frequencies(positions, cfg.head_width, cfg.rope_theta)
    block = Block
    if cfg.remat_policy != 'none':
      block = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)
    kw = dict(causal=self.causal, cross=self.cross, decode=decode, deterministic=deterministic)
    args = (mask_info, bias, rope, cross_x, cross_mask_info, cache_index)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={'params': 0, 'cache': 0}, split_rngs={'params': True, 'dropout': True},
                        in_axes=(nn.broadcast,) * len(args), length=self.num_layers,
                        metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = scanned(cfg, name='layers', **kw)(x, *args)
    else:
      for i in range(self.num_layers):
        x, _ = block(cfg, name=f'layers_{i}', **kw)(x, *args)
    if cfg.has_final_norm:
      x = Norm(cfg, name='final_norm')(x)
      x = nn.Dropout(cfg.dropout_rate)(x, deterministic=deterministic)
    return x


def default_positions(tokens, segment_ids=None):
  """[B,T] -> [B,T] positions, restarting at 0 in each packed segment (plain arange without segments)."""
  b, t = tokens.shape
  if segment_ids is None:
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  idx = jnp.arange(t, dtype=jnp.int32)
  starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  return idx - start_idx


def _embedder(module):
  """The module's own Embeddings, or the table it shares with a sibling (EncoderDecoder, ELECTRA)."""
  if module.shared_embeddings is not None:
    return module.shared_embeddings
  return module.embed if hasattr(module, 'embed') else Embeddings(module.cfg, name='embed')


def _segments(tokens, segment_ids):
  return jnp.ones_like(tokens, dtype=jnp.int32) if segment_ids is None else segment_ids


class Encoder(nn.Module):
  """Bidirectional encoder (BERT, RoBERTa, ELECTRA, the T5 encoder). tokens [B,T] -> hidden [B,T,D].

  segment_ids [B,T]: 0 marks padding, other values packed sequences (default: all one sequence); positions [B,T]
  default to per-segment arange; token_type_ids [B,T] select sentence A/B embeddings.
  """
  cfg: ModelConfig
  shared_embeddings: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, tokens, *, segment_ids=None, positions=None, token_type_ids=None, deterministic=True,
               extra_embeddings=None):
    cfg = self.cfg
    segment_ids = _segments(tokens, segment_ids)
    positions = default_positions(tokens, segment_ids) if positions is None else positions
    x = _embedder(self)(tokens, positions=positions, token_type_ids=token_type_ids, deterministic=deterministic,
                        extra_embeddings=extra_embeddings)
    if cfg.embed_width != cfg.d_model:
      x = dense(cfg, cfg.d_model, ('embed_in', 'embed'), use_bias=True, name='embed_proj')(x)
    mask_info = attn.make_mask_info(q_segment_ids=segment_ids)
    return Stack(cfg, cfg.num_layers, name='stack')(x, mask_info=mask_info, positions=positions,
                                                    deterministic=deterministic)


class Decoder(nn.Module):
  """Causal decoder: GPT/LLaMA on its own, or the decoder half of T5 (then with cross-attention to `encoded`).

  tokens [B,T] -> hidden [B,T,D]. With decode=True a 'cache' collection holds, besides each layer's keys and values,
  the write index and the segment ids of everything cached, so calls of any length (a prompt, then one token at a time)
  attend to all that came before.
  """
  cfg: ModelConfig
  cross: bool = False
  shared_embeddings: Optional[nn.Module] = None

  @nn.compact
  def __call__(self, tokens, *, segment_ids=None, positions=None, encoded=None, encoder_segment_ids=None,
               deterministic=True, decode=False, extra_embeddings=None):
    cfg = self.cfg
    b, t = tokens.shape
    segment_ids = _segments(tokens, segment_ids)
    positions = default_positions(tokens, segment_ids) if positions is None else positions
    x = _embedder(self)(tokens, positions=positions, deterministic=deterministic, extra_embeddings=extra_embeddings)
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    kv_segments, kv_slots, kv_positions, cache_index = segment_ids, slots, positions, None
    if decode:
      # Cache slot order drives the causal rule; token positions (which may start late for left-padded prompts)
      # drive position encodings.
      initialized = self.has_variable('cache', 'index')
      index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
      seg_cache = self.variable('cache', 'segment_ids', jnp.zeros, (b, t), jnp.int32)
      pos_cache = self.variable('cache', 'positions', jnp.zeros, (b, t), jnp.int32)
      if initialized:
        cache_index = index.value
        seg_cache.value = jax.lax.dynamic_update_slice(seg_cache.value, segment_ids, (0, cache_index))
        pos_cache.value = jax.lax.dynamic_update_slice(pos_cache.value, positions, (0, cache_index))
        index.value = cache_index + t
        kv_segments, kv_positions = seg_cache.value, pos_cache.value
        size = seg_cache.value.shape[1]
        kv_slots = jnp.broadcast_to(jnp.arange(size, dtype=jnp.int32), (b, size))
        slots = slots + cache_index
    mask_info = attn.MaskInfo(segment_ids, kv_segments, slots, kv_slots, None, True)
    cross_mask_info = None
    if self.cross:
      enc_seg = jnp.ones(encoded.shape[:2], jnp.int32) if encoder_segment_ids is None else encoder_segment_ids
      # Decoder segment k sees encoder segment k; decoder padding (0) sees encoder padding only.
      cross_mask_info = attn.MaskInfo(segment_ids, enc_seg)
    stack = Stack(cfg, cfg.decoder_layers if self.cross else cfg.num_layers, causal=True, cross=self.cross,
                  name='stack')
    return stack(x, mask_info=mask_info, positions=positions, kv_positions=kv_positions, cross_x=encoded,
                      cross_mask_info=cross_mask_info, cache_index=cache_index, deterministic=deterministic,
                      decode=decode)


class EncoderDecoder(nn.Module):
  """T5: an Encoder and a cross-attending Decoder sharing one token embedding table."""
  cfg: ModelConfig
  shared_embeddings: Optional[nn.Module] = None

  def setup(self):
    if self.shared_embeddings is None:
      self.embed = Embeddings(self.cfg)
    self.encoder = Encoder(self.cfg, shared_embeddings=_embedder(self))
    self.decoder = Decoder(self.cfg, cross=True, shared_embeddings=_embedder(self))

  def encode(self, tokens, *, segment_ids=None, positions=None, deterministic=True):
    return self.encoder(tokens, segment_ids=segment_ids, positions=positions, deterministic=deterministic)

  def decode(self, tokens, *, encoded, encoder_segment_ids=None, segment_ids=None, positions=None,
             deterministic=True, decode=False):
    return self.decoder(tokens, segment_ids=segment_ids, positions=positions, encoded=encoded,
                        encoder_segment_ids=encoder_segment_ids, deterministic=deterministic, decode=decode)

  def __call__(self, encoder_tokens, decoder_tokens, *, encoder_segment_ids=None, encoder_positions=None,
               decoder_segment_ids=None, decoder_positions=None, deterministic=True, decode=False):
    encoded = self.encode(encoder_tokens, segment_ids=encoder_segment_ids, positions=encoder_positions,
                          deterministic=deterministic)
    return self.decode(decoder_tokens, encoded=encoded, encoder_segment_ids=encoder_segment_ids,
                       segment_ids=decoder_segment_ids, positions=decoder_positions, deterministic=deterministic,
                       decode=decode)


# ------------------------------------------------------------------------------------ scanned <-> unrolled params

_LAYER_KEY = re.compile(r'^layers_(\d+)$')


def unstack_layers(params):
  """Scanned params ({'layers': leaves [L, ...]}) -> unrolled ({'layers_0': ..., 'layers_1': ...}), recursively."""
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key == 'layers':
      n = jax.tree.leaves(value)[0].shape[0]
      for i in range(n):
        out[f'layers_{i}'] = jax.tree.map(lambda a, i=i: a[i], value)
    else:
      out[key] = unstack_layers(value)
  return out


def stack_layers(params):
  """The inverse of unstack_layers."""
  if not isinstance(params, dict):
    return params
  out, layers = {}, {}
  for key, value in params.items():
    m = _LAYER_KEY.match(key)
    if m:
      layers[int(m.group(1))] = value
    else:
      out[key] = stack_layers(value)
  if layers:
    # numpy in, numpy out (checkpoint conversion stays on the host); anything else stacks on device.
    stack = lambda *xs: (np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs))
    out['layers'] = jax.tree.map(stack, *[layers[i] for i in sorted(layers)])
  return out
