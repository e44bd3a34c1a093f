"""Score a checkpoint on a downstream task's data: every example once, the task's predictions and its metrics by name.

The same functions serve the dev evaluation during fine-tuning and the evaluate job, so the job reproduces what
training logged for the same checkpoint:

  python -m train.evaluate --from=RUN --data=FILE --out=DIR [--step=best|latest|N]

writes DIR/metrics.json ({'accuracy': ..., 'f1': ..., 'exact_match': ...}, the task's metrics by name, with the
checkpoint step and the file) and DIR/predictions.jsonl (one JSON object per record: its id or text, the reference and
the prediction). Examples are batched in order, the last batch padded with copies that are dropped after the forward
pass; the forward is jitted once per batch shape. A task's record (train/tasks.py) names the model outputs its scorer
reads, how to turn records into evaluation examples (QA: doc-stride windows) and the scorer, one of the functions
below.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from train import metrics as metrics_lib
from train.data import task_examples as tex

Scored = tuple[dict[str, float], list[dict[str, Any]]]

# ------------------------------------------------------------------------------------------------- forward


def forward_fn(model, keys: Sequence[str], *, params_sharding=None, batch_sharding=None, rules=None, mesh=None):
  """jit(params, batch) -> {key: model output} for the keys a scorer reads (nothing else leaves the device)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  def fwd(params, batch):
    out = model.apply({'params': params}, batch, deterministic=True)
    return {k: out[k] for k in keys}

  if mesh is None:
    return jax.jit(fwd)

  def under_rules(params, batch):
    with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fwd(params, batch)

  return jax.jit(under_rules, in_shardings=(params_sharding, batch_sharding))


def _padded_batches(examples: Sequence[Mapping[str, np.ndarray]], batch_size: int):
  """(batch of batch_size rows, how many are real) in order; the last batch repeats its first row as padding."""
  for start in range(0, len(examples), batch_size):
    rows = list(examples[start:start + batch_size])
    n = len(rows)
    rows += [rows[0]] * (batch_size - n)
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}, n


