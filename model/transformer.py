"""The three backbones, Encoder, Decoder and EncoderDecoder, built from one ModelConfig (model/config.py).

Layers are stacked by `Stack`, which scans one Block over depth (compile time flat in depth) or unrolls it, with
optional rematerialization. Relative-position biases and rotary tables are computed once per stack and broadcast into
every layer. `stack_layers` / `unstack_layers` convert params between the scanned and the unrolled layout;
`inference_layout` unrolls a small stack for forward passes.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from model import attention as attn
from model import pytree
# ModelConfig, PRESETS and preset are re-exported: callers have long written `transformer.preset('bert-tiny')`.
from model.config import PRESETS, REMAT_POLICIES, ModelConfig, preset  # noqa: F401
from model.layers import Block, Embeddings, Norm, dense

# --------------------------------------------------------------------------------------------------------- stacks


class RelativePositionBias(nn.Module):
  """T5's learned bias per (bucket of key_pos - query_pos, head): positions [B,T], [B,S] -> [B,N,T,S]."""
  cfg: ModelConfig
  bidirectional: bool

  @nn.compact
  def __call__(self, q_positions, kv_positions):
    cfg = self.cfg
    table = self.param('rel_embedding',
                       nn.with_logical_partitioning(nn.initializers.normal(
                           cfg.d_model ** -0.5 if cfg.init == 't5' else cfg.init_std), (None, 'heads')),
                       (cfg.relative_buckets, cfg.num_heads), cfg.jnp_param_dtype)
    buckets = attn.t5_relative_position_bucket(kv_positions[:, None, :] - q_positions[:, :, None],
                                               bidirectional=self.bidirectional, num_buckets=cfg.relative_buckets,
                                               max_distance=cfg.relative_max_distance)
    return jnp.transpose(jnp.take(table, buckets, axis=0), (0, 3, 1, 2)).astype(jnp.float32)


class Stack(nn.Module):
  """num_layers Blocks (scanned or unrolled, maybe rematerialized), position tables, final norm: [B,T,D] -> same."""
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
    block, policy = Block, cfg.remat_for(self.num_layers)
    if policy != 'none' and not decode:  # decoding keeps no residuals to trade
      block = nn.remat(Block, policy=REMAT_POLICIES[policy], prevent_cse=not cfg.scan_layers)
    kw = dict(causal=self.causal, cross=self.cross, decode=decode, deterministic=deterministic)
    args = (mask_info, bias, rope, cross_x, cross_mask_info, cache_index)
    if cfg.scan_layers:
      scanned = nn.scan(block, variable_axes={
          'params': 0,
          'cache': 0
      }, split_rngs={
          'params': True,
          'dropout': True
      }, in_axes=(nn.broadcast,) * len(args), length=self.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'},
                        unroll=cfg.layers_per_iteration(self.num_layers))
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
                 cross_mask_info=cross_mask_info, cache_index=cache_index, deterministic=deterministic, decode=decode)


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

  def decode(self, tokens, *, encoded, encoder_segment_ids=None, segment_ids=None, positions=None, deterministic=True,
             decode=False):
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


def inference_layout(cfg: ModelConfig, params):
  """(cfg, params) to run forward passes and decoding with: a scanned stack that runs all its layers in one iteration
  anyway (ModelConfig.layers_per_iteration: a small stack) is unrolled, its params unstacked once here. The same
  computation and the same compile, without the copy of every layer's weights out of the stacked arrays that XLA:CPU
  makes on every call (a bfloat16 slice goes through float32): all-MiniLM-L6-v2 classifying SST-2 dev on a 2-core Xeon,
  benchmarks/inference.py, spent 23% of a float32 pass and 29% of a bfloat16 one there. A stack that loops keeps its
  layout (compile time flat in depth)."""
  stacks = (cfg.num_layers, cfg.decoder_layers) if cfg.arch == 'encoder_decoder' else (cfg.num_layers,)
  if not cfg.scan_layers or any(cfg.layers_per_iteration(n) < n for n in stacks):
    return cfg, params
  return cfg.replace(scan_layers=False), unstack_layers(params)


def forward_compiler_options(decode_dtype: Optional[str] = None) -> dict[str, str]:
  """XLA options for jit-compiling a forward pass that no gradient follows: scoring, or decoding a model that
  computes in `decode_dtype`. On a CPU: no while-loop invariant code motion, which hoists the float32 copy of every
  stacked bfloat16 weight (XLA:CPU slices bfloat16 through float32) out of the layer loop, writing the whole model out
  in float32 on every call: SmolLM2-135M scoring 256 SST-2 prompts in bfloat16 on a 2-core Xeon took 5.5 s with it
  and 3.5 s without (float32 unchanged). Greedy decoding in bfloat16 without it: 16.3 -> 24.4 tokens/s at batch 1,
  93 -> 130 at batch 8 (benchmarks/inference.py, same machine). Decoding in float32 keeps the pass (batch 1 the same
  either way, batch 8 102 with it against 92 without)."""
  if jax.default_backend() != 'cpu':
    return {}
  if decode_dtype is not None and jnp.dtype(decode_dtype) != jnp.dtype(jnp.bfloat16):
    return {}
  return {'xla_disable_hlo_passes': 'while-loop-invariant-code-motion'}


def stack_layers(params):
  """The inverse of unstack_layers."""
  if not isinstance(params, dict):
    return params
  out, layers = {}, {}
  for key, value in params.items():
    i = pytree.layer_index(key)
    if i is not None:
      layers[i] = value
    else:
      out[key] = stack_layers(value)
  if layers:
    # numpy in, numpy out (checkpoint conversion stays on the host); anything else stacks on device.
    stack = lambda *xs: (np.stack(xs) if all(isinstance(x, np.ndarray) for x in xs) else jnp.stack(xs))
    out['layers'] = jax.tree.map(stack, *[layers[i] for i in sorted(layers)])
  return out
