"""Training throughput of lmlab's own train step (the trainer's build_parts -> make_setup -> jit_steps, not a copy)
on the reference configs, beside what a user would run instead, in the same invocation.

Configs (a)-(d) are the reference scripts' (../shared/bench/configs.py: GPT 4x128 at 12 x 64 with 65 characters,
GPT 6x512 at 8 x 256, BERT-MLM 4x256 at 16 x 128, BERT-MLM 4x768 at 8 x 128); 'llama' (4x256, 8 heads over 4 kv
heads, SwiGLU, RoPE, RMSNorm, untied) and 't5' (4+4 x 256, relative bias, 8 x 128 -> 32) have their references in
benchmarks/torch_models_reference.py (Hugging Face LlamaForCausalLM / T5ForConditionalGeneration, same shapes).
Everything is fp32, dropout 0, AdamW lr 3e-4, weight decay 0.01, no clipping, on one fixed synthetic batch.

Each measurement runs in its own process (several per config; the median and range over processes are printed):
tokens/s, MFU against a jnp matmul peak measured in the same run, compile time (a second process of the same config
reads XLA's persistent compilation cache when --cache_dir is given) and the process's peak RSS.

  python benchmarks/train_throughput.py [--configs=a,b,c,d,llama,t5] [--procs=3] [--reference] [--json]
      [--dtype=float32|bfloat16]

--reference also runs, per config, Hugging Face torch eager (and torch.compile with --compile_reference) and the plain
Flax script from ../shared/bench, and prints lmlab's ratio to each. Measure on a quiet machine (check `uptime`).
--dtype=bfloat16 measures mixed precision instead (lmlab's ModelConfig dtype='bfloat16' over float32 parameters and
optimizer, against torch.autocast bfloat16 in benchmarks/torch_autocast_reference.py; no plain Flax row): on a CPU
with AMX both sides' matmuls run on its bfloat16 tiles. The CPU model and its extensions are printed with the table.

lmlab's processes start as its command-line jobs do (train/core/host.py start_job: single-device programs run inline,
malloc keeps freed memory), torch's and plain Flax's under the environment this script was given, as their users run
them. The faults column is lmlab's minor page faults per timed step.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / 'shared' / 'bench'
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))
import machine  # noqa: E402  (benchmarks/machine.py)
from train.core import host  # noqa: E402

LR, WEIGHT_DECAY, MASK_PROB = 3e-4, 0.01, 0.15
# kind, layers, heads, width, MLP width, vocab, batch, length (+ kv heads, decoder length where they apply)
CONFIGS = {
    'a': dict(kind='gpt', L=4, H=4, d=128, ff=512, V=65, B=12, T=64),
    'b': dict(kind='gpt', L=6, H=8, d=512, ff=2048, V=8192, B=8, T=256),
    'c': dict(kind='bert', L=4, H=4, d=256, ff=1024, V=30522, B=16, T=128),
    'd': dict(kind='bert', L=4, H=12, d=768, ff=3072, V=30522, B=8, T=128),
    'llama': dict(kind='llama', L=4, H=8, KV=4, d=256, ff=688, V=8192, B=8, T=256),
    't5': dict(kind='t5', L=4, H=4, d=256, ff=1024, V=8192, B=8, T=128, T_dec=32),
}
TIMED_STEPS = {'a': 60, 'b': 8, 'c': 10, 'd': 8, 'llama': 10, 't5': 12}
WARMUP = 3


def n_matmul(c) -> int:
  """Weights that take part in a matmul for every token (the reference's FLOP convention), embeddings as the LM head."""
  d, ff, L, V = c['d'], c['ff'], c['L'], c['V']
  if c['kind'] == 'llama':
    kv = c['d'] // c['H'] * c['KV']
    return L * (2 * d * d + 2 * d * kv + 3 * d * ff) + V * d
  attn_mlp = 4 * d * d + 2 * d * ff
  if c['kind'] == 't5':
    return L * attn_mlp + L * (attn_mlp + 4 * d * d) + V * d
  return L * attn_mlp + V * d + (d * d if c['kind'] == 'bert' else 0)


def flops_per_step(c) -> float:
  """6 N tokens + attention's 12 L T d per token; the MLM head counted at every position, as the reference does."""
  tokens = c['B'] * c['T']
  if c['kind'] == 't5':
    td = c['T_dec']
    enc = c['B'] * c['T'] * (6 * c['L'] * (4 * c['d'] ** 2 + 2 * c['d'] * c['ff']) + 12 * c['L'] * c['T'] * c['d'])
    dec_n = c['L'] * (8 * c['d'] ** 2 + 2 * c['d'] * c['ff']) + c['V'] * c['d']
    dec = c['B'] * td * (6 * dec_n + 12 * c['L'] * (td + c['T']) * c['d'])
    return float(enc + dec)
  return float(tokens * (6 * n_matmul(c) + 12 * c['L'] * c['T'] * c['d']))


# ------------------------------------------------------------------------------------------- lmlab's own step


def model_config(c, dtype: str = 'float32'):
  """The lmlab ModelConfig of a benchmark config, computing in `dtype` over float32 parameters."""
  from model.config import preset
  common = dict(vocab_size=c['V'], d_model=c['d'], num_heads=c['H'], num_layers=c['L'], d_ff=c['ff'], dropout_rate=0.0,
                attention_dropout_rate=0.0, mlp_dropout_rate=0.0, dtype=dtype)
  if c['kind'] == 'gpt':
    return preset('gpt2-tiny', max_len=max(c['T'], 64), **common)
  if c['kind'] == 'bert':
    return preset('bert-mini', max_len=512, **common)
  if c['kind'] == 'llama':
    return preset('llama-tiny', num_kv_heads=c['KV'], max_len=c['T'], **common)
  return preset('t5-tiny', head_dim=c['d'] // c['H'], **common)


def synthetic_batch(c, seed=0):
  """One fixed batch in lmlab's batch contract (train/data/__init__.py), numpy."""
  import numpy as np
  rng = np.random.default_rng(seed)
  b, t, v = c['B'], c['T'], c['V']
  ones = np.ones((b, t), np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
  if c['kind'] in ('gpt', 'llama'):
    toks = rng.integers(0, v, size=(b, t + 1)).astype(np.int32)
    weights = np.ones((b, t), np.float32)
    return dict(tokens=toks[:, :-1], targets=toks[:, 1:], weights=weights, segment_ids=ones, positions=positions)
  if c['kind'] == 'bert':
    ids = rng.integers(1000, v, size=(b, t)).astype(np.int32)
    p = int(round(t * MASK_PROB))
    pos = np.sort(np.stack([rng.choice(np.arange(1, t), p, replace=False) for _ in range(b)]), axis=1).astype(np.int32)
    masked_ids = np.take_along_axis(ids, pos, axis=1)
    tokens = ids.copy()
    np.put_along_axis(tokens, pos, 103, axis=1)
    return dict(tokens=tokens, segment_ids=ones, positions=positions, token_type_ids=np.zeros_like(ones),
                masked_positions=pos, masked_ids=masked_ids, masked_weights=np.ones(pos.shape, np.float32))
  td = c['T_dec']
  enc = rng.integers(2, v, size=(b, t)).astype(np.int32)
  dec = rng.integers(2, v, size=(b, td + 1)).astype(np.int32)
  dones = np.ones((b, td), np.int32)
  return dict(encoder_tokens=enc, encoder_segment_ids=ones, encoder_positions=positions, decoder_tokens=dec[:, :-1],
              decoder_targets=dec[:, 1:], decoder_weights=np.ones((b, td), np.float32), decoder_segment_ids=dones,
              decoder_positions=np.broadcast_to(np.arange(td, dtype=np.int32), (b, td)).copy())


def lmlab_step(c, dtype: str = 'float32'):
  """(jitted train step, initial state, global batch) built the way train.main builds them."""
  import ml_collections
  from train.core import optim
  from train.core import trainer
  from train.data.loader import global_batch
  objective = {'gpt': 'clm', 'llama': 'clm', 'bert': 'mlm', 't5': 'span'}[c['kind']]
  opt = optim.default_config()
  opt.update(learning_rate=LR, weight_decay=WEIGHT_DECAY, clip_norm=0.0, decay='constant', eps=1e-8)
  config = ml_collections.ConfigDict(
      dict(objectives={objective: 1.0}, model=dict(preset='custom', overrides={}), optim=opt,
           mesh=dict(shape=(-1, 1, 1), rules=None), data=dict(batch_size=c['B'])))
  batch = synthetic_batch(c)
  setup = trainer.make_setup(trainer.build_parts(config, model_config(c, dtype)), batch)
  train_fn, _ = trainer.jit_steps(setup)
  return train_fn, setup.init_fn(0), global_batch(batch, setup.batch_sharding)


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(name: str, steps: int, cache_dir: str | None, dtype: str = 'float32') -> dict:
  """One process: compile, warm up, time `steps` steps of lmlab on config `name`."""
  import jax
  if cache_dir:
    jax.config.update('jax_compilation_cache_dir', cache_dir)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  c = CONFIGS[name]
  r = time_steps(*lmlab_step(c, dtype), steps)
  med = r['step_s_median']
  tokens = c['B'] * c['T']
  return dict(impl='lmlab', config=name, tok_s_median=tokens / med, peak_rss_mb=peak_rss_mb(),
              gflops_achieved=flops_per_step(c) / med / 1e9, **r)


def time_steps(train_fn, state, batch, steps: int) -> dict:
  """Compiles the jitted step, runs WARMUP steps, then times `steps` of them one by one."""
  import jax
  t0 = time.perf_counter()
  compiled = train_fn.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  state, m = compiled(state, batch)
  loss_first = float(m['loss'])
  for _ in range(WARMUP - 1):
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  ts = []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    ts.append(time.perf_counter() - t0)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
  return dict(compile_s=compile_s, step_s_median=statistics.median(ts), loss_first=loss_first,
              loss_last=float(m['loss']), faults_per_step=faults)


# ------------------------------------------------------------------------------------------------ the driver


def run_json(cmd, cwd=None, env=None) -> dict:
  """Runs a command that prints one JSON line last; returns it (or {'error': ...})."""
  out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
  lines = [ln for ln in out.stdout.splitlines() if ln.startswith('{')]
  if out.returncode or not lines:
    return {'error': (out.stderr or out.stdout).strip().splitlines()[-1:] or ['no output']}
  return json.loads(lines[-1])


def matmul_peak() -> float:
  """jnp fp32 matmul GFLOP/s at 2048 (the reference's matmul_bench), measured now."""
  import jax
  import jax.numpy as jnp
  n = 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  ts = []
  for _ in range(10):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    ts.append(time.perf_counter() - t0)
  return 2 * n ** 3 / min(ts) / 1e9


def lmlab_runs(name, procs, cache_dir, dtype='float32') -> list[dict]:
  cmd = [sys.executable, __file__, f'--worker={name}', f'--steps={TIMED_STEPS[name]}', f'--dtype={dtype}']
  if cache_dir:
    cmd.append(f'--cache_dir={cache_dir}')
  return [run_json(cmd) for _ in range(procs)]


def reference_runs(name, procs, compile_ref, dtype='float32') -> dict[str, list[dict]]:
  """torch eager (+ torch.compile) and plain Flax on the same config, from ../shared/bench or our torch script;
  in bfloat16, torch eager under autocast (benchmarks/torch_autocast_reference.py)."""
  out = {}
  if dtype == 'bfloat16':
    script = str(ROOT / 'benchmarks' / 'torch_autocast_reference.py')
    return {'torch-autocast': [run_json([sys.executable, script, name]) for _ in range(procs)]}
  if name in ('a', 'b', 'c', 'd'):
    if not SHARED_BENCH.exists():
      return {'torch-eager': [{'error': [f'{SHARED_BENCH} not found']}]}
    base = [sys.executable]
    out['torch-eager'] = [run_json(base + ['torch_train_bench.py', name], cwd=SHARED_BENCH) for _ in range(procs)]
    if compile_ref:
      out['torch-compile'] = [run_json(base + ['torch_train_bench.py', name, '--compile'], cwd=SHARED_BENCH)]
    out['plain-flax'] = [run_json(base + ['jax_train_bench.py', name], cwd=SHARED_BENCH) for _ in range(procs)]
  else:
    script = str(ROOT / 'benchmarks' / 'torch_models_reference.py')
    out['torch-eager'] = [run_json([sys.executable, script, name]) for _ in range(procs)]
    if compile_ref:
      out['torch-compile'] = [run_json([sys.executable, script, name, '--compile'])]
  return out


MALLOC_LINE = ("lmlab's processes start as its jobs do (train/core/host.py start_job: single-device programs inline, "
               'malloc keeps freed memory); the references as given')


def summary(runs: list[dict]) -> dict:
  ok = [r for r in runs if 'error' not in r]
  if not ok:
    return {'error': runs[0].get('error') if runs else 'no runs'}
  tok = [r['tok_s_median'] for r in ok]
  s = dict(tok_s=statistics.median(tok), tok_s_min=min(tok), tok_s_max=max(tok), procs=len(ok))
  for key in ('compile_s', 'peak_rss_mb', 'loss_first', 'loss_last', 'faults_per_step'):
    if key in ok[0]:
      s[key] = [round(r[key], 3) for r in ok]
  return s


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--configs', default='a,b,c,d,llama,t5')
  p.add_argument('--procs', type=int, default=3, help='processes per measurement (median and range over them)')
  p.add_argument('--reference', action='store_true', help='also run torch eager and plain Flax in this invocation')
  p.add_argument('--compile_reference', action='store_true', help='with --reference: torch.compile too')
  p.add_argument('--cache_dir', default=None, help="jax's persistent compilation cache for lmlab's processes")
  p.add_argument('--json', action='store_true', help='print one JSON document instead of the table')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='compute dtype (parameters and optimizer stay float32)')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  p.add_argument('--steps', type=int, default=None, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.worker:
    host.start_job()  # as lmlab's command-line jobs start, before JAX does
    print(json.dumps(worker(a.worker, a.steps or TIMED_STEPS[a.worker], a.cache_dir, a.dtype)), flush=True)
    return
  names = [n for n in a.configs.split(',') if n]
  unknown = [n for n in names if n not in CONFIGS]
  if unknown:
    p.error(f'--configs: unknown {unknown}; known: {sorted(CONFIGS)}')
  peak = matmul_peak()
  results = {'machine': machine.describe(), 'dtype': a.dtype, 'malloc': MALLOC_LINE,
             'matmul_gflops': peak, 'uptime': os.getloadavg(),
             'configs': {}}
  for name in names:
    t0 = time.perf_counter()
    entry = {'lmlab': summary(lmlab_runs(name, a.procs, a.cache_dir, a.dtype))}
    if a.reference:
      runs = reference_runs(name, a.procs, a.compile_reference, a.dtype)
      entry.update({k: summary(v) for k, v in runs.items()})
    entry['mfu_lmlab'] = entry['lmlab'].get('tok_s', 0) * flops_per_step(
        CONFIGS[name]) / (CONFIGS[name]['B'] * CONFIGS[name]['T']) / 1e9 / peak
    results['configs'][name] = entry
    print(f'[{name} measured in {time.perf_counter() - t0:.0f}s]', file=sys.stderr, flush=True)
  if a.json:
    print(json.dumps(results, indent=1))
  else:
    print_table(results)


def print_table(results):
  print(results["machine"])
  print(results['malloc'])
  print(f"compute dtype {results['dtype']}; jnp fp32 matmul peak: {results['matmul_gflops']:.0f} GFLOP/s; load average "
        f"{results['uptime']}")
  print(f"{'config':7} {'impl':14} {'tokens/s (median, range)':>32} {'lmlab / it':>10} {'compile s':>12} "
        f"{'peak RSS MB':>12} {'faults/step':>12}")
  for name, entry in results['configs'].items():
    mine = entry['lmlab'].get('tok_s')
    for impl, s in entry.items():
      if impl.startswith('mfu'):
        continue
      if 'error' in s:
        print(f'{name:7} {impl:14} error: {s["error"]}')
        continue
      ratio = '' if impl == 'lmlab' or not mine else f"{mine / s['tok_s']:.2f}x"
      rng = f"{s['tok_s']:,.0f} ({s['tok_s_min']:,.0f}-{s['tok_s_max']:,.0f})"
      comp = '/'.join(f'{x:.1f}' for x in s.get('compile_s', []))
      rss = f"{max(s['peak_rss_mb']):,.0f}" if 'peak_rss_mb' in s else ''
      faults = f"{statistics.median(s['faults_per_step']):,.0f}" if 'faults_per_step' in s else ''
      print(f'{name:7} {impl:14} {rng:>32} {ratio:>10} {comp:>12} {rss:>12} {faults:>12}')
    if results['dtype'] == 'float32':  # the peak is float32's: a bfloat16 step on AMX would read over 100%
      print(f"{name:7} {'lmlab MFU':14} {100 * entry['mfu_lmlab']:31.1f}%")


if __name__ == '__main__':
  main()
