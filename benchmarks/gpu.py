"""One prepared GPU check: lmlab's own train step (the trainer's make_setup + jit_steps) in bfloat16 compute with
float32 parameters, cuDNN flash attention, on a ~350M-parameter decoder (24 x 1024, GPT-2 medium's shape, 2048 tokens
per sequence) and a BERT-large encoder (24 x 1024, MLM at 512): tokens/s and MFU against the device's datasheet bf16
dense peak. Prints a table and one JSON line; never asserts.

  python benchmarks/gpu.py [--steps=20] [--peak_tflops=989]   # 989: H100/H200 SXM bf16 dense

Needs a GPU build of jax (pip install -e '.[gpu]'). On a CPU it refuses in one line.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import train_throughput as tt  # noqa: E402

GPU_CONFIGS = {
    'decoder-350m': dict(kind='gpt', L=24, H=16, d=1024, ff=4096, V=50304, B=8, T=2048),
    'bert-large': dict(kind='bert', L=24, H=16, d=1024, ff=4096, V=30522, B=32, T=512),
}


def measure(name: str, steps: int) -> dict:
  c = GPU_CONFIGS[name]
  tt.CONFIGS[name] = c
  base = tt.model_config

  def bf16(cfg):
    return base(cfg).replace(dtype='bfloat16', max_len=max(c['T'], 512), attention_impl='auto', remat_policy='none')

  tt.model_config = bf16
  try:
    train_fn, state, batch = tt.lmlab_step(c)
  finally:
    tt.model_config = base
  r = tt.time_steps(train_fn, state, batch, steps)
  med = r['step_s_median']
  return dict(config=name, tokens_per_step=c['B'] * c['T'], step_s=med, tok_s=c['B'] * c['T'] / med,
              tflops=tt.flops_per_step(c) / med / 1e12, compile_s=r['compile_s'], loss=r['loss_last'])


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--steps', type=int, default=20)
  p.add_argument('--peak_tflops', type=float, default=989.0, help='datasheet bf16 dense peak of the device')
  p.add_argument('--configs', default=','.join(GPU_CONFIGS))
  a = p.parse_args()
  import jax
  if jax.default_backend() != 'gpu':
    sys.exit(f'error: benchmarks/gpu.py needs a GPU backend; jax sees {jax.default_backend()!r} '
             "(install the GPU build: pip install -e '.[gpu]').")
  print(f'device: {jax.devices()[0].device_kind}; peak {a.peak_tflops:g} TFLOP/s bf16 (datasheet)')
  rows = []
  for name in a.configs.split(','):
    r = measure(name, a.steps)
    r['mfu'] = r['tflops'] / a.peak_tflops
    rows.append(r)
    print(
        f"{name:14} {r['tok_s']:>10,.0f} tokens/s  {r['tflops']:7.1f} TFLOP/s  MFU {100 * r['mfu']:5.1f}%  "
        f"compile {r['compile_s']:.1f}s  loss {r['loss']:.3f}", flush=True)
  print(json.dumps(rows))


if __name__ == '__main__':
  main()
