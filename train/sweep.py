"""Seeds sweep: the same fine-tuning run once per seed, each scored on one file, reported as mean ± std.

Few-shot results (LM-BFF, Gao et al. 2021) move by several points with the draw of the k examples, so one number says
little; this command trains and scores one run per seed and tabulates them:

  python -m train.sweep --config=configs/finetune.py:task=sst2,strategy=full --workdir=W --seeds=13,21,42,87,100 \
      --eval_data=../shared/data/sst2/dev.tsv --config.data.train=../shared/data/sst2/train.tsv \
      --config.data.few_shot_k=16 [--config.<field>=<value> ...]

For each seed s it runs, as subprocesses (a crash or a leak in one seed cannot touch the next):

  python -m train.main --config=C --workdir=W/seed_s [the --config.* overrides] --config.data.few_shot_seed=s \
      --config.seed=s
  python -m train.evaluate --from=W/seed_s --data=EVAL --out=W/seed_s/eval --step=STEP

so the seed draws the few-shot subset and initializes, drops out and shuffles. Every `--config.<field>...` argument
(and `--noconfig.<field>`) is forwarded verbatim to train.main, unread here; a bad one is caught before any seed starts
by a `train.main --print_config` dry run, whose one `error:` line the sweep repeats with exit code 2. The children's
output goes to the console (prefixed by the seed) and to W/seed_s/sweep.log.

After every seed it rewrites W/results.md and W/results.csv: one row per finished seed (its metrics from
eval/metrics.json, the checkpoint step scored, wall seconds) and a mean ± std row (std over seeds with ddof=0, the
population std; the CSV has separate `mean` and `std` rows to stay numeric). Rerunning the same command after a kill
skips every seed whose eval/metrics.json exists and resumes a half-trained one from its last checkpoint (train.main
resumes a workdir); a resumed seed's wall seconds count only the invocation that finished it.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
from absl import flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FlagValues()  # our own, so importing this next to train.main (which owns --config) does not clash
flags.DEFINE_string('config', None, 'The run\'s config, as train.main takes it, e.g. configs/finetune.py:task=sst2.',
                    flag_values=FLAGS)
flags.DEFINE_string('workdir', None, 'Sweep folder: W/seed_<s> per seed, W/results.md and W/results.csv.',
                    flag_values=FLAGS)
flags.DEFINE_list('seeds', '13,21,42,87,100', 'Comma-separated seeds (LM-BFF\'s five by default).', flag_values=FLAGS)
flags.DEFINE_string('eval_data', None, 'The file every seed is scored on (train.evaluate --data).', flag_values=FLAGS)
flags.DEFINE_string('eval_step', 'best', "Which checkpoint train.evaluate scores: 'best', 'latest' or a step.",
                    flag_values=FLAGS)

_PER_SEED = ('seed', 'data.few_shot_seed')  # the fields the sweep sets; an override of them would undo the sweep
_ABOUT = ('step', 'examples', 'demonstrations', 'seconds')  # numbers in metrics.json that describe, not score
_SHOWN = ('objectives', 'finetune.strategy', 'data.train', 'data.few_shot_k', 'data.few_shot_dev_k', 'train.steps')


@dataclasses.dataclass
class Plan:
  config: str
  workdir: str
  seeds: list[int]
  eval_data: str
  eval_step: str
  overrides: list[str]
  command: str = ''  # the sweep's arguments, for the report
  shown: dict = dataclasses.field(default_factory=dict)  # a few resolved config fields for the report's header


class Failed(Exception):
  """A child command failed: the seed, its exit code and its last line."""


# ------------------------------------------------------------------------------------------------- flags


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(argv for our flags, the --config.<field> overrides to forward); `--config.x VALUE` keeps its VALUE."""
  own, overrides, i = [argv[0]], [], 1
  while i < len(argv):
    arg = argv[i]
    if re.match(r'^--?(no)?config\.', arg):
      overrides.append(arg)
      if '=' not in arg and i + 1 < len(argv) and not argv[i + 1].startswith('-'):
        overrides.append(argv[i + 1])  # we take no positional arguments, so a bare word is this flag's value
        i += 1
    else:
      own.append(arg)
    i += 1
  return own, overrides


def _seeds(values) -> list[int]:
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    raise ValueError(f'--seeds={",".join(values)}: give comma-separated integers, e.g. --seeds=13,21,42,87,100.') from None
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f'--seeds={",".join(values)}: give at least one seed, each once, e.g. --seeds=13,21,42.')
  return seeds