def run_forward(fwd: Callable, params, examples: Sequence[Mapping[str, np.ndarray]], *, batch_size: int,
                batch_sharding=None, log: Optional[Callable] = None) -> dict[str, np.ndarray]:
  """The forward's outputs for every example, concatenated on the host: {key: [N, ...]}; a progress line with ETA."""
  from train.data.loader import global_batch  # pylint: disable=g-import-not-at-top
  outs, t0, total = [], time.time(), -(-len(examples) // batch_size)
  for i, (batch, n) in enumerate(_padded_batches(examples, batch_size)):
    if batch_sharding is not None:
      rows = batch_size // jax.process_count()
      local = {k: v[jax.process_index() * rows:(jax.process_index() + 1) * rows] for k, v in batch.items()}
      out = fwd(params, global_batch(local, batch_sharding))
      if jax.process_count() > 1:
        out = multihost_utils.process_allgather(out, tiled=True)
    else:
      out = fwd(params, batch)
    outs.append({k: np.asarray(jax.device_get(v))[:n] for k, v in out.items()})
    if log is not None and (i + 1) % 20 == 0:
      rate = (i + 1) / max(time.time() - t0, 1e-9)
      log(f'evaluate: batch {i + 1}/{total}, {rate * batch_size:.0f} examples/s, ETA {(total - i - 1) / rate:.0f} s')
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


# ------------------------------------------------------------------------------------------------- scorers


def _names(data, field) -> list[str]:
  names = list(data.get(field) or [])
  if not names:
    raise ValueError(f'config.data.{field} is empty; the run resolves it from the training data.')
  return names


def score_classification(outputs, examples, records, data, tokenizer=None) -> Scored:
  """accuracy, macro_f1 (and f1 of label 1 with two classes) over argmax(cls_logits)."""
  names = _names(data, 'label_names')
  logits = outputs['cls_logits'].astype(np.float64)
  pred = logits.argmax(-1)
  ref = np.asarray([int(e['label']) for e in examples])
  scores = metrics_lib.classification_metrics(predictions=pred, references=ref, num_classes=len(names))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  rows = [{
      'idx': r.get('idx', i),
      'text_a': r['text_a'],
      'text_b': r.get('text_b', ''),
      'label': names[ref[i]],
      'prediction': names[pred[i]],
      'probabilities': {
          n: round(float(p), 6) for n, p in zip(names, probs[i])
      }
  } for i, r in enumerate(records)]
  return scores, rows


def score_tagging(outputs, examples, records, data, tokenizer=None) -> Scored:
  """Entity-level precision/recall/F1 (seqeval, conlleval rules) of the per-word tags read off first sub-words."""
  names = _names(data, 'tag_names')
  weights = np.stack([e['tag_weights'] for e in examples])
  predicted = metrics_lib.word_tags(predictions=outputs['tag_logits'], tag_weights=weights, tag_names=names,
                                    num_words=[len(r['tokens']) for r in records])
  scores = metrics_lib.tagging_metrics(predictions=predicted, references=[list(r['tags']) for r in records])
  rows = [{
      'idx': r.get('idx', i),
      'tokens': list(r['tokens']),
      'tags': list(r['tags']),
      'prediction': p
  } for i, (r, p) in enumerate(zip(records, predicted))]
  return scores, rows


def score_qa(outputs, examples, records, data, tokenizer=None) -> Scored:
  """SQuAD exact match and F1 of the best span over every doc-stride window of each question."""
  answers = tex.postprocess_qa(start_logits=outputs['start_logits'], end_logits=outputs['end_logits'],
                               offsets=np.stack([e['offsets'] for e in examples]),
                               example_index=np.asarray([int(e['example_index']) for e in examples]),
                               contexts=[r['context'] for r in records],
                               max_answer_length=int(data.get('max_answer_length') or 30))
  golds = [list(r['answers_text']) or [r['answer_text']] for r in records]
  scores = metrics_lib.squad_metrics(predictions=answers, references=golds)
  rows = [{
      'id': r['id'],
      'question': r['question'],
      'prediction': a,
      'answers': g
  } for r, a, g in zip(records, answers, golds)]
  return scores, rows


def generate_fn(model, data):
  """jit(params, batch) -> {'generated': [B, L] token ids}: greedy (or config.data.num_beams > 1: beam) KV-cache
  decoding, up to the task's target length, from the batch's encoder input (encoder-decoder) or from its prompt
  (decoder: batch['prompt'] right-padded, batch['prompt_mask'])."""
  from model import decode  # pylint: disable=g-import-not-at-top
  beams = int(data.get('num_beams') or 1)
  decoder = model.cfg.arch == 'decoder'
  length = tex.completion_length(data.seq_len,
                                 data.get('targets_len') or 0) if decoder else int(
                                     data.get('targets_len') or data.seq_len)
  config = decode.DecodeConfig(method='beam' if beams > 1 else 'greedy', num_beams=max(beams, 1), max_new_tokens=length)

  def fwd(params, batch):
    if decoder:
      tokens, _ = decode.generate(model, params, batch['prompt'], prompt_mask=batch['prompt_mask'], config=config)
    else:
      tokens, _ = decode.generate(model, params, encoder_tokens=batch['encoder_tokens'],
                                  encoder_segment_ids=batch['encoder_segment_ids'], config=config)
    return {'generated': tokens}

  return jax.jit(fwd)


def score_generation(outputs, examples, records, data, tokenizer=None) -> Scored:
  """Corpus BLEU and chrF (sacrebleu) of the decoded outputs against the targets."""
  stop = {i for i in (tokenizer.eos_id, tokenizer.pad_id) if i is not None}
  texts = []
  for row in outputs['generated']:
    ids = [int(t) for t in row]
    ids = ids[:next((j for j, t in enumerate(ids) if t in stop), len(ids))]
    texts.append(tokenizer.decode(ids).strip())
  scores = metrics_lib.generation_metrics(predictions=texts, references=[r['target'] for r in records])
  rows = [{
      'idx': r.get('idx', i),
      'source': r['source'],
      'target': r['target'],
      'prediction': t
  } for i, (r, t) in enumerate(zip(records, texts))]
  return scores, rows


def task_forward(task, model, data, **shardings) -> Callable:
  """What a task's scorer reads, as one jitted function: the model outputs it names, or generated tokens."""
  if task.outputs == ('generated',):
    return generate_fn(model, data)
  return forward_fn(model, task.outputs, **shardings)


def score(task, fwd: Callable, params, records: Sequence[Mapping[str, Any]], tokenizer, data, *, batch_size: int,
          batch_sharding=None, log: Optional[Callable] = None) -> Scored:
  """(metrics, predictions) of `task` on `records`: its evaluation examples through `fwd`, then its scorer."""
  if task.score is None:
    raise ValueError(f'task {task.name!r} has no scorer; evaluate it by its loss (config.train.eval_steps).')
  examples = task.eval_examples(records, tokenizer, data)
  outputs = run_forward(fwd, params, examples, batch_size=batch_size, batch_sharding=batch_sharding, log=log)
  return task.score(outputs, examples, records, data, tokenizer)


def write(out_dir: str, scores: Mapping[str, float], predictions: Sequence[Mapping[str, Any]], **about) -> None:
  """DIR/metrics.json and DIR/predictions.jsonl, each written to a temporary name and renamed (never half a file)."""
  os.makedirs(out_dir, exist_ok=True)
  for name, text in (('metrics.json', json.dumps({
      **about,
      **scores
  }, indent=2, sort_keys=True) + '\n'), ('predictions.jsonl',
                                         ''.join(json.dumps(p, ensure_ascii=False) + '\n' for p in predictions))):
    tmp = os.path.join(out_dir, f'.{name}.tmp')
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, os.path.join(out_dir, name))


