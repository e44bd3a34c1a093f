"""train/core/host.py: the thread pool a process that splits its CPU into several devices asks XLA for, and the
restart under glibc's huge-page tunable.

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


def test_the_command_line_jobs_set_it_before_jax_starts_its_cpu_client_and_restart_once_for_huge_pages():
  """train.main in a fresh interpreter with 8 fake devices: the CPU client it starts sees NPROC (read at client start),
  so the pool XLA makes has 32 threads (more on a host with more cores); asserted through the environment the job's
  own process ends with. Where glibc and the kernel allow it, the job first restarted itself once (the command runs
  twice, not more) with glibc.malloc.hugetlb=1, the user's other tunables kept."""
  code = ('import runpy, sys, os\n'
          'print("start", flush=True)\n'
          'sys.argv = ["train.main", "--helpfull"]\n'
          'try:\n'
          '  runpy.run_module("train.main", run_name="__main__")\n'
          'except SystemExit:\n'
          '  pass\n'
          'print("NPROC=" + os.environ.get("NPROC", ""))\n'
          'print("GLIBC_TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""))\n')
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8', JAX_PLATFORMS='cpu',
             GLIBC_TUNABLES='glibc.malloc.perturb=0')
  env.pop('NPROC', None)
  env.pop('LMLAB_MALLOC', None)
  relaunched = host.huge_pages_environment(env)
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  lines = out.stdout.strip().splitlines()
  want = f'NPROC={max(32, os.cpu_count())}'  # 4 threads per device, or every core where there are more
  assert lines[-2] == want, out.stdout[-2000:] + out.stderr[-2000:]
  tunables = relaunched['GLIBC_TUNABLES'] if relaunched else 'glibc.malloc.perturb=0'
  assert lines[-1] == f'GLIBC_TUNABLES={tunables}', out.stdout[-2000:]
  assert lines.count('start') == (2 if relaunched else 1), out.stdout[-2000:]


@pytest.mark.parametrize('environ, thp, glibc, expected', [
    ({}, 'madvise', (2, 36), 'glibc.malloc.hugetlb=1'),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'madvise', (2, 35),
     'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'),  # the user's tunables kept
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'madvise', (2, 36), None),  # the user's own choice
    ({'LMLAB_MALLOC': 'system'}, 'madvise', (2, 36), None),
    ({}, 'always', (2, 36), None),  # every large mapping gets huge pages already
    ({}, 'never', (2, 36), None),
    ({}, '', (2, 36), None),  # no THP in this kernel
    ({}, 'madvise', (2, 34), None),  # the tunable came with glibc 2.35
    ({}, 'madvise', (), None),  # musl and other C libraries
])
def test_huge_pages_environment_adds_the_tunable_only_where_it_changes_something(
    monkeypatch, environ, thp, glibc, expected):
  monkeypatch.setattr(host, 'thp_mode', lambda: thp)
  monkeypatch.setattr(host, '_glibc_version', lambda: glibc)
  monkeypatch.setattr(sys, 'platform', 'linux')
  env = host.huge_pages_environment(dict(environ, PATH='/bin'))
  if expected is None:
    assert env is None
  else:
    assert env['GLIBC_TUNABLES'] == expected and env['PATH'] == '/bin'


def test_thp_mode_reads_the_bracketed_word(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host.thp_mode(str(path)) == 'madvise'
  assert host.thp_mode(str(tmp_path / 'missing')) == ''
