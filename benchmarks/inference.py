"""Inference throughput of lmlab beside Hugging Face transformers + torch on the same model and the same inputs, in
one invocation (so that another load on the machine hits both alike): the rounds alternate lmlab and torch and the
median and range over rounds are printed, with the CPU model and its vector extensions (benchmarks/machine.py).

Parts (--parts, comma-separated):

  classify    SST-2 dev sentences through all-MiniLM-L6-v2 + a linear head over the mean of the last hidden states
              (a fresh head, the same weights on both sides): lmlab's scorer (train/tasks/scoring.py run_forward:
              length buckets, and without them) against torch.no_grad over BertModel + nn.Linear, batches padded
              to their longest row, in file order (what a user's loop does) and sorted by length (the strongest
              plain baseline). Token ids are lmlab's examples' on both sides; the head's predictions are compared.
  zero_shot   SmolLM2-135M-Instruct (the packaged Q4_1 GGUF, dequantized to fp32 on both sides) classifying SST-2
  in_context  dev by prompt, 'Review: {sentence}\\nSentiment:' -> ' negative' / ' positive', zero-shot and with
              --shots balanced demonstrations (seed 13): lmlab's scorer over the 'prompt' head (the evaluate job's
              path) against benchmarks/prompt_reference.py's torch scorer (length-sorted, LM head at the scored
              positions only). Accuracies are printed side by side: the same rule on the same prompts.
  generate    greedy KV-cache decoding of --max_new_tokens tokens after SST-2 prompts at batch 1 and 8 (right-padded
              for lmlab, left-padded with an attention mask for transformers): model/decode.py generate against
              transformers' generate, EOS ignored on both sides so both emit the same number of tokens; the share
              of rows whose tokens agree is printed.

Times are the model's work on prepared token ids (tokenizing is outside them on both sides); lmlab's compile happens
in a first, untimed call and is printed apart (it includes one pass). Threads: XLA uses every core the
process may use; --torch_threads=1,2 measures torch at each count (on a loaded machine one thread can beat two).

  python benchmarks/inference.py [--parts=classify,zero_shot,in_context,generate] [--rounds=3] [--torch_threads=1,2]
      [--zero_shot_limit=0] [--in_context_limit=200] [--shots=4] [--max_new_tokens=32] [--json]
      [--dtype=float32|bfloat16]

Both sides run in this one process, started as lmlab's command-line jobs start (train/core/host.py start_job:
single-device programs run inline, malloc keeps freed memory; LMLAB_MALLOC=system leaves glibc's defaults), printed
with the CPU.

--dtype=bfloat16 runs both sides in bfloat16, weights included (lmlab: ModelConfig dtype and param_dtype bfloat16;
torch: the models .to(torch.bfloat16)); on a CPU with AMX both run their matmuls on its tiles.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'benchmarks'))
import machine  # noqa: E402  (benchmarks/machine.py)
from train.core import host  # noqa: E402

DATA = Path(os.environ.get('LMLAB_DATA', ROOT.parent / 'shared' / 'data'))
TEMPLATE, VERBALIZER = 'Review: {sentence}\nSentiment:', '0:negative;1:positive'


def rounds(fns: dict, n: int) -> dict[str, dict]:
  """Runs every fn once per round, alternating, -> {name: {'median', 'min', 'max' seconds, 'last': its result}}."""
  times, last = {k: [] for k in fns}, {}
  for _ in range(n):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      last[name] = fn()
      times[name].append(time.perf_counter() - t0)
  return {k: dict(median=statistics.median(v), min=min(v), max=max(v), last=last[k]) for k, v in times.items()}


def with_threads(fns: dict, threads: list[int]) -> dict:
  """{name: fn} -> {'name, N threads': fn run with torch.set_num_threads(N)} for every N (one N: the names as they
  are). Under another load torch's OpenMP threads wait on each other at every barrier, so one thread can beat two:
  each count is measured rather than one assumed."""
  import torch

  def at(fn, n):

    def run():
      torch.set_num_threads(n)
      return fn()

    return run

  if len(threads) == 1:
    return {k: at(fn, threads[0]) for k, fn in fns.items()}
  return {f'{k[:-1]}, {n} thr)' if k.endswith(')') else f'{k} ({n} thr)': at(fn, n) for k, fn in fns.items()
          for n in threads}


def _finetune_config(strategy: str, seq_len: int, batch_size: int):
  from configs import finetune as finetune_config
  config = finetune_config.get_config(f'task=sst2,strategy={strategy}')
  config.data.label_names = ('0', '1')
  config.data.seq_len, config.data.batch_size = seq_len, batch_size
  config.data.train = str(DATA / 'sst2' / 'train.tsv')
  return config


def _records(config, limit: int = 0):
  from train import tasks
  from train.data import pipeline
  task = tasks.task_of(config.objectives)
  records = task.read(pipeline.sources(str(DATA / 'sst2' / 'dev.tsv'), config.data), config.data)
  return records[:limit] if limit else records


def _lmlab_scorer(config, init, records, tok, batch_size: int):
  """(model, params, examples, fwd) of lmlab's scorer for config's task on records, its fresh head seeded."""
  import jax
  from model.heads import init_params
  from train import tasks
  from train.core import pretrained
  from train.core import resolve
  from train.tasks import scoring
  task = resolve.run_task(tasks.task_of(config.objectives), config, init.cfg.arch)
  model = resolve.build_model(config, init.cfg)
  examples = task.eval_examples(records, tok, config.data)
  fresh = init_params(model, jax.random.key(0), {k: np.stack([e[k] for e in examples[:1]]) for k in examples[0]})
  params = pretrained.merge_params(fresh, init.params, where='benchmark')
  return model, params, examples, scoring.task_forward(task, model, config.data)


# ------------------------------------------------------------------------------------------------ classification


def _torch_classifier(minilm_dir, params):
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  bert = transformers.BertModel.from_pretrained(minilm_dir, add_pooling_layer=False).eval()
  head = torch.nn.Linear(bert.config.hidden_size, 2)
  with torch.no_grad():
    head.weight.copy_(torch.from_numpy(np.asarray(params['classifier']['kernel']).T.copy()))
    head.bias.copy_(torch.from_numpy(np.asarray(params['classifier']['bias'])))
  return bert, head


def _torch_classify(bert, head, rows: list[list[int]], order, batch_size: int) -> np.ndarray:
  """Logits [N,2] of rows (token ids), batches of `order` padded to their longest row, mean over real tokens."""
  import torch
  out = np.zeros((len(rows), 2), np.float32)
  with torch.no_grad():
    for s in range(0, len(order), batch_size):
      idx = order[s:s + batch_size]
      width = max(len(rows[i]) for i in idx)
      ids = torch.zeros((len(idx), width), dtype=torch.long)
      mask = torch.zeros((len(idx), width), dtype=torch.long)
      for r, i in enumerate(idx):
        ids[r, :len(rows[i])], mask[r, :len(rows[i])] = torch.tensor(rows[i]), 1
      hidden = bert(input_ids=ids, attention_mask=mask).last_hidden_state
      m = mask[..., None].to(hidden.dtype)
      out[idx] = head((hidden * m).sum(1) / m.sum(1).clamp(min=1.0)).float().numpy()
  return out


def _to_dtype(init, dtype: str, overrides: str = ''):
  """A Pretrained computing and keeping its weights in dtype (float32: unchanged), with ModelConfig overrides, laid
  out for inference as the evaluate job lays it out (model/transformer.py inference_layout)."""
  import jax
  import jax.numpy as jnp
  from model.transformer import inference_layout, unstack_layers
  if overrides:
    cfg = init.cfg.replace(**json.loads(overrides))
    if init.cfg.scan_layers and not cfg.scan_layers:
      init.params = unstack_layers(init.params)
    init.cfg = cfg
  if dtype != 'float32':
    init.cfg = init.cfg.replace(dtype=dtype, param_dtype=dtype)
    init.params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                               init.params)
  init.cfg, init.params = inference_layout(init.cfg, init.params)
  return init


def _torch_dtype(dtype: str):
  import torch
  return {'float32': torch.float32, 'bfloat16': torch.bfloat16}[dtype]


def classify(a) -> dict:
  import jax
  from train.core import pretrained
  from train.data import tokenizers
  from train.tasks import scoring
  minilm = pretrained.packaged('all-MiniLM-L6-v2')
  config = _finetune_config('full', a.seq_len, a.batch_size)
  config.model.classifier_pooling = 'mean'
  init = _to_dtype(pretrained.load(minilm), a.dtype, a.overrides)
  records = _records(config)
  model, params, examples, fwd = _lmlab_scorer(config, init, records, tokenizers.Tokenizer.load(init.tokenizer_dir),
                                               a.batch_size)
  rows = [list(e['tokens'][:n]) for e, n in zip(examples, scoring.example_lengths(examples))]
  bert, head = _torch_classifier(minilm, jax.tree.map(lambda x: np.asarray(x, np.float32), params))
  bert, head = bert.to(_torch_dtype(a.dtype)), head.to(_torch_dtype(a.dtype))
  file_order = list(range(len(rows)))
  by_length = sorted(file_order, key=lambda i: -len(rows[i]))
  run = lambda buckets: scoring.run_forward(fwd, params, examples, batch_size=a.batch_size, buckets=buckets)
  compile_s = {}
  for name, buckets in (('bucketed', None), ('full', ())):
    t0 = time.perf_counter()
    run(buckets)
    compile_s[name] = time.perf_counter() - t0
  r = rounds({
      'lmlab (buckets)': lambda: run(None)['cls_logits'],
      'lmlab (seq_len)': lambda: run(())['cls_logits'],
      **with_threads({
          'torch (file order)': lambda: _torch_classify(bert, head, rows, file_order, a.batch_size),
          'torch (sorted)': lambda: _torch_classify(bert, head, rows, by_length, a.batch_size),
      }, a.torch_threads)
  }, a.rounds)
  theirs = next(v['last'] for k, v in r.items() if k.startswith('torch'))
  mine = np.asarray(r['lmlab (buckets)']['last'], np.float32)
  agree = float((mine.argmax(-1) == theirs.argmax(-1)).mean())
  diff = float(np.abs(mine - theirs).max())
  return dict(part='classify', model=f'all-MiniLM-L6-v2 + linear head (mean pooling), {a.dtype}', n=len(rows),
              unit='examples/s', work=len(rows), times=r, first_call_s=compile_s,
              notes=f'predictions agree {100 * agree:.1f}%, max |logit diff| {diff:.1e}; batch {a.batch_size}, '
              f'seq_len {a.seq_len}, {np.mean([len(x) for x in rows]):.1f} tokens/sentence')


# ------------------------------------------------------------------------------------------------ prompt scoring


def _smollm(save_dir: str):
  """lmlab's Pretrained of the packaged SmolLM2 GGUF (fp32), its params on the device once."""
  import jax
  from train.core import pretrained
  init = pretrained.load(pretrained.packaged('SmolLM2-135M-Instruct'), save_dir=save_dir)
  init.params = jax.device_put(init.params)
  return init


