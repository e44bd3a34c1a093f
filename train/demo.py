"""`make demo`: pre-trains a small GPT on the embedded stdlib-docstring corpus (no files, no network) and reports.

Prints loss at start and end, throughput, where the outputs are, and a greedy continuation from the trained model.
"""
import os
import shutil
import sys
import time

import numpy as np

from configs import gpt
from model import decode
from model import heads
from train import pretrained
from train import trainer
from train.data import tokenizers

WORKDIR = os.path.join('workdir', 'demo')


def main():
  config = gpt.get_config('runlocal')
  config.model.overrides = {'num_layers': 4, 'd_model': 192, 'num_heads': 3, 'd_ff': 768, 'max_len': 128}
  config.data.seq_len = 128
  config.data.batch_size = 16
  config.data.vocab_size = 4000
  config.optim.learning_rate = 2e-3
  config.train.steps = int(os.environ.get('DEMO_STEPS', 250))
  config.optim.warmup_steps = max(1, config.train.steps // 10)
  config.train.log_every = 25
  config.train.eval_every = 100
  config.train.eval_steps = 4
  config.train.checkpoint_every = 100
  shutil.rmtree(WORKDIR, ignore_errors=True)  # the demo always starts fresh; real runs resume
  t0 = time.time()
  s = trainer.train_and_evaluate(config, WORKDIR, log=lambda m: print(m, flush=True))
  wall = time.time() - t0

  run = pretrained.load(WORKDIR)  # the run as any later user loads it: config.json, checkpoint, tokenizer
  tok = tokenizers.Tokenizer.load(run.tokenizer_dir)
  model_cfg = run.cfg
  prompt = 'Return the number of'
  ids = np.asarray([tok.encode(prompt)], np.int32)
  out, _ = decode.generate(heads.LanguageModel(model_cfg, heads=run.heads), run.params, ids,
                           config=decode.DecodeConfig(max_new_tokens=24))
  text = tok.decode([int(t) for t in out[0] if t != model_cfg.pad_id])
  print('\n==== lmlab demo summary ====')
  print(f'model           gpt2 (4 layers, d=192), {s["params"] / 1e6:.2f}M params, vocab {model_cfg.vocab_size}')
  print(f'data            embedded stdlib docstrings, {config.data.batch_size} x {config.data.seq_len} tokens/step')
  print(f'train loss      {s["first_loss"]:.3f} (first {config.train.log_every} steps) -> {s["final_loss"]:.3f} '
        f'(last {config.train.log_every}), {s["steps"]} steps')
  if s['eval']:
    print(f'eval            loss {s["eval"]["loss"]:.3f}, perplexity {s["eval"]["clm/perplexity"]:.1f}')
  print(f'throughput      {s["steps_per_sec"]:.2f} steps/s, {s["tokens_per_sec"]:.0f} tokens/s')
  print(f'wall time       {wall:.0f} s')
  print(f'outputs         {s["workdir"]} (config.json, metrics.jsonl, tensorboard/, checkpoints/, tokenizer/)')
  print(f'greedy sample   {prompt!r} -> {text!r}')
  return 0 if s['final_loss'] < s['first_loss'] else 1


if __name__ == '__main__':
  sys.exit(main())
