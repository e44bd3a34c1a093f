"""Stage 3 of a run, the loop: one jitted step per batch, with the metrics window, dev evaluation, early stopping,
checkpoints, the finite and divergence guards, and SIGTERM / Ctrl-C around it. train/core/trainer.py prepares the `Run` it
drives.

Steps are dispatched asynchronously, but the loop waits for the step before last before it goes on, so at most two
steps are queued: a signal (train/core/signals.py) is honoured within two steps, and the queued batches hold little memory.
(The command-line jobs run a single CPU device's programs inline, train/core/host.py: there a step's call returns
when it is done.)
"""
from __future__ import annotations

import time

import jax
import optax

from train.core import checkpoint as ckpt_lib
from train.tasks import scoring
from train.core import signals as signals_lib
from train import tasks
from train.core import workdir as workdir_lib
from train.data.loader import global_batch
from train.core.steps import summarize
from train.core.writers import MetricsWriter


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Loop:
  """Stage 3's bookkeeping: the metrics window, eval, checkpoints and the finite check, for one run."""

  def __init__(self, run, ckpts: ckpt_lib.Checkpoints, writer: MetricsWriter):
    self.run, self.ckpts, self.writer = run, ckpts, writer
    self.tc = run.config.train
    self.history, self.first_loss, self.last_train, self.last_eval = [], None, None, None
    self.t_window, self.steps_window = time.time(), 0
    self.eval_at, self.best, self.since_best, self.stop = None, None, 0, False
    self.lowest_loss = None
    self.saved_at = None  # the step of the newest save
    self.start_norm = None  # the parameters' global norm when this process started training (max_param_growth)
    self.warned = set()  # the health warnings (tasks.health_warnings) already logged

  def check_finite(self, state):
    bad = int(jax.device_get(state['nonfinite_step']))
    if bad >= 0:
      latest = self.ckpts.latest_step()
      kept = (f'the last checkpoint (step {latest}) holds finite parameters'
              if latest is not None else 'no checkpoint had been written yet')
      raise FloatingPointError(f'loss or gradients became NaN/Inf at step {bad + 1}; stopped without saving; {kept}. '
                               'Lower config.optim.learning_rate or enable config.optim.clip_norm.')

  def check_diverged(self, state, step):
    """The config's divergence guards (train.max_param_norm, train.max_param_growth, train.max_loss_ratio): finite
    but runaway numbers stop the run before they are saved, as a NaN does."""
    latest = self.ckpts.latest_step()
    kept = f'the last checkpoint (step {latest}) is kept' if latest is not None else 'no checkpoint was written yet'
    limit, growth = float(self.tc.get('max_param_norm') or 0), float(self.tc.get('max_param_growth') or 0)
    if limit or (growth and self.start_norm):
      norm = float(jax.device_get(optax.tree.norm(state['params'])))
      if limit and not norm <= limit:
        raise FloatingPointError(f'parameter norm {norm:.3g} at step {step} exceeds config.train.max_param_norm='
                                 f'{limit:g}: the run diverged; stopped without saving; {kept}. Lower '
                                 'config.optim.learning_rate or enable config.optim.clip_norm.')
      if growth and self.start_norm and not norm <= growth * self.start_norm:
        raise FloatingPointError(f'parameter norm {norm:.3g} at step {step} is over config.train.max_param_growth='
                                 f'{growth:g} times its {self.start_norm:.3g} at the start: the run diverged; stopped '
                                 f'without saving; {kept}. Lower config.optim.learning_rate or enable '
                                 'config.optim.clip_norm (max_param_growth=0 turns this guard off).')
    ratio = float(self.tc.get('max_loss_ratio') or 0)
    if ratio and self.last_train and self.lowest_loss is not None and self.last_train['loss'] > ratio * self.lowest_loss:
      raise FloatingPointError(f'loss {self.last_train["loss"]:.4g} at step {step} exceeds config.train.max_loss_ratio='
                               f'{ratio:g} x the lowest logged loss {self.lowest_loss:.4g}: the run diverged; stopped '
                               f'without saving; {kept}. Lower config.optim.learning_rate or enable clip_norm.')

  def save(self, state, step, metrics=None):
    self.check_finite(state)
    self.check_diverged(state, step)
    window = [{k: float(v) for k, v in m.items()} for m in jax.device_get(self.history)]
    self.ckpts.save(step, state, loader_state=self.run.data.train.get_state(),
                    config=workdir_lib.config_dict(self.run.config), metrics=metrics, window=window)
    self.saved_at = step

  def can_evaluate(self) -> bool:
    return self.run.forward is not None or (self.run.data.eval is not None and bool(self.tc.eval_steps))

  def evaluate(self, state, step):
    run = self.run
    if not self.can_evaluate():
      return None
    if run.forward is not None:  # a downstream task: every dev record, scored with the task's metrics
      values, _ = scoring.score(run.task, run.forward, state['params'], run.data.dev_records, run.data.tokenizer,
                                 run.config.data, batch_size=int(run.config.data.batch_size),
                                 batch_sharding=run.setup.batch_sharding)
      run.log(f'step {step}: dev ' + ', '.join(f'{k} {v:.4f}' for k, v in sorted(values.items())))
    else:
      rng = jax.random.key(int(run.config.seed) + 7)
      batches = [run.data.eval[i] for i in range(int(self.tc.eval_steps))]
      values = summarize([run.eval_fn(state['params'], global_batch(b, run.setup.batch_sharding), rng) for b in batches])
      values.update(tasks.token_baselines(run.config.objectives, batches))  # what the accuracies must beat
      run.log(f'step {step}: eval loss {values["loss"]:.4f}' + ''.join(
          f', {k} {values[k]:.4f} (baseline {v:.4f})' for k, v in
          ((k[:-len('_baseline')], v) for k, v in values.items() if k.endswith('_baseline')) if k in values))
      for line in tasks.health_warnings(values, split='eval'):
        run.log(line)
    self.writer.write(step, 'eval', values)
    self.last_eval, self.eval_at = values, step
    self._track_best(values)
    return values

  def _track_best(self, values):
    """Early stopping: config.train.early_stopping evaluations in a row without a better best_metric stop the run."""
    name = (self.tc.get('best_metric') or '').split('/', 1)[-1]
    if name not in values:
      return
    better = self.best is None or (values[name] > self.best
                                   if self.tc.get('best_mode') == 'max' else values[name] < self.best)
    self.best, self.since_best = (values[name], 0) if better else (self.best, self.since_best + 1)
    patience = int(self.tc.get('early_stopping') or 0)
    if patience and self.since_best >= patience:
      self.stop = True
      self.run.log(f'early stopping: {patience} evaluations without a better {self.tc.best_metric} '
                   f'(best {self.best:.4f})')

  def checkpoint_metrics(self, step):
    """{best_metric: value} when this step was evaluated (the checkpoint manager keeps the best by it)."""
    best = self.tc.get('best_metric')
    if not best or self.eval_at != step:
      return None
    name = best.split('/', 1)[-1]
    if name not in self.last_eval:
      raise ValueError(f'config.train.best_metric={best!r}: the evaluation reports {sorted(self.last_eval)}; '
                       "name one of them as 'eval/<metric>'.")
    return {best: self.last_eval[name]}

  def log_window(self, state, step, total):
    self.check_finite(state)
    values = summarize(self.history)
    values['steps_per_sec'] = self.steps_window / max(time.time() - self.t_window, 1e-9)
    values['tokens_per_sec'] = (values['steps_per_sec'] * int(self.run.config.data.batch_size)
                                * self.run.data.tokens_per_example)
    self.writer.write(step, 'train', values)
    # Past the warmup (a discriminator at step 10 has not learned yet either), each warning once per run.
    if step > max(2 * int(self.run.config.optim.get('warmup_steps') or 0), 50):
      for line in tasks.health_warnings(values, split='train'):
        if line.split(':')[1] not in self.warned:
          self.warned.add(line.split(':')[1])
          self.run.log(line)
    self.first_loss = values['loss'] if self.first_loss is None else self.first_loss
    self.last_train = values
    self.check_diverged(state, step)
    self.lowest_loss = values['loss'] if self.lowest_loss is None else min(self.lowest_loss, values['loss'])
    eta = (total - step) / max(values['steps_per_sec'], 1e-9)
    self.run.log(f'step {step}/{total}  loss {values["loss"]:.4f}  {values["steps_per_sec"]:.2f} steps/s  '
                 f'{values["tokens_per_sec"]:.0f} tokens/s  ETA {_fmt_time(eta)}')
    self.history, self.t_window, self.steps_window = [], time.time(), 0

  def after_step(self, state, metrics, step, total, *, stopping: bool = False):
    self.history.append(metrics)
    self.steps_window += 1
    tc = self.tc
    if step % int(tc.log_every) == 0 or step == total:
      self.log_window(state, step, total)
    # The last step is always evaluated (so the final checkpoint competes for best, whatever eval_every is); a run
    # asked to stop skips the others: a dev set can take longer than a preemption notice leaves.
    if (tc.eval_every and step % int(tc.eval_every) == 0 and not stopping) or step == total:
      self.evaluate(state, step)
    if step % int(tc.checkpoint_every) == 0 or step == total or self.stop:
      self.save(state, step, metrics=self.checkpoint_metrics(step))


