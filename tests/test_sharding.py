"""Sharding on 8 fake CPU devices and across two processes: DP, FSDP, TP and a 2x2x2 mix equal the single-device run;
FSDP divides memory by N; checkpoints reshard; meshes that do not fit fail before compiling; a missing peer times out
(train/core/distributed.py).

JAX fixes its device count when it initializes, and pytest workers have initialized it already, so every scenario
group runs in a fresh interpreter (tests/sharding_worker.py) and reports one JSON line. XLA's CPU backend optimization
is turned down there: the steps are tiny and compile time dominates (about 3x less), and both sides of every
comparison use the same flags.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'sharding_worker.py')
FAST_COMPILE = '--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true'
TOL = 1e-5


def _env(devices: int | None):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL='2')
  flags = FAST_COMPILE + (f' --xla_force_host_platform_device_count={devices}' if devices else '')
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' ' + flags).strip()
  return env


def _start(*args, devices: int | None = 8):
  return subprocess.Popen([sys.executable, WORKER, *map(str, args)], cwd=ROOT, env=_env(devices),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _result(proc, timeout: float = 600) -> dict:
  try:
    out, _ = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f'sharding worker timed out after {timeout}s:\n{out[-4000:]}')
  lines = [l for l in out.splitlines() if l.startswith('RESULT ')]
  assert proc.returncode == 0 and lines, f'sharding worker failed (exit {proc.returncode}):\n{out[-6000:]}'
  return json.loads(lines[-1][len('RESULT '):])


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.parametrize('kind', ['bert', 'llama', 't5'])
def test_data_fsdp_tensor_and_mixed_parallelism_equal_one_device(kind):
  """BERT (mlm+nsp), LLaMA (clm, grouped-query) and T5 (span, SGD with momentum): 3 steps on (8,1,1), (1,8,1),
  (1,1,8) and (2,2,2) give the single-device losses and parameters."""
  t0 = time.time()
  r = _result(_start('parallel', kind))
  seconds = json.dumps({k: round(v, 1) for k, v in r['seconds'].items()})
  print(f'\n{kind}: wall {time.time() - t0:.1f}s, per mesh {seconds}'
        f'\n  max |loss diff| {r["loss_diff"]}\n  max |param diff| {r["param_diff"]}\n  losses {r["losses"]["1x1x1"]}')
  assert set(r['param_diff']) == {'8x1x1', '1x8x1', '1x1x8', '2x2x2'}
  assert r['init_diff_2x2x2'] == 0.0  # the jitted init creating sharded params makes the single-device values
  for mesh in r['param_diff']:
    assert r['loss_diff'][mesh] <= TOL, (mesh, r['losses'])
    assert r['param_diff'][mesh] <= TOL, (mesh, r['param_diff'])
  # The run learned something (the comparison is not between two untouched initializations).
  assert r['losses']['1x1x1'][0] != r['losses']['1x1x1'][-1]
  if kind == 'bert':
    # FSDP really shards: one device holds about 1/8 of params + optimizer state.
    ratio = r['fsdp_per_device_bytes'] / r['fsdp_total_bytes']
    print(f'  FSDP (1,8,1): {r["fsdp_per_device_bytes"]} of {r["fsdp_total_bytes"]} bytes of params + Adam state on '
          f'one device = {ratio:.4f} (1/8 = 0.125)')
    assert ratio < 1.5 / 8, ratio
    # And the 2x2x2 state is laid out as the rules say: vocab and heads over tensor, embed over fsdp.
    assert r['specs_2x2x2'] == {
        'embed/token/embedding': ['tensor', 'fsdp'],
        'transformer/stack/layers/self_attn/query/kernel': [None, 'fsdp', 'tensor', None],
        'transformer/stack/layers/mlp/wi/kernel': [None, 'fsdp', 'tensor']
    }


def test_checkpoint_saved_on_2x2x2_restores_on_8x1x1_and_one_device(tmp_path):
  r = _result(_start('checkpoint', tmp_path / 'ckpt'))
  print(f'\ncontinue on 2x2x2: loss {r["continue_loss_2x2x2"]}; ' + json.dumps(r['targets']))
  assert set(r['targets']) == {'8x1x1', '1'}
  for name, t in r['targets'].items():
    assert t['restored_param_diff'] == 0.0, name
    assert t['shardings_as_asked'], name
    assert t['step'] == 3 and t['loader_state'] == {'position': 2}, name
    assert t['loss_diff'] <= TOL and t['param_diff_after_step'] <= TOL, (name, t)


def test_mesh_batch_and_dimension_errors_name_the_field():
  r = _result(_start('errors'))
  assert r['resolved_default'] == [8, 1, 1] and r['resolved_fill'] == [2, 2, 2]
  for key in ('mesh_product', 'mesh_product_fill'):
    assert r[key].startswith('config.mesh.shape=(3, '), r[key]
  assert 'config.mesh.shape' in r['mesh_product'] and 'there are 8 devices' in r['mesh_product']
  assert r['batch_size'].startswith('config.data.batch_size=12') and 'multiple of 8' in r['batch_size']
  assert 'parameter transformer/stack/layers/self_attn/' in r['heads'] and 'dimension of 2' in r['heads']
  assert 'parameter embed/token/embedding' in r['vocab'] and 'dimension of 100' in r['vocab']


def test_two_processes_equal_one_process_with_four_devices():
  """Two processes x 2 CPU devices on 127.0.0.1 (gloo), each feeding its half of the batch, vs 1 process x 4."""
  coordinator = f'127.0.0.1:{_free_port()}'
  t0 = time.time()
  procs = [_start('multiprocess', coordinator, 2, i, devices=None) for i in range(2)]
  ref = _start('multiprocess', '', 1, 0, devices=None)
  results = [_result(p) for p in procs]
  r1 = _result(ref)
  print(f'\nwall {time.time() - t0:.1f}s; 2 processes: {results[0]["losses"]}, {results[1]["losses"]}; '
        f'1 process: {r1["losses"]}')
  assert [r['process_index'] for r in results] == [0, 1]
  for r in results:
    assert r['process_count'] == 2 and r['global_devices'] == 4 and r['local_devices'] == 2
    assert max(abs(a - b) for a, b in zip(r['losses'], r1['losses'])) <= TOL, (r['losses'], r1['losses'])
  assert r1['process_count'] == 1 and r1['local_devices'] == 4


def test_missing_peer_is_a_clear_timeout_error():
  """Process 0 whose peer never starts, and process 1 whose coordinator never starts: RuntimeError, no hang."""
  coord0, coord1 = f'127.0.0.1:{_free_port()}', f'127.0.0.1:{_free_port()}'
  procs = [_start('timeout', coord0, 0, 5, devices=None), _start('timeout', coord1, 1, 5, devices=None)]
  r0, r1 = (_result(p, timeout=120) for p in procs)
  print(f'\n{r0}\n{r1}')
  assert coord0 in r0['error'] and 'process id(s) [1] never connected' in r0['error']
  assert coord1 in r1['error'] and 'could not be reached' in r1['error']
  assert r0['seconds'] < 60 and r1['seconds'] < 60


def _cli(workdir, *extra, devices: int):
  return subprocess.Popen([
      sys.executable, '-m', 'train.main', '--config=configs/gpt.py:runlocal', f'--workdir={workdir}',
      '--config.train.steps=6', '--config.train.checkpoint_every=3', '--config.train.log_every=3', *extra
  ], cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _losses(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  return [(r['step'], r['split'], round(r['loss'], 4)) for r in rows]


def test_two_train_main_processes_train_like_one_process(tmp_path):
  """The README's multi-host command: two `python -m train.main` processes x 2 CPU devices on one workdir train,
  checkpoint and log (process 0 alone writes) the losses one process with 4 devices logs."""
  coordinator = f'127.0.0.1:{_free_port()}'
  procs = [
      _cli(tmp_path / 'two', f'--coordinator={coordinator}', '--num_processes=2', f'--process_id={i}', devices=2)
      for i in range(2)
  ]
  one = _cli(tmp_path / 'one', devices=4)
  outs = [p.communicate(timeout=600)[0] for p in (*procs, one)]
  assert [p.returncode for p in (*procs, one)] == [0, 0, 0], '\n'.join(o[-3000:] for o in outs)
  assert 'done: 6 steps' in outs[0] and 'done:' not in outs[1]  # one console
  assert sorted(os.listdir(tmp_path / 'two' / 'checkpoints')) == ['3', '6']
  two, single = _losses(tmp_path / 'two'), _losses(tmp_path / 'one')
  assert [r[:2] for r in two] == [r[:2] for r in single] == [(3, 'train'), (6, 'train'), (6, 'eval')]
  assert max(abs(a[2] - b[2]) for a, b in zip(two, single)) <= 1e-3, (two, single)
