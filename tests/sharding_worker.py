"""Subprocess side of tests/test_sharding.py: runs one group of sharding scenarios and prints one JSON line.

The fake CPU device count (and, for multi-process runs, jax.distributed) must be set before JAX initializes, which a
pytest worker that already imported JAX cannot do; so each group runs here, in a fresh interpreter:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py parallel bert
  python tests/sharding_worker.py multiprocess 127.0.0.1:PORT 2 0     (two CPU devices per process)
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.core import host  # noqa: E402

host.size_host_device_pool()  # before JAX starts: threads enough for 8 devices' collectives

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from model import pytree  # noqa: E402
from model import transformer  # noqa: E402
from train.core import distributed  # noqa: E402
from train.core import optim  # noqa: E402
from train.core import partitioning as part  # noqa: E402
from train.core import trainer  # noqa: E402
from train.data.loader import global_batch  # noqa: E402

VOCAB = 128  # divisible by every tensor degree used here (vocab is sharded over `tensor`)
SEQ = 16
BATCH = 8  # divisible by every data-parallel degree used here

# Every sharded dimension divides 8: 8 heads (kv heads too), d_model 128, d_ff 512, vocab 128. No dropout, so the
# sharded and single-device runs compute the same function.
MODELS = {
    'bert': ('bert-tiny', {
        'mlm': 1.0,
        'nsp': 1.0
    }, dict(num_heads=8), 'adamw'),
    'gpt': ('gpt2-tiny', {
        'clm': 1.0
    }, dict(num_heads=8), 'adamw'),
    'llama': ('llama-tiny', {
        'clm': 1.0
    }, dict(num_heads=16, num_kv_heads=8, head_dim=8), 'adamw'),
    # T5 with SGD: under Adam or Adafactor, 1e-7 gradient noise on elements whose gradient is ~0 becomes a different
    # step direction (1e-5..2e-3 after 3 steps, growing with the learning rate) though losses agree to 1e-6.
    't5': ('t5-tiny', {
        'span': 1.0
    }, dict(num_heads=8, head_dim=16), 'sgd'),
}


def make_batch(kind: str, b: int = BATCH, t: int = SEQ, seed: int = 0) -> dict[str, np.ndarray]:
  """A random numpy batch with the keys the objectives of MODELS[kind] read."""
  rng = np.random.default_rng(seed)
  ids = lambda shape: rng.integers(5, VOCAB, shape).astype(np.int32)
  ones = lambda shape: np.ones(shape, np.int32)
  objectives = MODELS[kind][1]
  if 'clm' in objectives:
    return dict(tokens=ids((b, t)), targets=ids((b, t)), weights=np.ones((b, t), np.float32), segment_ids=ones((b, t)))
  if 'span' in objectives:
    d = t // 2
    return dict(encoder_tokens=ids((b, t)), encoder_segment_ids=ones((b, t)), decoder_tokens=ids((b, d)),
                decoder_targets=ids((b, d)), decoder_weights=np.ones((b, d), np.float32), decoder_segment_ids=ones(
                    (b, d)))
  p = 4
  return dict(tokens=ids((b, t)), segment_ids=ones(
      (b, t)), token_type_ids=(np.arange(t) >= t // 2).astype(np.int32)[None].repeat(b, 0),
              masked_positions=rng.integers(0, t, (b, p)).astype(np.int32), masked_ids=ids((b, p)),
              masked_weights=np.ones((b, p), np.float32), nsp_labels=rng.integers(0, 2, (b,)).astype(np.int32))


def make_config(kind: str, mesh_shape=(-1, 1, 1), batch_size: int = BATCH) -> ml_collections.ConfigDict:
  preset, objectives, overrides, optimizer = MODELS[kind]
  opt = optim.default_config()
  opt.optimizer = optimizer
  opt.learning_rate = 0.1 if optimizer == 'sgd' else 1e-3
  opt.momentum = 0.9 if optimizer == 'sgd' else 0.0
  opt.warmup_steps = 0
  opt.total_steps = 100
  return ml_collections.ConfigDict(
      dict(
          seed=0, objectives=objectives, model=dict(
              preset=preset, overrides=dict(overrides, vocab_size=VOCAB, dropout_rate=0.0, attention_dropout_rate=0.0,
                                            mlp_dropout_rate=0.0), generator_preset='', generator_overrides={}),
          optim=opt, mesh=dict(shape=tuple(mesh_shape), rules=None), data=dict(batch_size=batch_size)))


def model_cfg(config):
  return transformer.preset(config.model.preset, **dict(config.model.overrides))


def make_setup(config, batch, cfg, devices=None):
  """The trainer's parts (model, loss, optimizer, mesh: checked here) -> its Setup (shardings, sharded init)."""
  return trainer.make_setup(trainer.build_parts(config, cfg, devices), batch)


