"""train/core/host.py: the thread pool a process that splits its CPU into several devices asks XLA for.

XLA:CPU sizes the pool that runs every device's share of a program (and the launch of the next one) from NPROC when it
is set, else max(cores, devices); with max(2 cores, 8 devices) threads a 2x2x2 mesh on 2 loaded cores deadlocked in a
collective in 3 of 5 runs (colabs/sharding.ipynb, XLA's "Termination timeout ... rendezvous" abort).
"""
from __future__ import annotations

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
  so the pool XLA makes has 32 threads (more on a host with more cores); asserted through the environment the job's own process ends with."""
  code = ('import runpy, sys, os\n'
          'sys.argv = ["train.main", "--helpfull"]\n'
          'try:\n'
          '  runpy.run_module("train.main", run_name="__main__")\n'
          'except SystemExit:\n'
          '  pass\n'
          'print("NPROC=" + os.environ.get("NPROC", ""))\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu')
  env.pop('NPROC', None)
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  want = f'NPROC={max(32, os.cpu_count())}'  # 4 threads per device, or every core where there are more
  assert out.stdout.strip().splitlines()[-1] == want, out.stdout[-2000:] + out.stderr[-2000:]
