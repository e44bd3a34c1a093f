"""model/attention.py against float64 numpy written from the formulas, and the chunked path against the plain one.

The reference is z_i = sum_j alpha_ij v_j, v_j = x_j W^V, alpha_i = softmax_j(q_i . k_j / sqrt(d_k) + bias_ij) over
the keys the mask allows (q = x W^Q, k = x W^K); grouped-query: query head n reads kv head n // (N / K).
"""
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import attention as attn

B, D, H = 2, 24, 8

# ------------------------------------------------------------------------------------------------ numpy reference


def np_attention(x, wq, wk, wv, *, mask=None, bias=None, kv_x=None):
  """float64, one (batch, head) at a time. x [B,T,D]; wq [D,N,H]; wk, wv [D,K,H]; mask [B,T,S] or [B,N,T,S] bool
  (True = may attend); bias [B,N,T,S]. Returns z [B,T,N,H]."""
  x = np.asarray(x, np.float64)
  kv_x = x if kv_x is None else np.asarray(kv_x, np.float64)
  wq, wk, wv = (np.asarray(w, np.float64) for w in (wq, wk, wv))
  b_, t, _ = x.shape
  s = kv_x.shape[1]
  n, kh, h = wq.shape[1], wk.shape[1], wq.shape[2]
  out = np.zeros((b_, t, n, h))
  for b in range(b_):
    for head in range(n):
      kvh = head // (n // kh)
      q = x[b] @ wq[:, head]  # [T,H]
      k = kv_x[b] @ wk[:, kvh]  # [S,H]
      v = kv_x[b] @ wv[:, kvh]  # [S,H]
      for i in range(t):
        logits = np.array([q[i] @ k[j] / math.sqrt(h) for j in range(s)])
        if bias is not None:
          logits = logits + np.asarray(bias, np.float64)[b, head, i]
        allowed = np.ones(s, bool)
        if mask is not None:
          m = np.asarray(mask)
          allowed = m[b, head, i] if m.ndim == 4 else m[b, i]
        if not allowed.any():  # no key to attend to: undefined
          out[b, i, head] = np.nan
          continue
        e = np.where(allowed, np.exp(np.where(allowed, logits, -np.inf) - logits[allowed].max()), 0.0)
        alpha = e / e.sum()
        out[b, i, head] = sum(alpha[j] * v[j] for j in range(s))
  return out


@jax.jit
def project_attend(x, wq, wk, wv, mask, bias):
  q, k, v = project(x, wq, wk, wv)
  return attn.dot_product_attention(q, k, v, mask=mask, bias=bias)


def project(x, wq, wk, wv, kv_x=None):
  kv_x = x if kv_x is None else kv_x
  q = jnp.einsum('BTD,DNH->BTNH', x, wq)
  k = jnp.einsum('BSD,DKH->BSKH', kv_x, wk)
  v = jnp.einsum('BSD,DKH->BSKH', kv_x, wv)
  return q, k, v


def weights(rng, n, kh, d=D, h=H):
  r = np.random.default_rng(rng)
  f = lambda *shape: (r.normal(size=shape) / math.sqrt(d)).astype(np.float32)
  return f(d, n, h), f(d, kh, h), f(d, kh, h)


def np_masks(t, seed=0):
  """Independent numpy constructions of the masks: [B,T,T] bool each."""
  r = np.random.default_rng(seed)
  lengths = [t, t - 3]
  valid = np.array([[i < L for i in range(t)] for L in lengths])
  padding = np.array([[[valid[b, i] and valid[b, j] for j in range(t)] for i in range(t)] for b in range(B)])
  causal = np.array([[[j <= i for j in range(t)] for i in range(t)] for _ in range(B)])
  prefix = np.array([3, 5])
  prefix_lm = np.array([[[j <= i or j < prefix[b] for j in range(t)] for i in range(t)] for b in range(B)])
  seg = np.array([[1] * 4 + [2] * (t - 6) + [0] * 2, [1] * (t - 1) + [0]])
  segment = np.array([[[seg[b, i] == seg[b, j] for j in range(t)] for i in range(t)] for b in range(B)])
  return dict(valid=valid, padding=padding, causal=causal, prefix=prefix, prefix_lm=prefix_lm, seg=seg, segment=segment,
              rng=r)


