"""Choosing a starting point and a fine-tuning strategy for a task within a budget (configs/select.py:mode=finetune).

A candidate is a starting point (any checkpoint train/core/pretrained.py's load reads: a packaged name such as
all-MiniLM-L6-v2 or SmolLM2-135M-Instruct, an lmlab run, a Hugging Face or converted directory, a GGUF file) with a
strategy of configs/finetune.py (full, head, lora, soft_prompt, prompt+<one of them>), optionally few-shot
(few_shot_k records per class), or with no training at all: strategy 'prompt' alone is zero-shot, and with
demonstrations=k in-context k-shot (decoders); those cost inference only and are scored on the dev file at once.

The trained candidates go through successive halving over fine-tuning steps: at rung k seed 0's run trains on to
rung_steps[k] in its own run directory (its learning-rate schedule ends at the last rung, so a rung's model is the
same whether or not the search stopped there) and is scored on the dev file; the best 1/eta go on; the last rung's
survivors also train search.seeds - 1 more seeds from scratch (in-context candidates draw their demonstrations with
as many seeds). The plan is the longest last rung (up to finetune.steps) whose worst case fits the budget: every
inference-only evaluation, each rung's dearest survivors, every seed; it is printed before anything trains.

Every evaluation runs in a child process (train/selection/finetune_worker.py) whose peak resident memory the
leaderboard reports, and is kept in the optuna study of search.py (select.db) once finished, so a killed search
restarted with the same command reads those back, resumes the run in flight from its checkpoint and makes the same
choices. A 'seconds' budget is converted by the cost model and a calibration of this machine made once per workdir
(calibration.json), so a resumed search plans the same; the measured seconds are a hard limit as well: the search
stops, and reports what finished, before the evaluations it has recorded would run past the budget.

The candidates and the config each evaluation runs are train/selection/finetune_candidates.py's; their costs and the
plan are train/selection/finetune_plan.py's; this module runs the plan.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

from train.core import cost as cost_lib
from train.selection import finetune_worker
from train.selection import search
from train.selection.finetune_candidates import Candidate, Start, candidates_of, finetune_config, start_of
from train.selection.finetune_plan import Costs, Plan, costs_of, make_plan

CHOICES = ('best', 'cheapest_within')
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def describe(s: 'FtSearch') -> str:
  """The plan, in the lines people read before anything runs."""
  plan, costs, kind = s.plan, s.costs, s.config.search.budget_kind
  unit = 's' if kind == 'seconds' else 'FLOPs'
  lines = [f'selection (fine-tuning): {len(s.cands)} candidates for {s.config.task} ({costs.dev_records} dev records, '
           f'{len(costs.labels)} labels), ranked by dev {s.config.metric}; budget {plan.budget:.4g} {kind}']
  if plan.rung_steps:
    lines.append(f'  plan: successive halving of {len(plan.trained)} trained candidates over fine-tuning steps '
                 f'{list(plan.rung_steps)}, candidates per rung {list(plan.survivors)}, {plan.seeds} seed(s) at the '
                 f'last rung')
  if plan.inference:
    lines.append(f'  scored at once, without training: {", ".join(plan.inference)}')
  how = (f'; seconds = FLOPs / ({costs.flops_per_sec:.3g} FLOP/s calibrated x {s.config.search.mfu:g} mfu) + '
         f'{costs.overhead:g} s per evaluation' if kind == 'seconds' else '')
  lines.append(f'  worst case {plan.worst_case:.4g} of {plan.budget:.4g} {kind} in {plan.evaluations(s.cands)} '
               f'evaluations{how}')
  for cand in s.cands:
    c = costs.train[cand.name] or costs.infer[cand.name]
    step = f'{costs.per_step[cand.name]:.3g} {unit}/step, ' if cand.trains else ''
    rows = f' ({costs.groups[cand.name]} rows/example)' if costs.groups[cand.name] > 1 else ''
    trainable = cost_lib._count(c.trainable_params if cand.trains else 0)
    lines.append(f'  {cand.name:<20} {cand.init_from if not os.path.isabs(cand.init_from) else cand.path} '
                 f'{cand.method}: {cost_lib._count(c.params)} params, {trainable} trainable, '
                 f'~{c.bytes["total"] / cost_lib.MiB:.0f} MiB; {step}dev pass {costs.per_score[cand.name]:.3g} '
                 f'{unit}{rows}')
  return '\n'.join(lines)


# ---- running the search --------------------------------------------------------------------------------------------


class BudgetSpent(Exception):
  """The measured seconds reached a seconds budget: the search stops and reports what finished."""


@dataclasses.dataclass
class FtSearch:
  """What one fine-tuning selection holds while it runs."""
  config: Any
  workdir: str
  cands: list[Candidate]
  starts: dict[str, Start]
  costs: Costs
  plan: Plan
  study: search.Study
  files: tuple[str, str]
  log: Callable = print
  started: float = dataclasses.field(default_factory=time.time)

  def cand(self, name: str) -> Candidate:
    return next(c for c in self.cands if c.name == name)

  def run_dir(self, name: str, seed: int) -> str:
    return os.path.join(self.workdir, 'finetune', f'{name}-seed{seed}')

  def spent(self) -> dict[str, float]:
    """What the finished evaluations cost: budget units by the cost model, and measured seconds (with those of an
    evaluation the seconds budget stopped, kept in budget.json)."""
    done = self.study.done.values()
    return {'units': sum(e.get('charged', 0.0) for e in done),
            'seconds': sum(e.get('seconds', 0.0) for e in done) + _stopped(self.workdir).get('seconds', 0.0)}


def _stopped(workdir: str) -> dict:
  path = os.path.join(workdir, 'budget.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _child_env(workdir: str) -> dict:
  """The evaluations share one compilation cache in the workdir (unless the user set one): the later rungs and seeds
  of a candidate compile the same programs."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.abspath(workdir), 'jax_cache'))
  env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  return env