def _torch_prompt_scorer(ref, hf_tok, hf_model, rows, shots: int, seed: int, batch_size: int):
  """() -> predictions of benchmarks/prompt_reference.py's scorer on rows (contexts tokenized once, outside)."""
  names, words = ref.parse_verbalizer(VERBALIZER)
  train = train_labels = None
  if shots:
    train = [r for r in ref.read_tsv(DATA / 'sst2' / 'train.tsv') if r['label'] in names]
    train_labels = np.array([names.index(r['label']) for r in train])
  contexts = ref.build_contexts(rows, TEMPLATE, shots=shots, seed=seed, train=train, train_labels=train_labels,
                                label_words=words, balanced=True)
  context_ids = hf_tok(contexts, add_special_tokens=False)['input_ids']
  cont_ids = [hf_tok(' ' + w, add_special_tokens=False)['input_ids'] for ws in words for w in ws]
  cont_len = np.array([len(c) for c in cont_ids], np.float64)
  word_label = np.array([c for c, ws in enumerate(words) for _ in ws])

  def run():
    scores = ref.score(hf_model, context_ids, cont_ids, bos_id=None, max_len=512, batch_size=batch_size)[0]
    return ref.label_scores(scores, cont_len, word_label, len(names), False).argmax(1)

  return run, np.mean([len(c) for c in context_ids])