# ------------------------------------------------------------------------------------ plain attention vs numpy

_CASES = ([(4, 2, which) for which in ('none', 'padding', 'causal', 'prefix_lm', 'segment', 'bias', 'causal+bias')]
          + [(1, 1, 'causal+bias'), (4, 4, 'causal+bias'), (4, 1, 'causal+bias')])


@pytest.mark.parametrize('heads,kv_heads,which', _CASES)
def test_dot_product_attention_matches_numpy(heads, kv_heads, which):
  t = 9
  r = np.random.default_rng(1)
  x = r.normal(size=(B, t, D)).astype(np.float32)
  wq, wk, wv = weights(2, heads, kv_heads)
  masks = np_masks(t)
  mask = {
      'none': None,
      'padding': masks['padding'],
      'causal': masks['causal'],
      'prefix_lm': masks['prefix_lm'],
      'segment': masks['segment'],
      'bias': None,
      'causal+bias': masks['causal']
  }[which]
  bias = r.normal(size=(B, heads, t, t)).astype(np.float32) if 'bias' in which else None
  want = np_attention(x, wq, wk, wv, mask=mask, bias=bias)
  got = project_attend(x, wq, wk, wv, None if mask is None else mask[:, None], bias)
  assert got.dtype == jnp.float32 and got.shape == (B, t, heads, H)
  got = np.asarray(got)
  if which == 'padding':  # padded queries have no key to see; only real rows are defined
    rows = masks['valid']
    np.testing.assert_allclose(got[rows], want[rows], atol=1e-5, rtol=0)
  else:
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_dot_product_attention_per_head_mask_and_cross_attention():
  """A [B,N,T,S] mask (different per head) with grouped-query heads, and keys from another sequence (T != S)."""
  t, s, n, kh = 5, 7, 4, 2
  r = np.random.default_rng(3)
  x = r.normal(size=(B, t, D)).astype(np.float32)
  kv_x = r.normal(size=(B, s, D)).astype(np.float32)
  wq, wk, wv = weights(4, n, kh)
  mask = r.random((B, n, t, s)) < 0.6
  mask[..., 0] = True  # no empty rows
  bias = r.normal(size=(B, n, t, s)).astype(np.float32)
  want = np_attention(x, wq, wk, wv, mask=mask, bias=bias, kv_x=kv_x)
  q, k, v = project(jnp.asarray(x), wq, wk, wv, kv_x=jnp.asarray(kv_x))
  got = attn.dot_product_attention(q, k, v, mask=jnp.asarray(mask), bias=jnp.asarray(bias))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


def test_attention_dispatch_plain_uses_mask_info():
  """attention(implementation='plain') with a MaskInfo (causal + segments) is the numpy formula with that mask."""
  t = 9
  r = np.random.default_rng(5)
  x = r.normal(size=(B, t, D)).astype(np.float32)
  wq, wk, wv = weights(6, 4, 2)
  masks = np_masks(t)
  want = np_attention(x, wq, wk, wv, mask=masks['causal'] & masks['segment'])
  q, k, v = project(jnp.asarray(x), wq, wk, wv)
  info = attn.make_mask_info(q_segment_ids=jnp.asarray(masks['seg']), causal=True, q_len=t, kv_len=t, batch=B)
  for impl in ('plain', 'chunked'):
    got = jax.jit(functools.partial(attn.attention, implementation=impl, chunk_size=4))(q, k, v, mask_info=info)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0, err_msg=impl)


