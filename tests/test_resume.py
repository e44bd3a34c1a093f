"""Resumption is exact: a CLI run SIGKILLed after its step-N checkpoint and restarted with the same command ends with
the same parameters, optimizer state and metrics (bitwise, on CPU; the log window that straddles the resume included)
as a run of 2N steps that was never interrupted.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'tinyshakespeare' / 'input.txt'
N = 8
LOG = 3  # log windows of 3 steps: the one over steps 7-9 straddles the resume at step 8
TIMING = ('steps_per_sec', 'tokens_per_sec')

pytestmark = pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f'{SHAKESPEARE} is not here')


def _command(workdir):
  return [
      sys.executable, '-m', 'train.main', '--config=configs/gpt.py:runlocal', f'--workdir={workdir}',
      '--config.data.source=files', f'--config.data.path={SHAKESPEARE}', '--config.data.document_split=blank_line',
      '--config.data.seq_len=32', '--config.data.batch_size=8', '--config.data.vocab_size=500',
      '--config.data.tokenizer_train_records=1000', f'--config.train.steps={2 * N}',
      f'--config.optim.total_steps={2 * N}', f'--config.train.log_every={LOG}', f'--config.train.checkpoint_every={N}',
      '--config.train.eval_every=0', '--config.train.eval_steps=1', '--config.train.async_checkpoints=True'
  ]


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)  # one CPU device in every run, whatever the test session set
  return env


def _metrics(workdir):
  """{(step, split): record without timing fields}; fails on a duplicate line."""
  out = {}
  for line in (workdir / 'metrics.jsonl').read_text().splitlines():
    rec = json.loads(line)
    key = (rec['step'], rec['split'])
    assert key not in out, f'duplicate metrics line {key} in {workdir}'
    out[key] = {k: v for k, v in rec.items() if k not in TIMING}
  return out


def _final_state(workdir, step):
  path = workdir / 'checkpoints' / str(step)
  state = ocp.StandardCheckpointer().restore(path / 'state')
  loader = json.loads((path / 'loader' / 'metadata').read_text())
  return state, loader


def test_sigkill_after_checkpoint_then_restart_is_bitwise_equal(tmp_path):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'

  t0 = time.time()
  done = subprocess.run(_command(straight), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  t_straight = time.time() - t0

  # The same command, killed (SIGKILL: no handler, no clean-up) as soon as checkpoint N is finalized. Orbax renames a
  # step's temporary folder to its bare number only when the save is complete, and the save of step 2N cannot start
  # before that, so the kill lands while steps after N are running or being saved.
  proc = subprocess.Popen(_command(resumed), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt_n = resumed / 'checkpoints' / str(N)
  try:
    while proc.poll() is None and not ckpt_n.is_dir():
      time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL, f'the run ended (rc {proc.returncode}) before it could be killed'
  finished = sorted(p.name for p in (resumed / 'checkpoints').iterdir() if p.name.isdigit())
  assert finished == [str(N)], f'checkpoints after the kill: {finished}'
  logged = [
      json.loads(line)['step']
      for line in (resumed / 'metrics.jsonl').read_text().splitlines()
      if line.strip().endswith('}')
  ]
  print(f'\nkilled after step {max(logged)} (checkpoint {N} complete, {2 * N} steps asked)')

  t0 = time.time()
  again = subprocess.run(_command(resumed), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f'resumed from step {N}' in again.stdout, again.stdout
  print(f'straight run {t_straight:.1f} s, restarted run {time.time() - t0:.1f} s')

  # Metrics: every logged step, train and eval, the same numbers; the killed run's lines after N were replaced.
  a, b = _metrics(straight), _metrics(resumed)
  logged = sorted({*range(LOG, 2 * N + 1, LOG), 2 * N})
  assert sorted(a) == sorted(b) == sorted([(s, 'train') for s in logged] + [(2 * N, 'eval')])
  for key in sorted(a):
    assert a[key] == b[key], (key, a[key], b[key])
  print('logged losses:', [(s, a[(s, 'train')]['loss']) for s in logged])

  # Parameters, optimizer state, step, rng and the loader position: bitwise equal.
  (state_a, loader_a), (state_b, loader_b) = _final_state(straight, 2 * N), _final_state(resumed, 2 * N)
  assert loader_a == loader_b
  paths_a = jax.tree_util.tree_flatten_with_path(state_a)[0]
  paths_b = jax.tree_util.tree_flatten_with_path(state_b)[0]
  assert [p for p, _ in paths_a] == [p for p, _ in paths_b]
  assert int(np.asarray(state_a['step'])) == 2 * N
  for (path, x), (_, y) in zip(paths_a, paths_b):
    assert np.array_equal(np.asarray(x), np.asarray(y)), jax.tree_util.keystr(path)
  # And training really happened between N and 2N (the comparison is not of two untouched copies).
  state_n, _ = _final_state(resumed, N) if (resumed / 'checkpoints' / str(N)).is_dir() else (None, None)
  if state_n is not None:
    assert not all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(state_n['params']), jax.tree.leaves(state_b['params'])))