def run_child(spec: dict, log_path: str, timeout: Optional[float], workdir: str) -> tuple[Optional[int], float, float]:
  """Runs finetune_worker on `spec` -> (exit code, or None when `timeout` seconds passed and it was killed; its peak
  resident memory in bytes, os.wait4's ru_maxrss of that process alone; wall seconds). SIGTERM to this process is
  passed on (the child saves its checkpoint and exits 143); Ctrl-C reaches the child from the terminal itself."""
  spec_path = os.path.join(os.path.dirname(log_path), os.path.basename(log_path)[:-4] + '.spec.json')
  with open(spec_path, 'w') as f:
    json.dump(dict(spec, parent=os.getpid()), f)
  t0 = time.time()
  with open(log_path, 'a') as out:
    proc = subprocess.Popen([sys.executable, '-c', finetune_worker.COMMAND, spec_path], stdout=out,
                            stderr=subprocess.STDOUT, env=_child_env(workdir))
  main = threading.current_thread() is threading.main_thread()
  termed = []

  def forward(*_):
    termed.append(True)
    proc.send_signal(signal.SIGTERM)

  before = signal.signal(signal.SIGTERM, forward) if main else None
  try:
    while True:
      try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save and stop first
        os.wait4(proc.pid, 0)
        raise
      if pid:
        break
      if timeout is not None and time.time() - t0 > timeout:
        proc.kill()
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = -signal.SIGKILL
        return None, usage.ru_maxrss * 1024.0, time.time() - t0
      time.sleep(0.2)
  finally:
    if main:
      signal.signal(signal.SIGTERM, before)
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
  if termed:  # whatever the child did with it (a training run saved; a scoring one just ended): nothing is recorded
    raise search.Preempted(f'SIGTERM: the evaluation in flight stopped ({os.path.basename(log_path)[:-4]}, exit '
                           f'{proc.returncode}); rerun the same command to resume the selection.')
  return proc.returncode, usage.ru_maxrss * 1024.0, time.time() - t0


