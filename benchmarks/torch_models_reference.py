"""Training-step throughput of Hugging Face LlamaForCausalLM and T5ForConditionalGeneration in torch (eager, or
torch.compile), at the 'llama' and 't5' shapes of benchmarks/train_throughput.py: the reference ../shared/bench has
for GPT-2 and BERT, for the two families it lacks. fp32, dropout 0, AdamW (lr 3e-4, weight decay 0.01), one fixed
synthetic batch. Prints one JSON line like ../shared/bench/torch_train_bench.py.

  python benchmarks/torch_models_reference.py llama|t5 [--compile] [--steps=N]
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import CONFIGS, LR, TIMED_STEPS, WARMUP, WEIGHT_DECAY, flops_per_step  # noqa: E402


def build(name):
  c = CONFIGS[name]
  if name == 'llama':
    cfg = LlamaConfig(vocab_size=c['V'], hidden_size=c['d'], intermediate_size=c['ff'], num_hidden_layers=c['L'],
                      num_attention_heads=c['H'], num_key_value_heads=c['KV'], max_position_embeddings=c['T'],
                      tie_word_embeddings=False, attention_dropout=0.0)
    return LlamaForCausalLM(cfg)
  cfg = T5Config(vocab_size=c['V'], d_model=c['d'], d_kv=c['d'] // c['H'], d_ff=c['ff'], num_layers=c['L'],
                 num_decoder_layers=c['L'], num_heads=c['H'], dropout_rate=0.0, feed_forward_proj='relu',
                 tie_word_embeddings=True, decoder_start_token_id=0, pad_token_id=0)
  return T5ForConditionalGeneration(cfg)


def batch(name):
  c = CONFIGS[name]
  rng = np.random.default_rng(0)
  if name == 'llama':
    x = torch.from_numpy(rng.integers(0, c['V'], size=(c['B'], c['T'])))
    return dict(input_ids=x, labels=x)
  enc = torch.from_numpy(rng.integers(2, c['V'], size=(c['B'], c['T'])))
  labels = torch.from_numpy(rng.integers(2, c['V'], size=(c['B'], c['T_dec'])))
  return dict(input_ids=enc, labels=labels)


def time_step(step, steps: int):
  """step() WARMUP times (the first's loss kept), then `steps` timed calls -> (first loss, seconds each, last loss)."""
  first = step()
  for _ in range(WARMUP - 1):
    step()
  ts, loss = [], None
  for _ in range(steps):
    t0 = time.perf_counter()
    loss = step()
    ts.append(time.perf_counter() - t0)
  return first, ts, loss


def main():
  p = argparse.ArgumentParser()
  p.add_argument('config', choices=['llama', 't5'])
  p.add_argument('--compile', action='store_true')
  p.add_argument('--steps', type=int, default=None)
  a = p.parse_args()
  steps = a.steps or TIMED_STEPS[a.config]
  torch.manual_seed(0)
  model = build(a.config)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
  inputs = batch(a.config)
  fwd = torch.compile(model) if a.compile else model

  def step():
    opt.zero_grad(set_to_none=True)
    loss = fwd(**inputs).loss
    loss.backward()
    opt.step()
    return loss.item()

  first, ts, loss = time_step(step, steps)
  c = CONFIGS[a.config]
  med = statistics.median(ts)
  tokens = c['B'] * c['T']
  print(
      json.dumps(
          dict(impl='torch-compile' if a.compile else 'torch-eager', config=a.config, torch=torch.__version__,
               threads=torch.get_num_threads(), params=sum(p.numel() for p in model.parameters()), step_s_median=med,
               tok_s_median=tokens / med, tok_s_min=tokens / max(ts), tok_s_max=tokens / min(ts),
               gflops_achieved=flops_per_step(c) / med / 1e9, loss_first=first, loss_last=loss)), flush=True)


if __name__ == '__main__':
  main()
