"""The Flax modules a transformer is built from: embeddings, norms, multi-head attention, MLP and one block.

Every parameter carries logical axis names (embed, heads, kv_heads, kv, mlp, vocab) so that train/core/partitioning.py can
shard it without this file knowing about meshes. Modules take the frozen ModelConfig whole. Compute runs in
`cfg.dtype`, parameters are stored in `cfg.param_dtype`; softmax and norms compute in float32.

Letters: B batch, T length, D model width, E embedding width, N heads, K kv heads, H head dim, F MLP width, V vocab,
R LoRA rank.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from model import attention as attn
from model import lora
from model.config import ModelConfig

_ACTIVATIONS = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


def activation(name: str):
  return _ACTIVATIONS[name]


def init_std(cfg: ModelConfig, *, fan_in: int, query: bool = False) -> float:
  """The std of a kernel with fan_in inputs under cfg.init (model/config.py INITS): init_std for 'normal'; for 't5'
  fan_in^-0.5, and the query also head_dim^-0.5 (T5 folds the attention scale into it)."""
  if cfg.init == 't5':
    return fan_in ** -0.5 * (cfg.head_width ** -0.5 if query else 1.0)
  return cfg.init_std


def table_std(cfg: ModelConfig) -> float:
  """The std of the token (and position, token-type) embedding tables: 1.0 under T5's init, else init_std."""
  return 1.0 if cfg.init == 't5' else cfg.init_std


def kernel_init(cfg: ModelConfig, names: tuple[str, ...], std: float):
  return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def zeros_init(names: tuple[str, ...]):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def _amx_dtype(dtype) -> bool:
  """Whether a matmul in `dtype` takes the bfloat16 path below: bfloat16 on a CPU (AMX tiles where the CPU has them)."""
  return jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and jax.default_backend() == 'cpu'


def _stored_transpose(a):
  """a [R, C] -> a.T [C, R] written out in row-major order. A plain transpose is folded into the consuming dot's
  dimension numbers; XLA:CPU runs a bfloat16 dot on the AMX tiles only when neither operand is read transposed
  (measured on a 2-core Xeon with amx_bf16: ~250 GFLOP/s read transposed, 900-1,500 row-major), and the copy this
  reshape forces costs one pass over the array. The barrier keeps the array's producer out of that copy: fused into
  it, an elementwise producer (the softmax of the logits' gradient, an activation's derivative) would be recomputed
  in transposed order, 8x slower than the copy itself."""
  a = jax.lax.optimization_barrier(a)
  r, c = a.shape
  k = next((k for k in (16, 8, 4, 2) if r % k == 0), 0)
  if k:
    return jnp.transpose(a.reshape(r // k, k, c), (2, 0, 1)).reshape(c, r)
  k = next((k for k in (16, 8, 4, 2) if c % k == 0), 0)
  return jnp.transpose(a.reshape(r, c // k, k), (1, 2, 0)).reshape(c, r) if k else a.T


def _mm(a, b):
  """a [M, K] . b [K, N] accumulated in float32, returned in a's dtype."""
  return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)


def _mm_transposed(x, w):
  """x [M, E] . w [V, E]^T in bfloat16 on a CPU, by M (SmolLM2's 49,152 x 576 table on a 2-core Xeon with AMX, ms):
  one row as a matrix-vector product (1.9 against 42 through the written-out table), up to 256 rows as (w . x^T)^T,
  which transposes the few rows instead of the table (M = 8: 1.8 against 29; 128: 15 against 44), more rows through
  the written-out table (the training step's logits)."""
  if x.shape[0] == 1:
    return jnp.dot(x, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  if x.shape[0] <= 256:
    return _mm(w, _stored_transpose(x)).T
  return _mm(x, _stored_transpose(w))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def projection(x, w, w_transposed: bool):
  """x [..., E] . w -> [..., V]; w is [E, V], or [V, E] if w_transposed (a tied embedding table read as logits).

  Every dense layer with one input and one output axis goes through it. Its VJP takes the weight gradient as x^T . g
  over the flattened tokens ([E, V], transposed for a tied table) rather than g^T . x: XLA:CPU otherwise feeds that
  matmul the output gradient transposed and materializes the transpose (recomputing the softmax inside it for the
  logits: 9-11% of a GPT/LLaMA step with an 8k vocabulary; copies of every MLP activation in a bias-free model, whose
  nanoGPT-recipe step went from 42 to 25-31 ms). In bfloat16 on a CPU every product of the layer, forward and
  backward, is a row-major [M, K] . [K, N] accumulated in float32 (_stored_transpose), the one form AMX runs."""
  if _amx_dtype(x.dtype):
    x2 = x.reshape(-1, x.shape[-1])
    y = _mm_transposed(x2, w) if w_transposed else _mm(x2, w)  # [N, V]
    return y.reshape(x.shape[:-1] + (y.shape[-1],))
  return jnp.einsum('...e,ve->...v' if w_transposed else '...e,ev->...v', x, w)


def _projection_fwd(x, w, w_transposed):
  return projection(x, w, w_transposed), (x, w)


def _projection_bwd(w_transposed, res, g):
  x, w = res
  if _amx_dtype(x.dtype):
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])  # [N, E], [N, V]
    dx = _mm(g2, w if w_transposed else _stored_transpose(w)).reshape(x.shape)
    dw = _mm(_stored_transpose(g2), x2) if w_transposed else _mm(_stored_transpose(x2), g2)  # [V, E] / [E, V]
    return dx, dw.astype(w.dtype)
  dx = jnp.einsum('...v,ve->...e' if w_transposed else '...v,ev->...e', g, w)
  dw = jnp.einsum('ne,nv->ev', x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]))  # [E, V]
  return dx, (dw.T if w_transposed else dw)


