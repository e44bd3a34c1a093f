"""Process-wide settings for running XLA on a CPU host, applied once at a job's start (`start_job`).

The allocator: glibc's malloc hands every request above its mmap threshold (at most 32 MiB) a fresh mmap and gives it
back with munmap on free. XLA:CPU allocates a program's temporaries (activations kept for the backward pass, logits,
the scan's stacked residuals: tens to hundreds of MiB each) anew on every execution, so every step page-faulted and
had the kernel zero all of that memory again before the first byte was computed. `tune_allocator` makes malloc serve
large requests from its heap and keep freed memory for the next step instead (mallopt: no mmap, no trimming), which
is what a caching allocator does for torch and what TCMalloc does for TensorFlow. The process then keeps its peak heap
until it exits. LMLAB_MALLOC=system in the environment leaves glibc's defaults alone.

That holds for the thread that allocates: a glibc thread arena cannot hold a block above 64 MiB. With JAX's
asynchronous dispatch XLA:CPU runs each program on a worker thread, which maps its largest blocks fresh on every
execution whatever mallopt says (a float32 LLaMA step of benchmarks/train_throughput.py: 92,800 page faults).
`run_programs_inline` turns that dispatch off for single-device programs (jax_cpu_enable_async_dispatch; programs
over several devices stay asynchronous): the calling thread runs the program, its buffers come from the heap above
and are reused, 0 faults a step. The host then cannot queue the next step while one runs, which on a CPU, whose cores
the host shares with XLA, cost nothing measured (the nanoGPT recipe's loop, docs/results.md).
JAX_CPU_ENABLE_ASYNC_DISPATCH=true in the environment keeps JAX's asynchronous dispatch.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_applied: bool | None = None
_ASYNC_DISPATCH = 'JAX_CPU_ENABLE_ASYNC_DISPATCH'  # true: keep JAX's asynchronous CPU dispatch (run_programs_inline)
_cache_dir: str | None = None  # the compilation cache this module set (a later run in the process moves it)


def tune_allocator() -> bool:
  """Large allocations from the heap, freed memory kept for reuse; True when set (glibc on Linux), idempotent."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  if os.environ.get('LMLAB_MALLOC', '').lower() == 'system' or not sys.platform.startswith('linux'):
    return _applied  # glibc's defaults asked for, or no glibc malloc to tune
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other C libraries have no mallopt
    return _applied
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  ok = mallopt(_M_MMAP_MAX, 0) == 1
  ok &= mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
  ok &= mallopt(_M_TOP_PAD, 64 << 20) == 1
  _applied = bool(ok)
  return _applied


def run_programs_inline() -> bool:
  """XLA:CPU runs each single-device program in the thread that calls it (jax_cpu_enable_async_dispatch=False); call
  before JAX starts its CPU client. JAX_CPU_ENABLE_ASYNC_DISPATCH=true in the environment keeps JAX's asynchronous
  dispatch instead (JAX itself reads no variable for it). -> True if programs run inline."""
  import jax  # pylint: disable=g-import-not-at-top
  keep_async = os.environ.get(_ASYNC_DISPATCH, '').strip().lower() in ('1', 'true', 'yes', 'on')
  jax.config.update('jax_cpu_enable_async_dispatch', keep_async)
  return not keep_async


def start_job() -> None:
  """First thing in a command-line job's __main__, before JAX starts its CPU client: the device pool's size, programs
  run inline and the allocator tuned (see the module's docstring)."""
  size_host_device_pool()
  run_programs_inline()
  tune_allocator()


def size_host_device_pool() -> int | None:
  """NPROC for a process that splits the CPU into N > 1 devices (--xla_force_host_platform_device_count=N in
  XLA_FLAGS): call before the first jax.devices(); an NPROC already set is left alone. -> the value set, or None.

  XLA:CPU runs every device's share of a program, and the launch of the next program, on one pool of max(cores, N)
  threads. A launch queued behind a running program waits for it while holding a thread, so when the running
  program's last devices have not started yet they find no thread; the devices that did start wait for them in a
  collective until XLA aborts the process ("Termination timeout ... Expected 2 threads to join the rendezvous"). A
  2x2x2 mesh of 8 fake devices on 2 loaded cores did so in 3 of 5 runs. XLA sizes that pool from NPROC when it is set:
  4 x N threads leave room for the launches of the programs queued behind (5 of 5 runs, twice)."""
  match = re.search(r'--xla_force_host_platform_device_count=(\d+)', os.environ.get('XLA_FLAGS', ''))
  if not match or int(match.group(1)) < 2 or os.environ.get('NPROC'):
    return None
  threads = max(4 * int(match.group(1)), os.cpu_count() or 1)
  os.environ['NPROC'] = str(threads)
  return threads


def use_compilation_cache(workdir: str, min_compile_s: float = 0.5) -> bool:
  """JAX's persistent compilation cache in <workdir>/jax_cache, unless the user has set a cache directory: a rerun,
  a resumed run, later rungs of a selection and the seeds of a sweep compile the same steps again, and a cached
  executable is the same program (results are unchanged). A later run in the same process moves the cache to its own
  workdir unless it lies inside the first one's parent (a selection's candidates share the selection's cache). JAX's
  cache is re-initialized, so this applies even after something was compiled. -> True if this call set it."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  global _cache_dir
  path = os.path.abspath(os.path.join(workdir, 'jax_cache'))
  current = jax.config.jax_compilation_cache_dir
  if current and current != _cache_dir:  # the user's own cache
    return False
  if current and os.path.abspath(workdir).startswith(os.path.dirname(current) + os.sep):
    return True  # a job over several runs (a selection, a sweep) keeps one cache for all of them
  if current != path:
    jax.config.update('jax_compilation_cache_dir', path)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', min_compile_s)
    compilation_cache.reset_cache()
  _cache_dir = path
  return True


def cache_home() -> str:
  """$XDG_CACHE_HOME/lmlab (default ~/.cache/lmlab): where a job with no workdir of its own (train.generate from a
  Hugging Face directory or a .gguf file) keeps compiled programs, so that running it again skips the compile."""
  return os.path.join(os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'lmlab')


def use_job_cache(*dirs: str | None) -> bool:
  """use_compilation_cache in the first of dirs that exists and can be written (or can be made): the evaluate job and
  train.generate reuse what a run's training compiled in its workdir, and a read-only run (someone else's) falls back
  to the next directory (the job's --out, cache_home()) rather than warning on every compile. -> True if set."""
  for d in dirs:
    if not d:
      continue
    d = os.path.abspath(d)
    probe = d
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
      probe = os.path.dirname(probe)
    if os.path.isdir(probe) and os.access(probe, os.W_OK | os.X_OK):
      return use_compilation_cache(d)
  return False