def setup_for(kind, mesh_shape, devices=None, batch_size=BATCH):
  config = make_config(kind, mesh_shape, batch_size)
  return make_setup(config, make_batch(kind, batch_size), model_cfg(config), devices)


def train(setup, batches, state=None):
  """Runs one train step per batch -> (state, [loss per step])."""
  step_fn, _ = trainer.jit_steps(setup)
  state = setup.init_fn(0) if state is None else state
  losses = []
  for b in batches:
    state, metrics = step_fn(state, global_batch(b, setup.batch_sharding))
    losses.append(float(metrics['loss']))
  return state, losses


def max_abs_diff(a, b) -> float:
  return float(
      max(
          np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)))
          for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def spec_of(sharding_tree, path: str):
  """The PartitionSpec (as a list of str/None/list) of the params leaf whose '/'-joined dict path is `path`."""
  for p, sh in jax.tree_util.tree_flatten_with_path(sharding_tree)[0]:
    if pytree.path_str(p) == path:
      return [list(a) if isinstance(a, tuple) else a for a in sh.spec]
  raise KeyError(path)


def group_parallel(kind: str, steps: int = 3) -> dict:
  """Single device vs (8,1,1), (1,8,1), (1,1,8), (2,2,2): per-step losses and final params.

  Only the (2,2,2) run creates its state with its own jitted, sharded init (checked equal to the single-device init);
  the others start from the single-device init placed onto their shardings, which saves a compile each.
  """
  batches = [make_batch(kind, seed=i) for i in range(steps)]
  t0 = time.time()
  ref_setup = setup_for(kind, (1, 1, 1), jax.devices()[:1])
  init = host(ref_setup.init_fn(0))
  out = {'kind': kind, 'losses': {}, 'seconds': {}, 'param_diff': {}, 'loss_diff': {}}
  ref_params = ref_losses = None
  for shape in ((1, 1, 1), (8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)):
    name = 'x'.join(map(str, shape))
    t0 = t0 if shape == (1, 1, 1) else time.time()
    setup = ref_setup if shape == (1, 1, 1) else setup_for(kind, shape)
    if shape == (2, 2, 2):
      state = setup.init_fn(0)
      out['init_diff_2x2x2'] = max_abs_diff(host(state), init)
    else:
      state = jax.device_put(init, setup.state_shardings)
    state, losses = train(setup, batches, state)
    out['seconds'][name] = time.time() - t0
    out['losses'][name] = losses
    if shape == (1, 1, 1):
      ref_params, ref_losses = host(state['params']), losses
      continue
    out['loss_diff'][name] = float(np.max(np.abs(np.array(losses) - np.array(ref_losses))))
    out['param_diff'][name] = max_abs_diff(host(state['params']), ref_params)
    if shape == (1, 8, 1):
      tree = {'params': state['params'], 'opt_state': state['opt_state']}
      out['fsdp_per_device_bytes'] = part.per_device_bytes(tree)
      out['fsdp_total_bytes'] = part.total_bytes(tree)
    if shape == (2, 2, 2):
      # The sharding the state really has after training (not just what was asked for).
      out['specs_2x2x2'] = {
          k: spec_of(jax.tree.map(lambda x: x.sharding, state['params']), k) for k in _probe_paths(kind)
      }
  return out


def _probe_paths(kind):
  if kind == 'bert':
    return [
        'embed/token/embedding', 'transformer/stack/layers/self_attn/query/kernel',
        'transformer/stack/layers/mlp/wi/kernel'
    ]
  return []


