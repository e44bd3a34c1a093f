"""Attention math as pure functions: masks, position encodings and scaled dot-product attention.

Everything here is a plain function of arrays (jit-able, no parameters), so tests can hold it against a float64 numpy
formula and the Flax modules in layers.py stay thin. Attention is softmax(Q K^T / sqrt(d_k) + bias) V with boolean masks
(True = may attend). Two implementations agree to float rounding: `dot_product_attention` materializes the [T, S] score
matrix (and, training, keeps only a log-sum-exp per row for its backward pass, which recomputes the scores),
`chunked_attention` walks key/value chunks with an online softmax so its memory grows linearly in length.
Masks for the chunked path are described by `MaskInfo` (segment ids, positions, causal flag) and built one block at a
time, never as a dense [T, S] array.

Letters: B batch, T query length, S key length, N query heads, K key/value heads, G = N // K, H head dim.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

# A large finite negative keeps fully masked rows finite (uniform weights) instead of NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)

# ----------------------------------------------------------------------------------------------------------- masks


def padding_mask(q_valid: jax.Array, kv_valid: jax.Array) -> jax.Array:
  """[B,T] bool, [B,S] bool -> [B,1,T,S]: real queries see only real keys."""
  return q_valid[:, None, :, None] & kv_valid[:, None, None, :]


def causal_mask(q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
  """[B,T] int, [B,S] int -> [B,1,T,S]: position t sees keys at positions <= t."""
  return kv_positions[:, None, None, :] <= q_positions[:, None, :, None]


def prefix_lm_mask(q_positions: jax.Array, kv_positions: jax.Array, prefix_len: jax.Array) -> jax.Array:
  """Causal, except that every query sees the whole prefix: keys with position < prefix_len[b] ([B])."""
  in_prefix = kv_positions[:, None, None, :] < prefix_len[:, None, None, None]
  return causal_mask(q_positions, kv_positions) | in_prefix


def segment_mask(q_segment_ids: jax.Array, kv_segment_ids: jax.Array) -> jax.Array:
  """[B,T], [B,S] -> [B,1,T,S]: block-diagonal mask for packed sequences (same segment id only).

  Segment id 0 marks padding: a padding query only meets padding keys, so real positions never see padding and no row
  is left empty.
  """
  return q_segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MaskInfo:
  """What decides which key a query may see, without the dense [T, S] mask.

  q_segment_ids [B,T], kv_segment_ids [B,S]: packing/padding segments (0 = padding); None means all one segment.
  q_positions [B,T], kv_positions [B,S]: order used by the causal rule (cache slots when decoding).
  prefix_len [B]: prefix-LM boundary (with causal=True); None for none.
  causal: static flag.
  """

  q_segment_ids: Optional[jax.Array] = None
  kv_segment_ids: Optional[jax.Array] = None
  q_positions: Optional[jax.Array] = None
  kv_positions: Optional[jax.Array] = None
  prefix_len: Optional[jax.Array] = None
  causal: bool = dataclasses.field(default=False, metadata=dict(static=True))

  def block(self, q_slice: slice | None = None, kv_slice: slice | None = None) -> Optional[jax.Array]:
    """The boolean mask [B,1,t,s] for a block of queries and keys (all of them by default); None if nothing masks."""
    sl = lambda x, s: None if x is None else (x if s is None else x[:, s])
    mask = None
    if self.q_segment_ids is not None:
      mask = segment_mask(sl(self.q_segment_ids, q_slice), sl(self.kv_segment_ids, kv_slice))
    if self.causal:
      qp, kp = sl(self.q_positions, q_slice), sl(self.kv_positions, kv_slice)
      rule = causal_mask(qp, kp) if self.prefix_len is None else prefix_lm_mask(qp, kp, self.prefix_len)
      mask = rule if mask is None else mask & rule
    return mask

  def dense(self) -> Optional[jax.Array]:
    return self.block()


def make_mask_info(*, q_segment_ids=None, kv_segment_ids=None, q_positions=None, kv_positions=None, causal=False,
                   prefix_len=None, q_len=None, kv_len=None, batch=None) -> MaskInfo:
  """Fills defaults: kv segments follow q segments, causal positions default to arange."""
  if kv_segment_ids is None:
    kv_segment_ids = q_segment_ids
  if causal:
    if q_positions is None:
      q_positions = jnp.broadcast_to(jnp.arange(q_len, dtype=jnp.int32), (batch, q_len))
    if kv_positions is None:
      kv_positions = jnp.broadcast_to(jnp.arange(kv_len, dtype=jnp.int32), (batch, kv_len))
  return MaskInfo(q_segment_ids, kv_segment_ids, q_positions, kv_positions, prefix_len, causal)


# ---------------------------------------------------------------------------------------------- position encodings


def sinusoidal_positions(positions: jax.Array, dim: int, max_timescale: float = 10_000.0) -> jax.Array:
  """[..., T] int -> [..., T, dim]: PE(p, 2i) = sin(p / 10000^(2i/dim)), PE(p, 2i+1) = cos(...), interleaved."""
  half = dim // 2
  inv = 1.0 / (max_timescale ** (np.arange(half, dtype=np.float32) * 2.0 / dim))
  angles = positions[..., None].astype(jnp.float32) * inv
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*angles.shape[:-1], 2 * half)
  if dim % 2:
    pe = jnp.pad(pe, [(0, 0)] * (pe.ndim - 1) + [(0, 1)])
  return pe


def rope_frequencies(positions: jax.Array, head_dim: int, theta: float = 10_000.0):
  """[B,T] int -> (sin, cos) each [B,T,H/2]; computed once per stack, shared by every layer."""
  inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
  angles = positions[..., None].astype(jnp.float32) * inv
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
  """Rotary embedding, half-split layout (as in LLaMA/HF): x [B,T,N,H], sin/cos [B,T,H/2]."""
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  s, c = sin[:, :, None, :], cos[:, :, None, :]
  out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
  return out.astype(x.dtype)


def t5_relative_position_bucket(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int = 32,
                                max_distance: int = 128) -> jax.Array:
  """T5's bucketing of (key_pos - query_pos): exact for small distances, log-spaced up to max_distance."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  # The epsilon mirrors T5 so the same distances land in the same buckets.
  val_if_large = max_exact + (jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
                              / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


# ----------------------------------------------------------------------------------------------- attention proper


def _group(q: jax.Array, num_kv_heads: int) -> jax.Array:
  b, t, n, h = q.shape
  return q.reshape(b, t, num_kv_heads, n // num_kv_heads, h)


def _bias_blocks(bias: Optional[jax.Array], num_kv_heads: int):
  """[B|1, N, T, S] -> [B|1, K, G, T, S] matching grouped queries."""
  if bias is None:
    return None
  b, n, t, s = bias.shape
  return bias.reshape(b, num_kv_heads, n // num_kv_heads, t, s)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask: Optional[jax.Array] = None,
                          bias: Optional[jax.Array] = None, scale: Optional[float] = None, dropout_rate: float = 0.0,
                          dropout_rng: Optional[jax.Array] = None, groups: Optional[int] = None) -> jax.Array:
  """softmax(q k^T * scale + bias, masked) v, the plain way.

  q [B,T,N,H]; k, v [B,S,K,H] with N a multiple of K (grouped-query; K == 1 is multi-query); mask [B|1, 1|N, T, S]
  bool; bias [B|1, N, T, S]; scale defaults to 1/sqrt(H). Scores and softmax run in float32. Returns [B,T,N,H].
  Without dropout the gradient is `_softmax_attention`'s, which keeps each row's log-sum-exp instead of the [T, S]
  probabilities for the backward pass, and `groups` groups of batch rows (a divisor of B; None: `batch_groups`) run
  one after another.
  """
  kheads = k.shape[2]
  scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
  qg = _group(q, kheads)
  bias_g = None if bias is None else _bias_blocks(bias.astype(jnp.float32), kheads)
  if mask is not None:
    mask = mask[:, :, None] if mask.shape[1] == 1 else mask.reshape(mask.shape[0], kheads, -1, *mask.shape[2:])
  if dropout_rate > 0.0 and dropout_rng is not None:
    weights = jax.nn.softmax(_scores(scale, qg, k, bias_g, mask), axis=-1)
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
    weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum('BKGTS,BSKH->BTKGH', weights.astype(v.dtype), v)
  else:  # head-major inside: XLA:CPU runs the batched [T,H] x [H,S] products fastest with B, K, G leading
    groups = batch_groups(q.shape[0], q.shape[2], q.shape[1], k.shape[1]) if groups is None else groups
    if groups < 1 or q.shape[0] % groups:
      raise ValueError(f'dot_product_attention(groups={groups}): the batch of {q.shape[0]} rows splits into a divisor '
                       f'of {q.shape[0]} groups; pass one, or None for batch_groups to choose.')
    heads = _softmax_attention(float(scale), groups, jnp.transpose(qg, (0, 2, 3, 1, 4)),
                               jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3)), bias_g, mask)  # [B,K,G,T,H]
    out = jnp.transpose(heads, (0, 3, 1, 2, 4))
  return out.reshape(q.shape)


