"""The scaling sweep (`configs/select.py:mode=scaling`): one pre-training run per (model size, token budget), each
with its own schedule ending at its budget (as Hoffmann et al. train every point), then the fit of
train/selection/scaling.py with bootstrap intervals, its plot and the compute-optimal N and D for a target budget.

Each run resumes like any lmlab run, and a finished one is read back, so the same command after a kill goes on where
it stopped.
"""
from __future__ import annotations

import json
import os
import re
import time

from train.selection import scaling
from train.selection import search as search_lib


def sizes_of(config) -> list[dict]:
  """config.scaling.sizes ('2x64', ...: layers x d_model) -> model overrides (head width 32, d_ff 4 d_model)."""
  out = []
  for size in config.scaling.sizes:
    m = re.fullmatch(r'(\d+)x(\d+)', str(size))
    if not m or int(m.group(2)) % 32:
      raise ValueError(f'config.scaling.sizes: {size!r} is not LAYERSxD_MODEL with D_MODEL a multiple of 32, e.g. '
                       "'2x64'.")
    layers, d = int(m.group(1)), int(m.group(2))
    out.append(dict(num_layers=layers, d_model=d, num_heads=d // 32, d_ff=4 * d))
  if len(out) < 2 or len(config.scaling.tokens) < 2:
    raise ValueError('config.scaling: give at least 2 sizes and 2 token budgets (the fit has 5 parameters; 4 x 3 '
                     'points is a small sweep).')
  return out


def run(config, workdir: str, *, log=print) -> dict:
  """Trains the grid (sizes x tokens), fits, plots -> {'fit', 'paths', 'runs'}."""
  sc, p = config.scaling, config.pretrain
  tokens_per_step = int(p.batch_size) * int(p.seq_len)
  grid = [(o, int(t)) for o in sizes_of(config) for t in sc.tokens]
  runs, t0 = [], time.time()
  for i, (overrides, tokens) in enumerate(grid, 1):
    steps = max(1, round(tokens / tokens_per_step))
    cand = search_lib.Candidate(f'{overrides["num_layers"]}x{overrides["d_model"]}', sc.family, sc.arg, '', 'full',
                                0.0, {}, dict(sc.overrides, **overrides),
                                pretrain_learning_rate=float(sc.learning_rate))
    pc = search_lib.pretrain_config(config, cand, steps=steps, max_steps=steps)
    pc.train.eval_steps = int(sc.eval_steps)
    run_dir = os.path.join(workdir, 'scaling', f'{cand.name}-{tokens}')
    search_lib._train(pc, run_dir, os.path.join(workdir, 'logs', f'scaling-{cand.name}-{tokens}.log'))
    runs.append(run_dir)
    n, d, loss = scaling.points_from_runs([run_dir])
    log(f'[{i:>2}/{len(grid)}] {cand.name} on {tokens:.3g} tokens ({steps} steps): N {n[0]:.3g} non-embedding '
        f'params, eval loss {loss[0]:.4f} | {time.time() - t0:.0f} s elapsed')
  n, d, loss = scaling.points_from_runs(runs)
  fit = scaling.fit(n, d, loss, bootstrap=int(sc.bootstrap), seed=int(config.seed))
  paths = {'plot': os.path.join(workdir, 'scaling_fit.png'), 'summary': os.path.join(workdir, 'scaling.md'),
           'fit': os.path.join(workdir, 'scaling_fit.json')}
  scaling.plot(fit, n, d, loss, paths['plot'], budget=float(sc.target_flops))
  rows = '\n'.join(f'| {os.path.basename(r)} | {a:.4g} | {b:.4g} | {c:.4f} | {fit.predict(a, b):.4f} |'
                   for r, a, b, c in zip(runs, n, d, loss))
  text = (f'# Scaling sweep: {sc.family} with {", ".join(map(str, sc.sizes))} on '
          f'{", ".join(f"{t:.3g}" for t in sc.tokens)} tokens\n\n```\n{fit.summary(float(sc.target_flops))}\n```\n\n'
          '| run | N (non-embedding) | D (tokens) | eval loss | fitted |\n|---|---:|---:|---:|---:|\n' + rows + '\n')
  for key, body in (('summary', text), ('fit', json.dumps(fit.to_dict(), indent=2))):
    tmp = paths[key] + '.tmp'
    with open(tmp, 'w') as f:
      f.write(body)
    os.replace(tmp, paths[key])
  return {'fit': fit, 'paths': paths, 'runs': runs, 'points': (n, d, loss)}
