"""Training-step throughput of the torch references in bfloat16 mixed precision: the same models, batch, optimizer and
timing as ../shared/bench/torch_train_bench.py (configs a-d) and benchmarks/torch_models_reference.py (llama, t5),
with the forward and the loss under torch.autocast('cpu', dtype=torch.bfloat16) and fp32 parameters and AdamW, which
is what lmlab's ModelConfig dtype='bfloat16' (param_dtype float32) does. On a CPU with AMX (amx_bf16) both sides'
matmuls run on its tiles; this is the fair reference for `benchmarks/train_throughput.py --dtype=bfloat16`.

  python benchmarks/torch_autocast_reference.py a|b|c|d|llama|t5 [--steps=N]

Prints one JSON line like the references.
"""
import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
SHARED_BENCH = HERE.parents[1] / 'shared' / 'bench'
sys.path.insert(0, str(HERE))
import torch_models_reference  # noqa: E402
from train_throughput import CONFIGS, LR, TIMED_STEPS, WEIGHT_DECAY, flops_per_step  # noqa: E402


def model_and_inputs(name):
  """(the reference's model, its keyword inputs) for a config."""
  if name in ('llama', 't5'):
    return torch_models_reference.build(name), torch_models_reference.batch(name)
  sys.path.insert(0, str(SHARED_BENCH))
  import configs as shared_configs  # pylint: disable=g-import-not-at-top
  import torch_train_bench  # pylint: disable=g-import-not-at-top
  cfg = shared_configs.CONFIGS[name]
  x, y = shared_configs.make_batch(cfg)
  return torch_train_bench.build(cfg), dict(input_ids=torch.from_numpy(x), labels=torch.from_numpy(y))


def main():
  p = argparse.ArgumentParser()
  p.add_argument('config', choices=list(CONFIGS))
  p.add_argument('--steps', type=int, default=None)
  a = p.parse_args()
  steps = a.steps or TIMED_STEPS[a.config]
  torch.manual_seed(0)
  model, inputs = model_and_inputs(a.config)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
      loss = model(**inputs).loss
    loss.backward()
    opt.step()
    return loss.item()

  first, ts, loss = torch_models_reference.time_step(step, steps)
  c = CONFIGS[a.config]
  med, tokens = statistics.median(ts), c['B'] * c['T']
  print(json.dumps({
      'impl': 'torch-autocast-bf16', 'config': a.config, 'torch': torch.__version__,
      'threads': torch.get_num_threads(), 'timed_steps': steps, 'step_s_median': med,
      'tok_s_median': tokens / med, 'tok_s_min': tokens / max(ts), 'tok_s_max': tokens / min(ts),
      'gflops_achieved': flops_per_step(c) / med / 1e9, 'loss_first': first, 'loss_last': loss,
      'finite': bool(np.isfinite(loss))}), flush=True)


if __name__ == '__main__':
  main()
