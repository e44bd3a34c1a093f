"""What a benchmark ran on, printed beside its figures: the CPU model, its vector extensions (AVX-512, AMX: the
instructions oneDNN/MKL and XLA's CPU backend pick kernels by), the cores this process may use, the load average,
any XLA_FLAGS and glibc's tunables, so that a row measured
on one machine is never read as another's.

  python benchmarks/machine.py     # the one line
"""
from __future__ import annotations

import os
import platform

_EXTENSIONS = ('avx2', 'fma', 'avx512', 'amx')  # flag prefixes worth printing (avx512f, avx512_bf16, amx_tile, ...)


def cpu_model() -> str:
  """'Intel(R) Xeon(R) Processor' (/proc/cpuinfo's model name), else platform's processor string."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_extensions() -> list[str]:
  """The AVX2/FMA/AVX-512/AMX flags of the first CPU in /proc/cpuinfo, sorted ([] where there is none)."""
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('flags'):
          return sorted(x for x in line.split(':', 1)[1].split() if x.startswith(_EXTENSIONS))
  except OSError:
    pass
  return []


def describe() -> str:
  """One line: model, extensions, usable cores, load average, XLA_FLAGS, GLIBC_TUNABLES."""
  flags = cpu_extensions()
  amx = [f for f in flags if f.startswith('amx')]
  avx512 = [f for f in flags if f.startswith('avx512')]
  rest = [f for f in flags if f not in amx and f not in avx512]
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
  return (f'CPU: {cpu_model()}; {cores} cores usable; {" ".join(rest) or "no AVX2"}; '
          f'AVX-512: {" ".join(avx512) or "none"}; AMX: {" ".join(amx) or "none"}; load average {load}; '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}; GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r}')


if __name__ == '__main__':
  print(describe())