def parse(argv: list[str]) -> Plan:
  """argv -> Plan; a mistake is a ValueError (or flags.Error) saying which flag and the fix."""
  own, overrides = split_overrides(argv)
  FLAGS.unparse_flags()  # a second call in one process (tests, notebooks) starts from the defaults again
  rest = FLAGS(own)
  if len(rest) > 1:
    raise ValueError(f'unexpected argument(s) {rest[1:]}: every option is a flag, e.g. --seeds=13,21.')
  missing = [f'--{n}' for n in ('config', 'workdir', 'eval_data') if not FLAGS[n].value]
  if missing:
    raise ValueError(f'{" ".join(missing)} required: python -m train.sweep --config=C --workdir=W --seeds=13,21 '
                     '--eval_data=FILE [--config.<field>=<value> ...].')
  for arg in overrides:
    field = arg.split('=', 1)[0].split('.', 1)[-1]
    if field in _PER_SEED:
      raise ValueError(f'{arg}: the sweep sets config.{field} to each seed of --seeds; drop the override.')
  if not FLAGS.eval_data.startswith('tfds:') and not os.path.exists(FLAGS.eval_data):
    raise ValueError(f'--eval_data={FLAGS.eval_data} does not exist; give a file of the task (or tfds:NAME:SPLIT).')
  return Plan(FLAGS.config, FLAGS.workdir, _seeds(FLAGS.seeds), FLAGS.eval_data, FLAGS.eval_step, overrides,
              shlex.join(argv[1:]))


def _env() -> dict:
  """The children find the repository's packages from any working directory (data paths stay relative to it)."""
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  return env


def _train_cmd(plan: Plan, seed: int, *extra: str) -> list[str]:
  return [
      sys.executable, '-m', 'train.main', f'--config={plan.config}', f'--workdir={_seed_dir(plan, seed)}',
      *plan.overrides, f'--config.data.few_shot_seed={seed}', f'--config.seed={seed}', *extra
  ]


def check_config(plan: Plan) -> None:
  """A dry run of the first seed's train.main (--print_config): a bad config or override fails here, before any seed
  trains, with train.main's own one-line error; the resolved fields the report shows are read from its output."""
  proc = subprocess.run(_train_cmd(plan, plan.seeds[0], '--print_config'), env=_env(), capture_output=True, text=True)
  if proc.returncode:
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    errors = [l for l in lines if l.startswith('error:')]
    raise ValueError((errors or lines
                      or [f'train.main --print_config exited {proc.returncode}'])[-1].removeprefix('error: '))
  for line in proc.stdout.splitlines():
    name, sep, value = line.removeprefix('config.').partition(' = ')
    if sep and (name in _SHOWN or name.startswith('objectives.')):
      plan.shown[name] = value


# ------------------------------------------------------------------------------------------------- running


def _seed_dir(plan: Plan, seed: int) -> str:
  return os.path.join(plan.workdir, f'seed_{seed}')


def _metrics_path(plan: Plan, seed: int) -> str:
  return os.path.join(_seed_dir(plan, seed), 'eval', 'metrics.json')


_CHILD = []  # the running child, for the SIGTERM handler


def _forward_sigterm(signum, frame):
  del frame
  for child in _CHILD:
    child.send_signal(signum)  # train.main saves a checkpoint and exits 143; the loop then stops


def _call(cmd: list[str], log_path: str, prefix: str) -> None:
  """Runs cmd, its output to the console (prefixed) and appended to log_path; Failed when it exits non-zero."""
  last = ''
  with open(log_path, 'a') as log:
    log.write(f'$ {shlex.join(cmd)}\n')
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _CHILD.append(proc)
    try:
      for line in proc.stdout:
        log.write(line)
        log.flush()
        print(prefix + line, end='', flush=True)
        last = line.strip() or last
    finally:
      rc = proc.wait()
      _CHILD.remove(proc)
  if rc:
    raise Failed(rc, f'{cmd[2]} exited {rc}: {last.removeprefix("error: ")} (log: {log_path})')


def run_seed(plan: Plan, seed: int) -> float:
  """Trains (or resumes) and scores one seed -> its wall seconds; writes W/seed_s/wall.json beside the scores."""
  t0, where = time.time(), _seed_dir(plan, seed)
  os.makedirs(where, exist_ok=True)
  log, prefix = os.path.join(where, 'sweep.log'), f'  [seed {seed}] '
  _call(_train_cmd(plan, seed), log, prefix)
  _call([
      sys.executable, '-m', 'train.evaluate', f'--from={where}', f'--data={plan.eval_data}',
      f'--out={os.path.join(where, "eval")}', f'--step={plan.eval_step}'
  ], log, prefix)
  wall = time.time() - t0
  with open(os.path.join(where, 'wall.json'), 'w') as f:
    json.dump({'seed': seed, 'wall_s': round(wall, 1)}, f)
  return wall


def _wall(plan: Plan, seed: int) -> float:
  path = os.path.join(_seed_dir(plan, seed), 'wall.json')
  return _read_json(path)['wall_s'] if os.path.exists(path) else float('nan')