# ------------------------------------------------------------------------------------------------- the job


def evaluate_run(run_dir: str, data_path: str, out_dir: str, *, step: str = 'best', batch_size: int = 0,
                 log=print) -> dict[str, float]:
  """Scores a fine-tuning run's checkpoint (best by its dev metric, latest, or a step) on a file of its task."""
  from train import pretrained  # pylint: disable=g-import-not-at-top
  from train import tasks  # pylint: disable=g-import-not-at-top
  from train.data import tokenizers  # pylint: disable=g-import-not-at-top
  loaded = pretrained.load_run(run_dir, step=step)
  config, task = loaded.config, tasks.for_run(tasks.task_of(loaded.config), loaded.config, loaded.model.cfg.arch)
  if task.read is None:
    raise ValueError(f'{run_dir}: its objectives {sorted(config.objectives)} are pre-training objectives; the '
                     'evaluate job scores fine-tuning runs (configs/finetune.py).')
  if not data_path.startswith('tfds:') and not os.path.exists(data_path):
    raise FileNotFoundError(f'--data={data_path} does not exist; give a file in the format of task {task.name!r} '
                            'or a TFDS split (tfds:NAME:SPLIT).')
  from train.data import pipeline  # pylint: disable=g-import-not-at-top
  records = task.read(pipeline.sources(data_path, config.data), config.data)
  tokenizer = tokenizers.Tokenizer.load(loaded.pretrained.tokenizer_dir)
  fwd = task_forward(task, loaded.model, config.data)
  t0 = time.time()
  scores, rows = score(task, fwd, loaded.pretrained.params, records, tokenizer, config.data, batch_size=batch_size
                       or int(config.data.batch_size), log=log)
  where = data_path if data_path.startswith('tfds:') else os.path.abspath(data_path)
  write(out_dir, scores, rows, step=loaded.step, data=where, task=task.name, examples=len(records))
  log(f'evaluate: {task.name} step {loaded.step} on {len(records)} records of {data_path}: '
      + ', '.join(f'{k} {v:.4f}' for k, v in sorted(scores.items())) + f' ({time.time() - t0:.0f} s); '
      f'wrote {out_dir}/metrics.json and predictions.jsonl')
  return scores


