"""Attention implementations side by side: time per call and compiled temp memory at several sequence lengths.

Baseline: `jax.nn.dot_product_attention` (XLA; cuDNN too on GPU). Ours: plain (materialized scores) and chunked
(online softmax). Prints a table; asserts nothing.

  python benchmarks/attention.py --lengths=512,2048,4096 --batch=1 --heads=8 --head_dim=64
"""
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp

from model import attention as attn

_LENGTHS = flags.DEFINE_list('lengths', ['512', '1024', '2048', '4096'], 'Sequence lengths.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Batch size.')
_HEADS = flags.DEFINE_integer('heads', 8, 'Query heads.')
_KV_HEADS = flags.DEFINE_integer('kv_heads', 8, 'Key/value heads.')
_HEAD_DIM = flags.DEFINE_integer('head_dim', 64, 'Head width.')
_CHUNK = flags.DEFINE_integer('chunk', 256, 'Chunk size of the chunked implementation.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_REPEATS = flags.DEFINE_integer('repeats', 5, 'Timed calls per cell.')


def _impls(chunk):
  causal = lambda t, b: attn.make_mask_info(causal=True, q_len=t, kv_len=t, batch=b)
  impls = {
      'jax.nn (baseline)': lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True),
      'plain': lambda q, k, v: attn.attention(q, k, v, mask_info=causal(q.shape[1], q.shape[0]), implementation='plain'
                                             ),
      'chunked': lambda q, k, v: attn.attention(q, k, v, mask_info=causal(q.shape[1], q.shape[0]), implementation=
                                                'chunked', chunk_size=chunk),
  }
  if jax.default_backend() == 'gpu':
    impls['cudnn'] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')
  return impls


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  print(f'backend {jax.default_backend()}, B={_BATCH.value} N={_HEADS.value} K={_KV_HEADS.value} '
        f'H={_HEAD_DIM.value} {dtype.name}, causal')
  print(f'{"impl":<20}{"T":>7}{"ms/call":>12}{"temp MiB":>12}{"max |diff| vs baseline":>26}')
  for t in map(int, _LENGTHS.value):
    keys = jax.random.split(jax.random.key(t), 3)
    q = jax.random.normal(keys[0], (_BATCH.value, t, _HEADS.value, _HEAD_DIM.value), dtype)
    k = jax.random.normal(keys[1], (_BATCH.value, t, _KV_HEADS.value, _HEAD_DIM.value), dtype)
    v = jax.random.normal(keys[2], (_BATCH.value, t, _KV_HEADS.value, _HEAD_DIM.value), dtype)
    ref = None
    for name, fn in _impls(_CHUNK.value).items():
      try:
        compiled = jax.jit(fn).lower(q, k, v).compile()
      except Exception as e:  # an implementation the backend lacks is reported, not fatal
        print(f'{name:<20}{t:>7}  unavailable: {type(e).__name__}')
        continue
      mem = compiled.memory_analysis()
      temp = getattr(mem, 'temp_size_in_bytes', float('nan')) / 2 ** 20 if mem is not None else float('nan')
      out = jax.block_until_ready(compiled(q, k, v))
      start = time.perf_counter()
      for _ in range(_REPEATS.value):
        out = compiled(q, k, v)
      jax.block_until_ready(out)
      ms = (time.perf_counter() - start) / _REPEATS.value * 1e3
      ref = out if ref is None else ref
      diff = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
      print(f'{name:<20}{t:>7}{ms:>12.2f}{temp:>12.1f}{diff:>26.2e}')


if __name__ == '__main__':
  app.run(main)
