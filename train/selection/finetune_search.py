"""Choosing a starting point and a fine-tuning strategy for a task within a budget (configs/select.py:mode=finetune).

A candidate is a starting point (any checkpoint train/core/pretrained.py's load reads: a packaged name such as
all-MiniLM-L6-v2 or SmolLM2-135M-Instruct, an lmlab run, a Hugging Face or converted directory, a GGUF file) with a
strategy of configs/finetune.py (full, head, lora, soft_prompt, prompt+<one of them>), optionally few-shot
(few_shot_k records per class), or with no training at all: strategy 'prompt' alone is zero-shot, and with
demonstrations=k in-context k-shot (decoders); those cost inference only and are scored on the dev file at once.

The trained candidates go through successive halving over fine-tuning steps: at rung k seed 0's run trains on to
rung_steps[k] in its own run directory (its learning-rate schedule ends at the last rung, so a rung's model is the
same whether or not the search stopped there) and is scored on the dev file; the best 1/eta go on; the last rung's
survivors also train search.seeds - 1 more seeds from scratch (in-context candidates draw their demonstrations with
as many seeds). The plan is the longest last rung (up to finetune.steps) whose worst case fits the budget: every
inference-only evaluation, each rung's dearest survivors, every seed; it is printed before anything trains.

Every evaluation runs in a child process (train/selection/finetune_worker.py) whose peak resident memory the
leaderboard reports, and is kept in the optuna study of search.py (select.db) once finished, so a killed search
restarted with the same command reads those back, resumes the run in flight from its checkpoint and makes the same
choices. A 'seconds' budget is converted by the cost model and a calibration of this machine made once per workdir
(calibration.json), so a resumed search plans the same; the measured seconds are a hard limit as well: the search
stops, and reports what finished, before the evaluations it has recorded would run past the budget.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

import ml_collections

from configs import finetune as finetune_configs
from train.core import cost as cost_lib
from train.selection import finetune_worker
from train.selection import search

BUDGET_KINDS = ('seconds', 'flops')
CHOICES = ('best', 'cheapest_within')
FIELDS = ('init_from', 'strategy', 'learning_rate', 'demonstrations', 'few_shot_k', 'seq_len', 'batch_size', 'finetune',
          'overrides')
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


# ---- costs: the cost model's, in budget units -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Costs:
  """Per candidate: the cost model's records (one training step; one forward batch of the dev scoring with nothing
  trained), input rows per example, and budget units per training step and per dev pass."""
  train: dict[str, Optional[cost_lib.Cost]]
  infer: dict[str, cost_lib.Cost]
  groups: dict[str, int]
  per_step: dict[str, float]
  per_score: dict[str, float]
  score_flops: dict[str, float]
  overhead: float  # budget units per evaluation: a seconds budget's start-up (config.search.overhead_seconds)
  flops_per_sec: float  # 0 unless the budget is in seconds
  dev_records: int
  labels: tuple[str, ...]

  def model_cost(self, name: str, steps: int) -> float:
    """Budget units to train the candidate `steps` steps and score the dev file once (the choice's cost)."""
    return self.per_step[name] * steps + self.per_score[name]


def _estimate(fc, cfg, *, rows: int, train: bool) -> cost_lib.Cost:
  """The cost model's Cost of one training step (train) or one forward batch (not train) of fc from starting point
  cfg, `rows` input rows per batch. The cost model has no prompt head: a prompt is costed as the MLM or LM head it
  reads for its parameters and memory (the logits at every position: an upper bound) and as the backbone alone for
  its FLOPs (the label words' few positions through the vocabulary projection are left out)."""
  from train.core import resolve  # pylint: disable=g-import-not-at-top
  from train.finetune import strategies  # pylint: disable=g-import-not-at-top
  model_cfg = resolve.model_config_of(fc, init_cfg=cfg)
  arch, heads = model_cfg.arch, resolve.heads(fc, model_cfg.arch)
  patterns = strategies.trainable_patterns(fc.finetune.strategy, heads, train_pooler=bool(fc.finetune.train_pooler))
  prompt = 'prompt' in heads
  heads = tuple(('mlm' if arch == 'encoder' else 'lm') if h == 'prompt' else h for h in heads)
  kw = dict(batch_size=rows, seq_len=int(fc.data.seq_len), targets_len=int(fc.data.get('targets_len') or 0),
            trainable=(patterns or None) if train else (lambda path: False), optimizer=fc.optim,
            model_kw=resolve.model_kwargs(fc))
  whole = cost_lib.estimate(model_cfg, heads=heads, **kw)
  if not prompt:
    return whole
  body = cost_lib.estimate(model_cfg, heads=tuple(h for h in heads if h not in ('mlm', 'lm')), **kw)
  return dataclasses.replace(whole, flops_per_step=body.flops_per_step, flops=body.flops)


def prompt_groups(fc, start: Start, labels) -> int:
  """Input rows per example of a prompt (train/finetune/prompts.py: one per distinct continuation prefix or mask
  count; one when every verbalizer word is a single token), from the checkpoint's tokenizer; 1 without a prompt."""
  from train import tasks  # pylint: disable=g-import-not-at-top
  from train.core import resolve  # pylint: disable=g-import-not-at-top
  from train.data import tokenizers  # pylint: disable=g-import-not-at-top
  from train.finetune import prompts  # pylint: disable=g-import-not-at-top
  if not resolve.prompting(fc):
    return 1
  record = tasks.for_arch(tasks.task_of(fc.objectives), start.cfg.arch)
  spec = dataclasses.replace(prompts.prompt_spec(record, fc, start.cfg.arch, labels), demonstrations=0)
  tokenizer = tokenizers.Tokenizer.load(start.tokenizer_dir)
  return prompts.PromptExamples(tokenizer, spec, seq_len=int(fc.data.seq_len), label_names=labels, fields={}).groups


def dev_of(config, files) -> tuple[tuple[str, ...], int]:
  """(the label names in the training file, sorted as every run orders them; the number of dev records)."""
  from train import tasks  # pylint: disable=g-import-not-at-top
  from train.data import pipeline  # pylint: disable=g-import-not-at-top
  fc = finetune_configs.get_config(f'task={config.task},strategy=full')
  fc.data.text_columns, fc.data.label_column = tuple(config.data.text_columns), str(config.data.label_column)
  task = tasks.task_of(fc.objectives)
  labels = tuple(task.labels.find(pipeline.sources(files[0], fc.data), fc.data))
  fc.data.label_names = labels
  return labels, len(task.read(pipeline.sources(files[1], fc.data), fc.data))


def flops_per_sec(config, workdir: str) -> float:
  """This machine's FLOP/s for a seconds budget: cost.calibrate() once, kept in <workdir>/calibration.json so that
  a resumed search plans (and so chooses) as the first run did."""
  if config.search.budget_kind != 'seconds':
    return 0.0
  path = os.path.join(workdir, 'calibration.json')
  if os.path.exists(path):
    with open(path) as f:
      return float(json.load(f)['flops_per_sec'])
  rate = cost_lib.calibrate()
  with open(path + '.tmp', 'w') as f:
    json.dump({'flops_per_sec': rate, 'how': 'train.core.cost.calibrate(): a 1024x1024 float32 matmul'}, f)
  os.replace(path + '.tmp', path)
  return rate


def costs_of(config, cands: list[Candidate], starts: dict[str, Start], files, workdir: str) -> Costs:
  kind = config.search.budget_kind
  if kind not in BUDGET_KINDS:
    raise ValueError(f"config.search.budget_kind={kind!r}: mode=finetune takes 'seconds' or 'flops'.")
  labels, dev_records = dev_of(config, files)
  rate = flops_per_sec(config, workdir)
  mfu = float(config.search.mfu)
  if kind == 'seconds' and not 0 < mfu <= 1:
    raise ValueError(f'config.search.mfu={mfu}: the share of the calibrated FLOP/s that steps reach is in (0, 1] '
                     '(0.4: MiniLM fine-tuning on a 2-core CPU).')
  unit = (lambda f: f / (rate * mfu)) if kind == 'seconds' else (lambda f: f)
  train, infer, groups, per_step, per_score, score_flops = {}, {}, {}, {}, {}, {}
  for cand in cands:
    start = starts[cand.name]
    fc = finetune_config(config, cand, arch=start.cfg.arch, seed=0, steps=1, max_steps=1, save_every=1, labels=labels,
                         train_file=files[0])
    g, batch = prompt_groups(fc, start, labels), int(fc.data.batch_size)
    groups[cand.name] = g
    train[cand.name] = _estimate(fc, start.cfg, rows=batch * g, train=True) if cand.trains else None
    infer[cand.name] = _estimate(fc, start.cfg, rows=batch * g, train=False)
    score_flops[cand.name] = infer[cand.name].flops['forward'] * math.ceil(dev_records / batch)
    per_step[cand.name] = unit(train[cand.name].flops_per_step) if cand.trains else 0.0
    per_score[cand.name] = unit(score_flops[cand.name])
  overhead = float(config.search.overhead_seconds) if kind == 'seconds' else 0.0
  return Costs(train, infer, groups, per_step, per_score, score_flops, overhead, rate, dev_records, labels)


# ---- the plan -----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Plan:
  """Fine-tuning steps per rung and the trained candidates scored at each, the seeds of the last rung (and of the
  in-context candidates), the inference-only candidates, and the worst case in budget units."""
  rung_steps: tuple[int, ...]
  survivors: tuple[int, ...]
  seeds: int
  trained: tuple[str, ...]
  inference: tuple[str, ...]
  worst_case: float
  budget: float

  @property
  def max_steps(self) -> int:
    return self.rung_steps[-1] if self.rung_steps else 0

  def evaluations(self, cands: list[Candidate]) -> int:
    inference = sum(c.seeds(self.seeds) for c in cands if not c.trains)
    return inference + (sum(self.survivors) + self.survivors[-1] * (self.seeds - 1) if self.rung_steps else 0)


def worst_case(costs: Costs, cands: list[Candidate], rung_steps, survivors, seeds: int) -> float:
  """Every inference-only evaluation, then at each rung the survivors whose next steps and dev pass cost the most,
  then the last rung's other seeds from scratch; each evaluation with its start-up overhead."""
  trained = [c.name for c in cands if c.trains]
  total = sum((costs.per_score[c.name] + costs.overhead) * c.seeds(seeds) for c in cands if not c.trains)
  before = 0
  for steps, n in zip(rung_steps, survivors):
    each = sorted((costs.per_step[m] * (steps - before) + costs.per_score[m] + costs.overhead for m in trained),
                  reverse=True)
    total += sum(each[:n])
    before = steps
  if rung_steps:
    whole = sorted((costs.model_cost(m, rung_steps[-1]) + costs.overhead for m in trained), reverse=True)
    total += (seeds - 1) * sum(whole[:survivors[-1]])
  return total


def make_plan(config, cands: list[Candidate], costs: Costs) -> Plan:
  s, budget = config.search, float(config.search.budget)
  eta, rungs, seeds, cap = int(s.eta), int(s.rungs), int(s.seeds), int(config.finetune.steps)
  if eta < 2 or rungs < 1 or seeds < 1 or cap < 0:
    raise ValueError(f'config.search: eta={eta} must be >= 2, rungs={rungs} and seeds={seeds} >= 1, and '
                     f'config.finetune.steps={cap} >= 0 (0: as many as the budget allows).')
  trained = tuple(c.name for c in cands if c.trains)
  inference = tuple(c.name for c in cands if not c.trains)
  survivors = search._survivors(len(trained), eta, rungs) if trained else ()
  steps_of = lambda m: tuple(m * eta**k for k in range(rungs)) if trained else ()
  fits = lambda m: worst_case(costs, cands, steps_of(m), survivors, seeds) <= budget and (
      not cap or m * eta**(rungs - 1) <= cap)
  lo = 0
  if trained:
    hi = 1
    while fits(hi) and hi < 2**30:
      lo, hi = hi, hi * 2
    while hi - lo > 1:  # the largest first rung whose worst case fits
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  worst = worst_case(costs, cands, steps_of(max(lo, 1)), survivors, seeds)
  if (trained and lo < 1) or worst > budget:
    raise ValueError(f'config.search.budget={budget:.4g} {s.budget_kind} is too small: the smallest plan (1 step at '
                     f'the first of {rungs} rungs, {seeds} seed(s), every zero-shot and in-context candidate scored) '
                     f'needs {worst:.4g}. Raise the budget, or lower search.rungs or search.seeds, or drop candidates '
                     '(search.only).')
  return Plan(steps_of(lo), survivors, seeds, trained, inference, worst, budget)


def describe(s: 'FtSearch') -> str:
  """The plan, in the lines people read before anything runs."""
  plan, costs, kind = s.plan, s.costs, s.config.search.budget_kind
  unit = 's' if kind == 'seconds' else 'FLOPs'
  lines = [f'selection (fine-tuning): {len(s.cands)} candidates for {s.config.task} ({costs.dev_records} dev records, '
           f'{len(costs.labels)} labels), ranked by dev {s.config.metric}; budget {plan.budget:.4g} {kind}']
  if plan.rung_steps:
    lines.append(f'  plan: successive halving of {len(plan.trained)} trained candidates over fine-tuning steps '
                 f'{list(plan.rung_steps)}, candidates per rung {list(plan.survivors)}, {plan.seeds} seed(s) at the '
                 f'last rung')
  if plan.inference:
    lines.append(f'  scored at once, without training: {", ".join(plan.inference)}')
  how = (f'; seconds = FLOPs / ({costs.flops_per_sec:.3g} FLOP/s calibrated x {s.config.search.mfu:g} mfu) + '
         f'{costs.overhead:g} s per evaluation' if kind == 'seconds' else '')
  lines.append(f'  worst case {plan.worst_case:.4g} of {plan.budget:.4g} {kind} in {plan.evaluations(s.cands)} '
               f'evaluations{how}')
  for cand in s.cands:
    c = costs.train[cand.name] or costs.infer[cand.name]
    step = f'{costs.per_step[cand.name]:.3g} {unit}/step, ' if cand.trains else ''
    rows = f' ({costs.groups[cand.name]} rows/example)' if costs.groups[cand.name] > 1 else ''
    trainable = cost_lib._count(c.trainable_params if cand.trains else 0)
    lines.append(f'  {cand.name:<20} {cand.init_from if not os.path.isabs(cand.init_from) else cand.path} '
                 f'{cand.method}: {cost_lib._count(c.params)} params, {trainable} trainable, '
                 f'~{c.bytes["total"] / cost_lib.MiB:.0f} MiB; {step}dev pass {costs.per_score[cand.name]:.3g} '
                 f'{unit}{rows}')
  return '\n'.join(lines)


# ---- running the search --------------------------------------------------------------------------------------------


class BudgetSpent(Exception):
  """The measured seconds reached a seconds budget: the search stops and reports what finished."""


@dataclasses.dataclass
class FtSearch:
  """What one fine-tuning selection holds while it runs."""
  config: Any
  workdir: str
  cands: list[Candidate]
  starts: dict[str, Start]
  costs: Costs
  plan: Plan
  study: search.Study
  files: tuple[str, str]
  log: Callable = print
  started: float = dataclasses.field(default_factory=time.time)

  def cand(self, name: str) -> Candidate:
    return next(c for c in self.cands if c.name == name)

  def run_dir(self, name: str, seed: int) -> str:
    return os.path.join(self.workdir, 'finetune', f'{name}-seed{seed}')

  def spent(self) -> dict[str, float]:
    """What the finished evaluations cost: budget units by the cost model, and measured seconds (with those of an
    evaluation the seconds budget stopped, kept in budget.json)."""
    done = self.study.done.values()
    return {'units': sum(e.get('charged', 0.0) for e in done),
            'seconds': sum(e.get('seconds', 0.0) for e in done) + _stopped(self.workdir).get('seconds', 0.0)}


def _stopped(workdir: str) -> dict:
  path = os.path.join(workdir, 'budget.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _child_env(workdir: str) -> dict:
  """The evaluations share one compilation cache in the workdir (unless the user set one): the later rungs and seeds
  of a candidate compile the same programs."""
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(os.path.abspath(workdir), 'jax_cache'))
  env['PYTHONPATH'] = REPO + (os.pathsep + env['PYTHONPATH'] if env.get('PYTHONPATH') else '')
  return env


def run_child(spec: dict, log_path: str, timeout: Optional[float], workdir: str) -> tuple[Optional[int], float, float]:
  """Runs finetune_worker on `spec` -> (exit code, or None when `timeout` seconds passed and it was killed; its peak
  resident memory in bytes, os.wait4's ru_maxrss of that process alone; wall seconds). SIGTERM to this process is
  passed on (the child saves its checkpoint and exits 143); Ctrl-C reaches the child from the terminal itself."""
  spec_path = os.path.join(os.path.dirname(log_path), os.path.basename(log_path)[:-4] + '.spec.json')
  with open(spec_path, 'w') as f:
    json.dump(dict(spec, parent=os.getpid()), f)
  t0 = time.time()
  with open(log_path, 'a') as out:
    proc = subprocess.Popen([sys.executable, '-c', finetune_worker.COMMAND, spec_path], stdout=out,
                            stderr=subprocess.STDOUT, env=_child_env(workdir))
  main = threading.current_thread() is threading.main_thread()
  termed = []

  def forward(*_):
    termed.append(True)
    proc.send_signal(signal.SIGTERM)

  before = signal.signal(signal.SIGTERM, forward) if main else None
  try:
    while True:
      try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
      except KeyboardInterrupt:  # the child got the same Ctrl-C: let it save and stop first
        os.wait4(proc.pid, 0)
        raise
      if pid:
        break
      if timeout is not None and time.time() - t0 > timeout:
        proc.kill()
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = -signal.SIGKILL
        return None, usage.ru_maxrss * 1024.0, time.time() - t0
      time.sleep(0.2)
  finally:
    if main:
      signal.signal(signal.SIGTERM, before)
  proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait for it again
  if termed:  # whatever the child did with it (a training run saved; a scoring one just ended): nothing is recorded
    raise search.Preempted(f'SIGTERM: the evaluation in flight stopped ({os.path.basename(log_path)[:-4]}, exit '
                           f'{proc.returncode}); rerun the same command to resume the selection.')
  return proc.returncode, usage.ru_maxrss * 1024.0, time.time() - t0


def _charge(s: FtSearch, cand: Candidate, steps: int, seed: int, rung: int) -> tuple[float, float]:
  """(budget units, FLOPs) an evaluation costs by the cost model: the training steps it adds (seed 0 continues the
  previous rung's run) and one dev pass, with a seconds budget's start-up."""
  new = steps - (s.plan.rung_steps[rung - 1] if rung and seed == 0 else 0)
  train = s.costs.train[cand.name]
  flops = (train.flops_per_step * new if train else 0.0) + s.costs.score_flops[cand.name]
  return s.costs.per_step[cand.name] * new + s.costs.per_score[cand.name] + s.costs.overhead, flops


def _failure(log_path: str, rc) -> str:
  """The last line of a failed evaluation's log that says what went wrong."""
  try:
    with open(log_path) as f:
      lines = [line.strip() for line in f if line.strip()]
  except OSError:
    lines = []
  said = [line for line in lines if 'Error' in line or line.startswith('error')]
  return f'exit {rc}: ' + ((said or lines or ['no output'])[-1])[:300]


def evaluate(s: FtSearch, cand: Candidate, steps: int, seed: int, *, rung: int) -> dict:
  """One evaluation (read back from the study when it is there): train seed `seed` on to `steps` and score the
  checkpoint on the dev file, or score the prompt (steps 0) -> its record."""
  done = s.study.get(cand.name, steps, seed)
  if done is not None:
    return done
  budget_left = None
  if s.config.search.budget_kind == 'seconds':
    budget_left = s.plan.budget - s.spent()['seconds']
    if budget_left <= 0:
      raise BudgetSpent(f'the measured seconds of the finished evaluations reached the budget {s.plan.budget:g} s')
  run_dir = s.run_dir(cand.name, seed)
  fc = finetune_config(s.config, cand, arch=s.starts[cand.name].cfg.arch, seed=seed, steps=steps,
                       max_steps=s.plan.max_steps, save_every=s.plan.rung_steps[0] if s.plan.rung_steps else 1,
                       labels=s.costs.labels, train_file=s.files[0])
  if not cand.trains:  # what `python -m train.evaluate --from=<run_dir>` scores: the prompt, from its checkpoint
    os.makedirs(run_dir, exist_ok=True)
    _write_json(os.path.join(run_dir, 'config.json'), {'config': json.loads(fc.to_json_best_effort())})
  logs = os.path.join(s.workdir, 'logs')
  os.makedirs(logs, exist_ok=True)
  log_path = os.path.join(logs, f'{cand.name}-{steps}-seed{seed}.log')
  result_path = log_path[:-4] + '.result.json'
  spec = dict(config=json.loads(fc.to_json_best_effort()), train=cand.trains, run_dir=run_dir, dev=s.files[1],
              log=log_path, result=result_path)
  rc, peak, wall = run_child(spec, log_path, budget_left, s.workdir)
  if rc is None:
    _write_json(os.path.join(s.workdir, 'budget.json'), {'seconds': _stopped(s.workdir).get('seconds', 0.0) + wall,
                                                          'stopped': f'{cand.name} {steps} steps seed {seed}'})
    raise BudgetSpent(f'{cand.name} ({steps} steps, seed {seed}) was stopped after {wall:.0f} s: the measured seconds '
                      f'reached the budget {s.plan.budget:g} s')
  if rc == finetune_worker.PREEMPTED:
    raise search.Preempted(f'SIGTERM: {run_dir} saved its checkpoint; rerun the same command to resume the selection.')
  charged, flops = _charge(s, cand, steps, seed, rung)
  attrs = dict(rung=rung, charged=charged, flops=flops, seconds=wall, peak_rss=peak, run_dir=run_dir, failed='')
  if rc != 0:
    attrs['failed'] = _failure(log_path, rc)
    s.study.add(cand.name, steps, seed, 0.0, attrs)
    return dict(attrs, value=0.0)
  with open(result_path) as f:
    result = json.load(f)
  metric = s.config.metric.split('/')[-1]
  if metric not in result['scores']:
    raise ValueError(f'config.metric={s.config.metric!r}: the task reports {sorted(result["scores"])}; name one of '
                     'them (eval/<name>).')
  attrs.update({k: result[k] for k in ('train_seconds', 'score_seconds', 'correct', 'majority', 'majority_label')})
  s.study.add(cand.name, steps, seed, float(result['scores'][metric]), attrs)
  return dict(attrs, value=float(result['scores'][metric]))


def _write_json(path: str, value) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(path + '.tmp', path)


def _progress(s: FtSearch, done: int, total: int, cand: Candidate, steps: int, seed: int, e: dict) -> None:
  metric = s.config.metric.split('/')[-1]
  what = f'{steps} steps' if cand.trains else cand.method
  outcome = f'failed ({e["failed"]})' if e.get('failed') else f'{metric} {e["value"]:.4f}'
  spent = s.spent()
  s.log(f'[{done:>{len(str(total))}}/{total}] {cand.name} {what}, seed {seed}: {outcome} ({e["seconds"]:.0f} s, peak '
        f'{e["peak_rss"] / 2**20:.0f} MiB) | spent {spent["units"]:.4g} of {s.plan.budget:.4g} '
        f'{s.config.search.budget_kind} (measured {spent["seconds"]:.0f} s), {time.time() - s.started:.0f} s elapsed')


def _ranked(s: FtSearch, names: list[str], steps: int) -> list[str]:
  """Best first by seed 0's dev metric at `steps` (a failed evaluation last); ties go to the cheaper, then by name."""
  def key(n):
    e = s.study.get(n, steps, 0)
    return bool(e.get('failed')), -e['value'], s.costs.model_cost(n, steps), n
  return sorted(names, key=key)


def run(s: FtSearch) -> dict[str, Any]:
  """Inference-only candidates, then successive halving of the trained ones -> {'rungs': [[names], ...],
  'stopped': why the search ended early ('' when it did not)}."""
  plan, done, total = s.plan, 0, s.plan.evaluations(s.cands)
  rungs: list[list[str]] = []

  def one(cand, steps, seed, rung):
    nonlocal done
    e = evaluate(s, cand, steps, seed, rung=rung)
    done += 1
    _progress(s, done, total, cand, steps, seed, e)

  try:
    for name in plan.inference:
      for seed in range(s.cand(name).seeds(plan.seeds)):
        one(s.cand(name), 0, seed, 0)
    alive = list(plan.trained)
    for rung, steps in enumerate(plan.rung_steps):
      last = rung == len(plan.rung_steps) - 1
      alive = alive[:plan.survivors[rung]]
      rungs.append(list(alive))
      for name in alive:
        for seed in range(plan.seeds if last else 1):
          one(s.cand(name), steps, seed, rung)
      alive = _ranked(s, alive, steps)
  except BudgetSpent as e:
    s.log(f'stopped: {e}; the report covers the evaluations that finished')
    return {'rungs': rungs, 'stopped': str(e)}
  return {'rungs': rungs, 'stopped': ''}


def prepare(config, workdir: str, *, log=print) -> FtSearch:
  """Everything checked and planned before anything trains: candidates, starting points, data, costs, the plan."""
  cands = candidates_of(config)
  os.makedirs(workdir, exist_ok=True)
  search.check_same_config(workdir, config)
  files = search.data_files(config, workdir)
  if not files[1]:
    raise ValueError('config.data.dev is empty: the selection scores every candidate on a dev file; give one.')
  if config.search.choose not in CHOICES:
    raise ValueError(f'config.search.choose={config.search.choose!r}: use one of {", ".join(CHOICES)}.')
  starts = {c.name: start_of(c.path, workdir) for c in cands}
  costs = costs_of(config, cands, starts, files, workdir)
  plan = make_plan(config, cands, costs)
  return FtSearch(config, workdir, cands, starts, costs, plan, search.Study(workdir, [c.name for c in cands]), files,
                  log)
