"""A run around the pure steps of train/core/steps.py: config -> model, sharded state, data and jitted steps (prepare),
restore or init, then the loop of train/core/loop.py (logging, eval, checkpoints, resumption).

`jit_steps` jits train_step / eval_step with in/out shardings and donation. A step whose loss or gradient is not finite
leaves the state as it was and records its number; the loop stops at the next log or checkpoint boundary with that
step in the message, so no checkpoint ever holds bad parameters. The per-step rng is fold_in(run rng, step) and the loader's state is saved with every checkpoint, which is
what makes a resumed run bitwise equal to an uninterrupted one on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
import re
import shutil
import time
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from model import heads as heads_lib
from model.config import ModelConfig, set_fields
from train.core import checkpoint as ckpt_lib
from train.core import workdir as workdir_lib
from train.core.workdir import WorkdirLock
from train.core.writers import MetricsWriter
from train.finetune import strategies as finetune
from train.core import host
from train.core import loop as loop_lib
from train.core import optim
from train.core import partitioning as part
from train.core import cost
from train.core import pretrained
from train.core import resolve
from train.core import signals as signals_lib
from train import tasks
from train.tasks import scoring
from train.data import pipeline
from train.core.steps import eval_step, train_step

# ---------------------------------------------------------------------------------------------- model and state


def _rules(config):
  return part.rules_from_config(config.mesh.rules if config.mesh.get('rules') else None)


@dataclasses.dataclass
class Parts:
  """The run's objects, each built and checked once, before anything is traced."""
  model: Any
  model_cfg: ModelConfig
  loss_fn: Callable
  optimizer: optax.GradientTransformation
  lr_fn: Callable
  mesh: jax.sharding.Mesh
  rules: Any
  train_patterns: tuple = ((), ())  # config.optim (trainable, frozen) path patterns; both empty: all trains


def _train_patterns(config) -> tuple:
  return tuple(config.optim.get('trainable') or ()), tuple(config.optim.get('frozen') or ())


def _mesh_parts(config, devices=None) -> dict[str, Any]:
  """The mesh (checked against the devices and the batch) and the logical-axis rules."""
  mesh = part.make_mesh(tuple(config.mesh.shape), devices)
  part.check_batch_size(int(config.data.batch_size), mesh)
  return dict(mesh=mesh, rules=_rules(config))


def _optimizer_parts(config, lr_fn: Optional[Callable] = None) -> dict[str, Any]:
  """The optax chain, its learning-rate schedule (reused when given) and what trains."""
  lr_fn = lr_fn or optim.learning_rate_fn(_fit_warmup(_schedule_steps(config), log=lambda _: None).optim)
  return dict(optimizer=optim.make_optimizer(config.optim, lr_fn), lr_fn=lr_fn, train_patterns=_train_patterns(config))


def build_parts(config, model_cfg: ModelConfig, devices=None) -> Parts:
  """Model (from the objectives' records), loss, optimizer, learning-rate schedule, mesh and rules for config."""
  loss_fn = tasks.build_loss_fn(model_cfg, dict(config.objectives), heads=resolve.heads(config, model_cfg.arch),
                                **dict(config.get('loss', {})))
  return Parts(resolve.build_model(config, model_cfg), model_cfg, loss_fn, **_mesh_parts(config, devices),
               **_optimizer_parts(config))


@dataclasses.dataclass
class Setup(Parts):
  """Parts plus the sharded state's layout; `init_fn(rng_seed)` creates the state already sharded."""
  state_shardings: Any = None
  abstract_state: Any = None
  batch_sharding: Any = None
  init_fn: Callable = None
  trainable: Any = None  # bool pytree like the params (None: every leaf trains); frozen leaves are not differentiated