def prompt(a, shots: int, init, torch_side) -> dict:
  from train.data import tokenizers
  from train.tasks import scoring
  import prompt_reference as ref  # benchmarks/prompt_reference.py
  seq_len = 128 if not shots else 512
  config = _finetune_config('prompt', seq_len, a.prompt_batch_size)
  config.finetune.update(template=TEMPLATE, verbalizer=VERBALIZER, demonstrations=shots, demonstration_seed=13)
  limit = a.in_context_limit if shots else a.zero_shot_limit
  records = _records(config, limit)
  tok = tokenizers.Tokenizer.load(init.tokenizer_dir)
  _, params, examples, fwd = _lmlab_scorer(config, init, records, tok, a.prompt_batch_size)
  rows = ref.read_tsv(DATA / 'sst2' / 'dev.tsv')[:len(records)]
  gold = np.array([int(r['label']) for r in rows])
  torch_run, tokens = _torch_prompt_scorer(ref, *torch_side, rows, shots, 13, a.prompt_batch_size)
  run = lambda buckets: scoring.run_forward(fwd, params, examples, batch_size=a.prompt_batch_size,
                                            buckets=buckets)['cls_logits'].argmax(-1)
  t0 = time.perf_counter()
  run(None)
  compile_s = {'bucketed': time.perf_counter() - t0}
  fns = {'lmlab (buckets)': lambda: run(None), **with_threads({'torch (sorted)': torch_run}, a.torch_threads)}
  if a.full_length:
    t0 = time.perf_counter()
    run(())
    compile_s['full'] = time.perf_counter() - t0
    fns['lmlab (seq_len)'] = lambda: run(())
  r = rounds(fns, a.rounds)
  acc = {k: float((v['last'] == gold).mean()) for k, v in r.items()}
  theirs = next(v['last'] for k, v in r.items() if k.startswith('torch'))
  agree = float((r['lmlab (buckets)']['last'] == theirs).mean())
  mode = f'{shots}-shot (balanced, seed 13)' if shots else 'zero-shot'
  return dict(part='in_context' if shots else 'zero_shot', model=f'SmolLM2-135M {a.dtype}, {mode}', n=len(records),
              unit='examples/s', work=len(records), times=r, first_call_s=compile_s,
              notes=f'accuracy {", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items())}; predictions agree '
              f'{100 * agree:.1f}%; {tokens:.0f} context tokens/query; batch {a.prompt_batch_size}, seq_len {seq_len}')