def _charge(s: FtSearch, cand: Candidate, steps: int, seed: int, rung: int) -> tuple[float, float]:
  """(budget units, FLOPs) an evaluation costs by the cost model: the training steps it adds (seed 0 continues the
  previous rung's run) and one dev pass, with a seconds budget's start-up."""
  new = steps - (s.plan.rung_steps[rung - 1] if rung and seed == 0 else 0)
  train = s.costs.train[cand.name]
  flops = (train.flops_per_step * new if train else 0.0) + s.costs.score_flops[cand.name]
  return s.costs.per_step[cand.name] * new + s.costs.per_score[cand.name] + s.costs.overhead, flops


def _failure(log_path: str, rc) -> str:
  """The last line of a failed evaluation's log that says what went wrong."""
  try:
    with open(log_path) as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    lines = []
  said = [line for line in lines if 'Error' in line or line.startswith('error')]
  return f'exit {rc}: ' + ((said or lines or ['no output'])[-1])[:300]


def evaluate(s: FtSearch, cand: Candidate, steps: int, seed: int, *, rung: int) -> dict:
  """One evaluation (read back from the study when it is there): train seed `seed` on to `steps` and score the
  checkpoint on the dev file, or score the prompt (steps 0) -> its record."""
  done = s.study.get(cand.name, steps, seed)
  if done is not None:
    return done
  budget_left = None
  if s.config.search.budget_kind == 'seconds':
    budget_left = s.plan.budget - s.spent()['seconds']
    if budget_left <= 0:
      raise BudgetSpent(f'the measured seconds of the finished evaluations reached the budget {s.plan.budget:g} s')
  run_dir = s.run_dir(cand.name, seed)
  fc = finetune_config(s.config, cand, arch=s.starts[cand.name].cfg.arch, seed=seed, steps=steps,
                       max_steps=s.plan.max_steps, save_every=s.plan.rung_steps[0] if s.plan.rung_steps else 1,
                       labels=s.costs.labels, train_file=s.files[0])
  if not cand.trains:  # what `python -m train.evaluate --from=<run_dir>` scores: the prompt, from its checkpoint
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, 'config.json'), {'config': json.loads(fc.to_json_best_effort())})
  logs = os.path.join(s.workdir, 'logs')
  os.makedirs(logs, exist_ok=True)
  log_path = os.path.join(logs, f'{cand.name}-{steps}-seed{seed}.log')
  result_path = log_path[:-4] + '.result.json'
  spec = dict(config=json.loads(fc.to_json_best_effort()), train=cand.trains, run_dir=run_dir, dev=s.files[1],
              log=log_path, result=result_path)
  rc, peak, wall = run_child(spec, log_path, budget_left, s.workdir)
  if rc is None:
    _write_json(os.path.join(s.workdir, 'budget.json'), {'seconds': _stopped(s.workdir).get('seconds', 0.0) + wall,
                                                          'stopped': f'{cand.name} {steps} steps seed {seed}'})
    raise BudgetSpent(f'{cand.name} ({steps} steps, seed {seed}) was stopped after {wall:.0f} s: the measured seconds '
                      f'reached the budget {s.plan.budget:g} s')
  if rc == finetune_worker.PREEMPTED:
    raise search.Preempted(f'SIGTERM: {run_dir} saved its checkpoint; rerun the same command to resume the selection.')
  charged, flops = _charge(s, cand, steps, seed, rung)
  attrs = dict(rung=rung, charged=charged, flops=flops, seconds=wall, peak_rss=peak, run_dir=run_dir, failed='')
  if rc != 0:
    attrs['failed'] = _failure(log_path, rc)
    s.study.add(cand.name, steps, seed, 0.0, attrs)
    return dict(attrs, value=0.0)
  with open(result_path) as f:
    result = json.load(f)
  metric = s.config.metric.split('/')[-1]
  if metric not in result['scores']:
    raise ValueError(f'config.metric={s.config.metric!r}: the task reports {sorted(result["scores"])}; name one of '
                     'them (eval/<name>).')
  attrs.update({k: result[k] for k in ('train_seconds', 'score_seconds', 'correct', 'majority', 'majority_label')})
  s.study.add(cand.name, steps, seed, float(result['scores'][metric]), attrs)
  return dict(attrs, value=float(result['scores'][metric]))