def make_setup(parts: Parts, example_batch: Mapping[str, np.ndarray]) -> Setup:
  """Shardings of params and optimizer state from the model's logical axes, and the sharded init function."""
  model, optimizer, mesh = parts.model, parts.optimizer, parts.mesh
  batch = {k: jnp.asarray(v) for k, v in example_batch.items()}

  def init_boxed(rng):
    return model.init({'params': rng, 'dropout': rng}, batch)['params']

  boxed_shapes = jax.eval_shape(init_boxed, jax.random.key(0))
  params_shapes = nn.meta.unbox(boxed_shapes)
  params_sh = part.param_shardings(nn.get_partition_spec(boxed_shapes), params_shapes, mesh, parts.rules)
  opt_shapes = jax.eval_shape(optimizer.init, params_shapes)
  opt_sh = part.like_params_shardings(opt_shapes, params_shapes, params_sh, mesh)
  rep = part.replicated(mesh)
  state_sh = {'params': params_sh, 'opt_state': opt_sh, 'step': rep, 'rng': rep, 'nonfinite_step': rep}

  def init(seed):
    rng = jax.random.key(seed)
    params = nn.meta.unbox(init_boxed(jax.random.fold_in(rng, 0)))
    return {
        'params': params,
        'opt_state': optimizer.init(params),
        'step': jnp.zeros((), jnp.int32),
        'rng': jax.random.key_data(jax.random.fold_in(rng, 1)),
        'nonfinite_step': jnp.full((), -1, jnp.int32)
    }

  abstract = jax.eval_shape(init, 0)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_sh)
  trainable = optim.trainable_mask(params_shapes, *parts.train_patterns) if any(parts.train_patterns) else None
  return Setup(**vars(parts), state_shardings=state_sh, abstract_state=abstract,
               batch_sharding=part.batch_sharding(mesh), init_fn=jax.jit(init, static_argnums=0,
                                                                         out_shardings=state_sh), trainable=trainable)


def trainable_params(setup: Setup) -> int:
  """How many parameters train (the rest are frozen: no gradient, no update, no optimizer state)."""
  params = setup.abstract_state['params']
  if setup.trainable is None:
    return heads_lib.count_params(params)
  return sum(int(np.prod(x.shape)) for x, t in zip(jax.tree.leaves(params), jax.tree.leaves(setup.trainable)) if t)


def jit_steps(setup: Setup):
  """(jitted train_step(state, batch), jitted eval_step(params, batch, rng)) under the setup's mesh and rules."""
  host.tune_allocator()
  step = functools.partial(train_step, model=setup.model, loss_fn=setup.loss_fn, optimizer=setup.optimizer,
                           lr_fn=setup.lr_fn, trainable=setup.trainable)
  rep = part.replicated(setup.mesh)

  def with_rules(fn):
    # The abstract mesh in context while tracing is what turns the model's with_logical_constraint calls into
    # sharding constraints on activations.
    @functools.wraps(fn)
    def wrapped(*args):
      with nn.logical_axis_rules(setup.rules), jax.sharding.use_abstract_mesh(setup.mesh.abstract_mesh):
        return fn(*args)

    return wrapped

  train = jax.jit(with_rules(step), in_shardings=(setup.state_shardings, setup.batch_sharding),
                  out_shardings=(setup.state_shardings, rep), donate_argnums=(0,))
  evaluate = jax.jit(with_rules(functools.partial(eval_step, model=setup.model, loss_fn=setup.loss_fn)),
                     in_shardings=(setup.state_shardings['params'], setup.batch_sharding, rep), out_shardings=rep)
  return train, evaluate


@dataclasses.dataclass
class Run:
  """Stage 1's product: every object a run needs, built and checked once."""
  config: Any
  workdir: str
  init: Optional[pretrained.Pretrained]
  data: pipeline.RunData
  setup: Setup
  train_fn: Callable
  eval_fn: Callable
  log: Callable
  task: Any  # the record (train/tasks: an Objective or a Task) that made the batches; a downstream task's scorer evaluates the dev records
  forward: Optional[Callable] = None  # jitted params, batch -> the outputs task.score reads (downstream tasks)


def _with(config, **fields):
  """A copy of config with 'section.field'-style fields set, passed as section__field=value."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in fields.items():
    section, field = key.split('__')
    config[section][field] = value
  return config


def _steps_from_epochs(config, train_size: int, log):
  """config.train.epochs > 0 -> train.steps, optim.total_steps and optim.warmup_steps for that many passes."""
  epochs = float(config.train.get('epochs') or 0)
  if epochs <= 0:
    return config
  steps = max(1, int(np.ceil(epochs * train_size / int(config.data.batch_size))))
  warmup = int(round(float(config.train.get('warmup_fraction', 0.0)) * steps))
  log(f'{epochs:g} epochs of {train_size} examples in batches of {config.data.batch_size}: {steps} steps, '
      f'{warmup} of warmup')
  return _with(config, train__steps=steps, optim__total_steps=steps, optim__warmup_steps=warmup)


def _labeled(config, task):
  """A downstream task's records (read and validated now) and config with the label names they resolve."""
  if task.kind != 'task':
    return None, config
  labeled = pipeline.read_labeled(config.data, task)
  config = _with(config, **{f'data__{k}': v for k, v in labeled.names.items()}) if labeled.names else config
  return labeled, resolve.with_strategy(config)


