"""A full disk, from whichever layer hit it (Python, orbax/tensorstore's asynchronous save, the Rust tokenizer), as
the one line a user can act on: what filled up, which file, the fix and the step a rerun resumes from; and the
background noise (orbax's thread tracebacks, tensorstore's closed-event-loop callbacks) that would bury that line.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import sys

# A full disk in the text of an error that is not an OSError: tensorstore/orbax raise ValueErrors that carry the OS
# error code (os_error_code='28'), the Rust tokenizer says '(os error 28)', wrapped OSErrors '[Errno 28]'.
_CODES = '|'.join(str(code) for code in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT))
_DISK_FULL = re.compile(rf"os_error_code=\\?'({_CODES})\\?'|\(os error ({_CODES})\)|\[Errno ({_CODES})\]|"
                        'No space left on device|Disk quota exceeded')

# The file tensorstore names, most precise first.
_WRITING = (re.compile(r'Failed writing: "([^"]+)"'), re.compile(r'Failed to open "([^"]+)"'),
            re.compile(r'local file "([^"]+)"'))


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _complete_steps(workdir: str) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in (os.listdir(directory) if os.path.isdir(directory) else []) if n.isdigit())


def disk_full(error: BaseException, workdir: str) -> str | None:
  """The one line for a write that failed for want of space (ENOSPC, EDQUOT, EFBIG: a quota or `ulimit -f`), also
  from inside orbax's asynchronous save; None for any other error."""
  for e in _chain(error):
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
      what, where = e.strerror or os.strerror(e.errno), e.filename or workdir
      break
    said = _DISK_FULL.search(str(e))
    if said:
      code = next((int(g) for g in said.groups() if g), None)
      what = os.strerror(code) if code else said.group(0)
      named = [found.group(1).rstrip('/') for found in (p.search(str(e)) for p in _WRITING) if found]
      where = named[0] if named else workdir
      break
  else:
    return None
  steps = _complete_steps(workdir)
  resume = (f'it resumes from step {steps[-1]}, the newest complete checkpoint (the save cut short is discarded)'
            if steps else 'no checkpoint was complete yet, so it starts from step 0')
  return (f'the disk is full ({what}) writing {where}: free space (or raise the disk quota or the file-size limit, '
          f'ulimit -f) and rerun the same command; {resume}.')


class _QuietDiskFull(logging.Filter):
  """Drops the tracebacks orbax logs from its background threads when a write fails for want of space: the main
  thread turns the same error into one line."""

  def filter(self, record):
    if record.levelno < logging.WARNING:
      return True
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
      text += ' '.join(str(e) for e in _chain(record.exc_info[1]))
    return not _DISK_FULL.search(text)


def _quiet_closed_loop(hook):
  """sys.unraisablehook that skips `RuntimeError: Event loop is closed` (tensorstore answering, from a C++ callback,
  an orbax save abandoned after a write failed: dozens of tracebacks) and passes everything else on."""

  def unraisablehook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == 'Event loop is closed':
      return
    hook(unraisable)

  return unraisablehook


def quiet_disk_full_noise() -> None:
  """Installs the filters: absl's logger and asyncio's (a failed write's future that no one awaited, logged when it is
  collected) drop full-disk tracebacks, and closed-event-loop callbacks are skipped."""
  for name in ('absl', 'asyncio'):
    logging.getLogger(name).addFilter(_QuietDiskFull())
  sys.unraisablehook = _quiet_closed_loop(sys.unraisablehook)
