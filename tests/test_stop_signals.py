"""Stopping a run as a user or a scheduler does it: SIGTERM (preemption) and Ctrl-C (SIGINT), sent for real to a real
`python -m train.main`. In the loop the run saves within two steps of the signal, says so in one line and exits 143
(SIGTERM) or 130 (Ctrl-C); a second Ctrl-C exits at once without saving; during start-up, or after the final save, it
says in one line that nothing was lost and exits with the same codes, never killed by the signal itself.

The loop tests train a model whose step takes a few tenths of a second on a CPU, so that the loop could run many
steps ahead of the device (it dispatches asynchronously) and a signal that waited for them would show."""
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# gpt2-tiny at d_model 512: about 0.4 s a step on one CPU core, compiled in a few seconds.
SLOW = ('--config=configs/gpt.py:runlocal', '--config.model.overrides.d_model=512',
        '--config.model.overrides.num_heads=8', '--config.model.overrides.d_ff=2048', '--config.train.steps=1000',
        '--config.train.log_every=10', '--config.train.checkpoint_every=1000', '--config.train.eval_every=0',
        '--config.train.eval_steps=0')
CODES = {signal.SIGTERM: (143, 'SIGTERM'), signal.SIGINT: (130, 'Ctrl-C')}


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO), PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)
  return env


def _start(workdir, *args, command=None):
  return subprocess.Popen(command or [sys.executable, '-m', 'train.main', f'--workdir={workdir}', *args], cwd=REPO,
                          env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_line(proc, pattern: str, lines: list) -> re.Match:
  for line in proc.stdout:
    lines.append(line.rstrip('\n'))
    m = re.match(pattern, line)
    if m:
      return m
  proc.wait()
  raise AssertionError(f'no line matching {pattern!r}; rc {proc.returncode}, output:\n' + '\n'.join(lines)
                       + proc.stderr.read())


def _finish(proc, lines: list, timeout: float = 60):
  out, err = proc.communicate(timeout=timeout)
  lines += out.splitlines()
  return lines, err


def _press_until_gone(proc, stop, every: float = 0.05):
  while not stop.wait(every) and proc.poll() is None:
    try:
      proc.send_signal(signal.SIGINT)
    except ProcessLookupError:
      return


def _checkpoints(workdir: Path) -> list[int]:
  d = workdir / 'checkpoints'
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['sigterm', 'ctrl_c'])
def test_a_signal_in_the_loop_saves_within_two_steps_and_exits_with_its_code(signum, tmp_path):
  code, name = CODES[signum]
  workdir = tmp_path / 'run'
  proc, lines = _start(workdir, *SLOW), []
  try:
    m = _wait_for_line(proc, r'step 20/1000 .* ([\d.]+) steps/s', lines)
    t_line = time.time()
    # A signal lands mid-step: a little after the log line, by which time a loop free to run ahead has dispatched
    # every step up to the next log step.
    time.sleep(0.3)
    proc.send_signal(signum)
    t_signal = time.time()
    lines, err = _finish(proc, lines)
  finally:
    proc.kill()
  t_exit = time.time()
  rate = float(m.group(1))
  at_signal = 20 + math.ceil((t_signal - t_line) * rate)  # the step in flight when the signal came (+1: rounding)
  print(f'\n{name}: rc {proc.returncode}, {rate:.2f} steps/s, step ~{at_signal} at the signal, '
        f'{t_exit - t_signal:.1f} s to exit; output tail: {lines[-2:]}, stderr: {err.strip()[-300:]}')
  assert proc.returncode == code, (proc.returncode, err[-3000:])
  assert 'Traceback' not in err and not err.strip(), err[-3000:]
  saved = [line for line in lines if line.startswith(f'{name}: saved step')]
  assert len(saved) == 1, lines[-5:]
  step = int(re.match(rf'{name}: saved step (\d+)', saved[0]).group(1))
  assert _checkpoints(workdir) == [step]
  assert 20 < step <= at_signal + 2 + 1, (step, at_signal)  # within two steps (+1 for the estimate of the step)