def test_multi_head_attention_module_matches_numpy():
  """layers.MultiHeadAttention with its kernels = the numpy formula followed by the output projection."""
  from model.layers import MultiHeadAttention
  from model.transformer import ModelConfig
  cfg = ModelConfig(d_model=D, num_heads=4, num_kv_heads=2, head_dim=H, use_bias=False, dropout_rate=0.0,
                    attention_dropout_rate=0.0, attention_impl='plain')
  t = 6
  r = np.random.default_rng(7)
  x = r.normal(size=(B, t, D)).astype(np.float32)
  mha = MultiHeadAttention(cfg)
  info = attn.make_mask_info(causal=True, q_len=t, kv_len=t, batch=B)
  params = jax.jit(mha.init)(jax.random.key(0), x, mask_info=info)['params']
  params = jax.tree.map(np.asarray, nn.meta.unbox(params))
  got = jax.jit(mha.apply)({'params': params}, x, mask_info=info)
  masks = np_masks(t)
  z = np_attention(x, params['query']['kernel'], params['key']['kernel'], params['value']['kernel'],
                   mask=masks['causal'])
  want = np.einsum('btnh,nhd->btd', z, params['out']['kernel'].astype(np.float64))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- chunked vs plain


@functools.partial(jax.jit, static_argnames=('q_chunk', 'kv_chunk'))
def _plain_and_chunked(q, k, v, info, bias, *, q_chunk, kv_chunk):
  plain = attn.dot_product_attention(q, k, v, mask=info.dense(), bias=bias)
  chunked = attn.chunked_attention(q, k, v, mask_info=info, bias=bias, q_chunk=q_chunk, kv_chunk=kv_chunk)
  return plain, chunked


def _chunked_vs_plain(t, s, n, kh, *, causal=False, segments=False, bias=False, prefix=False, chunk=16, seed=0):
  r = np.random.default_rng(seed)
  q = jnp.asarray(r.normal(size=(B, t, n, H)), jnp.float32)
  k = jnp.asarray(r.normal(size=(B, s, kh, H)), jnp.float32)
  v = jnp.asarray(r.normal(size=(B, s, kh, H)), jnp.float32)
  kw = {}
  if segments:
    # Two packed segments and trailing padding; queries and keys split alike (cross-attention: proportionally).
    def segs(length):
      a, b = max(1, length // 3), max(2, (5 * length) // 6)
      return np.array([[1] * a + [2] * (b - a) + [0] * (length - b), [1] * (length - 1) + [0]], np.int32)

    kw.update(q_segment_ids=jnp.asarray(segs(t)), kv_segment_ids=jnp.asarray(segs(s)))
  if causal:
    kw.update(causal=True, q_len=t, kv_len=s, batch=B)
  if prefix:
    kw.update(prefix_len=jnp.asarray([min(3, t), min(7, t)], jnp.int32))
  info = attn.make_mask_info(**kw)
  b_arr = jnp.asarray(r.normal(size=(B, n, t, s)), jnp.float32) if bias else None
  plain, chunked = _plain_and_chunked(q, k, v, info, b_arr, q_chunk=chunk, kv_chunk=chunk)
  assert chunked.shape == plain.shape == (B, t, n, H)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), atol=1e-5, rtol=0)


@pytest.mark.parametrize('length', [5, 16, 33, 70])
def test_chunked_equals_plain_causal_segments_bias_gqa(length):
  """Lengths below, at and not a multiple of the chunk (16); causal + packed segments + padding + bias, K < N."""
  _chunked_vs_plain(length, length, 4, 2, causal=True, segments=True, bias=True, seed=length)


def test_chunked_equals_plain_no_mask_multi_query():
  _chunked_vs_plain(33, 33, 4, 1, seed=11)


def test_chunked_equals_plain_prefix_lm():
  _chunked_vs_plain(33, 33, 2, 2, causal=True, prefix=True, seed=12)


@pytest.mark.parametrize('t,s', [(20, 37), (37, 5)])
def test_chunked_equals_plain_cross_attention(t, s):
  _chunked_vs_plain(t, s, 4, 2, segments=True, bias=True, seed=t + s)


def test_chunked_uneven_q_and_kv_chunks():
  r = np.random.default_rng(13)
  q = jnp.asarray(r.normal(size=(1, 23, 2, H)), jnp.float32)
  k = jnp.asarray(r.normal(size=(1, 23, 2, H)), jnp.float32)
  v = jnp.asarray(r.normal(size=(1, 23, 2, H)), jnp.float32)
  info = attn.make_mask_info(causal=True, q_len=23, kv_len=23, batch=1)
  plain, chunked = _plain_and_chunked(q, k, v, info, None, q_chunk=8, kv_chunk=5)
  np.testing.assert_allclose(np.asarray(chunked), np.asarray(plain), atol=1e-5, rtol=0)


