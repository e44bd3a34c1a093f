"""XLA compile seconds and training speed of short runs, with the default XLA flags and with others, side by side in
one invocation (each run in its own process, flag sets alternating, the persistent compilation cache off), with the CPU
model beside them (benchmarks/machine.py).

The seconds are JAX's own ("Finished XLA compilation of <name> in <s>", JAX_LOG_COMPILES=1): their sum over the
run's programs, the count of programs and the largest one (the training step). steps/s is the run's last log line
(compile excluded).

  python benchmarks/compile_time.py [--runs=gpt,bert,minilm] [--flags='--xla_llvm_disable_expensive_passes=true']
      [--rounds=1]
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'benchmarks'))
import machine  # noqa: E402  (benchmarks/machine.py)

DATA = Path(os.environ.get('LMLAB_DATA', ROOT.parent / 'shared' / 'data'))
COMMON = ('--config.train.compilation_cache=false', '--config.train.log_every=5')


def _minilm() -> list[str]:
  sys.path.insert(0, str(ROOT))
  from train.core import pretrained  # pylint: disable=g-import-not-at-top
  return [
      '--config=configs/finetune.py:task=sst2,strategy=full', f'--config.model.init_from={pretrained.packaged("all-MiniLM-L6-v2")}',
      f'--config.data.train={DATA}/sst2/train.tsv', f'--config.data.dev={DATA}/sst2/dev.tsv', '--config.data.seq_len=64',
      '--config.data.batch_size=16', '--config.train.epochs=0', '--config.train.steps=20', '--config.train.eval_every=20',
      '--config.train.checkpoint_every=20', '--config.optim.warmup_steps=2'
  ]


RUNS = {
    'gpt': lambda: ['--config=configs/gpt.py:runlocal', '--config.train.steps=20'],
    'bert': lambda: ['--config=configs/bert.py:runlocal', '--config.train.steps=20'],
    'minilm': _minilm,
}
_COMPILED = re.compile(r'Finished XLA compilation of (\S+) in ([0-9.e+-]+) ?(ms|s|sec)')
_RATE = re.compile(r'step \d+/\d+ .* ([0-9.]+) steps/s')


def run_once(args: list[str], flags: str) -> dict[str, float]:
  env = dict(os.environ, JAX_LOG_COMPILES='1', JAX_PLATFORMS='cpu', XLA_FLAGS=flags)
  env.pop('JAX_COMPILATION_CACHE_DIR', None)
  with tempfile.TemporaryDirectory() as workdir:
    proc = subprocess.run([sys.executable, '-m', 'train.main', f'--workdir={workdir}/run', *args, *COMMON], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=1800, check=False)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  seconds = [float(v) / (1000 if unit == 'ms' else 1) for _, v, unit in _COMPILED.findall(proc.stderr + proc.stdout)]
  out = {'total': sum(seconds), 'programs': float(len(seconds)), 'largest': max(seconds, default=0.0)}
  rates = _RATE.findall(proc.stdout)
  out['steps/s'] = float(rates[-1]) if rates else float('nan')
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--runs', default='gpt,bert,minilm')
  p.add_argument('--flags', default='--xla_llvm_disable_expensive_passes=true')
  p.add_argument('--rounds', type=int, default=1)
  a = p.parse_args()
  print(machine.describe())
  flag_sets = {'default': os.environ.get('XLA_FLAGS', ''), 'with': a.flags}
  print(f'"with": XLA_FLAGS={a.flags!r}')
  print(f'{"run":8} {"flags":8} {"compile s":>10} {"programs":>8} {"largest s":>10} {"steps/s":>8}')
  for run in a.runs.split(','):
    args = RUNS[run]()
    got = {k: [] for k in flag_sets}
    for _ in range(a.rounds):
      for k, flags in flag_sets.items():
        got[k].append(run_once(args, flags))
    for k, rows in got.items():
      med = {m: statistics.median(r[m] for r in rows) for m in rows[0]}
      print(f'{run:8} {k:8} {med["total"]:10.2f} {med["programs"]:8.0f} {med["largest"]:10.2f} '
            f'{med["steps/s"]:8.2f}', flush=True)


if __name__ == '__main__':
  main()