projection.defvjp(_projection_fwd, _projection_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _add_bias(y, b, ndim: int):
  """y [..., *F] + b [*F] (ndim = len(F)), bfloat16 on a CPU: the bias gradient, g summed over the leading axes, is
  taken as ones [1, N] . g [N, F] on the AMX tiles instead of XLA:CPU's reduce-window tree over a float32 copy of g
  (~15 ms for an [8, 256, 2048] gradient on a 2-core Xeon)."""
  del ndim
  return y + b


def _add_bias_fwd(y, b, ndim):
  return y + b, None


def _add_bias_bwd(ndim, _, g):
  features = g.shape[g.ndim - ndim:]
  g2 = g.reshape(-1, int(np.prod(features)))  # [N, F]
  return g, _mm(jnp.ones((1, g2.shape[0]), g.dtype), g2).reshape(features)


_add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Dense(nn.Module):
  """x [..., *in] . kernel [*in, *out] (+ bias [*out]) contracting the trailing `axis` of x.

  Unlike flax's DenseGeneral, the kernel is created at its full multi-axis shape ([D,N,H] for queries), so its logical
  names fit it also when a mesh is in context while tracing (activation sharding constraints need that).
  With cfg.lora_rank > 0 and this module's path among cfg.lora_targets (model/lora.py) it also holds a LoRA adapter;
  `deterministic` only switches the adapter's dropout.
  """
  cfg: ModelConfig
  features: tuple[int, ...]
  names: tuple[Optional[str], ...]
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = True
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    axis = tuple(sorted(a % x.ndim for a in self.axis))
    in_shape = tuple(x.shape[a] for a in axis)
    std = init_std(cfg, fan_in=int(np.prod(in_shape)), query=self.name == 'query')
    kernel = self.param('kernel', kernel_init(cfg, self.names, std), in_shape + self.features, cfg.jnp_param_dtype)
    lead = x.shape[:x.ndim - len(axis)]
    if axis == (x.ndim - 1,) and len(self.features) == 1:  # through projection's VJP
      y = projection(x.astype(cfg.jnp_dtype), kernel.astype(cfg.jnp_dtype), False)
    # The attention out projection [N, H] -> [D] goes through projection's VJP in every dtype: as a dot_general, XLA:CPU
    # fuses the residual gradient's layer-norm backward (across layers) into transposing copies that feed its weight
    # gradient, 8-12 ms of a 48 ms float32 step of GPT 4L/128d on Intel (an optimization barrier does not stop it: the
    # CPU pipeline expands barriers before fusion). q/k/v [D] -> [N, H] take that route only in bfloat16 (AMX's form).
    elif axis == tuple(range(len(lead), x.ndim)) and (len(self.features) == 1 or _amx_dtype(cfg.jnp_dtype)):
      flat = kernel.astype(cfg.jnp_dtype).reshape(int(np.prod(in_shape)), -1)
      y = projection(x.astype(cfg.jnp_dtype).reshape(lead + (-1,)), flat, False).reshape(lead + self.features)
    else:
      y = jax.lax.dot_general(x.astype(cfg.jnp_dtype), kernel.astype(cfg.jnp_dtype),
                              ((axis, tuple(range(len(axis)))), ((), ())))
    if self.use_bias:
      bias = self.param('bias', zeros_init(self.names[-len(self.features):]), self.features, cfg.jnp_param_dtype)
      y = _add_bias(y, bias.astype(cfg.jnp_dtype), len(self.features)) if _amx_dtype(y.dtype) else (
          y + bias.astype(cfg.jnp_dtype))
    if cfg.lora_rank and lora.is_target(self.path, cfg.lora_targets):
      y = y + self._lora(x, axis, in_shape)
    return y

  def _lora(self, x, axis, in_shape):
    """scale * (dropout(x) . A) . B: x [..., *in], A [*in, R] (random, as peft), B [R, *out] (zeros, so training
    starts from the base model exactly) -> [..., *out]."""
    cfg, r = self.cfg, self.cfg.lora_rank
    in_names, out_names = self.names[:len(in_shape)], self.names[len(in_shape):]
    # peft's kaiming_uniform(a=sqrt(5)) on A: U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = every input axis.
    a_init = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform', in_axis=tuple(range(len(in_shape))),
                                              out_axis=-1)
    a = self.param('lora_a', nn.with_logical_partitioning(a_init, in_names + (None,)), in_shape + (r,),
                   cfg.jnp_param_dtype)
    b = self.param('lora_b', zeros_init((None,) + out_names), (r,) + self.features, cfg.jnp_param_dtype)
    x = nn.Dropout(cfg.lora_dropout)(x, deterministic=self.deterministic or not cfg.lora_dropout)
    xa = jax.lax.dot_general(x.astype(cfg.jnp_dtype), a.astype(cfg.jnp_dtype),
                             ((axis, tuple(range(len(axis)))), ((), ())))  # [..., R]
    xab = jax.lax.dot_general(xa, b.astype(cfg.jnp_dtype), (((xa.ndim - 1,), (0,)), ((), ())))  # [..., *out]
    return (lora.scale(cfg) * xab).astype(cfg.jnp_dtype)