# ------------------------------------------------------------------------------------------------ generation


def _prompts(tok, n: int) -> list[list[int]]:
  config = _finetune_config('full', 128, 8)
  return [tok.encode(TEMPLATE.format(sentence=r['text_a'])) for r in _records(config, n)]


def _lmlab_generate(init, ids: list[list[int]], max_new: int):
  from model import decode
  from model import heads
  model = heads.LanguageModel(init.cfg, heads=('lm',))
  width = max(len(x) for x in ids)
  tokens, mask = np.zeros((len(ids), width), np.int32), np.zeros((len(ids), width), np.int32)
  for i, x in enumerate(ids):
    tokens[i, :len(x)], mask[i, :len(x)] = x, 1
  config = decode.DecodeConfig(method='greedy', max_new_tokens=max_new, eos_id=-1)  # -1: no token ends a row
  return lambda: np.asarray(decode.generate(model, init.params, tokens, prompt_mask=mask, config=config)[0])


def _torch_generate(hf_model, ids: list[list[int]], max_new: int):
  import torch
  width = max(len(x) for x in ids)
  tokens, mask = torch.zeros((len(ids), width), dtype=torch.long), torch.zeros((len(ids), width), dtype=torch.long)
  for i, x in enumerate(ids):  # transformers generates after the last column: prompts sit on the right
    tokens[i, width - len(x):], mask[i, width - len(x):] = torch.tensor(x), 1

  config = copy.deepcopy(hf_model.generation_config)
  config.update(eos_token_id=None, do_sample=False, max_new_tokens=max_new, pad_token_id=0)  # as lmlab's: no EOS stop

  def run():
    with torch.inference_mode():
      out = hf_model.generate(input_ids=tokens, attention_mask=mask, generation_config=config)
    return out[:, width:].numpy()

  return run


def generate(a, init, torch_side, batch: int) -> dict:
  from train.data import tokenizers
  ids = _prompts(tokenizers.Tokenizer.load(init.tokenizer_dir), batch)
  lmlab_fn = _lmlab_generate(init, ids, a.max_new_tokens)
  t0 = time.perf_counter()
  lmlab_fn()
  compile_s = {'greedy': time.perf_counter() - t0}
  torch_fn = _torch_generate(torch_side[1], ids, a.max_new_tokens)
  torch_fn()  # transformers' first call sets up its generation config and caches
  r = rounds({'lmlab (KV cache)': lmlab_fn, **with_threads({'torch generate': torch_fn}, a.torch_threads)}, a.rounds)
  mine, theirs = r['lmlab (KV cache)']['last'], next(v['last'] for k, v in r.items() if k.startswith('torch'))
  same = (mine == theirs).all(axis=1).mean()
  prefix = np.mean([np.argmin(np.append(m == t, False)) for m, t in zip(mine, theirs)])
  return dict(part=f'generate_b{batch}', model=f'SmolLM2-135M {a.dtype}, greedy, batch {batch}', n=batch, unit='tokens/s',
              work=batch * a.max_new_tokens, times=r, first_call_s=compile_s,
              notes=f'{a.max_new_tokens} new tokens per row after {np.mean([len(x) for x in ids]):.0f}-token '
              f'prompts; rows identical {100 * same:.0f}%, mean agreeing prefix {prefix:.1f} tokens')


