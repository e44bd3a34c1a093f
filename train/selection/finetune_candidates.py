"""The candidates of a fine-tuning selection (configs/select.py:mode=finetune) and the run config each evaluation
trains: config.candidates -> Candidate records, each starting point's architecture and tokenizer read from its files'
headers (Start), and the configs/finetune.py config of one evaluation (finetune_config). train/selection/
finetune_search.py runs the search; finetune_plan.py costs and plans it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from configs import finetune as finetune_configs

FIELDS = ('init_from', 'strategy', 'learning_rate', 'demonstrations', 'few_shot_k', 'seq_len', 'batch_size', 'finetune',
          'overrides')

# ---- candidates ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One entry of config.candidates: a starting point and what to do with it (configs/select.py _ft)."""
  name: str
  init_from: str  # as the config names it: a packaged name or a path
  path: str  # the checkpoint it resolves to
  strategy: str  # configs/finetune.py's strategy argument; 'prompt' alone trains nothing
  learning_rate: float = 0.0  # 0: the strategy's default
  demonstrations: int = 0  # with strategy 'prompt': in-context examples before each query
  few_shot_k: int = 0  # train on k records per class of the training file (drawn per seed)
  seq_len: int = 0  # 0: config.finetune.seq_len
  batch_size: int = 0  # 0: config.finetune.batch_size
  finetune: dict = dataclasses.field(default_factory=dict)  # more config.finetune fields (lora_rank, template, ...)
  overrides: dict = dataclasses.field(default_factory=dict)  # ModelConfig fields over the checkpoint's

  @property
  def trains(self) -> bool:
    return self.strategy != 'prompt'

  @property
  def method(self) -> str:
    """How the leaderboard names it: 'zero-shot prompt', 'in-context 4-shot', 'lora', 'full, 16 per class'."""
    if not self.trains:
      return f'in-context {self.demonstrations}-shot' if self.demonstrations else 'zero-shot prompt'
    return self.strategy + (f', {self.few_shot_k} per class' if self.few_shot_k else '')

  def seeds(self, plan_seeds: int) -> int:
    """Evaluations of an inference-only candidate: one zero-shot (nothing varies), one per seed in context."""
    return plan_seeds if self.demonstrations else 1


def resolve_start(init_from: str, where: str) -> str:
  """A packaged checkpoint's name -> its path (pretrained.packaged); a path is checked and made absolute."""
  from train.core import pretrained  # pylint: disable=g-import-not-at-top
  if init_from in pretrained.PACKAGED:
    try:
      return pretrained.packaged(init_from)
    except FileNotFoundError as e:
      raise ValueError(f'{where}={init_from!r}: {e}') from None
  if not init_from or not os.path.exists(init_from):
    raise ValueError(f'{where}={init_from!r} does not exist: give a packaged name '
                     f'({", ".join(sorted(pretrained.PACKAGED))}), an lmlab run, a Hugging Face or converted model '
                     'directory, or a .gguf file.')
  return os.path.abspath(init_from)


def _candidate(config, name: str) -> Candidate:
  entry, where = dict(config.candidates[name]), f'config.candidates.{name}'
  odd = sorted(set(entry) - set(FIELDS))
  if odd:
    raise ValueError(f'{where}: unknown field(s) {odd}; a fine-tuning candidate has {", ".join(FIELDS)} '
                     '(configs/select.py _ft).')
  strategy = str(entry.get('strategy') or 'full')
  try:
    finetune_configs.get_config(f'task={config.task},strategy={strategy}')
  except ValueError as e:
    raise ValueError(f'{where}.strategy={strategy!r} (config.task={config.task!r}): {e}') from None
  demos = int(entry.get('demonstrations') or 0)
  if demos < 0 or (demos and strategy != 'prompt'):
    raise ValueError(f'{where}.demonstrations={demos}: in-context demonstrations are >= 0 and go with '
                     "strategy='prompt' (no training); a trained candidate learns from few_shot_k records instead.")
  if int(entry.get('few_shot_k') or 0) and strategy == 'prompt':
    raise ValueError(f"{where}.few_shot_k: strategy='prompt' alone trains nothing; use 'prompt+full' (PET) or "
                     "another trained strategy with few_shot_k, or demonstrations=k for in-context.")
  return Candidate(name=name, init_from=str(entry.get('init_from') or ''),
                   path=resolve_start(str(entry.get('init_from') or ''), f'{where}.init_from'), strategy=strategy,
                   learning_rate=float(entry.get('learning_rate') or 0.0), demonstrations=demos,
                   few_shot_k=int(entry.get('few_shot_k') or 0), seq_len=int(entry.get('seq_len') or 0),
                   batch_size=int(entry.get('batch_size') or 0), finetune=dict(entry.get('finetune') or {}),
                   overrides=dict(entry.get('overrides') or {}))