def train_loop(run, state, start: int, loop: Loop, signals: signals_lib.Signals | None = None):
  """Stage 3: steps from `start` to config.train.steps -> (state, step, status). A SIGTERM or Ctrl-C (`signals`, the
  command line's; without it the loop installs its own handlers for its duration) saves the step in flight and
  returns status 'preempted'."""
  own = signals is None
  signals = signals_lib.Signals().install() if own else signals
  signals.raise_if_stopped()  # a start-up signal whose exception was swallowed: still nothing trained
  signals.immediate = False  # from here on a signal is honoured by a save, never by an exception mid-step
  total, step, previous = int(run.config.train.steps), start, None
  if loop.tc.get('max_param_growth'):
    loop.start_norm = float(jax.device_get(optax.tree.norm(state['params'])))
  try:
    while step < total:
      state, metrics = run.train_fn(state, global_batch(next(run.data.train), run.setup.batch_sharding))
      step += 1
      if previous is not None:
        # Dispatch returns at once, so unchecked the loop runs ahead of the device up to the next log step; waiting
        # for the step before this one keeps the device fed (this one is queued) and a signal waits two steps at most.
        jax.block_until_ready(previous)
      previous = metrics
      loop.after_step(state, metrics, step, total, stopping=signals.received is not None)
      if signals.received is not None:
        if loop.saved_at != step:
          loop.save(state, step)
        run.log(f'{signals.name}: saved step {step}, exiting; the same command resumes from it')
        return state, step, 'preempted'
      if loop.stop:
        return state, step, 'early_stopped'
  finally:
    if own:
      signals.uninstall()
  return state, step, 'done'