def _start_from(config, workdir: str, log):
  """config.model.init_from -> (Pretrained or None, config pointing at the checkpoint's own tokenizer)."""
  if not config.model.get('init_from'):
    return None, config
  # The checkpoint's architecture replaces the preset (a GGUF writes its tokenizer under <workdir>/init).
  init = pretrained.load(config.model.init_from, save_dir=os.path.join(workdir, 'init'))
  if init.tokenizer_dir and not config.data.tokenizer_path:
    config = ml_collections.ConfigDict(config.to_dict())
    config.data.tokenizer_path = init.tokenizer_dir  # the checkpoint's own vocabulary
  log(f'starting from {init.source} checkpoint {config.model.init_from}')
  return init, config


_POSITIVE = ('steps', 'log_every', 'checkpoint_every', 'keep_checkpoints')
_NON_NEGATIVE = ('eval_every', 'eval_steps', 'epochs', 'early_stopping', 'max_param_norm', 'max_loss_ratio',
                 'max_param_growth')


def check_train(config) -> None:
  """config.train's counts and names, checked before anything is read or written (ValueError naming field and fix)."""
  tc = config.train
  for field in _POSITIVE + _NON_NEGATIVE:
    value = tc.get(field, 0) or 0
    low, word = (1, 'an integer >= 1') if field in _POSITIVE else (0, 'a number >= 0')
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value) or value < low:
      hint = ' (it is how many checkpoints stay on disk; 0 would delete them all)' if field == 'keep_checkpoints' else ''
      raise ValueError(f'config.train.{field}={value!r}: must be {word}{hint}.')
  for field, example in (('max_loss_ratio', 3), ('max_param_growth', 1000)):
    if 0 < float(tc.get(field) or 0) <= 1:
      raise ValueError(f'config.train.{field}={tc[field]}: the guard stops the run past this multiple, so it must '
                       f'exceed 1 (e.g. {example}); 0 turns the guard off.')
  best = tc.get('best_metric') or ''
  if best and not best.startswith('eval/'):
    raise ValueError(f"config.train.best_metric={best!r}: name an evaluation metric as 'eval/<metric>', e.g. "
                     "'eval/loss' or 'eval/accuracy'; '' turns it off.")
  if tc.get('best_mode', 'min') not in ('min', 'max'):
    raise ValueError(f"config.train.best_mode={tc.best_mode!r}: must be 'min' or 'max'.")


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_objectives(config) -> None:
  """config.objectives' weights: finite numbers >= 0, one of them positive (all 0: the loss is 0, nothing trains)."""
  objectives = dict(config.objectives)
  for name, weight in objectives.items():
    if not _is_number(weight) or weight < 0:
      raise ValueError(f'config.objectives.{name}={weight!r}: a loss weight must be a finite number >= 0 (0 leaves '
                       'that objective out of the loss).')
  if objectives and not any(objectives.values()):
    raise ValueError(f'config.objectives={objectives}: every weight is 0, so the loss is 0 and nothing trains; give '
                     f'one a positive weight, e.g. --config.objectives.{next(iter(objectives))}=1.0.')


# config.loss fields: the range [low, high) each must lie in, and what it is.
_LOSS_RANGES = {
    'label_smoothing': (0.0, 1.0, 'the share of the target spread uniformly (1 would leave nothing to learn)'),
    'z_loss': (0.0, math.inf, 'a penalty weight'),
    'rtd_lambda': (0.0, math.inf, 'a loss weight'),
}


def check_loss(config) -> None:
  """config.loss: label smoothing in [0, 1), the weights >= 0, a positive sampling temperature."""
  loss = dict(config.get('loss') or {})
  for field, (low, high, what) in _LOSS_RANGES.items():
    value = loss.get(field, low)
    if not _is_number(value) or not low <= value < high:
      bound = f'in [{low:g}, {high:g})' if math.isfinite(high) else f'a finite number >= {low:g}'
      raise ValueError(f'config.loss.{field}={value!r}: must be {bound}; it is {what}.')
  temperature = loss.get('generator_temperature', 1.0)
  if not _is_number(temperature) or temperature <= 0:
    raise ValueError(f'config.loss.generator_temperature={temperature!r}: ELECTRA samples the generator at this '
                     'temperature; give a positive number (1.0: as is).')