def candidates_of(config) -> list[Candidate]:
  """config.candidates (those config.search.only names, when it names any) -> Candidates in name order."""
  names, only = sorted(config.candidates), tuple(config.search.get('only') or ())
  unknown = [n for n in only if n not in names]
  if unknown:
    raise ValueError(f'config.search.only names {unknown}, which config.candidates does not hold; its candidates: '
                     f'{", ".join(names)}.')
  out = [_candidate(config, n) for n in names if not only or n in only]
  if not out:
    raise ValueError('config.candidates is empty; name at least one (configs/select.py _ft).')
  return out


# ---- starting points: architecture and tokenizer, read without loading the weights -------------------------------


@dataclasses.dataclass(frozen=True)
class Start:
  cfg: Any  # ModelConfig
  tokenizer_dir: str


def start_of(path: str, workdir: str) -> Start:
  """A checkpoint's ModelConfig and tokenizer folder from its files' headers (no tensor is read)."""
  from model import convert  # pylint: disable=g-import-not-at-top
  from train.core import resolve  # pylint: disable=g-import-not-at-top
  kind = convert.checkpoint_kind(path)
  if kind == 'gguf':
    return _gguf_start(path, workdir)
  tokenizer = os.path.join(path, 'tokenizer') if kind == 'lmlab-run' else path
  return Start(resolve.checkpoint_model_cfg(path), tokenizer)


def _gguf_start(path: str, workdir: str) -> Start:
  """A GGUF file's architecture and tokenizer from its metadata (the cost model's reader refuses GGUF files because
  their config sits behind the tokenizer table; reading the metadata takes seconds, dequantizing every tensor more)."""
  from model.config import ModelConfig  # pylint: disable=g-import-not-at-top
  from model.convert import gguf as gguf_lib  # pylint: disable=g-import-not-at-top
  from model.convert import hf_layouts  # pylint: disable=g-import-not-at-top
  _, reader = gguf_lib._gguf_reader(path)
  meta = gguf_lib.gguf_metadata(reader)
  hf = gguf_lib._hf_config(meta, meta.get('general.architecture'), path)
  tied = not any(t.name == 'output.weight' for t in reader.tensors)
  cfg = ModelConfig(**hf_layouts.llama_config(hf, path, tied=tied), scan_layers=True)
  folder = os.path.join(workdir, 'starts', os.path.basename(path))
  if not os.path.exists(os.path.join(folder, 'tokenizer.json')):
    os.makedirs(folder, exist_ok=True)
    gguf_lib.gguf_tokenizer(meta, path).save(os.path.join(folder, 'tokenizer.json.tmp'))
    os.replace(os.path.join(folder, 'tokenizer.json.tmp'), os.path.join(folder, 'tokenizer.json'))
  return Start(cfg, folder)


# ---- the configs each evaluation runs --------------------------------------------------------------------------


def finetune_config(config, cand: Candidate, *, arch: str, seed: int, steps: int, max_steps: int, save_every: int,
                    labels, train_file: str) -> ml_collections.ConfigDict:
  """configs/finetune.py for the task and the candidate's strategy from its checkpoint: the selection's lengths and
  batch (or the candidate's), every candidate with the same label order; a trained one runs `steps` of a schedule
  ending at `max_steps` with no dev evaluation of its own (the search scores each rung's checkpoint once)."""
  c = finetune_configs.get_config(f'task={config.task},strategy={cand.strategy}')
  f = config.finetune
  c.seed = int(seed)
  c.model.init_from = cand.path
  c.model.overrides.update(cand.overrides)
  c.data.train, c.data.dev, c.data.label_names = train_file, '', tuple(labels)
  c.data.text_columns, c.data.label_column = tuple(config.data.text_columns), str(config.data.label_column)
  c.data.seq_len, c.data.batch_size = cand.seq_len or int(f.seq_len), cand.batch_size or int(f.batch_size)
  for key, value in cand.finetune.items():
    if key not in c.finetune:
      raise ValueError(f'config.candidates.{cand.name}.finetune.{key}: not a config.finetune field; '
                       f'configs/finetune.py has {", ".join(sorted(c.finetune))}.')
    c.finetune[key] = value
  c.finetune.demonstrations, c.finetune.demonstration_seed = cand.demonstrations, int(seed)
  if cand.few_shot_k:
    c.data.few_shot_k, c.data.few_shot_seed, c.data.few_shot_dev_k = cand.few_shot_k, int(seed), 0
  if arch == 'encoder_decoder':
    c.data.targets_len = int(f.targets_len)
  if arch == 'encoder' and not c.finetune.prompt:
    c.model.classifier_pooling = 'mean'  # as search.finetune_config: a sentence encoder's own pooling
  if cand.learning_rate:
    c.optim.learning_rate = cand.learning_rate
  c.train.epochs, c.train.steps, c.optim.total_steps = 0.0, max(int(steps), 1), max(int(max_steps), 1)
  c.optim.warmup_steps = min(int(f.warmup_steps), max(1, int(max_steps) // 10))
  c.train.eval_every, c.train.best_metric = 0, ''
  c.train.checkpoint_every, c.train.keep_checkpoints = max(int(save_every), 1), 1
  c.train.log_every = max(1, min(50, int(save_every)))
  return c