def _autodiff_attention(q, k, v, mask, bias):
  """The formula written out, differentiated by autodiff: the reference for both hand-written backward passes."""
  g = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
  scores = jnp.einsum('btnh,bsnh->bnts', q, k) / np.sqrt(q.shape[-1])
  scores = scores if bias is None else scores + bias
  scores = jnp.where(mask, scores, -1e30) if mask is not None else scores
  return jnp.einsum('bnts,bsnh->btnh', jax.nn.softmax(scores, axis=-1), v)


@functools.partial(jax.jit, static_argnames=('chunk',))
def _attention_grads(q, k, v, info, bias, w, *, chunk):
  """Gradients of sum(w * attention) with respect to q, k, v and the bias: autodiff through the formula, the plain
  path's VJP and the chunked path's."""

  def loss(impl, q, k, v, bias):
    if impl == 'autodiff':
      out = _autodiff_attention(q, k, v, info.dense(), bias)
    elif impl == 'plain':
      out = attn.dot_product_attention(q, k, v, mask=info.dense(), bias=bias)
    else:
      out = attn.chunked_attention(q, k, v, mask_info=info, bias=bias, q_chunk=chunk, kv_chunk=chunk)
    return jnp.sum(w * out)

  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  return [
      jax.grad(functools.partial(loss, impl), argnums=argnums)(q, k, v, bias)
      for impl in ('autodiff', 'plain', 'chunked')
  ]


@pytest.mark.parametrize('case', ['causal_segments_gqa', 'bias_batch1', 'bias_per_example_cross', 'prefix_lm'])
def test_plain_and_chunked_gradients_equal_autodiff(case):
  """Both hand-written backward passes (the plain path's log-sum-exp VJP, the chunked FlashAttention one) against
  autodiff through the formula: lengths not a multiple of the chunk, padding, packed segments, grouped queries, a
  bias shared over the batch or per example."""
  t, s, n, kh = {'bias_per_example_cross': (21, 37)}.get(case, (37, 37)) + ((4, 2) if case != 'prefix_lm' else (2, 2))
  r = np.random.default_rng(len(case))
  q = jnp.asarray(r.normal(size=(B, t, n, H)), jnp.float32)
  k, v = (jnp.asarray(r.normal(size=(B, s, kh, H)), jnp.float32) for _ in range(2))
  w = jnp.asarray(r.normal(size=(B, t, n, H)), jnp.float32)
  kw = dict(causal=True, q_len=t, kv_len=s, batch=B) if case in ('causal_segments_gqa', 'prefix_lm') else {}
  if case == 'causal_segments_gqa':
    kw.update(q_segment_ids=jnp.asarray([[1] * 12 + [2] * 20 + [0] * 5, [1] * 36 + [0]], jnp.int32))
  if case == 'prefix_lm':
    kw.update(prefix_len=jnp.asarray([3, 20], jnp.int32))
  if case == 'bias_per_example_cross':
    kw.update(q_segment_ids=jnp.asarray([[1] * 18 + [0] * 3, [1] * 21], jnp.int32),
              kv_segment_ids=jnp.asarray([[1] * 30 + [0] * 7, [1] * 37], jnp.int32))
  bias = {'bias_batch1': (1, n, t, s), 'bias_per_example_cross': (B, n, t, s)}.get(case)
  bias = None if bias is None else jnp.asarray(r.normal(size=bias), jnp.float32)
  reference, plain, chunked = _attention_grads(q, k, v, attn.make_mask_info(**kw), bias, w, chunk=16)
  for name, a, b, c in zip(('dq', 'dk', 'dv', 'dbias'), reference, plain, chunked):
    assert a.shape == b.shape == c.shape, name
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-5, rtol=1e-5, err_msg=f'plain {name}')
    np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=2e-5, rtol=1e-5, err_msg=f'chunked {name}')


