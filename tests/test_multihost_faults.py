"""A process of a multi-host run that dies or hangs mid-run: the others stop within --peer_timeout with one line naming
it and exit code 75 (train/core/distributed.py's Watchdog), instead of hanging in a gloo collective until a C++ abort a
minute later; the checkpoints left on disk are whole, and a restart of every process resumes from the newest one.

The Watchdog itself is tested in-process over socket pairs (no JAX); the end-to-end cases run two `python -m
train.main` processes x 2 fake CPU devices on 127.0.0.1, as the README's multi-host command does.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from train.core.distributed import PEER_LOST_EXIT
from train.core.distributed import Watchdog

ROOT = Path(__file__).resolve().parents[1]
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
NOISE = ('Traceback', 'Terminating process', 'Check failure', 'Fatal Python error')

# ------------------------------------------------------------------------------------------- the watchdog alone


class _Verdicts:

  def __init__(self):
    self.lines, self.event = [], threading.Event()

  def __call__(self, line):
    self.lines.append(line)
    self.event.set()


def _watch(conns, process_id, num_processes, timeout_s=5.0):
  verdicts = _Verdicts()
  return Watchdog(conns, process_id, num_processes, timeout_s, interval_s=0.05, on_lost=verdicts).start(), verdicts


def test_watchdog_names_a_killed_a_silent_and_a_failed_peer_and_lets_a_finished_one_go():
  # Killed: its end of the connection closes -> named at once, not after the timeout.
  mine, theirs = socket.socketpair()
  dog, seen = _watch({1: mine}, 0, 2, timeout_s=30)
  t0 = time.monotonic()
  theirs.close()
  assert seen.event.wait(5) and time.monotonic() - t0 < 2
  assert seen.lines[0].startswith('error: process 1 of 2 stopped responding (its connection closed')
  assert 'process 0 stops too' in seen.lines[0] and 'Restart all 2 processes' in seen.lines[0]

  # Silent (a hung host: the connection stays open, nothing arrives): named after the timeout, not before.
  mine, theirs = socket.socketpair()
  dog, seen = _watch({0: mine}, 1, 2, timeout_s=0.6)
  t0 = time.monotonic()
  assert seen.event.wait(5)
  assert 0.6 <= time.monotonic() - t0 < 3
  assert 'process 0 of 2 stopped responding (no heartbeat for 0.6s' in seen.lines[0]
  theirs.close()

  # Finished: a peer that says `done` and closes is let go; heartbeats keep a live one watched past the timeout.
  a0, a1 = socket.socketpair()
  dog0, seen0 = _watch({1: a0}, 0, 2, timeout_s=0.5)
  dog1, seen1 = _watch({0: a1}, 1, 2, timeout_s=0.5)
  time.sleep(1.2)  # > timeout: only the heartbeats keep them from giving up
  dog1.stop()
  time.sleep(1.0)
  assert not seen0.lines and not seen1.lines
  dog0.stop()

  # Failed: process 2 stops on its own error; process 0 names it and passes the news on to process 1.
  p0_to_1, p1_to_0 = socket.socketpair()
  p0_to_2, p2_to_0 = socket.socketpair()
  dog0, seen0 = _watch({1: p0_to_1, 2: p0_to_2}, 0, 3)
  dog1, seen1 = _watch({0: p1_to_0}, 1, 3)
  dog2, _ = _watch({0: p2_to_0}, 2, 3)
  dog2.stop(failed='the disk is full (No space left on device) writing /w/checkpoints')
  assert seen0.event.wait(5) and seen1.event.wait(5)
  for line in seen0.lines + seen1.lines:
    assert line.startswith('error: process 2 of 3 stopped on an error (the disk is full'), line
  assert 'process 0 stops too' in seen0.lines[0] and 'process 1 stops too' in seen1.lines[0]


# ------------------------------------------------------------------------------------- two train.main processes


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _env(cache: Path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL='2',
             JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  env['XLA_FLAGS'] = f'{FAST_COMPILE} --xla_force_host_platform_device_count=2'
  return env


def _start_two(tmp_path: Path, tag: str, steps: int, *extra) -> list[tuple[subprocess.Popen, Path]]:
  """Processes 0 and 1 of one run on tmp_path/run (output to files: nothing blocks on a full pipe)."""
  coordinator = f'127.0.0.1:{_free_port()}'
  out = []
  for i in range(2):
    log = tmp_path / f'{tag}.{i}.log'
    proc = subprocess.Popen([
        sys.executable, '-m', 'train.main', '--config=configs/gpt.py:runlocal', f'--workdir={tmp_path / "run"}',
        f'--config.train.steps={steps}', '--config.optim.total_steps=1000', '--config.train.checkpoint_every=3',
        '--config.train.log_every=3', f'--coordinator={coordinator}', '--num_processes=2', f'--process_id={i}', *extra
    ], cwd=ROOT, env=_env(tmp_path / 'jax_cache'), stdout=log.open('w'), stderr=subprocess.STDOUT)
    out.append((proc, log))
  return out


def _wait_for(path: Path, procs, timeout: float = 240):
  t0 = time.monotonic()
  while not path.is_dir():
    for proc, log in procs:
      assert proc.poll() is None, f'exited {proc.returncode} before {path.name}:\n{log.read_text()[-4000:]}'
    assert time.monotonic() - t0 < timeout, f'no {path} after {timeout}s'
    time.sleep(0.1)


def _kill(procs):
  for proc, _ in procs:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _errors(log: Path) -> list[str]:
  return [line for line in log.read_text().splitlines() if line.startswith('error:')]


def _steps(checkpoints: Path) -> list[int]:
  return sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())


def test_a_peer_killed_mid_run_stops_the_survivor_in_one_line_and_a_restart_resumes(tmp_path):
  """SIGKILL process 1 after the first checkpoint, in the middle of the next save: process 0, blocked in a collective
  or in orbax's barrier, exits with code 75 and one line naming process 1 within --peer_timeout (a closed connection
  is seen at once); every step orbax finished is whole (the save cut short stays a temporary folder, which orbax
  never restores), and both processes started again resume from the newest step and finish."""
  t_all = time.monotonic()
  timeout = 10
  procs = _start_two(tmp_path, 'first', 1000, f'--peer_timeout={timeout}')
  checkpoints = tmp_path / 'run' / 'checkpoints'
  try:
    _wait_for(checkpoints / '3', procs)
    deadline = time.monotonic() + 20  # then in the middle of the next save, when it can be caught there
    while not any(checkpoints.glob('*.orbax-checkpoint-tmp')) and time.monotonic() < deadline:
      time.sleep(0.01)
    (survivor, log), (victim, _) = procs
    victim.send_signal(signal.SIGKILL)
    t0 = time.monotonic()
    try:
      code = survivor.wait(timeout=timeout + 20)
    except subprocess.TimeoutExpired:
      pytest.fail(f'process 0 still running {timeout + 20}s after process 1 was killed:\n{log.read_text()[-3000:]}')
    took = time.monotonic() - t0
  finally:
    _kill(procs)
  text = log.read_text()
  print(f'\nsurvivor: exit {code} {took:.2f}s after the kill; {_errors(log)}')
  assert code == PEER_LOST_EXIT, text[-3000:]
  assert took <= timeout, took
  assert len(_errors(log)) == 1 and _errors(log)[0].startswith('error: process 1 of 2 stopped responding'), text[-3000:]
  assert not any(noise in text for noise in NOISE), text[-3000:]

  # Nothing half-written is a step: each numbered folder is one orbax finished (the last may await its digest).
  steps = _steps(checkpoints)
  assert steps and steps[0] == 3, sorted(os.listdir(checkpoints))
  for step in steps:
    assert (checkpoints / str(step) / 'commit_success.txt').exists(), step
    assert step == steps[-1] or (checkpoints / str(step) / 'lmlab_digest.json').exists(), step
  print(f'on disk: {sorted(os.listdir(checkpoints))}')

  # Both processes again, to three steps past the newest checkpoint: they resume from it and finish.
  newest, t1 = steps[-1], time.monotonic()
  again = _start_two(tmp_path, 'again', newest + 3)
  try:
    codes = [proc.wait(timeout=240) for proc, _ in again]
  finally:
    _kill(again)
  out0 = again[0][1].read_text()
  print(f'restart: {time.monotonic() - t1:.1f}s, exits {codes}; whole test {time.monotonic() - t_all:.1f}s')
  assert codes == [0, 0], '\n'.join(log.read_text()[-3000:] for _, log in again)
  assert f'resumed from step {newest} ' in out0 and f'done: {newest + 3} steps' in out0, out0[-3000:]
  assert 'is corrupt' not in out0
  assert _steps(checkpoints)[-1] == newest + 3


def test_a_hung_peer_stops_the_other_process_after_the_peer_timeout(tmp_path):
  """SIGSTOP process 1 (a hung host: its connection stays open, it just stops answering): process 0, blocked in a
  collective, gives up after --peer_timeout and not before, naming process 1."""
  timeout = 6
  procs = _start_two(tmp_path, 'hang', 1000, f'--peer_timeout={timeout}')
  try:
    _wait_for(tmp_path / 'run' / 'checkpoints' / '3', procs)
    (survivor, log), (victim, _) = procs
    victim.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
      code = survivor.wait(timeout=timeout + 30)
    except subprocess.TimeoutExpired:
      pytest.fail(f'process 0 still running {timeout + 30}s after process 1 hung:\n{log.read_text()[-3000:]}')
    took = time.monotonic() - t0
  finally:
    _kill(procs)
  text = log.read_text()
  print(f'\nsurvivor: exit {code} {took:.2f}s after the hang; {_errors(log)}')
  assert code == PEER_LOST_EXIT, text[-3000:]
  assert timeout - 1 <= took <= timeout + 5, took
  assert len(_errors(log)) == 1, text[-3000:]
  assert _errors(log)[0].startswith(f'error: process 1 of 2 stopped responding (no heartbeat for {timeout}s')
  assert not any(noise in text for noise in NOISE), text[-3000:]