def dense(cfg: ModelConfig, features, names: tuple[Optional[str], ...], *, axis=-1, use_bias: Optional[bool] = None,
          name: Optional[str] = None, deterministic: bool = True) -> Dense:
  """A Dense whose kernel is named `names` (input axes then output axes) and whose bias is named by outputs;
  deterministic=False lets a LoRA adapter on it drop out."""
  use_bias = cfg.use_bias if use_bias is None else use_bias
  features = tuple(features) if isinstance(features, (tuple, list)) else (features,)
  axis = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  return Dense(cfg, features, tuple(names), axis, use_bias, deterministic, name=name)


class Norm(nn.Module):
  """LayerNorm (with bias) or RMSNorm (scale only, as LLaMA/T5), computed in float32."""
  cfg: ModelConfig
  features_axis: str = 'embed'

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    x32 = x.astype(jnp.float32)
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones_init(), (self.features_axis,)),
                       (x.shape[-1],), cfg.jnp_param_dtype)
    if cfg.norm == 'rmsnorm':
      y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
      return (y * scale.astype(jnp.float32)).astype(cfg.jnp_dtype)
    bias = self.param('bias', zeros_init((self.features_axis,)), (x.shape[-1],), cfg.jnp_param_dtype)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + cfg.norm_eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(cfg.jnp_dtype)


