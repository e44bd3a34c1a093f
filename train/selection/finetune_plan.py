"""The costs and the plan of a fine-tuning selection (configs/select.py:mode=finetune): the cost model's FLOPs and
memory for each candidate's training step and dev pass, in budget units (seconds through this machine's calibration,
or FLOPs), and the successive-halving plan whose worst case fits the budget (train/selection/finetune_search.py
prints it before anything trains).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional

from configs import finetune as finetune_configs
from train.core import cost as cost_lib
from train.selection import search
from train.selection.finetune_candidates import Candidate, Start, finetune_config

BUDGET_KINDS = ('seconds', 'flops')

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
