"""XLA:CPU against torch on the matmuls of one dense layer's training step, in each form autodiff writes them, in the
same process: forward x w ("NN"), input gradient g w^T ("NT"), weight gradient x^T g ("TN"), at the shapes of
benchmarks/train_throughput.py's config (b) (GPT 6x512: 2048 rows, width 512, MLP 2048, vocabulary 8192).

float32 shows how far XLA's kernels (YNNPACK) are from torch's (oneDNN/MKL) per shape; bfloat16 (accumulated in
float32, as model/layers.py computes) shows which forms reach a CPU's AMX tiles: only NN ones, hence the written-out
transposes of model/layers.py's bfloat16 path (the 'NN stored' column: the transpose forced by a reshape, as there).
The last table is decoding's product, a few rows against SmolLM2-135M's vocabulary projection (576 x 49,152).

  python benchmarks/matmul_forms.py [--repeats=20]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import machine  # noqa: E402  (benchmarks/machine.py)

ROWS = 2048
SHAPES = (('qkv', 512, 1536), ('attn out', 512, 512), ('mlp in', 512, 2048), ('mlp out', 2048, 512),
          ('logits', 512, 8192))


def _time(fn, repeats: int) -> float:
  fn()
  t0 = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - t0) / repeats


def stored_transpose(a):
  """a.T written out row-major (model/layers.py _stored_transpose's reshape, without its barrier)."""
  import jax.numpy as jnp
  r, c = a.shape
  return jnp.transpose(a.reshape(r // 16, 16, c), (2, 0, 1)).reshape(c, r)


def float32_rows(repeats: int):
  import jax
  import torch
  out = []
  for name, k, n in SHAPES:
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype(np.float32) for s in ((ROWS, k), (k, n), (ROWS, n)))
    jx, jw, jg = map(jax.numpy.asarray, (x, w, g))
    tx, tw, tg = map(torch.from_numpy, (x, w, g))
    forms = (('forward x w', jax.jit(lambda a, b: a @ b), (jx, jw), lambda: tx @ tw),
             ('input grad g w^T', jax.jit(lambda a, b: a @ b.T), (jg, jw), lambda: tg @ tw.T),
             ('weight grad x^T g', jax.jit(lambda a, b: a.T @ b), (jx, jg), lambda: tx.T @ tg))
    for form, f, args, tf in forms:
      flops = 2 * ROWS * k * n
      xla = flops / _time(lambda: f(*args).block_until_ready(), repeats) / 1e9
      ref = flops / _time(tf, repeats) / 1e9
      out.append((name, form, xla, ref))
  return out


def bfloat16_rows(repeats: int):
  import jax
  import jax.numpy as jnp
  import torch
  f32, bf16 = jnp.float32, jnp.bfloat16
  dot = lambda a, b: jnp.dot(a, b, preferred_element_type=f32)
  out = []
  for name, k, n in SHAPES:
    x, w, g = (jnp.ones(s, bf16) for s in ((ROWS, k), (k, n), (ROWS, n)))
    flops = 2 * ROWS * k * n
    rate = lambda f, *a: flops / _time(lambda: f(*a).block_until_ready(), repeats) / 1e9
    nn = rate(jax.jit(dot), x, w)
    nt = rate(jax.jit(lambda a, b: dot(a, b.T)), g, w)
    tn = rate(jax.jit(lambda a, b: dot(a.T, b)), x, g)
    stored = rate(jax.jit(lambda a, b: dot(stored_transpose(a), b)), x, g)
    tx, tg = torch.ones((ROWS, k), dtype=torch.bfloat16), torch.ones((ROWS, n), dtype=torch.bfloat16)
    ref = flops / _time(lambda: tx.T @ tg, repeats) / 1e9
    out.append((name, nn, nt, tn, stored, ref))
  return out


def decode_rows(repeats: int):
  """Milliseconds of x [M, 576] . w [576, 49152] for M = 1 and 8: float32, and bfloat16 accumulated in float32."""
  import jax
  import jax.numpy as jnp
  out = []
  for m in (1, 8):
    x, w = jnp.ones((m, 576), jnp.float32), jnp.ones((576, 49152), jnp.float32)
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    f32 = jax.jit(lambda a, b: a @ b)
    b16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    out.append((m, 1e3 * _time(lambda: f32(x, w).block_until_ready(), repeats),
                1e3 * _time(lambda: b16(xb, wb).block_until_ready(), repeats)))
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--repeats', type=int, default=20)
  a = p.parse_args()
  import torch
  print(machine.describe(), f'; torch threads {torch.get_num_threads()}', flush=True)
  print(f'\nfloat32, GFLOP/s ({ROWS} rows)\n{"layer":<10}{"form":<20}{"XLA":>8}{"torch":>8}{"XLA/torch":>11}')
  for name, form, xla, ref in float32_rows(a.repeats):
    print(f'{name:<10}{form:<20}{xla:8.0f}{ref:8.0f}{xla / ref:10.2f}x', flush=True)
  print(f'\nbfloat16 in, float32 accumulation, GFLOP/s\n{"layer":<10}{"XLA NN":>8}{"NT":>8}{"TN":>8}'
        f'{"NN stored":>11}{"torch TN":>10}')
  for name, nn, nt, tn, stored, ref in bfloat16_rows(a.repeats):
    print(f'{name:<10}{nn:8.0f}{nt:8.0f}{tn:8.0f}{stored:11.0f}{ref:10.0f}', flush=True)
  print(f'\ndecoding: [M, 576] . [576, 49152], ms\n{"M":>3}{"float32":>10}{"bfloat16":>10}')
  for m, a32, a16 in decode_rows(a.repeats):
    print(f'{m:>3}{a32:10.2f}{a16:10.2f}', flush=True)


if __name__ == '__main__':
  main()