@pytest.mark.parametrize('rows_per_group', [1, 2])
@pytest.mark.parametrize('case', ['causal_segments_gqa', 'bias_batch1', 'bias_per_example_cross'])
def test_plain_attention_in_batch_groups_equals_all_rows_at_once(case, rows_per_group, monkeypatch):
  """Above GROUP_SCORES_BYTES of float32 scores, one CPU device runs the plain path over groups of batch rows in
  turn: the same output and gradients (dq, dk, dv; a bias shared over the batch gets the sum over groups) as all rows
  at once, with a mask per example or shared, grouped queries, and uneven lengths."""
  b, (t, s), n, kh = 4, (13, 21) if case == 'bias_per_example_cross' else (19, 19), 4, 2
  r = np.random.default_rng(rows_per_group + len(case))
  q = jnp.asarray(r.normal(size=(b, t, n, H)), jnp.float32)
  k, v = (jnp.asarray(r.normal(size=(b, s, kh, H)), jnp.float32) for _ in range(2))
  w = jnp.asarray(r.normal(size=(b, t, n, H)), jnp.float32)
  if case == 'causal_segments_gqa':
    seg = jnp.asarray([[1] * 7 + [2] * 12, [1] * 19, [1] * 15 + [0] * 4, [3] * 10 + [1] * 9], jnp.int32)
    mask = attn.make_mask_info(causal=True, q_segment_ids=seg, q_len=t, kv_len=s, batch=b).dense()  # [B,1,T,S]
  else:
    mask = attn.causal_mask(jnp.arange(t)[None], jnp.arange(s)[None]) if case == 'bias_batch1' else None  # [1,1,T,S]
  bias = jnp.asarray(r.normal(size=(1 if case == 'bias_batch1' else b, n, t, s)), jnp.float32)

  def grads():
    loss = lambda q, k, v, bias: jnp.sum(w * attn.dot_product_attention(q, k, v, mask=mask, bias=bias))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, bias)

  assert attn.batch_groups(b, n, t, s) == 1  # small scores: all rows at once
  whole = grads()
  monkeypatch.setattr(attn, 'GROUP_SCORES_BYTES', 4 * rows_per_group * n * t * s)
  assert attn.batch_groups(b, n, t, s) == b // rows_per_group
  grouped = grads()
  for name, x, y in zip(('loss', 'dq', 'dk', 'dv', 'dbias'), jax.tree.leaves(whole), jax.tree.leaves(grouped)):
    assert x.shape == y.shape, name
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), atol=2e-5, rtol=1e-5, err_msg=name)


def test_batch_groups_only_split_large_scores_on_one_cpu_device():
  """Groups divide the batch with each group's float32 scores within GROUP_SCORES_BYTES; small scores, a batch of one
  row and a batch that cannot be split finer keep what they can."""
  assert jax.default_backend() == 'cpu' and jax.device_count() == 1
  assert attn.batch_groups(8, 8, 256, 256) == 4  # 16 MiB of scores -> 4 MiB each
  assert attn.batch_groups(8, 12, 128, 128) == 2  # 6 MiB -> 3 MiB
  assert attn.batch_groups(16, 4, 128, 128) == 1  # 4 MiB: at the limit, one group
  assert attn.batch_groups(1, 8, 2048, 2048) == 1  # one row cannot be split
  assert attn.batch_groups(6, 8, 512, 512) == 6  # 48 MiB: even one row each is over the limit
  q = jnp.zeros((4, 8, 2, H))
  with pytest.raises(ValueError, match=r'groups=3\): the batch of 4 rows splits into a divisor of 4'):
    attn.dot_product_attention(q, q, q, groups=3)


