"""Kill campaign: one training command SIGKILLed at random moments (before, during and after its asynchronous saves),
each time restarted with the same command until it finishes, against the same command never interrupted. Prints, per
trial, when the kill landed and whether the finished run's final parameters, optimizer state and metrics.jsonl (timing
fields aside) equal the uninterrupted run's; then k/N. Asserts nothing.

  python benchmarks/kill_campaign.py --trials=10
  python benchmarks/kill_campaign.py --trials=3 --kills=3 --steps=40     # several kills per trial
"""
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import app
from absl import flags
from absl import logging

_ROOT = Path(__file__).resolve().parents[1]
_TRIALS = flags.DEFINE_integer('trials', 10, 'Runs to kill (each restarted until it finishes).')
_KILLS = flags.DEFINE_integer('kills', 1, 'SIGKILLs per trial, each at a random moment of the restarted run.')
_STEPS = flags.DEFINE_integer('steps', 24, 'Train steps of the command.')
_SEED = flags.DEFINE_integer('seed', 0, 'Seed of the kill moments.')
_TIMING = ('steps_per_sec', 'tokens_per_sec')


def _command(workdir: Path) -> list[str]:
  steps = _STEPS.value
  return [
      sys.executable, '-m', 'train.main', '--config=configs/gpt.py:runlocal', f'--workdir={workdir}',
      f'--config.train.steps={steps}', '--config.train.checkpoint_every=2', '--config.train.log_every=3',
      f'--config.train.eval_every={steps // 2}', '--config.train.async_checkpoints=True'
  ]


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return env


def _first_save(workdir: Path) -> bool:
  d = workdir / 'checkpoints'
  return d.is_dir() and any(p.name.isdigit() or 'tmp' in p.name for p in d.iterdir())


def _run(workdir: Path, kill_after: float = None) -> tuple[int, float]:
  """Runs the command; with kill_after >= 0, SIGKILLs it that many seconds after its first checkpoint save began;
  with kill_after < 0, that many seconds after start if no save began by then. -> (return code, seconds)."""
  t0 = time.time()
  proc = subprocess.Popen(_command(workdir), cwd=_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  if kill_after is not None:
    t_save = None
    while proc.poll() is None and t_save is None and (kill_after >= 0 or time.time() - t0 < -kill_after):
      t_save = time.time() if _first_save(workdir) else None
      time.sleep(0.005)
    deadline = (t_save if kill_after >= 0 and t_save else t0) + abs(kill_after)
    while proc.poll() is None and time.time() < deadline:
      time.sleep(0.005)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
  _, err = proc.communicate()
  if proc.returncode not in (0, -signal.SIGKILL):
    print(f'  run failed (rc {proc.returncode}): {err.strip().splitlines()[-1:]}')
  return proc.returncode, time.time() - t0


def _metrics(workdir: Path) -> list[dict]:
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  return [{k: v for k, v in r.items() if k not in _TIMING} for r in rows]


def _final_state(workdir: Path):
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(workdir / 'checkpoints' / str(_STEPS.value) / 'state')


def _same_state(a, b) -> bool:
  import jax
  import numpy as np
  la, lb = jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_flatten_with_path(b)[0]
  return [p for p, _ in la] == [p for p, _ in lb] and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(la, lb))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax's restore chatter
  rng = random.Random(_SEED.value)
  base = Path(tempfile.mkdtemp(prefix='lmlab-kills-'))
  ref_dir = base / 'uninterrupted'
  rc, ref_seconds = _run(ref_dir)
  assert rc == 0, 'the uninterrupted run failed'
  ref_state, ref_metrics = _final_state(ref_dir), _metrics(ref_dir)
  saves = [p.stat().st_mtime for p in (ref_dir / 'checkpoints').iterdir()]
  span = max(saves) - min(saves)
  print(f'uninterrupted: {_STEPS.value} steps in {ref_seconds:.1f} s, {span:.1f} s between its first and last '
        f'saves; {len(ref_metrics)} metrics lines; in {base}')
  good = 0
  for trial in range(_TRIALS.value):
    workdir = base / f'trial{trial}'
    moments = []
    for _ in range(_KILLS.value):
      # Mostly while the saves happen (first save to a second past the last), sometimes before any save began.
      at = rng.uniform(0.0, span + 1.0) if rng.random() < 0.8 else -rng.uniform(1.0, ref_seconds)
      rc, _ = _run(workdir, kill_after=at)
      ckpts = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) if (
          workdir / 'checkpoints').is_dir() else []
      when = f'{at:.2f} s after the first save' if at >= 0 else f'{-at:.1f} s after start'
      moments.append(f'{when} ({"killed" if rc == -signal.SIGKILL else "finished"}, checkpoints {ckpts})')
    restarts = 0
    while restarts < 3:
      rc, _ = _run(workdir)
      restarts += 1
      if rc == 0:
        break
    equal_state = rc == 0 and _same_state(_final_state(workdir), ref_state)
    equal_metrics = rc == 0 and _metrics(workdir) == ref_metrics
    good += equal_state and equal_metrics
    print(f'trial {trial}: kill at {", ".join(moments)}; restarted x{restarts}: params/optimizer '
          f'{"equal" if equal_state else "DIFFERENT"}, metrics.jsonl {"equal" if equal_metrics else "DIFFERENT"}')
  print(f'{good}/{_TRIALS.value} killed runs finished with the uninterrupted run\'s state and metrics')


if __name__ == '__main__':
  app.run(main)