def test_a_second_ctrl_c_exits_at_once_without_saving(tmp_path):
  workdir = tmp_path / 'run'
  proc, lines, stop = _start(workdir, *SLOW), [], threading.Event()
  try:
    _wait_for_line(proc, r'step 20/1000 ', lines)
    time.sleep(0.3)  # mid-step, as in the test above: the first Ctrl-C's save waits for the step in flight
    proc.send_signal(signal.SIGINT)
    t_signal = time.time()
    # Two signals that arrive while the main thread is inside one C call (the step in flight, longer on a loaded
    # machine) reach Python's handler once, as two quick key presses do: press again until the run has gone.
    again = threading.Thread(target=_press_until_gone, args=(proc, stop), daemon=True)
    again.start()
    lines, err = _finish(proc, lines)
  finally:
    stop.set()
    proc.kill()
  print(f'\ntwice: rc {proc.returncode} after {time.time() - t_signal:.1f} s; {lines[-1:]}, {err.strip()[-300:]}')
  assert proc.returncode == 130 and 'Traceback' not in err, (proc.returncode, err[-3000:])
  said = [line for line in lines + err.splitlines() if 'Ctrl-C' in line]
  assert len(said) == 1 and 'without saving' in said[0], said
  assert _checkpoints(workdir) == []  # the first Ctrl-C's save never happened


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT], ids=['sigterm', 'ctrl_c'])
def test_a_signal_during_start_up_is_one_line_and_leaves_the_workdir_as_it_was(signum, tmp_path):
  code, name = CODES[signum]
  workdir = tmp_path / 'run'
  proc = _start(workdir, '--config=configs/gpt.py:runlocal')
  try:
    deadline = time.time() + 120
    while not (workdir / '.lock').exists():  # the run holds its workdir: it is preparing data and the model
      assert proc.poll() is None and time.time() < deadline, proc.communicate()
      time.sleep(0.02)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
  finally:
    proc.kill()
  print(f'\n{name} at start-up: rc {proc.returncode}, stdout {out.strip()[-300:]!r}, stderr {err.strip()[-300:]!r}')
  assert proc.returncode == code, (proc.returncode, err[-3000:])
  said = [line for line in (out + err).splitlines() if name in line]
  assert len(said) == 1 and 'nothing was lost' in said[0], (out, err)
  assert 'Traceback' not in err
  assert not workdir.exists() or not any(workdir.iterdir()), sorted(p.name for p in workdir.iterdir())


def test_sigterm_just_after_the_final_save_says_nothing_was_lost(tmp_path):
  # The signal comes while the run closes its checkpoints after the loop (the final save in flight): sent from inside
  # Checkpoints.close, the one moment no real sender can aim at.
  workdir = tmp_path / 'run'
  patch = ('import os, runpy, signal, sys\n'
           'from train.core import checkpoint\n'
           'close = checkpoint.Checkpoints.close\n'
           'def closing(self):\n'
           '  os.kill(os.getpid(), signal.SIGTERM)\n'
           '  close(self)\n'
           'checkpoint.Checkpoints.close = closing\n'
           'sys.argv = ["train.main"] + sys.argv[1:]\n'
           'runpy.run_module("train.main", run_name="__main__", alter_sys=True)\n')
  args = (f'--workdir={workdir}', '--config=configs/gpt.py:runlocal', '--config.train.steps=4',
          '--config.optim.warmup_steps=1', '--config.train.checkpoint_every=2', '--config.train.log_every=2')
  proc = _start(workdir, command=[sys.executable, '-c', patch, *args])
  out, err = proc.communicate(timeout=300)
  print(f'\nafter the final save: rc {proc.returncode}, stdout tail {out.strip()[-300:]!r}, stderr {err[-300:]!r}')
  assert proc.returncode == 143, (proc.returncode, err[-3000:])
  said = [line for line in (out + err).splitlines() if 'SIGTERM' in line]
  assert len(said) == 1 and 'nothing was lost' in said[0] and 'step 4' in said[0], said
  assert _checkpoints(workdir) == [2, 4] and (workdir / 'checkpoints' / '4' / 'lmlab_digest.json').exists()
