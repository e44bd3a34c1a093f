"""What every test shares: one persistent JAX compilation cache for the whole suite.

The xdist workers and the `python -m train.main` subprocesses the CLI tests start inherit JAX_COMPILATION_CACHE_DIR,
so a program the suite has compiled once (the runlocal train and eval steps most of them run) is read back instead
of compiled again. A cached executable is the same program, so no result changes (the resume tests compare runs
bitwise). The trainer keeps a cache a user set (train/core/host.py), so runs here use this one instead of their
workdir's; the tests of that placement unset it (tests/test_colabs.py) or set their own (tests/test_select.py).
"""
import os
import tempfile


def pytest_configure(config):
  del config
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return
  path = os.path.join(tempfile.gettempdir(), f'lmlab-tests-jax-cache-{os.getuid()}')
  os.makedirs(path, exist_ok=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