def group_checkpoint(kind: str = 'gpt', tmpdir: str = '') -> dict:
  """Train 2 steps on (2,2,2), save, then one more step there and after restoring on (8,1,1) and on one device."""
  from train.core import checkpoint as ckpt_lib
  batches = [make_batch(kind, seed=i) for i in range(3)]
  src = setup_for(kind, (2, 2, 2))
  state, _ = train(src, batches[:2])
  ckpts = ckpt_lib.Checkpoints(tmpdir, async_save=True)
  ckpts.save(2, state, loader_state={'position': 2}, config={'mesh': [2, 2, 2]})
  ckpts.wait()
  saved = host(state['params'])
  state, (cont_loss,) = train(src, batches[2:], state)
  cont_params = host(state['params'])
  out = {'continue_loss_2x2x2': cont_loss, 'targets': {}}
  for name, shape, devices in (('8x1x1', (8, 1, 1), None), ('1', (1, 1, 1), jax.devices()[:1])):
    dst = setup_for(kind, shape, devices)
    restored, loader_state, _ = ckpts.restore(dst.abstract_state)
    same_sharding = all(
        x.sharding.is_equivalent_to(sh, x.ndim)
        for x, sh in zip(jax.tree.leaves(restored), jax.tree.leaves(dst.state_shardings)))
    restored_diff = max_abs_diff(host(restored['params']), saved)
    restored, (loss,) = train(dst, batches[2:], restored)
    out['targets'][name] = dict(restored_param_diff=restored_diff, shardings_as_asked=same_sharding,
                                step=int(restored['step']), loader_state=loader_state, next_loss=loss,
                                loss_diff=abs(loss - cont_loss),
                                param_diff_after_step=max_abs_diff(host(restored['params']), cont_params))
  ckpts.close()
  return out


def _error(fn) -> str:
  try:
    fn()
  except ValueError as e:
    return str(e)
  return ''


def group_errors() -> dict:
  """The checks that run before anything compiles; build_parts and make_setup only trace shapes here."""
  return {
      'resolved_default': list(part.resolve_mesh_shape((-1, 1, 1), 8)),
      'resolved_fill': list(part.resolve_mesh_shape((2, -1, 2), 8)),
      'mesh_product': _error(lambda: setup_for('bert', (3, 1, 1))),
      'mesh_product_fill': _error(lambda: setup_for('bert', (3, -1, 1))),
      'batch_size': _error(lambda: setup_for('bert', (4, 2, 1), batch_size=12)),
      # bert-tiny's 2 heads cannot be split 8 ways by tensor parallelism.
      'heads': _error(lambda: make_setup(make_config('bert', (1, 1, 8)), make_batch('bert'),
                                         transformer.preset('bert-tiny', vocab_size=VOCAB))),
      # vocab 100 cannot be split 8 ways over `tensor`.
      'vocab': _error(lambda: make_setup(make_config('gpt', (1, 1, 8)), make_batch('gpt'),
                                         model_cfg(make_config('gpt')).replace(vocab_size=100))),
  }


def group_multiprocess(coordinator: str, num_processes: int, process_id: int, kind: str = 'gpt',
                       steps: int = 3) -> dict:
  """One of `num_processes` processes with 2 CPU devices each, feeding its own slice of the global batch.

  coordinator '' is the single-process reference (4 local devices, the whole batch)."""
  if coordinator:
    distributed.initialize_distributed(coordinator, num_processes, process_id, timeout_s=60)
  n = jax.process_count()
  setup = setup_for(kind, (2, -1, 1))  # data x fsdp over all 4 devices
  step_fn, _ = trainer.jit_steps(setup)
  state = setup.init_fn(0)
  losses = []
  rows = BATCH // n
  for i in range(steps):
    full = make_batch(kind, seed=i)
    local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in full.items()}
    state, metrics = step_fn(state, global_batch(local, setup.batch_sharding))
    losses.append(float(metrics['loss']))
  return {
      'process_index': jax.process_index(),
      'process_count': n,
      'global_devices': jax.device_count(),
      'local_devices': jax.local_device_count(),
      'mesh': dict(setup.mesh.shape),
      'losses': losses
  }


def group_timeout(coordinator: str, process_id: int, timeout_s: int) -> dict:
  t0 = time.time()
  try:
    distributed.initialize_distributed(coordinator, 2, process_id, timeout_s=timeout_s)
  except RuntimeError as e:
    return {'error': str(e), 'seconds': time.time() - t0}
  return {'error': '', 'seconds': time.time() - t0}


def main(argv):
  group = argv[1]
  if group == 'parallel':
    result = group_parallel(argv[2])
  elif group == 'checkpoint':
    result = group_checkpoint(tmpdir=argv[2])
  elif group == 'errors':
    result = group_errors()
  elif group == 'multiprocess':
    jax.config.update('jax_num_cpu_devices', 2 if argv[2] else 4)
    result = group_multiprocess(argv[2], int(argv[3]), int(argv[4]))
  elif group == 'timeout':
    result = group_timeout(argv[2], int(argv[3]), int(argv[4]))
  else:
    raise SystemExit(f'unknown group {group!r}')
  print('RESULT ' + json.dumps(result), flush=True)


if __name__ == '__main__':
  main(sys.argv)
