"""The budgeted search: candidates from configs/select.py, a plan that fits the budget, and successive halving on the
dev metric, with every evaluation kept in an optuna study (SQLite in the workdir) so a killed search resumes.

An evaluation is one (candidate, pre-training steps, fine-tuning seed): the candidate's pre-training run is trained on
to that many steps (its own workdir, resumed, on a learning-rate schedule fixed to the plan's longest length, so a
rung's model is the same whether or not the search stopped there) and a fresh fine-tuning run from that checkpoint is
scored on the dev file. Halving is synchronous (every candidate of a rung is scored before any is cut), so which
candidates go on never depends on the order evaluations finished in, and a resumed search makes the same choices.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import math
import os
import time
from typing import Any, Callable, Optional

import ml_collections
import numpy as np

from configs import finetune as finetune_configs
from train.core import cost as cost_lib



def family_config(family: str, arg: str = ''):
  """A config family's config: configs/<family>.py's get_config(arg), or a .py file of one's own (any file whose
  get_config returns a pre-training config), so a new family is a new config file and nothing else."""
  if family.endswith('.py'):
    spec = importlib.util.spec_from_file_location(f'lmlab_family_{os.path.basename(family)[:-3]}', family)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  else:
    module = importlib.import_module(f'configs.{family}')
  return module.get_config(arg or None)


def families() -> tuple[str, ...]:
  """The config families in configs/ (every module there with a model preset, i.e. a pre-training config)."""
  import configs  # pylint: disable=g-import-not-at-top
  here = os.path.dirname(configs.__file__)
  names = sorted(f[:-3] for f in os.listdir(here) if f.endswith('.py') and not f.startswith('_'))
  return tuple(n for n in names if n not in ('common', 'finetune', 'select'))


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One entry of config.candidates: what to pre-train (or load) and how to fine-tune it."""
  name: str
  family: str
  arg: str
  init_from: str
  strategy: str
  learning_rate: float  # fine-tuning; 0: the strategy's default
  objectives: dict
  overrides: dict
  generator: dict = dataclasses.field(default_factory=dict)  # ELECTRA: the generator's ModelConfig overrides
  pretrain_learning_rate: float = 0.0  # 0: the family config's

  @property
  def pretrains(self) -> bool:
    return not self.init_from


def candidates_of(config) -> list[Candidate]:
  """config.candidates -> Candidates, in name order; a bad entry fails naming its field and the fix."""
  out = []
  for name in sorted(config.candidates):
    entry = dict(config.candidates[name])
    where = f'config.candidates.{name}'
    family = str(entry.get('family') or '')
    if not entry.get('init_from') and family not in families() and not (family.endswith('.py') and
                                                                         os.path.isfile(family)):
      raise ValueError(f'{where}.family={entry.get("family")!r}: name a config family '
                       f'({", ".join(families())}) or a config file of your own (.py), or give {where}.init_from '
                       '(a local checkpoint).')
    out.append(Candidate(name=name, family=entry.get('family', ''), arg=entry.get('arg', ''),
                         init_from=entry.get('init_from', ''), strategy=entry.get('strategy', 'full'),
                         learning_rate=float(entry.get('learning_rate', 0.0)),
                         objectives=dict(entry.get('objectives') or {}), overrides=dict(entry.get('overrides') or {}),
                         generator=dict(entry.get('generator') or {}),
                         pretrain_learning_rate=float(entry.get('pretrain_learning_rate', 0.0))))
  if not out:
    raise ValueError('config.candidates is empty; name at least one (configs/select.py _candidate).')
  return out


# ---- the configs each evaluation trains --------------------------------------------------------------------------


