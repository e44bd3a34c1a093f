"""Where a run's metrics go: metrics.jsonl (one JSON object per logged step, the record) and TensorBoard, on process 0.

A resumed run redoes the steps after its checkpoint, so the writer first drops the lines logged after that step (and
a line cut off by a kill), atomically, so that the file always reads as one uninterrupted run.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import jax


class MetricsWriter:
  """metrics.jsonl (one JSON object per logged step) and TensorBoard, on process 0 only."""

  def __init__(self, workdir: str, *, resume_step: int = 0):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.tb = None
    if not self.active:
      return
    self._truncate_after(resume_step)
    try:
      from tensorboardX import SummaryWriter
      self.tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:  # TensorBoard output is a convenience; metrics.jsonl is the record.
      self.tb = None

  def _truncate_after(self, step: int):
    """A resumed run redoes steps after its checkpoint: drop their lines (and a line cut by a kill) atomically."""
    if not os.path.exists(self.path):
      return
    kept = []
    with open(self.path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue
        if rec.get('step', 0) <= step:
          kept.append(json.dumps(rec))
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.write(''.join(k + '\n' for k in kept))
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, values: Mapping[str, float]):
    if not self.active:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), 'split': split, **values}) + '\n')
    if self.tb is not None:
      for k, v in values.items():
        self.tb.add_scalar(f'{split}/{k}', v, step)
      self.tb.flush()

  def close(self):
    if self.tb is not None:
      self.tb.close()