def evaluate_prompt(checkpoint: str, config, data_path: str, out_dir: str, *, batch_size: int = 0,
                    log=print) -> dict[str, float]:
  """Zero-shot (and in-context) prompt scoring of any checkpoint with no training run: config's task, template and
  verbalizer (configs/finetune.py with strategy=prompt) on a file of the task, every parameter as loaded."""
  from model import heads as heads_lib  # pylint: disable=g-import-not-at-top
  from train import pretrained  # pylint: disable=g-import-not-at-top
  from train import tasks  # pylint: disable=g-import-not-at-top
  from train.data import pipeline  # pylint: disable=g-import-not-at-top
  from train.data import tokenizers  # pylint: disable=g-import-not-at-top
  task = tasks.task_of(config)
  if task is None or not tasks.prompting(config):
    raise ValueError('--from=CHECKPOINT with --config scores prompts zero-shot; use a prompt config, e.g. '
                     '--config=configs/finetune.py:task=sst2,strategy=prompt (a fine-tuning run needs no --config).')
  if not data_path.startswith('tfds:') and not os.path.exists(data_path):
    raise FileNotFoundError(f'--data={data_path} does not exist; give a file of task {task.name!r}.')
  data = config.data.to_dict()
  if not data.get('label_names'):  # from the training file when there is one, else from the scored file
    data['label_names'] = tuple(task.labels(pipeline.sources(data.get('train') or data_path, config.data), config.data))
  data = type(config.data)(data)
  init = pretrained.load(checkpoint, save_dir=os.path.join(out_dir, 'tokenizer'))
  task = tasks.for_run(task, config, init.cfg.arch)
  records = task.read(pipeline.sources(data_path, data), data)
  heads = tasks.run_heads(config, init.cfg.arch)
  module = heads_lib.LanguageModel(init.cfg, heads=heads, num_labels=len(data.label_names))
  shapes = heads_lib.abstract_params(init.cfg, heads, num_labels=len(data.label_names))
  params, report = pretrained.merge_params(shapes, init.params, where=checkpoint, report=True)
  if report.fresh:
    raise ValueError(f'{checkpoint}: zero-shot prompting reads the model\'s own MLM/LM head, but the checkpoint has '
                     f'no {", ".join(report.fresh[:3])}; fine-tune it (strategy=prompt with a training run) or start '
                     'from a checkpoint that keeps its pre-training head.')
  tokenizer = tokenizers.Tokenizer.load(init.tokenizer_dir)
  t0 = time.time()
  scores, rows = score(task, forward_fn(module, ('cls_logits',)), params, records, tokenizer, data,
                       batch_size=batch_size or int(data.batch_size), log=log)
  ft = config.finetune
  where = data_path if data_path.startswith('tfds:') else os.path.abspath(data_path)
  write(out_dir, scores, rows, step=0, data=where, task=task.name, examples=len(records), checkpoint=checkpoint,
        template=ft.template or task.prompts.get(init.cfg.arch, ('', ''))[0], verbalizer=ft.verbalizer
        or task.prompts.get(init.cfg.arch,
                            ('', ''))[1], demonstrations=int(ft.demonstrations), seconds=round(time.time() - t0, 1))
  how = f'{int(ft.demonstrations)} in-context demonstrations' if ft.demonstrations else 'zero-shot'
  log(f'evaluate: {task.name} prompt, {how}, no parameter updated, on {len(records)} records '
      f'of {data_path}: ' + ', '.join(f'{k} {v:.4f}' for k, v in sorted(scores.items()))
      + f' ({time.time() - t0:.0f} s); wrote {out_dir}/metrics.json and predictions.jsonl')
  return scores


def main(argv=None) -> int:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  flags.DEFINE_string(
      'from', None, 'A fine-tuning run (its workdir); with --config, any checkpoint (an lmlab run, a '
      'converted or Hugging Face directory, a .gguf file) scored zero-shot by prompt.')
  config_flags.DEFINE_config_file(
      'config', None, 'Zero-shot prompting: configs/finetune.py:task=T,strategy=prompt '
      '(template, verbalizer, demonstrations as --config.finetune.* overrides).')
  flags.DEFINE_string('data', None, "A file in the task's format (TSV/CSV/JSONL, CoNLL, SQuAD JSON).")
  flags.DEFINE_string('out', None, 'Where metrics.json and predictions.jsonl go.')
  flags.DEFINE_string('step', 'best', "'best' (by the run's config.train.best_metric), 'latest', or a step number.")
  flags.DEFINE_integer('batch_size', 0, "Examples per forward pass; 0: the run's config.data.batch_size.")
  fl = flags.FLAGS
  try:
    fl(argv or sys.argv)
    missing = [f'--{n}' for n in ('from', 'data', 'out') if not fl[n].value]
    if missing:
      raise ValueError(f'{" ".join(missing)} required: python -m train.evaluate --from=RUN --data=FILE --out=DIR.')
    where = fl['from'].value
    if not os.path.exists(where) or (fl.config is None and not os.path.isfile(os.path.join(where, 'config.json'))):
      why = 'does not exist' if not os.path.exists(where) else "holds no config.json: it is no run's workdir"
      raise FileNotFoundError(f'--from={where} {why}; give a fine-tuning run\'s --workdir, or with --config any '
                              'checkpoint (an lmlab run, a converted or Hugging Face directory, a .gguf file).')
    if fl.config is not None:
      evaluate_prompt(fl['from'].value, fl.config, fl.data, fl.out, batch_size=fl.batch_size)
    else:
      evaluate_run(fl['from'].value, fl.data, fl.out, step=fl.step, batch_size=fl.batch_size)
  except (ValueError, FileNotFoundError, flags.Error) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