def pretrain_config(config, cand: Candidate, *, steps: int, max_steps: int) -> ml_collections.ConfigDict:
  """The candidate's family config with the selection's pre-training data, its overrides, `steps` to train and a
  schedule that ends at `max_steps` (the same for every rung)."""
  c = family_config(cand.family, cand.arg)
  p = config.pretrain
  c.seed = int(config.seed)
  if cand.objectives:
    c.objectives = dict(cand.objectives)
  c.data.source, c.data.path, c.data.embedded_kind = p.source, p.path, p.embedded_kind
  c.data.seq_len, c.data.batch_size, c.data.vocab_size = int(p.seq_len), int(p.batch_size), int(p.vocab_size)
  c.data.tokenizer_train_records = int(p.tokenizer_train_records)
  c.model.overrides.update(dict(cand.overrides))
  if c.model.generator_preset:
    c.model.generator_overrides.update(dict(cand.generator))
    if 'max_len' in cand.overrides:  # ELECTRA's two models share position embeddings
      c.model.generator_overrides.max_len = cand.overrides['max_len']
  if cand.pretrain_learning_rate:
    c.optim.learning_rate = cand.pretrain_learning_rate
  c.optim.warmup_steps = min(int(p.warmup_steps), max(1, max_steps // 10))
  c.optim.total_steps = int(max_steps)
  c.train.steps = int(steps)
  c.train.log_every = max(1, min(50, steps // 4))
  c.train.eval_every = int(steps)
  c.train.eval_steps = 4
  c.train.checkpoint_every = int(p.checkpoint_every)
  c.train.keep_checkpoints = 1
  return c


def finetune_config(config, cand: Candidate, *, init_from: str, seed: int, arch: str,
                    data_files: tuple[str, str]) -> ml_collections.ConfigDict:
  """configs/finetune.py for the task and the candidate's strategy, from `init_from`. Every architecture fine-tunes
  the same task with the same optimizer, rate and steps, reading it the way it was pre-trained to: encoders with a
  classifier on their mean hidden state, decoders on their last token, an encoder-decoder T5's way, with each label's
  name as target text, ranked at evaluation by the log-probability of that text (train/tasks/classification.py LABEL_TEXT)."""
  c = finetune_configs.get_config(f'task={config.task},strategy={cand.strategy}')
  f = config.finetune
  c.seed = int(seed)
  c.model.init_from = init_from
  c.data.train, c.data.dev = data_files
  c.data.text_columns, c.data.label_column = tuple(config.data.text_columns), str(config.data.label_column)
  if arch == 'encoder_decoder':
    c.data.targets_len = int(f.targets_len)
  if arch == 'encoder':
    # The mean of the last hidden states, not [CLS] through a fresh pooler: an MLM- or RTD-only encoder never trained
    # [CLS] to summarize (demo, 120 fine-tuning steps: bert_mlm 0.33 -> 0.58, electra_rtd 0.34 -> 0.52 dev accuracy);
    # decoders read their last token, which has seen the whole text.
    c.model.classifier_pooling = 'mean'
  c.data.seq_len, c.data.batch_size = int(f.seq_len), int(f.batch_size)
  if cand.learning_rate:
    c.optim.learning_rate = cand.learning_rate
  c.train.epochs = 0.0
  c.train.steps = c.optim.total_steps = int(f.steps)
  c.optim.warmup_steps = int(f.warmup_steps)
  c.train.eval_every = c.train.checkpoint_every = int(f.eval_every)
  c.train.log_every = max(1, min(50, int(f.eval_every)))
  c.train.best_metric, c.train.best_mode = config.metric, 'max'
  return c


def arch_of(cand: Candidate) -> str:
  if cand.pretrains:
    from model import config as model_config  # pylint: disable=g-import-not-at-top
    c = family_config(cand.family, cand.arg)
    return model_config.preset(c.model.preset, **model_config.set_fields(c.model.overrides)).arch
  from train.core import pretrained
  return pretrained.load(cand.init_from).cfg.arch


# ---- what an evaluation costs, and the plan that fits the budget ------------------------------------------------


def _cost_configs(config, cand: Candidate, pre: Optional[ml_collections.ConfigDict]):
  """The fine-tuning config the cost model reads before the pre-training run exists: the same architecture built
  from the pre-training config's preset and overrides (or the checkpoint itself, for init_from)."""
  fc = finetune_config(config, cand, init_from=cand.init_from, seed=0, arch=arch_of(cand), data_files=('', ''))
  if pre is not None:
    fc.model.preset = pre.model.preset
    fc.model.overrides = pre.model.overrides
    fc.data.vocab_size = pre.data.vocab_size
    fc.data.label_names = ('a', 'b')  # a classifier's width is noise in the cost; the data decides it later
  return fc


@dataclasses.dataclass(frozen=True)
class Costs:
  """Per candidate: the cost model's records and the budget units one pre-training step / one fine-tuning cost."""
  pretrain: dict[str, Optional[cost_lib.Cost]]
  finetune: dict[str, cost_lib.Cost]
  per_step: dict[str, float]  # budget units per pre-training step
  per_finetune: dict[str, float]  # budget units per fine-tuning run
  flops_per_sec: float  # 0 unless the budget is in seconds


def costs_of(config, cands: list[Candidate]) -> Costs:
  kind, steps = config.search.budget_kind, int(config.finetune.steps)
  if kind not in ('flops', 'seconds', 'steps'):
    raise ValueError(f"config.search.budget_kind={kind!r}: use 'flops', 'seconds' or 'steps'.")
  pre, fine = {}, {}
  for cand in cands:
    pc = pretrain_config(config, cand, steps=1, max_steps=1) if cand.pretrains else None
    pre[cand.name] = cost_lib.of_config(pc) if pc is not None else None
    fine[cand.name] = cost_lib.of_config(_cost_configs(config, cand, pc))
  rate = cost_lib.calibrate() if kind == 'seconds' else 0.0
  unit = {'flops': lambda f: f, 'seconds': lambda f: f / rate, 'steps': lambda f: 0.0}[kind]
  per_step = {n: (1.0 if kind == 'steps' else unit(c.flops_per_step)) if c else 0.0 for n, c in pre.items()}
  per_ft = {n: unit(c.flops_per_step * steps) for n, c in fine.items()}
  return Costs(pre, fine, per_step, per_ft, rate)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Pre-training steps per rung (halving: the same for every candidate of a rung; equal_compute: one rung, steps per
  candidate), the candidates scored per rung, the seeds of the last rung and the worst case in budget units."""
  mode: str
  rung_steps: tuple[int, ...]
  survivors: tuple[int, ...]
  seeds: int
  worst_case: float
  budget: float
  per_candidate: dict = dataclasses.field(default_factory=dict)

  def steps(self, rung: int, name: str) -> int:
    return self.per_candidate[name] if self.per_candidate else self.rung_steps[rung]

  @property
  def max_steps(self) -> int:
    return max(self.per_candidate.values()) if self.per_candidate else self.rung_steps[-1]

  def evaluations(self) -> int:
    return sum(self.survivors) + self.survivors[-1] * (self.seeds - 1)


def _halving_cost(costs: Costs, names: list[str], rung_steps, survivors, seeds) -> float:
  """The worst case: at each rung, the survivors that would cost the most."""
  total, before = 0.0, 0
  for steps, n in zip(rung_steps, survivors):
    each = sorted((costs.per_step[m] * (steps - before) + costs.per_finetune[m] for m in names), reverse=True)
    total += sum(each[:n])
    before = steps
  return total + (seeds - 1) * sum(sorted((costs.per_finetune[m] for m in names), reverse=True)[:survivors[-1]])


def _survivors(n: int, eta: int, rungs: int) -> tuple[int, ...]:
  out = [n]
  for _ in range(rungs - 1):
    out.append(max(1, math.ceil(out[-1] / eta)))
  return tuple(out)


def make_plan(config, cands: list[Candidate], costs: Costs) -> Plan:
  s, budget = config.search, float(config.search.budget)
  eta, rungs, seeds = int(s.eta), int(s.rungs), int(s.seeds)
  if eta < 2 or rungs < 1 or seeds < 1:
    raise ValueError(f'config.search: eta={eta} must be >= 2, rungs={rungs} and seeds={seeds} >= 1.')
  names = [c.name for c in cands]
  if s.mode == 'equal_compute':
    return _equal_compute_plan(config, names, costs, budget, seeds)
  survivors = _survivors(len(names), eta, rungs)
  unit = eta ** (rungs - 1)  # the longest pre-training is a multiple of it, so every rung's length is whole

  def rung_steps(m):
    return tuple(m * unit // eta ** (rungs - 1 - k) for k in range(rungs))

  fixed = int(config.pretrain.max_steps)
  if fixed:
    m = max(1, fixed // unit)
  else:
    lo, hi = 0, 1
    while _halving_cost(costs, names, rung_steps(hi), survivors, seeds) <= budget and hi < 2**40:
      lo, hi = hi, hi * 2
    while hi - lo > 1:  # the largest m whose worst case fits
      mid = (lo + hi) // 2
      lo, hi = (mid, hi) if _halving_cost(costs, names, rung_steps(mid), survivors, seeds) <= budget else (lo, mid)
    m = lo
  worst = _halving_cost(costs, names, rung_steps(max(m, 1)), survivors, seeds)
  if m < 1 or worst > budget:
    raise ValueError(f'config.search.budget={budget:.3g} {s.budget_kind} is too small: the smallest plan ({rungs} '
                     f'rungs of {survivors} candidates, {seeds} seeds) needs {worst:.3g}. Raise the budget, or '
                     'lower search.rungs, search.seeds or finetune.steps.')
  return Plan('halving', rung_steps(m), survivors, seeds, worst, budget)


def _equal_compute_plan(config, names, costs: Costs, budget: float, seeds: int) -> Plan:
  """Every candidate pre-trains on the same share of the budget (after every seed's fine-tuning), then fine-tunes
  with every seed: a comparison at equal compute, not a search."""
  fine = seeds * sum(costs.per_finetune[n] for n in names)
  share = (budget - fine) / len(names)
  steps = {n: int(share // costs.per_step[n]) if costs.per_step[n] else 0 for n in names}
  if share <= 0 or any(costs.per_step[n] and steps[n] < 1 for n in names):
    raise ValueError(f'config.search.budget={budget:.3g} {config.search.budget_kind} leaves no pre-training: the '
                     f'fine-tuning alone ({seeds} seeds x {len(names)} candidates) needs {fine:.3g}.')
  worst = fine + sum(costs.per_step[n] * steps[n] for n in names)
  return Plan('equal_compute', (max(steps.values()),), (len(names),), seeds, worst, budget, per_candidate=steps)


# ---- the study: every finished evaluation, kept by optuna in SQLite ---------------------------------------------


class Study:
  """Finished evaluations keyed by (candidate, pre-training steps, seed), stored as optuna trials in
  <workdir>/select.db; an evaluation is added only once it is complete, so a kill leaves none half-recorded."""

  def __init__(self, workdir: str, names: list[str]):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    self._optuna = optuna
    self.study = optuna.create_study(study_name='select', storage=f'sqlite:///{os.path.join(workdir, "select.db")}',
                                     direction='maximize', load_if_exists=True)
    d = optuna.distributions
    self.distributions = {'candidate': d.CategoricalDistribution(tuple(names)),
                          'pretrain_steps': d.IntDistribution(0, 2**40), 'seed': d.IntDistribution(0, 2**20)}
    self.done = {self._key(t.params): dict(t.user_attrs, value=t.value)
                 for t in self.study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))}

  @staticmethod
  def _key(params) -> tuple:
    return params['candidate'], int(params['pretrain_steps']), int(params['seed'])

  def get(self, name: str, steps: int, seed: int) -> Optional[dict]:
    return self.done.get((name, steps, seed))

  def add(self, name: str, steps: int, seed: int, value: float, attrs: dict) -> None:
    params = {'candidate': name, 'pretrain_steps': steps, 'seed': seed}
    self.study.add_trial(self._optuna.trial.create_trial(params=params, distributions=self.distributions, value=value,
                                                         user_attrs=attrs))
    self.done[(name, steps, seed)] = dict(attrs, value=value)


def check_same_config(workdir: str, config) -> None:
  """A workdir holds one selection: resuming with another config would mix two searches' runs."""
  path = os.path.join(workdir, 'select_config.json')
  now = json.loads(config.to_json_best_effort())
  if os.path.exists(path):
    with open(path) as f:
      before = json.load(f)
    changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
    if changed:
      raise ValueError(f'{workdir} holds a selection with another config (it differs in {", ".join(changed)}); '
                       'rerun the same command to resume it, or give a new --workdir.')
    return
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(now, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


# ---- the data the fine-tuning reads ------------------------------------------------------------------------------


def data_files(config, workdir: str) -> tuple[str, str]:
  """config.data.train / dev, with 'embedded:<task>' written once to <workdir>/data as TSV (no files needed)."""
  train, dev = str(config.data.train), str(config.data.dev)
  if not train:
    raise ValueError("config.data.train is empty: give the fine-tuning training file (e.g. "
                     "../shared/data/sst2/train.tsv) or 'embedded:package'.")
  out = []
  for split, path in (('train', train), ('validation', dev)):
    if path.startswith('embedded:'):
      path = _write_embedded(path.split(':', 1)[1], split, os.path.join(workdir, 'data'))
    out.append(path)
  return tuple(out)


def _write_embedded(name: str, split: str, folder: str) -> str:
  from train.data import embedded
  path = os.path.join(folder, f'{name}_{split}.jsonl')
  if os.path.exists(path):
    return path
  os.makedirs(folder, exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    for record in embedded.task(name)[split]:
      f.write(json.dumps(record) + '\n')
  os.replace(tmp, path)
  return path


# ---- running the search ------------------------------------------------------------------------------------------


def best_metric(workdir: str, metric: str) -> float:
  """The best value of `metric` ('eval/accuracy') in a run's metrics.jsonl: what train.best_metric kept."""
  from train.viz import plots
  split, name = metric.split('/', 1) if '/' in metric else ('eval', metric)
  values = [float(r[name]) for r in plots.read_metrics(workdir) if r.get('split') == split and name in r]
  if not values:
    raise ValueError(f'{workdir}/metrics.jsonl has no {metric!r}: set config.metric to one the task reports '
                     '(e.g. eval/accuracy) and give a dev file (config.data.dev).')
  return max(values)


@dataclasses.dataclass
class Search:
  """What one selection run holds while it goes: config, candidates, costs, plan, study, and a progress clock."""
  config: Any
  workdir: str
  cands: list[Candidate]
  costs: Costs
  plan: Plan
  study: Study
  files: tuple[str, str]
  log: Callable = print
  started: float = dataclasses.field(default_factory=time.time)
  spent: float = 0.0  # budget units of the evaluations this invocation ran (for the ETA)
  planned_left: float = 0.0

  def cand(self, name: str) -> Candidate:
    return next(c for c in self.cands if c.name == name)


def _quiet_log(path: str) -> Callable:
  def log(message):
    with open(path, 'a') as f:
      f.write(f'{message}\n')
  return log


def _train(config, workdir: str, log_path: str) -> None:
  from train.core import trainer
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  summary = trainer.train_and_evaluate(config, workdir, log=_quiet_log(log_path))
  if summary['status'] == 'preempted':
    raise Preempted(f'SIGTERM: {workdir} saved its checkpoint; rerun the same command to resume the selection.')
  if summary['status'] not in ('done', 'finished', 'early_stopped'):
    raise RuntimeError(f'{workdir} ended with status {summary["status"]!r}; its log: {log_path}')


class Preempted(Exception):
  """A run of the search saved and stopped on SIGTERM; the same command resumes."""


def evaluate(s: Search, name: str, steps: int, seed: int, *, rung: int) -> dict:
  """One evaluation (read back from the study when it is there): pre-train on to `steps`, fine-tune with `seed`."""
  done = s.study.get(name, steps, seed)
  if done is not None:
    return done
  cand, t0, w = s.cand(name), time.time(), s.workdir
  pre_dir = os.path.join(w, 'pretrain', name)
  flops = 0.0
  if cand.pretrains:
    pc = pretrain_config(s.config, cand, steps=steps, max_steps=s.plan.max_steps)
    _train(pc, pre_dir, os.path.join(w, 'logs', f'pretrain-{name}.log'))
    if seed == 0:  # the rung's pre-training, counted once (by the plan, so a resumed run counts the same)
      flops += s.costs.pretrain[name].flops_per_step * (steps - (s.plan.steps(rung - 1, name) if rung else 0))
  ft_dir = os.path.join(w, 'finetune', f'{name}-{steps}-seed{seed}')
  fc = finetune_config(s.config, cand, init_from=pre_dir if cand.pretrains else cand.init_from, seed=seed,
                       arch=arch_of(cand), data_files=s.files)
  _train(fc, ft_dir, os.path.join(w, 'logs', f'finetune-{name}-{steps}-seed{seed}.log'))
  flops += s.costs.finetune[name].flops_per_step * int(s.config.finetune.steps)
  value = best_metric(ft_dir, s.config.metric)
  attrs = dict(rung=rung, flops=flops, seconds=time.time() - t0, pretrain_dir=pre_dir if cand.pretrains else '',
               finetune_dir=ft_dir)
  if s.config.metric.split('/')[-1] == 'accuracy':
    attrs.update(dev_predictions(ft_dir, s.files[1]))
  s.study.add(name, steps, seed, value, attrs)
  return dict(attrs, value=value)


def dev_predictions(ft_dir: str, dev_file: str) -> dict[str, Any]:
  """Which dev records the run's best checkpoint gets right ('correct': a string of 0/1 in file order, what the
  report's intervals and paired tests resample) and the majority-class share of the dev labels, from the evaluate
  job's predictions.jsonl (<ft_dir>/dev_eval)."""
  from train.core import evaluation  # pylint: disable=g-import-not-at-top
  out = os.path.join(ft_dir, 'dev_eval')
  evaluation.evaluate_run(ft_dir, dev_file, out, step='best', log=lambda *_: None)
  return read_predictions(out)


def read_predictions(out: str) -> dict[str, Any]:
  """dev_predictions' summary of an evaluate job's <out>/predictions.jsonl: 'correct', 'majority', 'majority_label'."""
  from train.selection import stats  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out, 'predictions.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  share, label = stats.majority_share([r['label'] for r in rows])
  return dict(correct=''.join('1' if str(r['label']) == str(r['prediction']) else '0' for r in rows),
              majority=share, majority_label=label)


def correctness(s: Search, name: str, steps: int, seeds: int) -> Optional[np.ndarray]:
  """[seeds, N] 0/1 of the candidate's dev predictions at `steps`, or None when an evaluation kept none (a metric
  other than accuracy, or a study written before predictions were kept)."""
  rows = [s.study.get(name, steps, k) for k in range(seeds)]
  if any(r is None or not r.get('correct') for r in rows):
    return None
  return np.array([[c == '1' for c in r['correct']] for r in rows], np.float64)


def majority(s: Search) -> Optional[float]:
  """The dev set's majority-class share (the accuracy of always predicting its most frequent label)."""
  return next((e['majority'] for e in s.study.done.values() if e.get('majority') is not None), None)


def learned(s: Search, name: str, steps: int, seeds: int) -> bool:
  """Whether the candidate's dev accuracy is above the majority baseline beyond noise (stats.verdict); True when
  there is nothing to test against."""
  from train.selection import stats  # pylint: disable=g-import-not-at-top
  correct, base = correctness(s, name, steps, seeds), majority(s)
  return True if correct is None or base is None else stats.verdict(correct, base).learned


def _ranked(s: Search, names: list[str], rung: int) -> list[str]:
  """Best first by the rung's seed-0 metric; ties go to the cheaper, then by name (so the order is total)."""
  def key(n):
    e = s.study.get(n, s.plan.steps(rung, n), 0)
    return -e['value'], e['flops'], n
  return sorted(names, key=key)


def _progress(s: Search, done: int, total: int, name: str, steps: int, seed: int, result: dict, rung: int) -> None:
  elapsed = time.time() - s.started
  frac = done / total
  eta = elapsed / frac * (1 - frac) if frac and s.spent else 0.0
  metric = s.config.metric.split('/')[-1]
  s.log(f'[{done:>{len(str(total))}}/{total}] rung {rung + 1}/{len(s.plan.rung_steps)} {name} {steps} pre-training steps, seed '
        f'{seed}: {metric} {result["value"]:.4f} ({result["seconds"]:.0f} s) | {elapsed:.0f} s elapsed'
        + (f', ETA {eta:.0f} s' if eta else ''))


def run(s: Search) -> dict[str, Any]:
  """Successive halving (or one equal-compute rung) over the candidates -> {'rungs': [[names], ...], 'chosen'}."""
  names, plan = [c.name for c in s.cands], s.plan
  rungs, total, done = [], plan.evaluations(), 0
  alive = list(names)
  for rung in range(len(plan.rung_steps)):
    last = rung == len(plan.rung_steps) - 1
    alive = alive[:plan.survivors[rung]]
    rungs.append(list(alive))
    for name in alive:
      for seed in range(plan.seeds if last else 1):
        steps = plan.steps(rung, name)
        fresh = s.study.get(name, steps, seed) is None
        result = evaluate(s, name, steps, seed, rung=rung)
        done += 1
        s.spent += result['flops'] if fresh else 0.0
        _progress(s, done, total, name, steps, seed, result, rung)
    alive = _ranked(s, alive, rung)
  last = len(rungs) - 1
  means = {n: np.mean([s.study.get(n, plan.steps(last, n), k)['value'] for k in range(plan.seeds)]) for n in rungs[-1]}
  # A candidate at chance is not ranked above one that learned, whatever its mean.
  ok = {n: learned(s, n, plan.steps(last, n), plan.seeds) for n in rungs[-1]}
  chosen = min(rungs[-1], key=lambda n: (not ok[n], -means[n], n))
  return {'rungs': rungs, 'chosen': chosen, 'means': means, 'any_learned': any(ok.values())}


def prepare(config, workdir: str, *, log=print) -> Search:
  """Everything checked and planned before anything trains: candidates, data, costs, the plan, the study."""
  cands = candidates_of(config)
  os.makedirs(workdir, exist_ok=True)
  check_same_config(workdir, config)
  files = data_files(config, workdir)
  costs = costs_of(config, cands)
  plan = make_plan(config, cands, costs)
  study = Study(workdir, [c.name for c in cands])
  return Search(config, workdir, cands, costs, plan, study, files, log)
