"""The pure train and eval steps, and the loop around them: sharded state, logging, eval, checkpoints, resumption.

`train_step(state, batch, *, ...)` and `eval_step` are module-level pure functions; `Trainer` jits them with
in/out shardings and donation. State is a plain dict pytree {'params', 'opt_state', 'step', 'rng', 'nonfinite_step'}.
A step whose loss or gradient is not finite leaves params and optimizer state as they were and records its number; the
loop stops at the next log or checkpoint boundary with that step in the message, so no checkpoint ever holds bad
parameters. The per-step rng is fold_in(run rng, step) and the loader's state is saved with every checkpoint, which is
what makes a resumed run bitwise equal to an uninterrupted one on CPU.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any, Callable, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from model import heads as heads_lib
from model import transformer
from train import checkpoint as ckpt_lib
from train import objectives as obj
from train import optim
from train import partitioning as part
from train import pretrained
from train.data import pipeline
from train.data.loader import global_batch

State = dict

# ------------------------------------------------------------------------------------------------ the pure steps


def train_step(state: State, batch, *, model, loss_fn, optimizer: optax.GradientTransformation,
               lr_fn: Optional[Callable] = None):
  """One optimizer (micro-)step: -> (new state, metrics). Non-finite loss or gradients leave the state unchanged."""
  step = state['step']
  rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']), step)
  grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, deterministic=False), has_aux=True)
  (loss, metrics), grads = grad_fn(state['params'], batch, rng)
  updates, opt_state = optimizer.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = dict(state, params=keep(params, state['params']), opt_state=keep(opt_state, state['opt_state']),
                   step=step + 1,
                   nonfinite_step=jnp.where((state['nonfinite_step'] < 0) & ~finite, step, state['nonfinite_step']))
  metrics = dict(metrics, grad_norm=grad_norm)
  if lr_fn is not None:
    metrics['learning_rate'] = lr_fn(step)
  return new_state, metrics


def eval_step(params, batch, rng, *, model, loss_fn):
  """Metrics of one batch without dropout."""
  _, metrics = loss_fn(params, batch, rng, model=model, deterministic=True)
  return metrics


def summarize(history: list[Mapping[str, Any]]) -> dict[str, float]:
  """Averages a window of per-step metrics: token-weighted by '<objective>/weight_sum' where present."""
  history = [jax.device_get(m) for m in history]
  out = {}
  for key in history[0]:
    values = np.array([float(m[key]) for m in history], np.float64)
    prefix, _, name = key.rpartition('/')
    weights = None
    if prefix and name != 'weight_sum' and f'{prefix}/weight_sum' in history[0]:
      weights = np.array([float(m[f'{prefix}/weight_sum']) for m in history], np.float64)
    if name == 'weight_sum':
      out[key] = float(values.sum())
    elif name == 'perplexity':
      logs = np.log(np.maximum(values, 1e-30))
      out[key] = float(np.exp(np.average(logs, weights=weights) if weights is not None and weights.sum() else
                              logs.mean()))
    elif weights is not None and weights.sum() > 0:
      out[key] = float(np.average(values, weights=weights))
    else:
      out[key] = float(values.mean())
  return out


# ---------------------------------------------------------------------------------------------- model and state


def model_config(config, tokenizer=None, init: Optional[pretrained.Pretrained] = None) -> transformer.ModelConfig:
  """config.model (preset + overrides) with the vocabulary and special ids of the tokenizer.

  Starting from a checkpoint (config.model.init_from), its architecture wins and only the overrides apply.
  """
  overrides = dict(config.model.overrides)
  if init is not None:
    return init.cfg.replace(**overrides)
  if tokenizer is not None:
    overrides.setdefault('vocab_size', tokenizer.vocab_size)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    overrides.setdefault('pad_id', pad)
    overrides.setdefault('decoder_start_id', pad)
    if tokenizer.eos_id is not None:
      overrides.setdefault('eos_id', tokenizer.eos_id)
    if tokenizer.bos_id is not None:
      overrides.setdefault('bos_id', tokenizer.bos_id)
  return transformer.preset(config.model.preset, **overrides)


def build_model(config, model_cfg: transformer.ModelConfig):
  """LanguageModel with the heads the objectives need, or Electra for 'rtd'."""
  objectives = dict(config.objectives)
  if 'rtd' in objectives:
    gen_overrides = {k: getattr(model_cfg, k) for k in ('vocab_size', 'pad_id', 'max_len', 'embed_dim',
                                                        'type_vocab_size', 'dtype', 'param_dtype', 'scan_layers',
                                                        'remat_policy')}
    gen_overrides.update(dict(config.model.generator_overrides))
    gen_cfg = transformer.preset(config.model.generator_preset, **gen_overrides)
    return heads_lib.Electra(gen_cfg, model_cfg)
  return heads_lib.LanguageModel(model_cfg, heads=obj.heads_for(objectives))


def _rules(config):
  return part.rules_from_config(config.mesh.rules if config.mesh.get('rules') else None)


@dataclasses.dataclass
class Setup:
  """Everything a run needs, built and checked before anything compiles."""
  model: Any
  model_cfg: transformer.ModelConfig
  loss_fn: Callable
  optimizer: optax.GradientTransformation
  lr_fn: Callable
  mesh: jax.sharding.Mesh
  rules: Any
  state_shardings: Any
  abstract_state: Any
  batch_sharding: Any
  init_fn: Callable


def make_setup(config, example_batch: Mapping[str, np.ndarray], model_cfg: transformer.ModelConfig,
               devices=None) -> Setup:
  """Model, loss, optimizer, mesh and shardings; `init_fn(rng_seed)` creates the state already sharded."""
  objectives = dict(config.objectives)
  model = build_model(config, model_cfg)
  loss_fn = obj.build_loss_fn(model_cfg, objectives, **dict(config.get('loss', {})))  # validates the objectives
  optimizer = optim.make_optimizer(config.optim)
  lr_fn = optim.learning_rate_fn(config.optim)
  mesh = part.make_mesh(tuple(config.mesh.shape), devices)
  part.check_batch_size(int(config.data.batch_size), mesh)
  rules = _rules(config)
  batch = {k: jnp.asarray(v) for k, v in example_batch.items()}

  def init_boxed(rng):
    return model.init({'params': rng, 'dropout': rng}, batch)['params']

  boxed_shapes = jax.eval_shape(init_boxed, jax.random.key(0))
  params_shapes = nn.meta.unbox(boxed_shapes)
  params_sh = part.param_shardings(nn.get_partition_spec(boxed_shapes), params_shapes, mesh, rules)
  opt_shapes = jax.eval_shape(optimizer.init, params_shapes)
  opt_sh = part.like_params_shardings(opt_shapes, params_shapes, params_sh, mesh)
  rep = part.replicated(mesh)
  state_sh = {'params': params_sh, 'opt_state': opt_sh, 'step': rep, 'rng': rep, 'nonfinite_step': rep}

  def init(seed):
    rng = jax.random.key(seed)
    params = nn.meta.unbox(init_boxed(jax.random.fold_in(rng, 0)))
    return {'params': params, 'opt_state': optimizer.init(params), 'step': jnp.zeros((), jnp.int32),
            'rng': jax.random.key_data(jax.random.fold_in(rng, 1)), 'nonfinite_step': jnp.full((), -1, jnp.int32)}

  abstract = jax.eval_shape(init, 0)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract, state_sh)
  init_fn = jax.jit(init, static_argnums=0, out_shardings=state_sh)
  return Setup(model, model_cfg, loss_fn, optimizer, lr_fn, mesh, rules, state_sh, abstract,
               part.batch_sharding(mesh), init_fn)


def jit_steps(setup: Setup):
  """(jitted train_step(state, batch), jitted eval_step(params, batch, rng)) under the setup's mesh and rules."""
  step = functools.partial(train_step, model=setup.model, loss_fn=setup.loss_fn, optimizer=setup.optimizer,
                           lr_fn=setup.lr_fn)
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