# ------------------------------------------------------------------------------------------------ the driver


def print_table(results: list[dict]) -> None:
  print(f"{'part':12} {'impl':20} {'rate (median over rounds, range)':>34} {'lmlab / it':>10}  first call s")
  for res in results:
    times = res['times']
    mine = next(k for k in times if k.startswith('lmlab'))
    rate = lambda k: res['work'] / times[k]['median']
    for k, t in times.items():
      span = f"{res['work'] / t['max']:,.1f}-{res['work'] / t['min']:,.1f}"
      ratio = '' if k.startswith('lmlab') else f'{rate(mine) / rate(k):.2f}x'
      first = ' '.join(f'{n} {v:.1f}' for n, v in res['first_call_s'].items()) if k == mine else ''
      print(f"{res['part']:12} {k:20} {rate(k):>14,.1f} {res['unit']:10} ({span:>16}) {ratio:>10}  {first}")
    print(f"{'':12} {res['model']}, n={res['n']}: {res['notes']}")


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--parts', default='classify,zero_shot,in_context,generate')
  p.add_argument('--rounds', type=int, default=3, help='alternating timed rounds per implementation')
  p.add_argument('--torch_threads', default=str(len(os.sched_getaffinity(0))),
                 help="torch.set_num_threads for the torch rows; '1,2' measures each (XLA uses every usable core)")
  p.add_argument('--batch_size', type=int, default=32, help='classify: examples per forward')
  p.add_argument('--seq_len', type=int, default=128, help="classify: lmlab's example length (the config default)")
  p.add_argument('--prompt_batch_size', type=int, default=16, help='zero_shot / in_context: queries per forward')
  p.add_argument('--zero_shot_limit', type=int, default=0, help='zero_shot: the first N dev sentences (0: all 872)')
  p.add_argument('--in_context_limit', type=int, default=200, help='in_context: the first N dev sentences')
  p.add_argument('--shots', type=int, default=4)
  p.add_argument('--full_length', action='store_true', help='zero_shot / in_context: lmlab without buckets too')
  p.add_argument('--max_new_tokens', type=int, default=32)
  p.add_argument('--json', action='store_true', help='also print one JSON line of the results')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='both sides compute and keep weights in this dtype')
  p.add_argument('--overrides', default='', help='lmlab ModelConfig fields as JSON, e.g. \'{"scan_unroll": 30}\'')
  a = p.parse_args()
  a.torch_threads = [int(x) for x in str(a.torch_threads).split(',') if x]
  parts = [x for x in a.parts.split(',') if x]
  print(machine.describe(), flush=True)
  results = []
  if 'classify' in parts:
    results.append(classify(a))
  if set(parts) & {'zero_shot', 'in_context', 'generate'}:
    import prompt_reference as ref  # benchmarks/prompt_reference.py
    with tempfile.TemporaryDirectory() as tmp:
      init, torch_side = _to_dtype(_smollm(tmp), a.dtype, a.overrides), ref.load(a.torch_threads[-1])
      torch_side = (torch_side[0], torch_side[1].to(_torch_dtype(a.dtype)))
      for shots, name in ((0, 'zero_shot'), (a.shots, 'in_context')):
        if name in parts:
          results.append(prompt(a, shots, init, torch_side))
      if 'generate' in parts:
        results += [generate(a, init, torch_side, b) for b in (1, 8)]
  print(machine.describe())  # the load average again: how busy the machine was while it measured
  print_table(results)
  if a.json:
    strip = lambda t: {k: {n: v for n, v in x.items() if n != 'last'} for k, x in t.items()}
    print(json.dumps([{**r, 'times': strip(r['times'])} for r in results]))


if __name__ == '__main__':
  host.start_job()  # as lmlab's jobs start (train/core/host.py); torch, in this process, gets the tuned malloc too
  main()