def _read_json(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def sweep(plan: Plan, log=print) -> list[dict]:
  """Every seed in turn (finished ones skipped), the report rewritten after each -> the rows."""
  t0, trained = time.time(), []
  todo = [s for s in plan.seeds if not os.path.exists(_metrics_path(plan, s))]
  for i, seed in enumerate(plan.seeds, 1):
    if seed not in todo:
      log(f'sweep: seed {seed} ({i}/{len(plan.seeds)}): {_metrics_path(plan, seed)} exists, skipped')
      continue
    log(f'sweep: seed {seed} ({i}/{len(plan.seeds)}): training {_seed_dir(plan, seed)}')
    trained.append(run_seed(plan, seed))
    write_report(plan)
    left = len(todo) - len(trained)
    log(f'sweep: seed {seed} ({i}/{len(plan.seeds)}) done in {trained[-1]:.0f} s: {_brief(_row(plan, seed))}; elapsed '
        f'{time.time() - t0:.0f} s, ETA {np.mean(trained) * left:.0f} s')
  rows = write_report(plan)
  log(f'sweep: {len(rows)} seeds, mean ± std (ddof=0): {_brief(summary(rows))}; wrote '
      f'{os.path.join(plan.workdir, "results.md")} and results.csv')
  return rows


# ------------------------------------------------------------------------------------------------- the report


def _row(plan: Plan, seed: int) -> dict:
  scores = _read_json(_metrics_path(plan, seed))
  metrics = {
      k: v
      for k, v in sorted(scores.items())
      if k not in _ABOUT and isinstance(v, (int, float)) and not isinstance(v, bool)
  }
  return {'seed': seed, **metrics, 'step': scores.get('step'), 'wall_s': _wall(plan, seed)}


def rows_of(plan: Plan) -> list[dict]:
  """One row per finished seed, in --seeds order."""
  return [_row(plan, s) for s in plan.seeds if os.path.exists(_metrics_path(plan, s))]


def _metric_names(rows: list[dict]) -> list[str]:
  return [k for k in rows[0] if k not in ('seed', 'step', 'wall_s')] if rows else []


def summary(rows: list[dict]) -> dict[str, tuple[float, float]]:
  """{metric: (mean, population std, ddof=0)} over the rows, wall_s last."""
  return {
      k: (float(np.mean([r[k] for r in rows])), float(np.std([r[k] for r in rows])))
      for k in _metric_names(rows) + ['wall_s']
  }


def _brief(row: dict) -> str:
  items = [(k, v) for k, v in row.items() if k not in ('seed', 'step', 'wall_s')]
  return ', '.join(f'{k} {v[0]:.4f} ± {v[1]:.4f}' if isinstance(v, tuple) else f'{k} {v:.4f}' for k, v in items)


def write_report(plan: Plan) -> list[dict]:
  """W/results.md and W/results.csv from the seeds finished so far -> their rows."""
  rows = rows_of(plan)
  if not rows:
    return rows
  names = _metric_names(rows)
  stats = summary(rows)
  _write_csv(os.path.join(plan.workdir, 'results.csv'), rows, names, stats)
  _write_atomic(os.path.join(plan.workdir, 'results.md'), _markdown(plan, rows, names, stats))
  return rows


def _write_atomic(path: str, text: str) -> None:
  with open(path + '.tmp', 'w') as f:
    f.write(text)
  os.replace(path + '.tmp', path)


def _write_csv(path: str, rows, names, stats) -> None:
  with open(path + '.tmp', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['seed', *names, 'step', 'wall_s'])
    for r in rows:
      writer.writerow([r['seed'], *(r[k] for k in names), r['step'], r['wall_s']])
    for label, j in (('mean', 0), ('std', 1)):
      writer.writerow([label, *(stats[k][j] for k in names), '', stats['wall_s'][j]])
  os.replace(path + '.tmp', path)


def _markdown(plan: Plan, rows, names, stats) -> str:
  head = ['seed', *names, 'step', 'wall s']
  lines = [
      '# Seeds sweep', '', f'`python -m train.sweep {plan.command}`', '',
      *(f'- config.{k} = {v}' for k, v in plan.shown.items()), f'- scored on {plan.eval_data} (checkpoint: '
      f'{plan.eval_step}); {len(rows)} of {len(plan.seeds)} seeds finished', '- std: population std over the seeds '
      '(ddof=0)', '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)
  ]
  for r in rows:
    lines.append(f'| {r["seed"]} | ' + ' | '.join(f'{r[k]:.4f}' for k in names) + f' | {r["step"]} | '
                 f'{r["wall_s"]:.0f} |')
  lines.append('| mean ± std | ' + ' | '.join(f'{stats[k][0]:.4f} ± {stats[k][1]:.4f}' for k in names)
               + f' | | {stats["wall_s"][0]:.0f} ± {stats["wall_s"][1]:.0f} |')
  return '\n'.join(lines) + '\n'


# --------------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
  try:
    plan = parse(list(sys.argv if argv is None else argv))
    check_config(plan)
  except (ValueError, flags.Error) as e:
    print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
    return 2
  os.makedirs(plan.workdir, exist_ok=True)
  signal.signal(signal.SIGTERM, _forward_sigterm)
  try:
    sweep(plan)
  except Failed as e:
    rc, message = e.args
    if rc == 2:  # the child's own one-line error: a config or data mistake, to fix before rerunning
      print(f'error: {message}', file=sys.stderr)
      return 2
    print(f'error: sweep stopped: {message}; rerun the same command to resume (finished seeds are skipped).',
          file=sys.stderr)
    return 143 if rc == 143 else 1
  except KeyboardInterrupt:
    print('error: sweep interrupted; rerun the same command to resume (finished seeds are skipped).', file=sys.stderr)
    return 130
  return 0


if __name__ == '__main__':
  sys.exit(main())