def test_plain_attention_keeps_no_score_sized_residual_for_its_backward():
  """What the plain path's VJP holds between forward and backward: q, k, v, the output and a log-sum-exp per row (and
  the boolean mask), never a float [B,N,T,S] array, so a scanned stack has no per-layer score buffer to fill."""
  b, t, n, kh = 2, 64, 4, 2
  r = np.random.default_rng(0)
  q = jnp.asarray(r.normal(size=(b, t, n, H)), jnp.float32)
  k, v = (jnp.asarray(r.normal(size=(b, t, kh, H)), jnp.float32) for _ in range(2))
  bias = jnp.asarray(r.normal(size=(1, n, t, t)), jnp.float32)
  mask = attn.causal_mask(jnp.arange(t)[None], jnp.arange(t)[None])  # [1,1,T,S]
  for impl, want_small in (('plain', True), ('autodiff', False)):
    f = (lambda q, k, v: attn.dot_product_attention(q, k, v, mask=mask)) if impl == 'plain' else (
        lambda q, k, v: _autodiff_attention(q, k, v, mask, None))
    _, vjp = jax.vjp(f, q, k, v)
    floats = [x.size for x in jax.tree.leaves(vjp) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert (max(floats) < b * n * t * t) == want_small, (impl, sorted(floats)[-3:])
  _, vjp = jax.vjp(lambda q, k, v, bias: attn.dot_product_attention(q, k, v, mask=mask, bias=bias), q, k, v, bias)
  assert max(x.size for x in jax.tree.leaves(vjp) if jnp.issubdtype(x.dtype, jnp.floating)) == bias.size  # its own


def test_chunked_attention_gradient_memory_is_linear_in_length():
  """XLA's temporaries for forward + backward: the plain path's grow with T^2, the chunked one's with T."""

  def temp(impl, t):
    q = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, t, 4, 32), jnp.float32)
    info = attn.make_mask_info(causal=True, q_len=t, kv_len=t, batch=1)
    grad = jax.grad(
        lambda q, k, v: jnp.sum(attn.attention(q, k, v, mask_info=info, implementation=impl, chunk_size=128)),
        argnums=(0, 1, 2))
    mem = jax.jit(grad).lower(q, kv, kv).compile().memory_analysis()
    if mem is None or not hasattr(mem, 'temp_size_in_bytes'):
      pytest.skip('memory_analysis unavailable on this backend')
    return mem.temp_size_in_bytes

  small, big = temp('chunked', 1024), temp('chunked', 4096)
  assert big < 6 * small, (small, big)  # 4x the length: about 4x the memory, not 16x
  assert big < 4096 * 4096 * 4 // 8, big  # far below one float32 [T,S] score matrix
  assert temp('plain', 4096) > 4096 * 4096 * 4  # the plain path does hold [T,S] arrays


# --------------------------------------------------------------------------------------------------- memory


def _largest_intermediate(jaxpr) -> int:
  """The largest array (in elements) any equation produces, descending into scan/map/while/pjit bodies."""
  biggest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      shape = getattr(var.aval, 'shape', ())
      biggest = max(biggest, int(np.prod(shape)) if shape else 1)
    for sub in _subjaxprs(eqn):
      biggest = max(biggest, _largest_intermediate(sub))
  return biggest


def _subjaxprs(eqn):
  for value in eqn.params.values():
    for item in (value if isinstance(value, (tuple, list)) else (value,)):
      if hasattr(item, 'jaxpr') and hasattr(item.jaxpr, 'eqns'):  # ClosedJaxpr
        yield item.jaxpr
      elif hasattr(item, 'eqns'):  # Jaxpr
        yield item


