"""Full-state checkpoints with orbax: params, optimizer state, step, rng, the data loader's state and the config.

One `Checkpoints` object wraps an orbax CheckpointManager under `<workdir>/checkpoints`: asynchronous saves, keep the
latest N (or the best N by an eval metric), and restore onto whatever shardings the caller asks for, so a run trained on
a (2,2,2) mesh resumes on 8x1x1 or on one device. Orbax writes each step to a temporary folder and renames it when
complete, so a kill mid-save leaves the previous checkpoints intact and the half-written one invisible.
"""
from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import jax
import orbax.checkpoint as ocp


class Checkpoints:
  """Save and restore {'state': pytree, 'loader': json, 'config': json, 'window': json} at integer steps; 'window'
  holds the per-step metrics logged since the last log step, so a resumed run logs the numbers an uninterrupted one
  does (checkpoints written before it existed restore with an empty window)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, best_metric: Optional[str] = None, best_mode: str = 'min',
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save,
                                           best_fn=(lambda m: m[best_metric]) if best_metric else None,
                                           best_mode=best_mode, keep_checkpoints_without_metrics=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'loader', 'config', 'window'))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def best_step(self) -> Optional[int]:
    """The step with the best saved metric (config.train.best_metric), or None when none was saved with one."""
    return self.manager.best_step()

  def save(self, step: int, state, *, loader_state: Mapping[str, Any], config: Mapping[str, Any],
           metrics: Optional[Mapping[str, float]] = None, window: Sequence[Mapping[str, float]] = (),
           force: bool = True) -> bool:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(dict(loader_state)),
                              config=ocp.args.JsonSave(dict(config)),
                              window=ocp.args.JsonSave({'steps': [dict(m) for m in window]}))
    return self.manager.save(step, args=args, metrics=dict(metrics) if metrics else None, force=force)

  def restore(self, abstract_state, step: Optional[int] = None):
    """-> (state laid out as abstract_state's shardings, loader_state, config). abstract_state: ShapeDtypeStructs."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore(),
                                      config=ocp.args.JsonRestore()))
    return out['state'], out['loader'], out['config']

  def window(self, step: int) -> list[dict[str, float]]:
    """The per-step metrics saved with `step` since its last log step ([] for checkpoints without them)."""
    if not os.path.isdir(os.path.join(self.directory, str(step), 'window')):
      return []
    return list(self.manager.restore(step, args=ocp.args.Composite(window=ocp.args.JsonRestore()))['window']['steps'])

  def restore_params(self, abstract_params, step: Optional[int] = None):
    """Only the params (for fine-tuning or evaluation from a pre-training run), onto abstract_params' shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    restore_args = jax.tree.map(
        lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape, dtype=x.dtype), abstract_params)
    # A partial restore: only the 'params' subtree of the saved state is read.
    out = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={'params': abstract_params}, restore_args={'params': restore_args}, partial_restore=True)))
    return out['state']['params']

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()
