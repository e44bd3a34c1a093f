"""Full-state checkpoints with orbax: params, optimizer state, step, rng, the data loader's state and the config.

One `Checkpoints` object wraps an orbax CheckpointManager under `<workdir>/checkpoints`: asynchronous saves, keep the
latest N (or the best N by an eval metric), and restore onto whatever shardings the caller asks for, so a run trained on
a (2,2,2) mesh resumes on 8x1x1 or on one device. Orbax writes each step to a temporary folder and renames it when
complete, so a kill mid-save leaves the previous checkpoints intact and the half-written one invisible.

Each finished step also gets `lmlab_digest.json` (size and SHA-256 of every file, written by process 0 once orbax
has finalized the step): `restore_latest` checks it, and a step whose files were truncated or altered (or that orbax
cannot read) is moved aside to `checkpoints/corrupt-<step>` (never deleted) and the newest good step is used instead.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

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

  # ---- integrity ------------------------------------------------------------------------------------------------
  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _write_digests(self):
    """Digests for finalized steps that have none yet (the save in flight, if any, is waited for first)."""
    self.manager.wait_until_finished()
    if jax.process_index() != 0:
      return
    for step in self.manager.all_steps():
      path = os.path.join(self._step_dir(step), DIGEST_FILE)
      if os.path.isdir(self._step_dir(step)) and not os.path.exists(path):
        tmp = f'{path}.tmp'
        with open(tmp, 'w') as f:
          json.dump(_digest(self._step_dir(step)), f, indent=0, sort_keys=True)
        os.replace(tmp, path)

  def problem(self, step: int) -> Optional[str]:
    """What is wrong with a step's files against its digest (None: matches, or no digest to check against)."""
    path = os.path.join(self._step_dir(step), DIGEST_FILE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      want = json.load(f)
    have = _digest(self._step_dir(step))
    for name in sorted(set(want) | set(have)):
      if name not in have:
        return f'{name} is missing'
      if name not in want:
        continue  # a file added after the digest (none of orbax's) is not a corruption
      if have[name] != want[name]:
        return f'{name} was changed ({have[name][0]} bytes, {want[name][0]} written)'
    return None

  def set_aside(self, step: int) -> str:
    """Moves a corrupt step out of orbax's sight (and out of max_to_keep's reach) -> its new path."""
    dst = os.path.join(self.directory, f'corrupt-{step}')
    if jax.process_index() == 0:
      os.replace(self._step_dir(step), dst)
    self.manager.reload()
    return dst

  def restore_latest(self, abstract_state, log: Callable[[str], None] = print):
    """(step, state, loader_state) of the newest step that is whole, setting corrupt ones aside; (None, ...) when
    there is none. A step that fails its digest or orbax's own reading is reported with the reason."""
    for step in sorted(self.all_steps(), reverse=True):
      bad = self.problem(step)
      if bad is None:
        try:
          state, loader, _ = self.restore(abstract_state, step)
          return step, state, loader
        except Exception as e:  # orbax/tensorstore raise many kinds for unreadable files
          if os.path.exists(os.path.join(self._step_dir(step), DIGEST_FILE)):
            raise  # the files are as written: the failure is not the checkpoint's (never set a good one aside)
          bad = f'orbax cannot read it ({type(e).__name__}: {" ".join(str(e).split())[:200]})'
      where = self.set_aside(step)
      log(f'checkpoint step {step} is corrupt: {bad}; moved it to {where} and falling back to an earlier step')
    return None, None, None

  def save(self, step: int, state, *, loader_state: Mapping[str, Any], config: Mapping[str, Any],
           metrics: Optional[Mapping[str, float]] = None, window: Sequence[Mapping[str, float]] = (),
           force: bool = True) -> bool:
    self._write_digests()  # the previous save is complete now: record what it wrote
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

  def trim(self) -> list[int]:
    """Deletes the steps the retention policy (max_to_keep, best_metric) no longer keeps -> their numbers. Orbax
    applies it only after a save, so a run killed between its final save and that cleanup leaves one step too many,
    and a finished workdir is never saved to again."""
    old = list(getattr(self.manager, '_get_old_steps_to_remove', lambda: [])())  # the policy each save applies
    for step in old:
      self.manager.delete(step)
    return old

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self._write_digests()
    self.manager.close()


DIGEST_FILE = 'lmlab_digest.json'


def _digest(step_dir: str) -> dict[str, list]:
  """{relative path: (size, sha256)} of every file under a step folder but the digest itself."""
  out = {}
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel in (DIGEST_FILE, f'{DIGEST_FILE}.tmp'):
        continue
      h = hashlib.sha256()
      with open(path, 'rb') as f:
        for block in iter(lambda f=f: f.read(1 << 20), b''):
          h.update(block)
      out[rel] = [os.path.getsize(path), h.hexdigest()]
  return out