_HEAD_MAJOR = 'BKGTH,BKSH->BKGTS'


def _scores(scale, qg, k, bias_g, mask_g, layout='BTKGH,BSKH->BKGTS'):
  """Scaled, biased, masked scores [B,K,G,T,S] float32 of grouped queries and keys (qg [B,T,K,G,H] and k [B,S,K,H];
  head-major qh [B,K,G,T,H] and kh [B,K,S,H] with layout 'BKGTH,BKSH->BKGTS')."""
  scores = jnp.einsum(layout, qg, k, preferred_element_type=jnp.float32) * scale
  if bias_g is not None:
    scores = scores + bias_g
  return scores if mask_g is None else jnp.where(mask_g, scores, _MASK_VALUE)


# XLA:CPU writes the [B,K,G,T,S] float32 scores out and reads them back for the mask, the max, the exponential, the
# sum and both products. Above this many bytes of them, one CPU device takes the batch rows in groups, one group after
# another, so that a group's scores stay near the cache (benchmarks/attention.py, 'plain' against 'plain, one group').
GROUP_SCORES_BYTES = 4 << 20


def batch_groups(b: int, n: int, t: int, s: int) -> int:
  """How many groups of batch rows the plain path runs one after another: 1 (all at once) unless this is a lone CPU
  device and the float32 scores [B,N,T,S] exceed GROUP_SCORES_BYTES; then the fewest groups that divide B with each
  group's scores within that size (a sharded batch, and accelerators, keep one group)."""
  total = 4 * b * n * t * s
  if total <= GROUP_SCORES_BYTES or jax.default_backend() != 'cpu' or jax.device_count() != 1:
    return 1
  return next((g for g in range(2, b + 1) if b % g == 0 and total // g <= GROUP_SCORES_BYTES), b)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _softmax_attention(scale, groups, qh, kh, vh, bias_g, mask_g):
  """Head-major attention: qh [B,K,G,T,H], kh and vh [B,K,S,H] -> [B,K,G,T,H]. Its VJP recomputes the probabilities
  from the saved log-sum-exp (FlashAttention's backward in one block), so a layer keeps O(T) numbers per head for
  its backward pass instead of O(T * S), and a scanned stack has no [layers, B, K, G, T, S] buffer to zero-fill.
  groups > 1: the same, over that many groups of batch rows in turn (lax.map)."""
  return _softmax_attention_fwd(scale, groups, qh, kh, vh, bias_g, mask_g)[0]


def _in_groups(fn, groups, *xs):
  """fn(*xs) over `groups` groups of the batch rows, one after another (lax.map), the outputs' groups merged back into
  one batch axis; an x that is None or has a batch of 1 (a mask or bias every row shares) goes to each group whole."""
  rows = [x is not None and x.shape[0] != 1 for x in xs]
  split = tuple(x.reshape(groups, x.shape[0] // groups, *x.shape[1:]) for x, r in zip(xs, rows) if r)

  def one(parts):
    parts = iter(parts)
    return fn(*[next(parts) if r else x for x, r in zip(xs, rows)])

  return jax.tree.map(lambda y: y.reshape(-1, *y.shape[2:]), jax.lax.map(one, split))


def _attend(scale, qh, kh, vh, bias_g, mask_g):
  """-> (output [B,K,G,T,H], each row's log-sum-exp [B,K,G,T,1]), all batch rows at once."""
  scores = _scores(scale, qh, kh, bias_g, mask_g, _HEAD_MAJOR)
  top = jnp.max(scores, axis=-1, keepdims=True)
  e = jnp.exp(scores - top)
  total = jnp.sum(e, axis=-1, keepdims=True)
  out = (jnp.einsum('BKGTS,BKSH->BKGTH', e.astype(vh.dtype), vh, preferred_element_type=jnp.float32) /
         total).astype(vh.dtype)  # normalized on [T,H], not on [T,S]
  return out, top + jnp.log(total)


def _softmax_attention_fwd(scale, groups, qh, kh, vh, bias_g, mask_g):
  attend = functools.partial(_attend, scale)
  args = (qh, kh, vh, bias_g, mask_g)
  out, lse = attend(*args) if groups == 1 else _in_groups(attend, groups, *args)
  # Named, so that a remat policy can keep them (model/config.py 'matmuls') and not redo this forward.
  out = checkpoint_name(out, 'attention_out')
  return out, (qh, kh, vh, bias_g, mask_g, out, checkpoint_name(lse, 'attention_lse'))


def _softmax_attention_bwd(scale, groups, res, dout):
  """The gradients of `_attend`, per group of batch rows where the forward ran in groups; a bias shared by every row
  gets the sum of its groups' gradients."""
  qh, kh, vh, bias_g, mask_g, out, lse = res
  grads = functools.partial(_attend_grads, scale)
  args = (qh, kh, vh, bias_g, mask_g, out, lse, dout)
  if groups == 1:
    return grads(*args)
  dq, dk, dv, dbias, _ = _in_groups(grads, groups, *args)
  if dbias is not None and bias_g.shape[0] == 1:
    dbias = dbias.sum(axis=0, keepdims=True)
  return dq, dk, dv, dbias, None


def _attend_grads(scale, qh, kh, vh, bias_g, mask_g, out, lse, dout):
  """p = exp(scores - lse); dV = p^T dO; dS = p (dO V^T - rowsum(dO * O)); dQ = dS K scale; dK = dS^T Q scale;
  dBias = dS (summed over a broadcast batch). A masked entry has p = 0, so no gradient, unless its whole row is
  masked (padding that may see no key; segment ids never make one): then, as its output is the mean of the values,
  its uniform p passes the row's gradient on to q and k."""
  p = jnp.exp(_scores(scale, qh, kh, bias_g, mask_g, _HEAD_MAJOR) - lse)  # [B,K,G,T,S]
  f32 = jnp.float32  # accumulate every product in float32: in bfloat16, XLA:CPU's bfloat16-out products run 3-7x slower
  dv = jnp.einsum('BKGTS,BKGTH->BKSH', p.astype(vh.dtype), dout, preferred_element_type=f32)
  dp = jnp.einsum('BKGTH,BKSH->BKGTS', dout, vh, preferred_element_type=f32)
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = p * (dp - delta)  # 0 where masked: p is
  dbias = None
  if bias_g is not None:
    dbias = ds.sum(axis=0, keepdims=True) if bias_g.shape[0] == 1 < ds.shape[0] else ds
  ds = (ds * scale).astype(qh.dtype)
  dq = jnp.einsum('BKGTS,BKSH->BKGTH', ds, kh, preferred_element_type=f32).astype(qh.dtype)
  dk = jnp.einsum('BKGTS,BKGTH->BKSH', ds, qh, preferred_element_type=f32)
  return dq, dk.astype(kh.dtype), dv.astype(vh.dtype), dbias, None


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, mask_info: Optional[MaskInfo] = None,
                      bias: Optional[jax.Array] = None, scale: Optional[float] = None, q_chunk: int = 128,
                      kv_chunk: int = 128) -> jax.Array:
  """Memory-efficient attention (Rabe & Staats; the online softmax of FlashAttention), same result as the plain one.

  Queries are processed q_chunk at a time; for each, a scan over kv_chunk-sized key blocks keeps a running max m, a
  running normalizer l and an unnormalized output acc, so only a [q_chunk, kv_chunk] score block ever exists. The
  gradient is FlashAttention's: the forward keeps only the output and each row's log-sum-exp, and the backward
  recomputes every block's probabilities, so training memory is linear in length too (a bias, being [T, S] itself,
  gets a [T, S] gradient). A block that no query of the batch may see (above a causal diagonal, between packed
  segments) is skipped in both directions, so causal attention does about half the work of the plain path. Lengths
  that are not a multiple of the chunk are padded and the padded keys masked. Shapes as in dot_product_attention;
  mask_info describes the mask block by block; bias [B|1,N,T,S] is sliced per block. A query that may see no key at
  all (which segment ids never make: padding meets padding) gets a finite output that differs from the plain path's
  mean of the values.
  """
  b, t, n, h = q.shape
  s, kheads = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  q_chunk, kv_chunk = min(q_chunk, t), min(kv_chunk, s)
  tp, sp = -(-t // q_chunk) * q_chunk, -(-s // kv_chunk) * kv_chunk
  mi = mask_info or MaskInfo()
  qg = _pad_to(_group(q, kheads), tp)
  bias_g = _bias_blocks(bias, kheads)
  if bias_g is not None:
    bias_g = _pad_to(_pad_to(bias_g.astype(jnp.float32), tp, axis=3), sp, axis=4)
  fields = dict(q_segment_ids=_pad_to(mi.q_segment_ids, tp), kv_segment_ids=_pad_to(mi.kv_segment_ids, sp, value=-1),
                q_positions=_pad_to(mi.q_positions, tp), kv_positions=_pad_to(mi.kv_positions, sp),
                prefix_len=mi.prefix_len, kv_valid=_pad_to(jnp.ones((b, s), bool), sp, value=False))
  blocks = _Blocks(q_chunk, kv_chunk, float(scale), mi.causal)
  out = _flash(blocks, qg, _pad_to(k, sp), _pad_to(v, sp), bias_g, fields)  # [B,K,G,Tp,H]
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, tp, n, h)[:, :t].astype(q.dtype)


def _pad_to(x, length, axis=1, value=0):
  if x is None or x.shape[axis] == length:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, length - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


@dataclasses.dataclass(frozen=True)
class _Blocks:
  """The static part of a chunked attention call."""
  q_chunk: int
  kv_chunk: int
  scale: float
  causal: bool


def _slice(x, start, size, axis=1):
  return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, size, axis=axis)


def _block_mask(blocks: _Blocks, f, qs, ks):
  """Which keys of block (qs, ks) each query may see: [B,1,1,tq,sk] bool."""
  tq, sk = blocks.q_chunk, blocks.kv_chunk
  info = MaskInfo(_slice(f['q_segment_ids'], qs, tq), _slice(f['kv_segment_ids'], ks, sk),
                  _slice(f['q_positions'], qs, tq), _slice(f['kv_positions'], ks, sk), f['prefix_len'], blocks.causal)
  mask = info.block()
  valid = _slice(f['kv_valid'], ks, sk)[:, None, None, :]
  return (valid if mask is None else mask & valid)[:, :, None]


def _block_scores(blocks: _Blocks, q_blk, k_blk, bias_g, mask, qs, ks):
  """Scaled, biased scores of one block, [B,K,G,tq,sk] float32, with the mask applied."""
  scores = jnp.einsum('BTKGH,BSKH->BKGTS', q_blk, k_blk, preferred_element_type=jnp.float32) * blocks.scale
  if bias_g is not None:
    scores = scores + _slice(_slice(bias_g, qs, blocks.q_chunk, axis=3), ks, blocks.kv_chunk, axis=4)
  return jnp.where(mask, scores, _MASK_VALUE)


def _flash_forward(blocks: _Blocks, qg, kp, vp, bias_g, f):
  """-> output [B,K,G,Tp,H] float32 and each row's log-sum-exp [B,K,G,Tp]. A block no query of the batch may see
  (above a causal diagonal, across packed segments) is skipped."""
  b, tp, kheads, g, h = qg.shape
  nq, nk = tp // blocks.q_chunk, kp.shape[1] // blocks.kv_chunk

  def one_query_chunk(qi):
    qs = qi * blocks.q_chunk
    q_blk = _slice(qg, qs, blocks.q_chunk)  # [B,tq,K,G,H]

    def kv_step(carry, ki):
      ks = ki * blocks.kv_chunk
      mask = _block_mask(blocks, f, qs, ks)

      def update(carry):
        m, l, acc = carry
        scores = _block_scores(blocks, q_blk, _slice(kp, ks, blocks.kv_chunk), bias_g, mask, qs, ks)
        m_new = jnp.maximum(m, scores.max(axis=-1))
        p = jnp.exp(scores - m_new[..., None])
        corr = jnp.exp(m - m_new)
        v_blk = _slice(vp, ks, blocks.kv_chunk).astype(jnp.float32)
        return m_new, l * corr + p.sum(axis=-1), acc * corr[..., None] + jnp.einsum('BKGTS,BSKH->BKGTH', p, v_blk)

      return jax.lax.cond(jnp.any(mask), update, lambda c: c, carry), None

    shape = (b, kheads, g, blocks.q_chunk)
    init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(shape + (h,), jnp.float32))
    (m, l, acc), _ = jax.lax.scan(kv_step, init, jnp.arange(nk))
    seen = l > 0  # False only where every block of this query chunk was skipped: those rows give 0
    return jnp.where(seen[..., None], acc, 0.0) / jnp.where(seen, l, 1.0)[..., None], jnp.where(
        seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)

  outs, lses = jax.lax.map(one_query_chunk, jnp.arange(nq))  # [nq,B,K,G,tq,H], [nq,B,K,G,tq]
  return (jnp.moveaxis(outs, 0, 3).reshape(b, kheads, g, tp, h), jnp.moveaxis(lses, 0, 3).reshape(b, kheads, g, tp))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(blocks: _Blocks, qg, kp, vp, bias_g, f):
  return _flash_forward(blocks, qg, kp, vp, bias_g, f)[0]


def _flash_fwd(blocks, qg, kp, vp, bias_g, f):
  out, lse = _flash_forward(blocks, qg, kp, vp, bias_g, f)
  return out, (qg, kp, vp, bias_g, f, out, lse)


def _flash_bwd(blocks: _Blocks, res, dout):
  """One pass over key blocks (outer) and query blocks (inner): p recomputed from the saved log-sum-exp, dV += p^T dO,
  dS = p (dO V^T - rowsum(dO * O)), dQ += dS K, dK += dS^T Q (times the scale), dBias = dS; blocks the forward
  skipped are skipped again."""
  qg, kp, vp, bias_g, f, out, lse = res
  tq, sk = blocks.q_chunk, blocks.kv_chunk
  b, sp, kheads, h = kp.shape
  dout = dout.astype(jnp.float32)
  delta = jnp.sum(dout * out, axis=-1)  # [B,K,G,Tp]

  def kv_block(carry, ki):
    ks = ki * sk
    k_blk, v_blk = _slice(kp, ks, sk), _slice(vp, ks, sk).astype(jnp.float32)  # [B,sk,K,H]

    def q_block(c, qi):
      qs = qi * tq
      mask = _block_mask(blocks, f, qs, ks)
      return jax.lax.cond(jnp.any(mask), functools.partial(block_grads, qs=qs, mask=mask), lambda c: c, c), None

    def block_grads(c, qs, mask):
      dk_b, dv_b, dq, dbias = c
      q_blk, do_blk = _slice(qg, qs, tq), _slice(dout, qs, tq, axis=3)  # [B,tq,K,G,H], [B,K,G,tq,H]
      scores = _block_scores(blocks, q_blk, k_blk, bias_g, mask, qs, ks)
      p = jnp.exp(scores - _slice(lse, qs, tq, axis=3)[..., None])  # [B,K,G,tq,sk]
      dv_b = dv_b + jnp.einsum('BKGTS,BKGTH->BSKH', p, do_blk)
      dp = jnp.einsum('BKGTH,BSKH->BKGTS', do_blk, v_blk)
      ds = jnp.where(mask, p * (dp - _slice(delta, qs, tq, axis=3)[..., None]), 0.0)
      dq_blk = jnp.einsum('BKGTS,BSKH->BKGTH', ds, k_blk.astype(jnp.float32)) * blocks.scale
      dq = jax.lax.dynamic_update_slice_in_dim(dq, _slice(dq, qs, tq, axis=3) + dq_blk, qs, axis=3)
      dk_b = dk_b + jnp.einsum('BKGTS,BTKGH->BSKH', ds, q_blk.astype(jnp.float32)) * blocks.scale
      if dbias is not None:
        ds_b = ds.sum(axis=0, keepdims=True) if dbias.shape[0] == 1 else ds
        dbias = jax.lax.dynamic_update_slice(dbias, ds_b, (0, 0, 0, qs, ks))
      return dk_b, dv_b, dq, dbias

    dq, dbias = carry
    zeros = jnp.zeros((b, sk, kheads, h), jnp.float32)
    (dk_b, dv_b, dq, dbias), _ = jax.lax.scan(q_block, (zeros, zeros, dq, dbias), jnp.arange(qg.shape[1] // tq))
    return (dq, dbias), (dk_b, dv_b)

  dq0 = jnp.zeros(out.shape, jnp.float32)  # [B,K,G,Tp,H]
  dbias0 = None if bias_g is None else jnp.zeros(bias_g.shape, jnp.float32)
  (dq, dbias), (dks, dvs) = jax.lax.scan(kv_block, (dq0, dbias0), jnp.arange(sp // sk))
  unblock = lambda x: jnp.moveaxis(x, 0, 1).reshape(b, sp, kheads, h)  # [nk,B,sk,K,H] -> [B,Sp,K,H]
  dq = jnp.transpose(dq, (0, 3, 1, 2, 4))  # [B,Tp,K,G,H]
  return (dq.astype(qg.dtype), unblock(dks).astype(kp.dtype), unblock(dvs).astype(vp.dtype),
          None if dbias is None else dbias.astype(bias_g.dtype), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def attention(q, k, v, *, mask_info: Optional[MaskInfo] = None, bias=None, scale=None, implementation: str = 'auto',
              chunk_size: int = 128, dropout_rate: float = 0.0, dropout_rng=None):
  """Dispatches to one implementation. 'auto': cuDNN flash attention on GPU when it applies, else plain.

  'plain' and 'chunked' are ours; 'cudnn' is jax.nn.dot_product_attention (GPU only, no bias with dropout). Chunked and
  cuDNN paths take no attention dropout (dropout there would need the same rng stream in every block).
  """
  if implementation == 'auto':
    usable = (jax.default_backend() == 'gpu' and dropout_rate == 0.0 and q.dtype in (jnp.bfloat16, jnp.float16)
              and (mask_info is None or mask_info.prefix_len is None))
    implementation = 'cudnn' if usable else 'plain'
  if implementation == 'plain':
    mask = None if mask_info is None else mask_info.dense()
    return dot_product_attention(q, k, v, mask=mask, bias=bias, scale=scale, dropout_rate=dropout_rate,
                                 dropout_rng=dropout_rng)
  if implementation == 'chunked':
    return chunked_attention(q, k, v, mask_info=mask_info, bias=bias, scale=scale, q_chunk=chunk_size,
                             kv_chunk=chunk_size)
  if implementation == 'cudnn':
    mask = None if mask_info is None else mask_info.dense()
    return jax.nn.dot_product_attention(q, k, v, bias=None if bias is None else bias.astype(q.dtype), mask=mask,
                                        scale=scale, implementation='cudnn')
  raise ValueError(f"attention implementation {implementation!r} is unknown; use 'auto', 'plain', 'chunked' or "
                   "'cudnn'.")
