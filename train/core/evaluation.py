"""Scoring checkpoints on a task's file, as the evaluate job does (`python -m train.evaluate`, train/evaluate.py):
a fine-tuning run's checkpoint (best by its dev metric, latest, or a step), or any checkpoint zero-shot by prompt.

Each writes OUT/metrics.json ({'accuracy': ..., 'f1': ..., 'exact_match': ...}, the task's metrics by name, with the
checkpoint step and the file) and OUT/predictions.jsonl (one JSON object per record: its id or text, the reference and
the prediction), through train/tasks/scoring.py, which the dev evaluation during fine-tuning uses too.
"""
from __future__ import annotations

import json
import os
import time

from model import heads as heads_lib
from train import tasks
from train.core import host
from train.core import pretrained
from train.core import resolve
from train.data import pipeline
from train.data import tokenizers
from train.tasks import scoring


def evaluate_run(run_dir: str, data_path: str, out_dir: str, *, step: str = 'best', batch_size: int = 0,
                 log=print) -> dict[str, float]:
  """Scores a fine-tuning run's checkpoint (best by its dev metric, latest, or a step) on a file of its task; a
  directory holding a prompt config and no checkpoint (a zero-shot or in-context choice of the fine-tuning
  selection) is scored by evaluate_prompt from the checkpoint it names."""
  prompt = prompt_config(run_dir)
  if prompt is not None:
    return evaluate_prompt(prompt.model.init_from, prompt, data_path, out_dir, batch_size=batch_size, log=log)
  loaded = pretrained.load_run(run_dir, step=step, inference=True)
  config = loaded.config
  # The forward the run's dev evaluation compiled, for a stack that loops; a small one is unrolled here
  # (inference_layout) and compiles anew, in seconds, to run each pass without copying its weights out of the stack.
  if config.get('train', {}).get('compilation_cache', True):
    host.use_job_cache(run_dir, out_dir)
  task = tasks.task_of(config.objectives)
  if task is None:
    raise ValueError(f'{run_dir}: its objectives {sorted(config.objectives)} are pre-training objectives; the '
                     'evaluate job scores fine-tuning runs (configs/finetune.py).')
  task = resolve.run_task(task, config, loaded.model.cfg.arch)
  if not data_path.startswith('tfds:') and not os.path.exists(data_path):
    raise FileNotFoundError(f'--data={data_path} does not exist; give a file in the format of task {task.name!r} '
                            'or a TFDS split (tfds:NAME:SPLIT).')
  records = task.read(pipeline.sources(data_path, config.data), config.data)
  tokenizer = tokenizers.Tokenizer.load(loaded.pretrained.tokenizer_dir)
  fwd = scoring.task_forward(task, loaded.model, config.data)
  t0 = time.time()
  scores, rows = scoring.score(task, fwd, loaded.pretrained.params, records, tokenizer, config.data, batch_size=batch_size
                       or int(config.data.batch_size), log=log)
  where = data_path if data_path.startswith('tfds:') else os.path.abspath(data_path)
  scoring.write(out_dir, scores, rows, step=loaded.step, data=where, task=task.name, examples=len(records))
  log(f'evaluate: {task.name} step {loaded.step} on {len(records)} records of {data_path}: '
      + ', '.join(f'{k} {v:.4f}' for k, v in sorted(scores.items())) + f' ({time.time() - t0:.0f} s); '
      f'wrote {out_dir}/metrics.json and predictions.jsonl')
  return scores


def prompt_config(run_dir: str):
  """The config of a directory whose config.json holds a prompt config and no model (nothing was trained: the
  fine-tuning selection leaves its zero-shot and in-context candidates so), or None for anything else."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  path = os.path.join(run_dir, 'config.json')
  if os.path.isdir(os.path.join(run_dir, 'checkpoints')) or not os.path.isfile(path):
    return None
  with open(path) as f:
    saved = json.load(f)
  if 'model' in saved or not isinstance(saved.get('config'), dict):
    return None
  config = ml_collections.ConfigDict(saved['config'])
  return config if resolve.prompting(config) else None


def evaluate_prompt(checkpoint: str, config, data_path: str, out_dir: str, *, batch_size: int = 0,
                    log=print) -> dict[str, float]:
  """Zero-shot (and in-context) prompt scoring of any checkpoint with no training run: config's task, template and
  verbalizer (configs/finetune.py with strategy=prompt) on a file of the task, every parameter as loaded."""
  resolve.import_registrations(config)
  task = tasks.task_of(config.objectives)
  if task is None or not resolve.prompting(config):
    raise ValueError('--from=CHECKPOINT with --config scores prompts zero-shot; use a prompt config, e.g. '
                     '--config=configs/finetune.py:task=sst2,strategy=prompt (a fine-tuning run needs no --config).')
  if not data_path.startswith('tfds:') and not os.path.exists(data_path):
    raise FileNotFoundError(f'--data={data_path} does not exist; give a file of task {task.name!r}.')
  data = config.data.to_dict()
  if not data.get('label_names'):  # from the training file when there is one, else from the scored file
    data['label_names'] = tuple(
        task.labels.find(pipeline.sources(data.get('train') or data_path, config.data), config.data))
  data = type(config.data)(data)
  init = pretrained.load(checkpoint, save_dir=os.path.join(out_dir, 'tokenizer'), inference=True)
  host.use_job_cache(checkpoint if init.source == 'lmlab-run' else None, out_dir)
  task = resolve.run_task(task, config, init.cfg.arch)
  records = task.read(pipeline.sources(data_path, data), data)
  heads = resolve.heads(config, init.cfg.arch)
  module = heads_lib.LanguageModel(init.cfg, heads=heads, num_labels=len(data.label_names))
  shapes = heads_lib.abstract_params(init.cfg, heads, num_labels=len(data.label_names))
  params, report = pretrained.merge_params(shapes, init.params, where=checkpoint, report=True)
  if report.fresh:
    raise ValueError(f'{checkpoint}: zero-shot prompting reads the model\'s own MLM/LM head, but the checkpoint has '
                     f'no {", ".join(report.fresh[:3])}; fine-tune it (strategy=prompt with a training run) or start '
                     'from a checkpoint that keeps its pre-training head.')
  tokenizer = tokenizers.Tokenizer.load(init.tokenizer_dir)
  t0 = time.time()
  scores, rows = scoring.score(task, scoring.forward_fn(module, ('cls_logits',)), params, records, tokenizer, data,
                       batch_size=batch_size or int(data.batch_size), log=log)
  ft = config.finetune
  where = data_path if data_path.startswith('tfds:') else os.path.abspath(data_path)
  scoring.write(out_dir, scores, rows, step=0, data=where, task=task.name, examples=len(records), checkpoint=checkpoint,
        template=ft.template or task.prompts.get(init.cfg.arch, ('', ''))[0], verbalizer=ft.verbalizer
        or task.prompts.get(init.cfg.arch,
                            ('', ''))[1], demonstrations=int(ft.demonstrations), seconds=round(time.time() - t0, 1))
  how = f'{int(ft.demonstrations)} in-context demonstrations' if ft.demonstrations else 'zero-shot'
  log(f'evaluate: {task.name} prompt, {how}, no parameter updated, on {len(records)} records '
      f'of {data_path}: ' + ', '.join(f'{k} {v:.4f}' for k, v in sorted(scores.items()))
      + f' ({time.time() - t0:.0f} s); wrote {out_dir}/metrics.json and predictions.jsonl')
  return scores