class Embeddings(nn.Module):
  """Token (+ learned or sinusoidal position) (+ token-type) embeddings, optional norm and dropout: [B,T] -> [B,T,E].

  `attend` reuses the token table as the output projection of tied heads (MLM, tied LM).
  """
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    emb_init = nn.with_logical_partitioning(nn.initializers.normal(table_std(cfg)), ('vocab', 'embed'))
    self.token = nn.Embed(cfg.vocab_size, cfg.embed_width, embedding_init=emb_init, dtype=cfg.jnp_dtype,
                          param_dtype=cfg.jnp_param_dtype)
    if cfg.position == 'learned':
      pos_init = nn.with_logical_partitioning(nn.initializers.normal(table_std(cfg)), ('length', 'embed'))
      self.position = nn.Embed(cfg.max_len, cfg.embed_width, embedding_init=pos_init, dtype=cfg.jnp_dtype,
                               param_dtype=cfg.jnp_param_dtype)
    if cfg.type_vocab_size:
      type_init = nn.with_logical_partitioning(nn.initializers.normal(table_std(cfg)), (None, 'embed'))
      self.token_type = nn.Embed(cfg.type_vocab_size, cfg.embed_width, embedding_init=type_init, dtype=cfg.jnp_dtype,
                                 param_dtype=cfg.jnp_param_dtype)
    if cfg.embed_norm:
      self.norm = Norm(cfg)
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def __call__(self, tokens, *, positions, token_type_ids=None, deterministic: bool = True, extra_embeddings=None):
    """tokens [B,T] int, positions [B,T] int, token_type_ids [B,T] int -> [B,T,E].

    extra_embeddings [B,T,E], if given, is added before the norm (soft prompts and adapters build on it).
    """
    cfg = self.cfg
    x = self.token(tokens)
    if cfg.position == 'learned':
      x = x + self.position(positions)
    elif cfg.position == 'sinusoidal':
      x = x + attn.sinusoidal_positions(positions, cfg.embed_width).astype(x.dtype)
    if cfg.type_vocab_size:
      tt = jnp.zeros_like(tokens) if token_type_ids is None else token_type_ids
      x = x + self.token_type(tt)
    if extra_embeddings is not None:
      x = x + extra_embeddings.astype(x.dtype)
    if cfg.embed_norm:
      x = self.norm(x)
    return self.dropout(x, deterministic=deterministic)

  def attend(self, x):
    """[..., E] -> [..., V] with the token table transposed."""
    dtype = self.cfg.jnp_dtype
    return projection(x.astype(dtype), self.token.embedding.astype(dtype), True)


class MultiHeadAttention(nn.Module):
  """Projections to N query heads and K <= N key/value heads, attention, projection back to D.

  Self-attention when `kv_input` is None, cross-attention otherwise. With decode=True the keys and values of every call
  are written into a 'cache' collection at `cache_index` (self-attention only), so one token at a time sees all before.
  """
  cfg: ModelConfig
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, kv_input=None, *, mask_info: Optional[attn.MaskInfo] = None, bias=None, rope=None,
               cache_index=None):
    """x [B,T,D]; kv_input [B,S,D] or None; bias [B|1,N,T,S]; rope (sin, cos) each [B,T,H/2] -> [B,T,D]."""
    cfg = self.cfg
    n, k_heads, h = cfg.num_heads, cfg.kv_heads, cfg.head_width
    det = self.deterministic
    q = dense(cfg, (n, h), ('embed', 'heads', 'kv'), name='query', deterministic=det)(x)  # [B,T,N,H]
    src = x if kv_input is None else kv_input
    k = dense(cfg, (k_heads, h), ('embed', 'kv_heads', 'kv'), name='key', deterministic=det)(src)  # [B,S,K,H]
    v = dense(cfg, (k_heads, h), ('embed', 'kv_heads', 'kv'), name='value', deterministic=det)(src)  # [B,S,K,H]
    if rope is not None:
      sin, cos = rope
      q, k = attn.apply_rope(q, sin, cos), attn.apply_rope(k, sin, cos)
    if self.decode and kv_input is None:
      is_initialized = self.has_variable('cache', 'cached_key')
      cached_k = self.variable('cache', 'cached_key', jnp.zeros, k.shape, k.dtype)
      cached_v = self.variable('cache', 'cached_value', jnp.zeros, v.shape, v.dtype)
      if is_initialized:
        k = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), (0, cache_index, 0, 0))
        v = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), (0, cache_index, 0, 0))
        cached_k.value, cached_v.value = k, v
    rate = 0.0 if self.deterministic else cfg.attention_dropout_rate
    out = attn.attention(q, k, v, mask_info=mask_info, bias=bias, scale=cfg.attention_scale,
                         implementation=cfg.attention_impl, chunk_size=cfg.attention_chunk, dropout_rate=rate,
                         dropout_rng=self.make_rng('dropout') if rate > 0 else None)
    out = dense(cfg, cfg.d_model, ('heads', 'kv', 'embed'), axis=(-2, -1), name='out',
                deterministic=det)(out)  # [B,T,D]
    return out