def _write_json(path: str, value) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)


def _progress(s: FtSearch, done: int, total: int, cand: Candidate, steps: int, seed: int, e: dict) -> None:
  metric = s.config.metric.split('/')[-1]
  what = f'{steps} steps' if cand.trains else cand.method
  outcome = f'failed ({e["failed"]})' if e.get('failed') else f'{metric} {e["value"]:.4f}'
  spent = s.spent()
  s.log(f'[{done:>{len(str(total))}}/{total}] {cand.name} {what}, seed {seed}: {outcome} ({e["seconds"]:.0f} s, peak '
        f'{e["peak_rss"] / 2**20:.0f} MiB) | spent {spent["units"]:.4g} of {s.plan.budget:.4g} '
        f'{s.config.search.budget_kind} (measured {spent["seconds"]:.0f} s), {time.time() - s.started:.0f} s elapsed')


def _ranked(s: FtSearch, names: list[str], steps: int) -> list[str]:
  """Best first by seed 0's dev metric at `steps` (a failed evaluation last); ties go to the cheaper, then by name."""
  def key(n):
    e = s.study.get(n, steps, 0)
    return bool(e.get('failed')), -e['value'], s.costs.model_cost(n, steps), n
  return sorted(names, key=key)


def run(s: FtSearch) -> dict[str, Any]:
  """Inference-only candidates, then successive halving of the trained ones -> {'rungs': [[names], ...],
  'stopped': why the search ended early ('' when it did not)}."""
  plan, done, total = s.plan, 0, s.plan.evaluations(s.cands)
  rungs: list[list[str]] = []

  def one(cand, steps, seed, rung):
    nonlocal done
    e = evaluate(s, cand, steps, seed, rung=rung)
    done += 1
    _progress(s, done, total, cand, steps, seed, e)

  try:
    for name in plan.inference:
      for seed in range(s.cand(name).seeds(plan.seeds)):
        one(s.cand(name), 0, seed, 0)
    alive = list(plan.trained)
    for rung, steps in enumerate(plan.rung_steps):
      last = rung == len(plan.rung_steps) - 1
      alive = alive[:plan.survivors[rung]]
      rungs.append(list(alive))
      for name in alive:
        for seed in range(plan.seeds if last else 1):
          one(s.cand(name), steps, seed, rung)
      alive = _ranked(s, alive, steps)
  except BudgetSpent as e:
    s.log(f'stopped: {e}; the report covers the evaluations that finished')
    return {'rungs': rungs, 'stopped': str(e)}
  return {'rungs': rungs, 'stopped': ''}


def prepare(config, workdir: str, *, log=print) -> FtSearch:
  """Everything checked and planned before anything trains: candidates, starting points, data, costs, the plan."""
  cands = candidates_of(config)
  os.makedirs(workdir, exist_ok=True)
  search.check_same_config(workdir, config)
  files = search.data_files(config, workdir)
  if not files[1]:
    raise ValueError('config.data.dev is empty: the selection scores every candidate on a dev file; give one.')
  if config.search.choose not in CHOICES:
    raise ValueError(f'config.search.choose={config.search.choose!r}: use one of {", ".join(CHOICES)}.')
  starts = {c.name: start_of(c.path, workdir) for c in cands}
  costs = costs_of(config, cands, starts, files, workdir)
  plan = make_plan(config, cands, costs)
  return FtSearch(config, workdir, cands, starts, costs, plan, search.Study(workdir, [c.name for c in cands]), files,
                  log)