def check_mesh(config, devices=None) -> None:
  """config.mesh.shape and config.mesh.rules, before the cost model or a mesh reads them."""
  part.resolve_mesh_shape(tuple(config.mesh.shape), len(devices) if devices else jax.device_count())
  part.rules_from_config(config.mesh.get('rules') or None)


def check_model(config) -> None:
  """config.model.overrides (with the fine-tuning strategy's fields) over the preset, or over the architecture the
  init_from checkpoint's config file names: a ValueError naming the field before the cost model reads them (it would
  only log that it cannot)."""
  init_cfg = None
  if config.model.get('init_from'):
    try:
      init_cfg = resolve.checkpoint_model_cfg(config.model.init_from)
    except Exception:  # pylint: disable=broad-except  (a format only the full load reads, e.g. GGUF: checked there)
      return
  try:
    resolve.arch_config(config, init_cfg)
  except ValueError as e:  # ModelConfig names its own field; say where the run set it
    field = re.match(r'ModelConfig\.(\w+)=', str(e))
    if field and field.group(1) in set_fields(config.model.overrides):
      raise ValueError(f'config.model.overrides.{field.group(1)}: {e}') from None
    raise


def check_init_from(config) -> None:
  """config.model.init_from names something that exists (pretrained.load says what it must be)."""
  path = config.model.get('init_from')
  if path and not os.path.exists(path):
    raise FileNotFoundError(f'config.model.init_from={path}: no such file or folder; give an lmlab workdir, a '
                            'converted or Hugging Face model directory, or a .gguf file.')


def _fit_warmup(config, log):
  """optim.warmup_steps at or past the run's optimizer steps (a short run of a config made for long ones: 100 steps
  of warmup, 10 of training) -> clipped to a tenth of them, said in one line: linear and cosine decay need steps
  after the warmup."""
  oc = config.optim
  total, warmup = int(oc.get('total_steps') or 0), int(oc.get('warmup_steps') or 0)
  if oc.get('decay', 'linear') not in ('linear', 'cosine') or not 0 < total <= warmup:
    return config
  clipped = total // 10
  log(f'config.optim.warmup_steps={warmup} does not fit the run\'s {total} optimizer steps: warmup clipped to '
      f'{clipped} (a tenth of them); set --config.optim.warmup_steps below {total} to choose it.')
  return _with(config, optim__warmup_steps=clipped)


