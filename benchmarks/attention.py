"""Attention implementations side by side: time per call and compiled temp memory at several sequence lengths.

Baseline: `jax.nn.dot_product_attention` (XLA; cuDNN too on GPU). Ours: plain (materialized scores; on one CPU device,
large scores in groups of batch rows, model/attention.py batch_groups), the plain path in one group, and chunked
(online softmax). `--modes=fwd,grad` times the forward call and the forward + backward of sum(output) with respect to
q, k and v (what a training step pays). An implementation whose compiled temporaries exceed --max_temp_gib is reported
with its size and not run, so one invocation can go to lengths where only the chunked one fits. Prints a table, the
chunked and one-group / plain time ratios per length, and asserts nothing. `--torch` adds torch's fused
scaled_dot_product_attention on the same arrays (float32).

  python benchmarks/attention.py --lengths=512,2048,4096 --batch=1 --heads=8 --head_dim=64
  python benchmarks/attention.py --lengths=1024,2048,4096,8192,16384 --modes=fwd,grad --repeats=2
  python benchmarks/attention.py --lengths=256 --batch=8 --kv_heads=4 --head_dim=32 --modes=fwd,grad --torch
"""
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from model import attention as attn

import machine  # benchmarks/machine.py

_LENGTHS = flags.DEFINE_list('lengths', ['512', '1024', '2048', '4096'], 'Sequence lengths.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Batch size.')
_HEADS = flags.DEFINE_integer('heads', 8, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 8, 'Key/value heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Head width.')
_CHUNK = flags.DEFINE_integer('chunk', 256, 'Chunk size of the chunked implementation.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per cell.')
_MODES = flags.DEFINE_list('modes', ['fwd'], "fwd: the attention call; grad: forward + backward of sum(output).")
_TORCH = flags.DEFINE_bool('torch', False, "CPU only: also torch's scaled_dot_product_attention (causal, grouped "
                           "heads) on the same arrays, one process")
_MAX_TEMP = flags.DEFINE_float('max_temp_gib', 4.0, 'Compile but do not run an implementation needing more '
                               'temporary memory than this.')


def _impls(chunk):
  causal = lambda t, b: attn.make_mask_info(causal=True, q_len=t, kv_len=t, batch=b)
  impls = {
      'jax.nn (baseline)': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
      'plain': lambda q, k, v: attn.attention(q, k, v, mask_info=causal(q.shape[1], q.shape[0]), implementation='plain'
                                             ),
      'plain, one group': lambda q, k, v: attn.dot_product_attention(
          q, k, v, mask=causal(q.shape[1], q.shape[0]).dense(), groups=1),
      'chunked': lambda q, k, v: attn.attention(q, k, v, mask_info=causal(q.shape[1], q.shape[0]), implementation=
                                                'chunked', chunk_size=chunk),
  }
  if jax.default_backend() == 'gpu':
    impls['cudnn'] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
  return impls


def _with_mode(fn, mode):
  if mode == 'fwd':
    return fn
  grad = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)), argnums=(0, 1, 2))
  # dq, dk and dv flattened into one array, so that XLA computes all three (it drops what a program does not return)
  return lambda q, k, v: jnp.concatenate([g.ravel() for g in grad(q, k, v)])


def _time(compiled, args, repeats):
  out = jax.block_until_ready(compiled(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = compiled(*args)
  jax.block_until_ready(out)
  return out, (time.perf_counter() - start) / repeats * 1e3


def _cell(name, fn, args, t, mode):
  """One implementation at one length: (output or None, ms or None), with its row printed."""
  try:
    compiled = jax.jit(fn).lower(*args).compile()
  except Exception as e:  # an implementation the backend lacks is reported, not fatal
    print(f'{name:<20}{mode:>6}{t:>7}  unavailable: {type(e).__name__}')
    return None, None
  mem = compiled.memory_analysis()
  temp = getattr(mem, 'temp_size_in_bytes', float('nan')) / 2 ** 20 if mem is not None else float('nan')
  if temp > _MAX_TEMP.value * 1024:
    print(f'{name:<20}{mode:>6}{t:>7}{"not run":>12}{temp:>12.1f}')
    return None, None
  out, ms = _time(compiled, args, _REPEATS.value)
  return out, (ms, temp)


def _torch_cell(q, k, v, mode, repeats):
  """torch.nn.functional.scaled_dot_product_attention on the same arrays -> (output like _with_mode's, ms/call)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  tq, tk, tv = (torch.from_numpy(np.array(x, np.float32)).transpose(1, 2).contiguous().requires_grad_(mode != 'fwd')
                for x in (q, k, v))  # [B,N,T,H]
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def call():
    out = sdpa(tq, tk, tv, is_causal=True, enable_gqa=True)
    if mode == 'fwd':
      return out.detach().transpose(1, 2).reshape(-1)
    grads = torch.autograd.grad(out.sum(), (tq, tk, tv))
    return torch.cat([g.transpose(1, 2).reshape(-1) for g in grads])

  with torch.no_grad() if mode == 'fwd' else torch.enable_grad():
    out = call()
    start = time.perf_counter()
    for _ in range(repeats):
      call()
    ms = (time.perf_counter() - start) / repeats * 1e3
  return jnp.asarray(out.numpy()), ms


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  print(machine.describe())
  print(f'backend {jax.default_backend()}, B={_BATCH.value} N={_HEADS.value} K={_KV_HEADS.value} '
        f'H={_HEAD_DIM.value} {dtype.name}, causal, chunk {_CHUNK.value}')
  print(f'{"impl":<20}{"mode":>6}{"T":>7}{"ms/call":>12}{"temp MiB":>12}{"max |diff| vs baseline":>26}')
  ratios = []
  for mode in _MODES.value:
    for t in map(int, _LENGTHS.value):
      keys = jax.random.split(jax.random.key(t), 3)
      q = jax.random.normal(keys[0], (_BATCH.value, t, _HEADS.value, _HEAD_DIM.value), dtype)
      k = jax.random.normal(keys[1], (_BATCH.value, t, _KV_HEADS.value, _HEAD_DIM.value), dtype)
      v = jax.random.normal(keys[2], (_BATCH.value, t, _KV_HEADS.value, _HEAD_DIM.value), dtype)
      ref, ms = None, {}
      for name, fn in _impls(_CHUNK.value).items():
        out, cell = _cell(name, _with_mode(fn, mode), (q, k, v), t, mode)
        if out is None:
          continue
        ms[name] = cell[0]
        ref = out if ref is None else ref
        diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        print(f'{name:<20}{mode:>6}{t:>7}{cell[0]:>12.2f}{cell[1]:>12.1f}{diff:>26.2e}', flush=True)
      if _TORCH.value and dtype == jnp.float32:
        out, ms['torch sdpa'] = _torch_cell(q, k, v, mode, _REPEATS.value)
        diff = float(jnp.max(jnp.abs(out - ref.ravel())))
        print(f'{"torch sdpa":<20}{mode:>6}{t:>7}{ms["torch sdpa"]:>12.2f}{"-":>12}{diff:>26.2e}', flush=True)
      if 'plain' in ms and 'chunked' in ms:
        ratios.append(f'{mode} T={t}: chunked {ms["chunked"] / ms["plain"]:.2f}x, one group '
                      f'{ms["plain, one group"] / ms["plain"]:.2f}x (groups {attn.batch_groups(*q.shape[:3], t)})')
  print('time / plain: ' + '; '.join(ratios))


if __name__ == '__main__':
  app.run(main)
