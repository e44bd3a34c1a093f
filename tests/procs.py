"""Helpers for tests that run a job as a child process and kill it at a chosen moment."""
from __future__ import annotations

import signal
import subprocess
import time


def kill_after_line(cmd, *, env, prefix: str, delay: float, cwd=None) -> str:
  """Runs cmd, reads its output until a line starting with `prefix` (an evaluation recorded, say), waits `delay`
  seconds (the next one is under way) and SIGKILLs it. -> what it printed; asserts it died of the SIGKILL."""
  proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  for line in proc.stdout:
    seen.append(line)
    if line.startswith(prefix):
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, ''.join(seen)[-2000:]
  return ''.join(seen)
