"""Scoring a model on a downstream task's records: every example once, the task's predictions and its metrics by name.

The same functions serve the dev evaluation during fine-tuning (train/core/loop.py) and the evaluate job
(train/core/evaluation.py), so the job reproduces what training logged for the same checkpoint. Examples are batched
(in order, or longest first with the length buckets below), the last batch padded with copies that are dropped after
the forward pass; the forward is jitted once per batch shape. A task's record (train/tasks/registry.py) names the model outputs its scorer reads (or its own forward:
generation), how to turn records into evaluation examples (QA: doc-stride windows) and the scorer, which lives in
the task kind's module.

Length buckets: where padding would be most of the work (SST-2 sentences of ~25 tokens at seq_len 128, zero-shot
prompts), `run_forward` scores the examples longest first, cuts each batch's per-position arrays to the shortest of a
few fixed lengths (`bucket_lengths`) that holds its longest example, and puts the outputs back in the examples' order:
the forward compiles once per bucket, not per batch (a length fewer than MIN_BATCHES_PER_BUCKET batches would use
goes to the next longer one), and every row sees the same real tokens as at full length (the
padding it loses was masked), so predictions and metrics are those of full-length scoring, logits equal to float
rounding. Tasks whose outputs have a position axis (tags, QA spans) or no `segment_ids` (generation) keep full length.
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from model.transformer import forward_compiler_options

Scored = tuple[dict[str, float], list[dict[str, Any]]]


def forward_fn(model, keys: Sequence[str], *, params_sharding=None, batch_sharding=None, rules=None, mesh=None):
  """jit(params, batch) -> {key: model output} for the keys a scorer reads (nothing else leaves the device)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  def fwd(params, batch):
    out = model.apply({'params': params}, batch, deterministic=True)
    return {k: out[k] for k in keys}

  options = forward_compiler_options()
  if mesh is None:
    return jax.jit(fwd, compiler_options=options)

  def under_rules(params, batch):
    with nn.logical_axis_rules(rules), jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fwd(params, batch)

  return jax.jit(under_rules, in_shardings=(params_sharding, batch_sharding), compiler_options=options)


def task_forward(task, model, data, **shardings) -> Callable:
  """What a task's scorer reads, as one jitted function: its own forward (generation), or the model outputs named."""
  if task.forward is not None:
    return task.forward(model, data)
  return forward_fn(model, task.outputs, **shardings)


def _padded_batches(examples: Sequence[Mapping[str, np.ndarray]], batch_size: int):
  """(batch of batch_size rows, how many are real) in order; the last batch repeats its first row as padding."""
  for start in range(0, len(examples), batch_size):
    rows = list(examples[start:start + batch_size])
    n = len(rows)
    rows += [rows[0]] * (batch_size - n)
    yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}, n


