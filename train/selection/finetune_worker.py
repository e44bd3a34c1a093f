"""One evaluation of the fine-tuning selection (train/selection/finetune_search.py), in a process of its own so that
its peak memory is measured honestly: the parent reads the child's peak resident set (os.wait4's ru_maxrss), which
counts everything the evaluation held (Python, XLA, the loaded checkpoint, optimizer state, activations, the data).

The parent writes a spec (JSON) and starts `python -c 'from train.selection import finetune_worker; ...' SPEC`; the
child trains a fine-tuning run to its rung's step and scores its checkpoint on the dev file (or, for a zero-shot or
in-context candidate, scores the prompt at once), then writes the result beside the spec. Exit codes: 0 done, 143 the
run saved and stopped on SIGTERM (the same command resumes), 1 anything else (the traceback is in the log).
"""
from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import time

PREEMPTED = 143
COMMAND = 'from train.selection import finetune_worker as w; w.main()'


def _die_with_parent(parent: int) -> None:
  """SIGKILL this process when the selection that started it dies (a killed selection leaves no orphan training on
  in its run directory, which its restart would find locked)."""
  try:
    ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except OSError:  # not glibc Linux: an orphan finishes its evaluation and exits
    return
  if os.getppid() != parent:  # the parent died before prctl took effect
    os._exit(1)


def _timed_scoring(seconds: list) -> None:
  """Times the dev file's forward passes and scorer (train/tasks/scoring.score), without the checkpoint's loading, for
  the leaderboard's examples/s; the compilation of the forward is inside (one shape: the first batch compiles)."""
  from train.tasks import scoring  # pylint: disable=g-import-not-at-top
  score = scoring.score

  def timed(*args, **kwargs):
    t0 = time.perf_counter()
    out = score(*args, **kwargs)
    seconds.append(time.perf_counter() - t0)
    return out

  scoring.score = timed


def run(spec: dict) -> dict:
  """The evaluation `spec` describes -> its result (metrics, per-example correctness, phase seconds)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from train.core import evaluation  # pylint: disable=g-import-not-at-top
  from train.selection import search  # pylint: disable=g-import-not-at-top
  config = ml_collections.ConfigDict(spec['config'])
  run_dir, out = spec['run_dir'], os.path.join(spec['run_dir'], 'dev_eval')
  scoring_seconds, log = [], lambda m: print(m, flush=True)
  _timed_scoring(scoring_seconds)
  t0 = time.perf_counter()
  if spec['train']:
    search._train(config, run_dir, spec['log'])  # resumes from the run's checkpoint; Preempted on SIGTERM
    trained = time.perf_counter() - t0
    scores = evaluation.evaluate_run(run_dir, spec['dev'], out, step='latest', log=log)
  else:
    trained = 0.0
    os.makedirs(run_dir, exist_ok=True)
    scores = evaluation.evaluate_prompt(config.model.init_from, config, spec['dev'], out, log=log)
  result = dict(scores=scores, train_seconds=trained, score_seconds=sum(scoring_seconds),
                seconds=time.perf_counter() - t0)
  result.update(search.read_predictions(out))
  return result


def main() -> None:
  spec_path = sys.argv[1]
  with open(spec_path) as f:
    spec = json.load(f)
  _die_with_parent(int(spec['parent']))
  from train.core import host  # pylint: disable=g-import-not-at-top
  host.start_job()  # as the command-line jobs start, before JAX does (train/core/host.py)
  from train.selection import search  # pylint: disable=g-import-not-at-top
  try:
    result = run(spec)
  except search.Preempted as e:
    print(e, flush=True)
    sys.exit(PREEMPTED)
  tmp = spec['result'] + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(result, f)
  os.replace(tmp, spec['result'])