def test_chunked_attention_never_materializes_scores():
  t = s = 4096
  q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
  kv = jax.ShapeDtypeStruct((1, s, 1, 16), jnp.float32)
  seg = jax.ShapeDtypeStruct((1, t), jnp.int32)

  def chunked(q, k, v, seg):
    info = attn.make_mask_info(q_segment_ids=seg, causal=True, q_len=t, kv_len=s, batch=1)
    return attn.chunked_attention(q, k, v, mask_info=info, q_chunk=128, kv_chunk=128)

  def plain(q, k, v, seg):
    info = attn.make_mask_info(q_segment_ids=seg, causal=True, q_len=t, kv_len=s, batch=1)
    return attn.dot_product_attention(q, k, v, mask=info.dense())

  big_plain = _largest_intermediate(jax.make_jaxpr(plain)(q, kv, kv, seg).jaxpr)
  big_chunked = _largest_intermediate(jax.make_jaxpr(chunked)(q, kv, kv, seg).jaxpr)
  assert big_plain >= t * s  # the walker sees the [T,S] scores when they exist
  assert big_chunked < t * s // 64, big_chunked  # chunked: nothing close to [T,S]

  # The compiled program agrees: XLA's temporary buffers stay far below one float32 [T,S] array.
  compiled = jax.jit(chunked).lower(q, kv, kv, seg).compile()
  mem = compiled.memory_analysis()
  if mem is None or not hasattr(mem, 'temp_size_in_bytes'):
    pytest.skip('memory_analysis unavailable on this backend (the jaxpr check above passed)')
  assert mem.temp_size_in_bytes < t * s * 4 // 8, mem.temp_size_in_bytes


# ---------------------------------------------------------------------------------------------- mask helpers


def test_mask_helpers_equal_numpy():
  t = 10
  m = np_masks(t)
  pos = jnp.broadcast_to(jnp.arange(t), (B, t))
  np.testing.assert_array_equal(np.asarray(attn.padding_mask(jnp.asarray(m['valid']), jnp.asarray(m['valid']))),
                                m['padding'][:, None])
  np.testing.assert_array_equal(np.asarray(attn.causal_mask(pos, pos)), m['causal'][:, None])
  np.testing.assert_array_equal(np.asarray(attn.prefix_lm_mask(pos, pos, jnp.asarray(m['prefix']))),
                                m['prefix_lm'][:, None])
  seg = jnp.asarray(m['seg'])
  np.testing.assert_array_equal(np.asarray(attn.segment_mask(seg, seg)), m['segment'][:, None])
  info = attn.make_mask_info(q_segment_ids=seg, causal=True, q_len=t, kv_len=t, batch=B)
  np.testing.assert_array_equal(np.asarray(info.dense()), (m['segment'] & m['causal'])[:, None])
  info = attn.make_mask_info(q_segment_ids=seg, causal=True, prefix_len=jnp.asarray(m['prefix']), q_len=t, kv_len=t,
                             batch=B)
  np.testing.assert_array_equal(np.asarray(info.dense()), (m['segment'] & m['prefix_lm'])[:, None])
  assert attn.make_mask_info().dense() is None


def test_causal_mask_uses_positions_not_indices():
  """Decoding: queries at cache slots 3..4 see keys at slots <= their own, over a key length different from T."""
  q_pos = jnp.asarray([[3, 4]])
  kv_pos = jnp.broadcast_to(jnp.arange(6), (1, 6))
  want = np.array([[[j <= i for j in range(6)] for i in (3, 4)]])
  np.testing.assert_array_equal(np.asarray(attn.causal_mask(q_pos, kv_pos))[:, 0], want)


# ------------------------------------------------------------------------------------------ position encodings


