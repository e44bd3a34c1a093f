"""train/core/host.py: the thread pool a process that splits its CPU into several devices asks XLA for, and programs
run inline so that a step's buffers are reused instead of faulted in afresh.

XLA:CPU sizes the pool that runs every device's share of a program (and the launch of the next one) from NPROC when it
is set, else max(cores, devices); with max(2 cores, 8 devices) threads a 2x2x2 mesh on 2 loaded cores deadlocked in a
collective in 3 of 5 runs (colabs/sharding.ipynb, XLA's "Termination timeout ... rendezvous" abort).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from train.core import host

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('flags, nproc, expected', [
    ('--xla_force_host_platform_device_count=8', None, str(max(32, os.cpu_count()))),
    ('--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=2', None, str(max(8, os.cpu_count()))),
    ('--xla_force_host_platform_device_count=8', '6', '6'),  # the user's own NPROC stays
    ('--xla_force_host_platform_device_count=1', None, None),  # one device: XLA's default pool is enough
    ('', None, None),
])
def test_nproc_is_four_threads_per_fake_device_unless_the_user_set_it(monkeypatch, flags, nproc, expected):
  monkeypatch.setenv('XLA_FLAGS', flags)
  if nproc is None:
    monkeypatch.delenv('NPROC', raising=False)
  else:
    monkeypatch.setenv('NPROC', nproc)
  returned = host.size_host_device_pool()
  assert os.environ.get('NPROC') == expected
  assert returned == (None if nproc or expected is None else int(expected))


def test_the_command_line_jobs_set_it_before_jax_starts_its_cpu_client():
  """train.main in a fresh interpreter with 8 fake devices: the CPU client it starts sees NPROC (read at client start),
  so the pool XLA makes has 32 threads (more on a host with more cores); asserted through the environment the job's
  own process ends with, and the dispatch setting JAX starts its client with."""
  code = ('import runpy, sys, os\n'
          'sys.argv = ["train.main", "--helpfull"]\n'
          'try:\n'
          '  runpy.run_module("train.main", run_name="__main__")\n'
          'except SystemExit:\n'
          '  pass\n'
          'import jax\n'
          'print("NPROC=" + os.environ.get("NPROC", ""))\n'
          'print("async=" + str(jax.config._read("jax_cpu_enable_async_dispatch")))\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  env.pop('NPROC', None)
  env.pop('JAX_CPU_ENABLE_ASYNC_DISPATCH', None)
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = out.stdout.strip().splitlines()
  want = f'NPROC={max(32, os.cpu_count())}'  # 4 threads per device, or every core where there are more
  assert lines[-2:] == [want, 'async=False'], out.stdout[-2000:] + out.stderr[-2000:]


_FAULTS = """
import json, resource
from train.core import host
host.start_job()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: (jnp.tanh(x @ x.T) @ x).sum())  # an [N, N] float32 temporary of 81 MiB
x = jnp.ones((4608, 256), jnp.float32) / 256
for _ in range(2):
  f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
  f(x).block_until_ready()
print(json.dumps({'faults': (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3,
                  'async': jax.config._read('jax_cpu_enable_async_dispatch')}))
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason="glibc's malloc and Linux's fault counts")
def test_a_jobs_program_reuses_its_temporary_instead_of_faulting_it_in_on_every_call():
  """A program with an 81 MiB temporary (20,736 pages of 4 KiB) after host.start_job(): it runs inline, its buffer
  comes from the caller's heap, which tune_allocator keeps, so calls after the first fault next to no pages (0 on an
  idle machine). Under JAX's asynchronous dispatch (JAX_CPU_ENABLE_ASYNC_DISPATCH=true keeps it) a worker thread's
  arena cannot hold the block and maps it afresh: 20,737 faults a call on an idle machine here, but as few as 500 while
  the suite's other worker loaded both cores, so that side is only checked for its setting."""
  runs = {}
  for keep_async in ('', 'true'):
    env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_CPU_ENABLE_ASYNC_DISPATCH=keep_async)
    env.pop('LMLAB_MALLOC', None)
    out = subprocess.run([sys.executable, '-c', _FAULTS], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    runs[keep_async] = json.loads(out.stdout.strip().splitlines()[-1])
  assert runs['']['async'] is False and runs['true']['async'] is True, runs
  assert runs['']['faults'] < 2_000, runs  # a tenth of the block: it is not faulted in afresh each call


def test_run_programs_inline_keeps_the_users_asynchronous_dispatch(monkeypatch):
  import jax
  before = jax.config._read('jax_cpu_enable_async_dispatch')
  try:
    monkeypatch.setenv('JAX_CPU_ENABLE_ASYNC_DISPATCH', 'true')
    assert host.run_programs_inline() is False and jax.config._read('jax_cpu_enable_async_dispatch') is True
    monkeypatch.delenv('JAX_CPU_ENABLE_ASYNC_DISPATCH')
    assert host.run_programs_inline() is True and jax.config._read('jax_cpu_enable_async_dispatch') is False
  finally:
    jax.config.update('jax_cpu_enable_async_dispatch', before)  # this process's client has started: no effect there