# ---------------------------------------------------------------------------------------------------- the loop


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


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class _Preemption:
  """SIGTERM (Colab / Cloud TPU preemption) sets a flag; the loop saves a checkpoint and returns."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler, nothing else changes
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _config_dict(config) -> dict:
  return json.loads(config.to_json_best_effort()) if hasattr(config, 'to_json_best_effort') else dict(config)


def train_and_evaluate(config, workdir: str, *, devices=None, log=print) -> dict[str, Any]:
  """Pre-trains per `config` in `workdir`, resuming from its latest checkpoint. -> summary dict."""
  objectives = dict(config.objectives)
  # Everything that can be wrong with the config is checked here, before a file is written or a step compiled.
  pipeline.check_config(config.data, objectives)
  optim.learning_rate_fn(config.optim)
  part.resolve_mesh_shape(tuple(config.mesh.shape), len(devices or jax.devices()))
  init = None
  if config.model.get('init_from'):
    # The checkpoint's architecture replaces the preset (a GGUF writes its tokenizer under <workdir>/init).
    init = pretrained.load(config.model.init_from, save_dir=os.path.join(workdir, 'init'))
  arch_cfg = init.cfg if init else transformer.preset(config.model.preset, **dict(config.model.overrides))
  obj.validate_objectives(arch_cfg, objectives)

  os.makedirs(workdir, exist_ok=True)
  if init is not None:
    if init.tokenizer_dir and not config.data.tokenizer_path:
      config = ml_collections.ConfigDict(config.to_dict())
      config.data.tokenizer_path = init.tokenizer_dir  # the checkpoint's own vocabulary
    log(f'starting from {init.source} checkpoint {config.model.init_from}')
  data = pipeline.build(config.data, objectives, workdir=workdir, seed=int(config.seed))
  model_cfg = model_config(config, data.tokenizer, init)
  too_long = data.tokens_per_example > model_cfg.max_len and model_cfg.arch != 'encoder_decoder'
  if model_cfg.position == 'learned' and too_long:
    raise ValueError(f'config.data.seq_len={config.data.seq_len} exceeds the model\'s max_len={model_cfg.max_len}; '
                     'lower seq_len or raise config.model.overrides.max_len.')
  example = data.train[0]
  setup = make_setup(config, example, model_cfg, devices)
  train_fn, eval_fn = jit_steps(setup)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      json.dump({'config': _config_dict(config), 'model': model_cfg.to_dict()}, f, indent=2)

  tc = config.train
  ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), max_to_keep=int(tc.keep_checkpoints),
                               best_metric=tc.get('best_metric') or None, best_mode=tc.get('best_mode', 'min'),
                               async_save=bool(tc.get('async_checkpoints', True)))
  start = ckpts.latest_step()
  if start is not None:
    state, loader_state, _ = ckpts.restore(setup.abstract_state, start)
    data.train.set_state(loader_state)
    log(f'resumed from step {start} in {ckpts.directory}')
  else:
    state = setup.init_fn(int(config.seed))
    if init is not None:
      merged = pretrained.merge_params(jax.device_get(state['params']), init.params, where=config.model.init_from)
      state = dict(state, params=jax.device_put(merged, setup.state_shardings['params']))
    start = 0
  writer = MetricsWriter(workdir, resume_step=start)
  total = int(tc.steps)
  n_params = heads_lib.count_params(setup.abstract_state['params'])
  log(f'model {config.model.preset} ({n_params / 1e6:.2f}M params), objectives {objectives}, mesh '
      f'{dict(setup.mesh.shape)}, {total} steps of {config.data.batch_size} x {data.tokens_per_example} tokens')

  def check_finite(state):
    bad = int(jax.device_get(state['nonfinite_step']))
    if bad >= 0:
      raise FloatingPointError(f'loss or gradients became NaN/Inf at step {bad + 1}; stopped without saving. The '
                               f'last checkpoint ({ckpts.latest_step()}) holds finite parameters; lower '
                               'config.optim.learning_rate or enable clip_norm.')

  def save(state, step, metrics=None):
    check_finite(state)
    ckpts.save(step, state, loader_state=data.train.get_state(), config=_config_dict(config), metrics=metrics)

  def run_eval(state, step):
    if data.eval is None:
      return None
    rng = jax.random.key(int(config.seed) + 7)
    history = [eval_fn(state['params'], global_batch(data.eval[i], setup.batch_sharding), rng)
               for i in range(int(tc.eval_steps))]
    values = summarize(history)
    writer.write(step, 'eval', values)
    log(f'step {step}: eval loss {values["loss"]:.4f}')
    return values

  history, first_loss, last_train, last_eval = [], None, None, None
  t_window, steps_window, t_start = time.time(), 0, time.time()
  status = 'done'
  try:
    with _Preemption() as preempt:
      step = start
      while step < total:
        batch = global_batch(next(data.train), setup.batch_sharding)
        state, metrics = train_fn(state, batch)
        step += 1
        history.append(metrics)
        steps_window += 1
        if step % int(tc.log_every) == 0 or step == total:
          check_finite(state)
          values = summarize(history)
          elapsed = time.time() - t_window
          values['steps_per_sec'] = steps_window / max(elapsed, 1e-9)
          values['tokens_per_sec'] = values['steps_per_sec'] * int(config.data.batch_size) * data.tokens_per_example
          writer.write(step, 'train', values)
          first_loss = values['loss'] if first_loss is None else first_loss
          last_train = values
          eta = (total - step) / max(values['steps_per_sec'], 1e-9)
          log(f'step {step}/{total}  loss {values["loss"]:.4f}  {values["steps_per_sec"]:.2f} steps/s  '
              f'{values["tokens_per_sec"]:.0f} tokens/s  ETA {_fmt_time(eta)}')
          history, t_window, steps_window = [], time.time(), 0
        if tc.eval_every and step % int(tc.eval_every) == 0:
          last_eval = run_eval(state, step) or last_eval
        if step % int(tc.checkpoint_every) == 0 or step == total:
          best = tc.get('best_metric')
          save(state, step, metrics=({best: last_eval[best.split('/', 1)[-1]]} if best and last_eval else None))
        if preempt.requested:
          if step % int(tc.checkpoint_every):
            save(state, step)
          status = 'preempted'
          log(f'SIGTERM: saved step {step}, exiting')
          break
    if status == 'done' and tc.eval_steps and data.eval is not None and last_eval is None:
      last_eval = run_eval(state, step)  # before the writer closes: a closed TensorBoard writer opens a second file
  finally:
    # Also on an error (a NaN stop included): wait for in-flight async saves, so the last good checkpoint lands.
    ckpts.close()
    writer.close()
  return {'status': status, 'steps': step, 'first_loss': first_loss,
          'final_loss': None if last_train is None else last_train['loss'],
          'steps_per_sec': None if last_train is None else last_train['steps_per_sec'],
          'tokens_per_sec': None if last_train is None else last_train['tokens_per_sec'],
          'eval': last_eval, 'wall_s': time.time() - t_start, 'workdir': os.path.abspath(workdir),
          'params': n_params, 'state': state}


def benchmark_tokens_per_second(*, kind: str, seq_len: int, preset: Optional[str] = None, batch_size: int = 8,
                                steps: int = 5, vocab_size: int = 8000) -> float:
  """Tokens/s one jitted train step consumes on this machine for a preset on random data (benchmarks use it)."""
  preset = preset or {'mlm': 'bert-small', 'clm': 'gpt2-tiny', 'span': 't5-tiny', 'nsp': 'bert-small'}[kind]
  objectives = {'mlm': {'mlm': 1.0}, 'nsp': {'mlm': 1.0, 'nsp': 1.0}, 'clm': {'clm': 1.0}, 'span': {'span': 1.0}}[kind]
  cfg = transformer.preset(preset, vocab_size=vocab_size, max_len=max(seq_len, 512))
  rng = np.random.default_rng(0)
  b, t = batch_size, seq_len
  ids = lambda shape: rng.integers(5, vocab_size, shape).astype(np.int32)
  ones = lambda shape: np.ones(shape, np.int32)
  if kind == 'clm':
    batch = dict(tokens=ids((b, t)), targets=ids((b, t)), weights=np.ones((b, t), np.float32), segment_ids=ones((b, t)))
  elif kind == 'span':
    batch = dict(encoder_tokens=ids((b, t)), encoder_segment_ids=ones((b, t)), decoder_tokens=ids((b, t // 4)),
                 decoder_targets=ids((b, t // 4)), decoder_weights=np.ones((b, t // 4), np.float32),
                 decoder_segment_ids=ones((b, t // 4)))
  else:
    p = int(round(0.15 * t)) + 1
    batch = dict(tokens=ids((b, t)), segment_ids=ones((b, t)), token_type_ids=np.zeros((b, t), np.int32),
                 masked_positions=rng.integers(0, t, (b, p)).astype(np.int32), masked_ids=ids((b, p)),
                 masked_weights=np.ones((b, p), np.float32), nsp_labels=np.zeros((b,), np.int32))
  config = ml_collections.ConfigDict(dict(
      objectives=objectives, model=dict(preset=preset, overrides={}, generator_preset='', generator_overrides={}),
      optim=optim.default_config(), mesh=dict(shape=(-1, 1, 1), rules=None), data=dict(batch_size=b)))
  setup = make_setup(config, batch, cfg)
  train_fn, _ = jit_steps(setup)
  state = setup.init_fn(0)
  gb = global_batch(batch, setup.batch_sharding)
  state, m = train_fn(state, gb)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = train_fn(state, gb)
  jax.block_until_ready(m)
  tokens = b * (t + (t // 4 if kind == 'span' else 0))
  return steps * tokens / (time.perf_counter() - t0)