def np_t5_bucket(relative_position, bidirectional=True, num_buckets=32, max_distance=128):
  """T5's _relative_position_bucket (mesh_tensorflow / t5.models), ported to float64 numpy."""
  ret = 0
  n = -np.asarray(relative_position, np.int64)
  if bidirectional:
    num_buckets //= 2
    ret += (n < 0).astype(np.int64) * num_buckets
    n = np.abs(n)
  else:
    n = np.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (np.log(n.astype(np.float64) / max_exact + np.finfo(np.float32).eps)
                              / math.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(np.int64)
  val_if_large = np.minimum(val_if_large, num_buckets - 1)
  return ret + np.where(is_small, n, val_if_large)


@pytest.mark.parametrize('bidirectional', [True, False])
@pytest.mark.parametrize('num_buckets,max_distance', [(32, 128), (16, 64)])
def test_t5_relative_position_bucket(bidirectional, num_buckets, max_distance):
  rel = np.concatenate([np.arange(-300, 301), [-100_000, -4096, -1000, 1000, 4096, 100_000]])
  got = jax.jit(
      functools.partial(attn.t5_relative_position_bucket, bidirectional=bidirectional, num_buckets=num_buckets,
                        max_distance=max_distance))(jnp.asarray(rel, jnp.int32))
  want = np_t5_bucket(rel, bidirectional, num_buckets, max_distance)
  np.testing.assert_array_equal(np.asarray(got), want)
  assert np.asarray(got).max() < num_buckets and np.asarray(got).min() >= 0


def test_t5_relative_position_bucket_known_values():
  """Spot values straight from the definition: exact buckets for small distances, sign split when bidirectional."""
  rel = jnp.asarray([0, -1, -7, 1, 7, -15, 5, -10_000, 10_000])
  bi = np.asarray(attn.t5_relative_position_bucket(rel, bidirectional=True)).tolist()
  uni = np.asarray(attn.t5_relative_position_bucket(rel, bidirectional=False)).tolist()
  assert bi[:5] == [0, 1, 7, 17, 23]  # key before query -> low half, after -> high half
  assert uni[:7] == [0, 1, 7, 0, 0, 15, 0]  # causal: future keys all in bucket 0
  assert bi[7:] == [15, 31] and uni[7:] == [31, 0]


def test_rope_matches_rotation_formula_and_preserves_norms():
  t, n, h, theta = 12, 3, 16, 10_000.0
  r = np.random.default_rng(0)
  x = r.normal(size=(B, t, n, h)).astype(np.float32)
  pos = np.stack([np.arange(t), np.arange(t) + 100])
  sin, cos = attn.rope_frequencies(jnp.asarray(pos), h, theta)
  got = np.asarray(attn.apply_rope(jnp.asarray(x), sin, cos))
  # Half-split rotation: pair (x_i, x_{i+h/2}) turned by angle p * theta^(-2i/h).
  ang = pos[..., None].astype(np.float64) * theta ** (-np.arange(0, h, 2) / h)  # [B,T,H/2]
  c, s = np.cos(ang)[:, :, None], np.sin(ang)[:, :, None]
  x1, x2 = x[..., :h // 2].astype(np.float64), x[..., h // 2:].astype(np.float64)
  want = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
  np.testing.assert_allclose(got, want, atol=5e-5, rtol=0)
  np.testing.assert_allclose(np.linalg.norm(got, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)


def test_rope_dot_product_depends_only_on_offset():
  h = 16
  r = np.random.default_rng(1)
  qv, kv = r.normal(size=h).astype(np.float32), r.normal(size=h).astype(np.float32)

  @jax.jit
  def rotated(vec, positions):
    positions = jnp.asarray(positions)[None]
    sin, cos = attn.rope_frequencies(positions, h)
    x = jnp.broadcast_to(jnp.asarray(vec), (1, positions.shape[1], 1, h))
    return attn.apply_rope(x, sin, cos)[0, :, 0]

  starts = np.array([0, 1, 7, 30, 61])
  firsts = []
  for offset in (0, 1, 5, 17):
    dots = np.asarray((rotated(qv, starts + offset) * rotated(kv, starts)).sum(-1))
    np.testing.assert_allclose(dots, dots[0], atol=1e-4)
    firsts.append(dots[0])
  # ... and it does depend on the offset.
  assert min(abs(a - b) for i, a in enumerate(firsts) for b in firsts[i + 1:]) > 1e-3


@pytest.mark.parametrize('dim', [16, 64])
def test_sinusoidal_positions_formula(dim):
  p = np.arange(0, 200)
  got = np.asarray(attn.sinusoidal_positions(jnp.asarray(p), dim))
  i = np.arange(dim // 2)
  ang = p[:, None].astype(np.float64) / 10_000 ** (2 * i / dim)
  want = np.zeros((len(p), dim))
  want[:, 0::2], want[:, 1::2] = np.sin(ang), np.cos(ang)
  assert got.shape == (len(p), dim)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # Batched positions broadcast the same way.
  got2 = np.asarray(attn.sinusoidal_positions(jnp.asarray(np.stack([p, p[::-1]])), dim))
  np.testing.assert_allclose(got2[1], got[::-1], atol=1e-6)