class Mlp(nn.Module):
  """Position-wise feed-forward: act(x W_i) W_o, or the gated form act(x W_i0) * (x W_i1) W_o (SwiGLU, GeGLU)."""
  cfg: ModelConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    act = activation(cfg.activation)
    proj = lambda features, names, name: dense(cfg, features, names, name=name, deterministic=self.deterministic)
    # 'mlp_in' names what a remat policy may keep (model/config.py 'projections'): `projection`'s own VJP hides the
    # matmul from the dots policies, which would otherwise recompute it.
    wi = lambda name: checkpoint_name(proj(cfg.d_ff, ('embed', 'mlp'), name)(x), 'mlp_in')
    # The exact (erf) GELU runs in float32: in bfloat16 XLA:CPU rounds between each of erf's operations in the backward
    # (recipe-shaped GPT step 28.1 -> 27.0 ms, BERT (c) +2%); tanh GELU and SiLU stay in the compute dtype, where
    # float32 cost GPT (b) 11% and LLaMA 10% in bfloat16 on a 2-core Xeon with AMX.
    f32 = (lambda h: h.astype(jnp.float32)) if cfg.activation == 'gelu' else (lambda h: h)
    hidden = act(f32(wi('wi_0'))) * f32(wi('wi_1')) if cfg.gated_mlp else act(f32(wi('wi')))
    hidden = hidden.astype(cfg.jnp_dtype)
    hidden = nn.Dropout(cfg.mlp_dropout_rate)(hidden, deterministic=self.deterministic)
    return proj(cfg.d_model, ('mlp', 'embed'), 'wo')(hidden)


class Block(nn.Module):
  """One transformer layer: self-attention, optional cross-attention, MLP; each with a residual and a norm.

  pre-LN: x + f(norm(x)) (GPT-2, LLaMA, T5); post-LN: norm(x + f(x)) (BERT). The signature is nn.scan's:
  (carry, *broadcast) -> (carry, None).
  """
  cfg: ModelConfig
  causal: bool = False
  cross: bool = False
  decode: bool = False
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, mask_info, bias, rope, cross_x, cross_mask_info, cache_index):
    cfg = self.cfg
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=self.deterministic)

    def residual(x, fn, norm_name):
      if cfg.pre_norm:
        return x + drop(fn(Norm(cfg, name=norm_name)(x)))
      return Norm(cfg, name=norm_name)(x + drop(fn(x)))

    self_attn = MultiHeadAttention(cfg, decode=self.decode, deterministic=self.deterministic, name='self_attn')
    x = residual(x, lambda y: self_attn(y, mask_info=mask_info, bias=bias, rope=rope, cache_index=cache_index),
                 'self_attn_norm')
    if self.cross:
      cross_attn = MultiHeadAttention(cfg, deterministic=self.deterministic, name='cross_attn')
      x = residual(x, lambda y: cross_attn(y, cross_x, mask_info=cross_mask_info), 'cross_attn_norm')
    x = residual(x, Mlp(cfg, deterministic=self.deterministic, name='mlp'), 'mlp_norm')
    # Between blocks activations are split over the batch only (Megatron/FSDP layout): 'act_embed' has no rule.
    x = nn.with_logical_constraint(x, ('batch', 'length', 'act_embed'))
    return x, None
