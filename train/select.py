"""Command line: `python -m train.select --config=configs/select.py[:args] --workdir=DIR [--config.key=value ...]`.

Plans the search within config.search.budget (printed before anything trains), pre-trains and fine-tunes the
candidates by successive halving on the dev metric, and writes the report into DIR: leaderboard.md / .csv, the plots
(metric_vs_compute.png, training_curves.png), TensorBoard hparams, and chosen.py, the chosen configuration as a config
file for train.main. The same command after a kill resumes (finished evaluations come back from DIR/select.db).
Flags and their mistakes behave as train.main's (`--print_config`, one-line `error:` with exit code 2).
"""
import os
import sys
import time

from absl import app
from absl import logging

from train.core import host
from train import main as cli


def describe(s) -> str:
  """The plan, in the lines people read before it runs."""
  plan, costs = s.plan, s.costs
  lines = [f'selection: {len(s.cands)} candidates for {s.config.task}, ranked by dev {s.config.metric}; plan '
           f'({plan.mode}): pre-training steps per rung {list(plan.rung_steps)}, candidates per rung '
           f'{list(plan.survivors)}, {plan.seeds} seeds at the last rung; worst case {plan.worst_case:.3g} of '
           f'{plan.budget:.3g} {s.config.search.budget_kind}']
  for cand in s.cands:
    pre = costs.pretrain[cand.name]
    what = f'pre-train {pre.summary()}' if pre else f'from {cand.init_from}'
    lines.append(f'  {cand.name:<14} {what}; fine-tune ({cand.strategy}) {costs.finetune[cand.name].summary()}')
  return '\n'.join(lines)


def scaling(config, workdir: str, *, log=print) -> dict:
  """mode=scaling: the sweep over config.scaling's sizes and token budgets, and its fit -> the sweep's result."""
  from train.selection import scaling_sweep, search
  host.use_compilation_cache(workdir)
  os.makedirs(workdir, exist_ok=True)
  search.check_same_config(workdir, config)
  return scaling_sweep.run(config, workdir, log=log)


def finetune(config, workdir: str, *, log=print):
  """mode=finetune: starting points x strategies within the budget -> (search, result, report paths, chosen, reason)."""
  from train.selection import finetune_report, finetune_search
  s = finetune_search.prepare(config, workdir, log=log)
  log(finetune_search.describe(s))
  result = finetune_search.run(s)
  paths, chosen, reason = finetune_report.write(s, result)
  return s, result, paths, chosen, reason


def select(config, workdir: str, *, log=print):
  """The whole job -> (search, result {'rungs', 'chosen', 'means'}, report paths)."""
  from train.selection import report, search
  host.use_compilation_cache(workdir)
  s = search.prepare(config, workdir, log=log)
  log(describe(s))
  result = search.run(s)
  paths = report.write(s, result)
  return s, result, paths


def main(argv):
  del argv
  if cli._PRINT_CONFIG.value:
    print('\n'.join(cli._config_lines(cli._CONFIG.value)))
    return
  from train.selection import search
  from train.core.workdir import WorkdirBusy, WorkdirLock
  t0 = time.time()
  config, workdir, log = cli._CONFIG.value, cli._WORKDIR.value, lambda m: print(m, flush=True)
  try:
    with WorkdirLock(workdir):
      if config.search.mode == 'scaling':
        out = scaling(config, workdir, log=log)
        print(out['fit'].summary(float(config.scaling.target_flops)))
        print(f'plot {out["paths"]["plot"]}, table {out["paths"]["summary"]} ({time.time() - t0:.0f} s)')
        return
      if config.search.mode == 'finetune':
        s, result, paths, chosen, reason = finetune(config, workdir, log=log)
        with open(paths['leaderboard']) as f:
          print('\n' + f.read())
        print(f'chosen: {chosen} ({time.time() - t0:.0f} s): {reason}; report in {workdir}: '
              + ', '.join(f'{k} {v}' for k, v in paths.items()))
        return
      s, result, paths = select(config, workdir, log=log)
  except (ValueError, FileNotFoundError, FloatingPointError, WorkdirBusy) as e:
    cli._fail(e)
  except search.Preempted as e:
    print(e, flush=True)
    sys.exit(143)
  with open(paths['leaderboard']) as f:
    print('\n' + f.read())
  print(f'chosen: {result["chosen"]} ({time.time() - t0:.0f} s); report in {s.workdir}: ' +
        ', '.join(f'{k} {v}' for k, v in paths.items()))


if __name__ == '__main__':
  host.start_job()  # the device pool, programs run inline, malloc tuned, before JAX starts (train/core/host.py)
  logging.set_verbosity(logging.WARNING)
  app.run(main, flags_parser=cli._parse_flags)