def bucket_lengths(seq_len: int, smallest: int = 16, step: int = 8) -> tuple[int, ...]:
  """16, 24, 32, ..., 64, 72, 88, 104, 120, 136, 160, ... below seq_len, then seq_len: multiples of `step`, each the
  next multiple at or above 9/8 of the one before (at least `step` more), so that a batch of length-sorted rows pads
  its longest row by fewer than `step` positions or an eighth. Lengths few batches would use are merged into the next
  (MIN_BATCHES_PER_BUCKET), so a task compiles a handful of them. Against powers of two and their midpoints (16, 24,
  32, 48, 64, 96, 128, 192, ...), SmolLM2's 4-shot SST-2 prompts (seq_len 512) carry 11% more positions than
  length-sorted batches need instead of 24%, through 3 shapes instead of 2 (benchmarks/inference.py)."""
  out, n = [], smallest
  while n < seq_len:
    out.append(n)
    n = max(n + step, -(-n * 9 // 8 // step) * step)
  return tuple(out) + (int(seq_len),)


def example_lengths(examples: Sequence[Mapping[str, np.ndarray]]) -> Optional[np.ndarray]:
  """Each example's positions up to its last real one (segment_ids != 0 along the last axis, over every input row of
  a prompt example), or None where the examples have no segment_ids."""
  if not examples or 'segment_ids' not in examples[0]:
    return None
  t = np.shape(examples[0]['segment_ids'])[-1]
  real = np.stack([np.reshape(e['segment_ids'], (-1, t)).any(axis=0) for e in examples])  # [N, T]
  last = t - np.argmax(real[:, ::-1], axis=1)
  return np.where(real.any(axis=1), last, 1)


def _cut(batch: Mapping[str, np.ndarray], length: int) -> dict[str, np.ndarray]:
  """The batch with every array shaped like segment_ids (one entry per position) cut to `length` positions."""
  shape = batch['segment_ids'].shape
  return {k: v[..., :length] if v.shape == shape else v for k, v in batch.items()}


def _buckets_apply(fwd: Callable, params, batch: Mapping[str, np.ndarray], length: int) -> bool:
  """Whether cut batches give outputs of the full batch's shapes: no output has a position axis (traced, not run)."""
  shapes = lambda b: jax.tree.map(lambda x: x.shape, jax.eval_shape(fwd, params, b))
  return shapes(batch) == shapes(_cut(batch, length))


# A bucket length that fewer batches than this would use is merged into the next longer one: its compile (seconds)
# would cost more than the padding it saves (a small dev set, the few longest examples).
MIN_BATCHES_PER_BUCKET = 4


def _merge_small(per_batch: np.ndarray, min_batches: int) -> np.ndarray:
  """per_batch with each length that fewer than min_batches batches use raised to the next longer one in use."""
  per_batch = per_batch.copy()
  sizes = sorted(set(per_batch.tolist()))
  for small, big in zip(sizes, sizes[1:]):
    hit = per_batch == small
    if hit.sum() < min_batches:
      per_batch[hit] = big
  return per_batch


def _plan(fwd, params, examples, batch_size, buckets, min_batches=MIN_BATCHES_PER_BUCKET):
  """(order the examples are scored in, the bucket length of each batch or None for full length)."""
  lengths = None if buckets is not None and not len(buckets) else example_lengths(examples)
  if lengths is None:
    return np.arange(len(examples)), None
  seq_len = np.shape(examples[0]['segment_ids'])[-1]
  sizes = np.asarray(sorted({min(int(b), seq_len) for b in buckets or bucket_lengths(seq_len)} | {seq_len}))
  order = np.argsort(-lengths, kind='stable')  # longest first: the biggest shape compiles (and fails) first
  longest = lengths[order][::batch_size]
  per_batch = _merge_small(sizes[np.searchsorted(sizes, longest)], min_batches)
  if per_batch.min() == seq_len:
    return np.arange(len(examples)), None
  first, _ = next(_padded_batches([examples[i] for i in order[-batch_size:]], batch_size))
  if not _buckets_apply(fwd, params, first, int(per_batch.min())):
    return np.arange(len(examples)), None
  return order, [int(x) for x in per_batch]


def run_forward(fwd: Callable, params, examples: Sequence[Mapping[str, np.ndarray]], *, batch_size: int,
                batch_sharding=None, log: Optional[Callable] = None,
                buckets: Optional[Sequence[int]] = None,
                min_batches: int = MIN_BATCHES_PER_BUCKET) -> dict[str, np.ndarray]:
  """The forward's outputs for every example, in the examples' order, concatenated on the host: {key: [N, ...]}; a
  progress line with ETA. buckets: the lengths batches are cut to (None: bucket_lengths(seq_len); (): full length);
  min_batches: the fewest batches a length below seq_len is compiled for (fewer go to the next longer length)."""
  from train.data.loader import global_batch  # pylint: disable=g-import-not-at-top
  order, lengths = _plan(fwd, params, examples, batch_size, buckets, min_batches)
  outs, t0, total = [], time.time(), -(-len(examples) // batch_size)
  for i, (batch, n) in enumerate(_padded_batches([examples[j] for j in order], batch_size)):
    if lengths is not None:
      batch = _cut(batch, lengths[i])
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
  result = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
  if lengths is None:
    return result
  inverse = np.empty_like(order)
  inverse[order] = np.arange(len(order))
  return {k: v[inverse] for k, v in result.items()}


def label_names(data, field) -> list[str]:
  """config.data.<field> (label_names, tag_names): the order the model's head and the scorer share."""
  names = list(data.get(field) or [])
  if not names:
    raise ValueError(f'config.data.{field} is empty; the run resolves it from the training data.')
  return names


def score(task, fwd: Callable, params, records: Sequence[Mapping[str, Any]], tokenizer, data, *, batch_size: int,
          batch_sharding=None, log: Optional[Callable] = None, buckets: Optional[Sequence[int]] = None,
          min_batches: int = MIN_BATCHES_PER_BUCKET) -> Scored:
  """(metrics, predictions) of `task` on `records`: its evaluation examples through `fwd` (length-bucketed unless
  buckets=(): run_forward), then its scorer."""
  if getattr(task, 'score', None) is None:
    raise ValueError(f'{task.name!r} has no scorer; evaluate it by its loss (config.train.eval_steps).')
  examples = task.eval_examples(records, tokenizer, data)
  outputs = run_forward(fwd, params, examples, batch_size=batch_size, batch_sharding=batch_sharding, log=log,
                        buckets=buckets, min_batches=min_batches)
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
