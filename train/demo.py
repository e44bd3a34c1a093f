"""`make demo`: the whole mission on the embedded default (no files, no network), in minutes on a laptop CPU.

Pre-trains four tiny candidates on the embedded stdlib-docstring corpus (an encoder with MLM, an ELECTRA encoder with
replaced-token detection, a decoder with causal LM, an encoder-decoder with span corruption), fine-tunes each on the
embedded task (which package a docstring comes from, 8 classes), chooses one by successive halving within the budget,
prints the leaderboard and where the plots are, and shows the chosen model at work on dev docstrings. It is
`python -m train.select --config=configs/select.py:demo --workdir=workdir/demo`, plus the example at the end.
"""
import json
import os
import shutil
import sys
import time

from configs import select as select_configs
from train.core import evaluation
from train.core import host
from train import select

WORKDIR = os.path.join('workdir', 'demo')


def _examples(s, result, log) -> None:
  """The chosen model's predictions on a few dev docstrings, as `train.evaluate` writes them."""
  name = result['chosen']
  run = os.path.join(s.workdir, 'finetune', f'{name}-{s.plan.steps(len(s.plan.rung_steps) - 1, name)}-seed0')
  out = os.path.join(s.workdir, 'chosen_eval')
  scores = evaluation.evaluate_run(run, s.files[1], out, log=lambda *_: None)
  log(f'\nthe chosen model ({name}) at work, from {out}/predictions.jsonl (dev accuracy {scores["accuracy"]:.3f}):')
  with open(os.path.join(out, 'predictions.jsonl')) as f:
    first = {}  # the first dev docstring of each package, for variety
    for row in map(json.loads, f):
      first.setdefault(row.get('label', row.get('target')), row)
  rows = list(first.values())[:5]
  for row in rows:
    text = str(row.get('text_a') or row.get('source') or row.get('sentence') or '')[:70]
    gold, pred = row.get('label', row.get('target')), row.get('prediction')
    log(f'  {"ok  " if str(gold) == str(pred) else "miss"} {text!r:74} gold {gold!s:9} predicted {pred}')


def main():
  config = select_configs.get_config('demo')
  shutil.rmtree(WORKDIR, ignore_errors=True)  # the demo always starts fresh; `train.select` resumes
  t0 = time.time()
  s, result, paths = select.select(config, WORKDIR, log=lambda m: print(m, flush=True))
  with open(paths['leaderboard']) as f:
    print('\n' + f.read())
  print('plots:  ' + ', '.join(paths[k] for k in ('metric_vs_compute', 'training_curves')))
  print(f'chosen: {result["chosen"]}; its config {paths["chosen"]} runs as it is with '
        f'`python -m train.main --config={paths["chosen"]} --workdir=W`')
  _examples(s, result, print)
  print(f'\nwall time {time.time() - t0:.0f} s; everything is in {os.path.abspath(WORKDIR)}')
  return 0


if __name__ == '__main__':
  host.start_job()  # the device pool, programs run inline, malloc tuned, before JAX starts (train/core/host.py)
  sys.exit(main())
