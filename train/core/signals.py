"""SIGTERM (a preemption notice: Colab, Cloud TPU, a batch scheduler) and SIGINT (Ctrl-C), as a run honours them.

A run meets a signal in one of three phases. During start-up (flags, data, tokenizer, model, restore) nothing has
been trained, so it stops at once: `Stopped` is raised, train/core/trainer.py's prepare removes what it wrote, and the
command line says so in one line. In the loop (train/core/loop.py) the signal is noted; the loop finishes the step in
flight (it keeps at most two steps queued), saves a checkpoint and returns. After the loop, while the final
checkpoint is written, the signal is noted and the save completes first. A second Ctrl-C raises KeyboardInterrupt as
soon as Python runs again (the step in flight ends first): it stops without the save.

This module imports nothing heavy, so train/main.py installs it before JAX is imported.
"""
from __future__ import annotations

import _thread
import signal
import sys
import threading

NAMES = {signal.SIGTERM: 'SIGTERM', signal.SIGINT: 'Ctrl-C'}
# 128 + the signal's number: what a shell reports for a command the signal ended, so a restart loop or a scheduler
# reads the same code whether the run saved first or not.
EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Stopped(BaseException):
  """A signal during start-up. A BaseException (as KeyboardInterrupt), so no `except Exception` on the way reports
  it as a config or data error."""

  def __init__(self, signum: int):
    super().__init__(NAMES[signum])
    self.signum = signum

  @property
  def name(self) -> str:
    return NAMES[self.signum]

  @property
  def exit_code(self) -> int:
    return EXIT_CODES[self.signum]


class Signals:
  """The handlers for SIGTERM and SIGINT, and the first signal received.

  `immediate`: a signal raises Stopped (start-up); otherwise it is only noted in `received` for the loop to act on.
  `with Signals(...):` installs the handlers and restores the previous ones on exit; outside the main thread (a
  notebook worker) it installs nothing and changes nothing."""

  def __init__(self, *, immediate: bool = False):
    self.immediate = immediate
    self.received = None  # the first signal's number
    self._old, self._old_hook = {}, None

  def install(self) -> 'Signals':
    for signum in NAMES:
      try:
        self._old[signum] = signal.signal(signum, self._handle)
      except ValueError:  # not the main thread
        return self
    self._old_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable
    return self

  def uninstall(self) -> None:
    for signum, old in self._old.items():
      signal.signal(signum, old)
    self._old = {}
    if self._old_hook is not None:
      sys.unraisablehook, self._old_hook = self._old_hook, None

  def __enter__(self):
    return self.install()

  def __exit__(self, *exc):
    self.uninstall()

  @property
  def name(self) -> str:
    return NAMES[self.received]

  @property
  def exit_code(self) -> int:
    return EXIT_CODES[self.received]

  def _handle(self, signum, frame):
    del frame
    if self.received is None:
      self.received = signum
    elif not self.immediate:
      if signum == signal.SIGINT:  # the second Ctrl-C: stop now, without the save the first one asked for
        raise KeyboardInterrupt
      return  # a second SIGTERM: already stopping
    if self.immediate:
      raise Stopped(self.received)

  def _unraisable(self, unraisable):
    """A handler's exception raised where Python cannot propagate it (a handler runs wherever the main thread is;
    inside a garbage-collector callback or a __del__ the exception is only printed): no traceback, and the signal is
    delivered again a moment later, when the main thread is most likely back in ordinary code."""
    error = unraisable.exc_value
    if isinstance(error, Stopped) or (isinstance(error, KeyboardInterrupt) and self.received == signal.SIGINT):
      if isinstance(error, KeyboardInterrupt) or self.immediate:  # else the loop has taken over: it saves
        threading.Timer(0.01, _thread.interrupt_main, (self.received,)).start()
      return
    self._old_hook(unraisable)

  def raise_if_stopped(self) -> None:
    """Raises Stopped for a start-up signal whose exception Python swallowed: a handler runs wherever the main thread
    is, and an exception from inside a garbage-collector callback or a __del__ is only printed."""
    if self.immediate and self.received is not None:
      raise Stopped(self.received)


def raise_if_stopped() -> None:
  """Signals.raise_if_stopped of the handlers installed now, if they are a Signals' (start-up's checkpoints call it)."""
  owner = getattr(signal.getsignal(signal.SIGTERM), '__self__', None)
  if isinstance(owner, Signals):
    owner.raise_if_stopped()