def _schedule_steps(config):
  """optim.total_steps = 0 (the default) -> the run's optimizer steps, so the schedule ends with train.steps."""
  if config.optim.get('total_steps'):
    return config
  accum = int(config.optim.get('grad_accum_steps') or 1)
  return _with(config, optim__total_steps=max(1, int(config.train.steps) // accum))


def prepare(config, workdir: str, *, devices=None, log=print) -> Run:
  """Stage 1: config -> Run. Everything that can be wrong with the config and the labeled data is checked before a
  step is compiled; what this stage wrote into the workdir (tokenizer/, tfds/, init/) is removed again when it fails,
  so a refused start leaves an existing workdir as it was."""
  before = set(os.listdir(workdir)) if os.path.isdir(workdir) else set()
  try:
    return _prepare(config, workdir, devices=devices, log=log)
  except BaseException:
    if jax.process_index() == 0 and os.path.isdir(workdir):
      for name in sorted(set(os.listdir(workdir)) - before):
        path = os.path.join(workdir, name)
        shutil.rmtree(path) if os.path.isdir(path) and not os.path.islink(path) else os.remove(path)
    raise


def _prepare(config, workdir: str, *, devices, log) -> Run:
  objectives = dict(config.objectives)
  resolve.import_registrations(config)
  check_train(config)
  check_objectives(config)
  check_loss(config)
  check_mesh(config, devices)
  check_init_from(config)
  config = _fit_warmup(_schedule_steps(config), log)
  task = resolve.record(config)
  pipeline.check_config(config.data, task)
  labeled, config = _labeled(config, task)
  check_model(config)
  cost.check_config(config, num_devices=len(devices) if devices else None, log=log)
  mesh, lr_fn = _mesh_parts(config, devices), optim.learning_rate_fn(config.optim)
  init, config = _start_from(config, workdir, log)
  arch_cfg = resolve.arch_config(config, init.cfg if init is not None else None)
  task = resolve.run_task(task, config, arch_cfg.arch)  # seq2seq on a decoder: prompt + completion examples; prompts
  loss_fn = tasks.build_loss_fn(arch_cfg, objectives, heads=resolve.heads(config, arch_cfg.arch),
                                **dict(config.get('loss', {})))
  os.makedirs(workdir, exist_ok=True)
  if init is not None and init.tokenizer_dir and jax.process_index() == 0:
    # The run carries its checkpoint's tokenizer: generate, evaluate and a later init_from read <workdir>/tokenizer.
    pretrained.adopt_tokenizer(config.data.tokenizer_path or init.tokenizer_dir, workdir)
  data = pipeline.build(config.data, task, workdir=workdir, seed=int(config.seed), labeled=labeled)
  if data.no_eval and config.train.eval_steps:
    log(data.no_eval)
  if config.train.get('epochs'):
    config, lr_fn = _fit_warmup(_steps_from_epochs(config, data.train_size, log), log), None
  model_cfg = arch_cfg if init is not None else resolve.with_tokenizer(arch_cfg, data.tokenizer, config.model.overrides)
  too_long = data.tokens_per_example > model_cfg.max_len and model_cfg.arch != 'encoder_decoder'
  if model_cfg.position == 'learned' and too_long:
    raise ValueError(f'config.data.seq_len={config.data.seq_len} exceeds the model\'s max_len={model_cfg.max_len}; '
                     'lower seq_len or raise config.model.overrides.max_len.')
  parts = Parts(resolve.build_model(config, model_cfg), model_cfg, loss_fn, **mesh, **_optimizer_parts(config, lr_fn))
  setup = make_setup(parts, data.train[0])
  train_fn, eval_fn = jit_steps(setup)
  forward = None
  if task.kind == 'task' and data.dev_records:
    forward = scoring.task_forward(task, setup.model, config.data, params_sharding=setup.state_shardings['params'],
                                    batch_sharding=setup.batch_sharding, rules=setup.rules, mesh=setup.mesh)
  signals_lib.raise_if_stopped()  # a signal whose exception was swallowed (train/core/signals.py): prepare cleans up
  return Run(config, workdir, init, data, setup, train_fn, eval_fn, log, task, forward)


def restore_or_init(run: Run, ckpts: ckpt_lib.Checkpoints):
  """Stage 2: the latest checkpoint of the workdir (state and loader position), or a fresh state (with the init_from
  checkpoint's parameters merged in). -> (state, start step)."""
  setup = run.setup
  if ckpts.latest_step() is not None:
    workdir_lib.check_same_model(
        run.workdir,
        run.setup.model_cfg)  # before any restore: another model is the config's mistake, not a corrupt checkpoint
    start, state, loader_state = ckpts.restore_latest(setup.abstract_state, log=run.log)
    if start is None:  # never train over a workdir's metrics from step 0 without being asked to
      raise ValueError(f'every checkpoint in {ckpts.directory} is corrupt (moved to corrupt-<step>); start over in a '
                       'new --workdir, or remove that workdir to reuse its name.')
    run.data.train.set_state(loader_state)
    run.log(f'resumed from step {start} in {ckpts.directory}')
    return state, start
  state = setup.init_fn(int(run.config.seed))
  if run.init is not None:
    merged, report = pretrained.merge_params(jax.device_get(state['params']), run.init.params,
                                             where=run.config.model.init_from, report=True)
    run.log(report.summary(run.config.model.init_from))
    merged = finetune.init_soft_prompt(merged, run.config, pad_id=setup.model_cfg.pad_id)
    state = dict(state, params=jax.device_put(merged, setup.state_shardings['params']))
  return state, 0


def _checkpoints(run: Run) -> ckpt_lib.Checkpoints:
  tc = run.config.train
  return ckpt_lib.Checkpoints(os.path.join(run.workdir, 'checkpoints'), max_to_keep=int(tc.keep_checkpoints),
                              best_metric=tc.get('best_metric') or None, best_mode=tc.get('best_mode', 'min'),
                              async_save=bool(tc.get('async_checkpoints', True)))


def train_and_evaluate(config, workdir: str, *, devices=None, log=print, signals=None) -> dict[str, Any]:
  """Trains per `config` in `workdir`, resuming from its latest checkpoint: prepare -> restore or init -> loop.

  -> summary dict (status, steps, first/final loss, throughput, last eval, workdir, params, state). A second run on
  a workdir that a live run holds raises workdir.WorkdirBusy naming that run. `signals`: the command line's
  train/core/signals.py handlers, which the loop takes over (without them the loop installs its own for its duration)."""
  with WorkdirLock(workdir, enabled=jax.process_index() == 0):
    return _train_and_evaluate(config, workdir, devices=devices, log=log, signals=signals)


def _train_and_evaluate(config, workdir: str, *, devices, log, signals) -> dict[str, Any]:
  run = prepare(config, workdir, devices=devices, log=log)
  if run.config.train.get('compilation_cache', True):
    host.use_compilation_cache(run.workdir)
  ckpts = _checkpoints(run)
  try:
    state, start = restore_or_init(run, ckpts)
    if start >= int(run.config.train.steps):
      # A finished run (or one preempted after its last save): nothing to train, nothing written again, but the
      # retention a kill right after the final save cut short is applied now.
      log(f'{workdir} already holds the final checkpoint (step {start} of {int(run.config.train.steps)}); '
          'nothing to do. Raise config.train.steps to train on, or use a new --workdir.')
      removed = ckpts.trim()
      if removed:
        log(f'removed checkpoint step(s) {removed}: config.train.keep_checkpoints={run.config.train.keep_checkpoints} '
            'keeps fewer (their removal was cut short when the run stopped)')
      return _summary('finished', start, None, None, workdir, heads_lib.count_params(state['params']), state)
    if start:
      _say_length_changes(run, log)
    workdir_lib.write_config(run.workdir, workdir_lib.config_dict(run.config), run.setup.model_cfg)
    writer = MetricsWriter(workdir, resume_step=start)
    n_params = heads_lib.count_params(run.setup.abstract_state['params'])
    trainable = trainable_params(run.setup)
    c = run.config
    mc = run.setup.model_cfg
    log(f'model {c.model.init_from or c.model.preset}: {mc.arch}, {mc.num_layers} layers, d_model {mc.d_model}, '
        f'vocab {mc.vocab_size} ({n_params / 1e6:.2f}M params: {trainable:,} trainable, {n_params - trainable:,} '
        f'frozen), objectives '
        f'{dict(c.objectives)}, mesh {dict(run.setup.mesh.shape)}, {int(c.train.steps)} steps of '
        f'{c.data.batch_size} x {run.data.tokens_per_example} tokens')
    loop, t_start = loop_lib.Loop(run, ckpts, writer), time.time()
    if start:  # the steps since the last log step before the checkpoint: the first window after it is whole again
      loop.history = ckpts.window(start)
    try:
      state, step, status = loop_lib.train_loop(run, state, start, loop, signals)
    finally:
      writer.close()
  except KeyboardInterrupt:  # a second Ctrl-C: out at once, not waiting for a save in flight
    ckpts = None
    raise
  finally:
    # Also on an error (a NaN stop included): wait for in-flight async saves, so the last good checkpoint lands.
    if ckpts is not None:
      ckpts.close()
  return _summary(status, step, loop, time.time() - t_start, workdir, n_params, state)


def _say_length_changes(run: Run, log) -> None:
  """A resumed run whose train.steps differs from the workdir's config.json trains on to the new count: one line
  says so, and whether the learning-rate schedule moved with it (optim.total_steps follows train.steps)."""
  path = os.path.join(run.workdir, 'config.json')
  try:
    with open(path) as f:
      saved = json.load(f)['config']
    before, schedule_before = int(saved['train']['steps']), int(saved['optim']['total_steps'])
  except (OSError, ValueError, KeyError, TypeError):  # no readable config.json: nothing to compare with
    return
  now, schedule_now = int(run.config.train.steps), int(run.config.optim.total_steps)
  if now == before:
    return
  schedule = (f'; the learning-rate schedule now ends at step {schedule_now} instead of {schedule_before}'
              if schedule_now != schedule_before else '')
  log(f'config.train.steps changed from {before} ({path}) to {now}: training on to step {now}{schedule}')


def _summary(status, step, loop: Optional[loop_lib.Loop], wall_s, workdir, n_params, state) -> dict[str, Any]:
  last = (loop.last_train if loop else None) or {}
  return {
      'status': status,
      'steps': step,
      'first_loss': loop.first_loss if loop else None,
      'final_loss': last.get('loss'),
      'steps_per_sec': last.get('steps_per_sec'),
      'tokens_per_sec': last.get('tokens_per_sec'),
      'eval': loop.last_eval if loop else None,
      'wall_s': wall_s,
      'workdir': os.path.abspath(workdir),
      'params': n_params,
      'state': state
  }
