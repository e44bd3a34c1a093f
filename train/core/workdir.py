"""One run per workdir: an exclusive lock held while a run trains, so a second run on the same workdir is refused
before it interleaves metrics.jsonl or deletes the first one's checkpoints; and the workdir's config.json, which
names the model its checkpoints hold (another architecture is refused before orbax reads them).

The lock is `fcntl.flock` on `<workdir>/.lock`: the kernel drops it when the holder exits, SIGKILL included, so a killed
run never leaves it stuck; the file only records who holds it (pid, host, command, start time) for the error message.
Only process 0 of a multi-host run locks (its peers share the workdir by design).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

LOCK_FILE = '.lock'


class WorkdirBusy(RuntimeError):
  """Another live run holds the workdir."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir for one run; a workdir it created is removed again when the run
  left nothing in it (a refused start leaves no trace)."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.workdir, self.enabled = workdir, enabled
    self.path = os.path.join(workdir, LOCK_FILE)
    self._fd, self._created = None, False

  def __enter__(self):
    if not self.enabled:
      return self
    self._created = not os.path.exists(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      raise WorkdirBusy(f'--workdir={self.workdir} is in use by {holder}; wait for that run to finish (or stop it), '
                        'or give another --workdir.') from None
    os.ftruncate(fd, 0)
    os.write(
        fd,
        json.dumps({
            'pid': os.getpid(),
            'host': socket.gethostname(),
            'command': ' '.join(sys.argv),
            'since': time.strftime('%Y-%m-%d %H:%M:%S')
        }).encode())
    self._fd = fd
    return self

  def __exit__(self, *exc):
    if self._fd is None:
      return False
    try:  # before unlocking, and only our own file (not one a later run made after this workdir was replaced)
      mine, there = os.fstat(self._fd), os.stat(self.path)
      if (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino):
        os.unlink(self.path)
    except FileNotFoundError:
      pass  # removed from under us (the workdir deleted): nothing to clean
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
    if self._created and os.path.isdir(self.workdir) and not os.listdir(self.workdir):
      os.rmdir(self.workdir)
    return False


def _read_holder(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0) or b'{}')
  except ValueError:
    info = {}
  if not info:
    return 'another run'
  return (f"process {info.get('pid')} on {info.get('host')} (since {info.get('since')}: "
          f"{str(info.get('command', ''))[:200]})")


# Model fields that change no parameter's shape or name: a resumed run may change them.
RUNTIME_FIELDS = ('dropout_rate', 'attention_dropout_rate', 'mlp_dropout_rate', 'remat_policy', 'attention_impl',
                  'attention_chunk', 'dtype', 'scan_unroll')


def check_same_model(workdir: str, model_cfg) -> None:
  """A workdir's checkpoints hold the model its config.json names; another architecture is refused in one line."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f).get('model', {})
  now = model_cfg.to_dict()
  changed = sorted(k for k in now if k in saved and k not in RUNTIME_FIELDS and saved[k] != now[k])
  if changed:
    diff = ', '.join(f'{k}: {saved[k]!r} -> {now[k]!r}' for k in changed)
    raise ValueError(f'{workdir} holds checkpoints of another model ({diff}); resume it with its own config '
                     '(see its config.json) or start the new model in a new --workdir.')


def config_dict(config) -> dict:
  """A ConfigDict (or a mapping) as plain JSON-able data, as config.json and the checkpoints hold it."""
  return json.loads(config.to_json_best_effort()) if hasattr(config, 'to_json_best_effort') else dict(config)


def write_config(workdir: str, config: dict, model_cfg) -> None:
  """<workdir>/config.json (the resolved config and the model) from process 0, to a temporary name and renamed."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, 'config.json')
  with open(f'{path}.tmp', 'w') as f:
    json.dump({'config': config, 'model': model_cfg.to_dict()}, f, indent=2)
  os.replace(f'{path}.tmp', path)
