"""What every test shares: one persistent JAX compilation cache for the whole suite, programs run inline and malloc
tuned as the jobs set them, and the longest modules first.

The xdist workers and the `python -m train.main` subprocesses the CLI tests start inherit JAX_COMPILATION_CACHE_DIR,
so a program the suite has compiled once (the runlocal train and eval steps most of them run) is read back instead
of compiled again. A cached executable is the same program, so no result changes (the resume tests compare runs
bitwise). The trainer keeps a cache a user set (train/core/host.py), so runs here use this one instead of their
workdir's; the tests of that placement unset it (tests/test_colabs.py) or set their own (tests/test_select.py).

`make test` runs the suite on two xdist workers, which take tests in collection order: the modules whose tests run for
minutes (the colabs, the end-to-end selections, the multi-host faults) are collected first, each module's tests in
their own order, so that the last minutes are not one long test on one worker while the other idles.
"""
import os
import tempfile

from train.core import host


def pytest_configure(config):
  del config
  # programs run inline and malloc tuned, as in the command-line jobs (train/core/host.py start_job); this runs in
  # every xdist worker before its tests start JAX's CPU client, and the CLI subprocesses set it themselves
  host.run_programs_inline()
  host.tune_allocator()
  if os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return
  path = os.path.join(tempfile.gettempdir(), f'lmlab-tests-jax-cache-{os.getuid()}')
  os.makedirs(path, exist_ok=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = path
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')


LONGEST_FIRST = ('test_select_finetune.py', 'test_colabs.py', 'test_select.py', 'test_multihost_faults.py')


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  order = {id(item): k for k, item in enumerate(items)}
  items.sort(key=lambda item: (rank.get(os.path.basename(str(item.fspath)), len(rank)), order[id(item)]))
