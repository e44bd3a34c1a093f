"""The weighted combination of objectives into one loss over one params pytree: `build_loss_fn`.

Each record's loss reads the model's outputs and the batch; this module checks that the model has the heads and the
batch the keys every record reads, runs one forward pass and sums the weighted losses, metrics named
'<objective>/<metric>'. An objective with its own model and step (ELECTRA) runs that step instead, alone.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from model.config import ModelConfig
from model.heads import LanguageModel
from train.tasks import registry

Metrics = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, Metrics]]


@dataclasses.dataclass(frozen=True)
class LossOptions:
  """config.loss: label_smoothing and z_loss for the generative token losses, ELECTRA's weights."""
  label_smoothing: float = 0.0
  z_loss: float = 0.0
  rtd_lambda: float = 50.0
  generator_temperature: float = 1.0


def _check_model(model, objectives, heads):
  if not isinstance(model, LanguageModel):
    raise ValueError(f'objectives {sorted(objectives)} need a LanguageModel, got {type(model).__name__}.')
  missing = sorted(set(heads) - set(model.heads))
  if missing:
    raise ValueError(f'objectives {sorted(objectives)} read head(s) {missing} the model was built without; build '
                     f'LanguageModel(cfg, heads=heads_for(objectives)) = heads={heads}.')


def _check_batch(batch, records: Mapping[str, registry.Record]):
  for name, record in records.items():
    missing = [k for k in record.batch_keys if k not in batch]
    if missing:
      raise ValueError(f'objective {name!r} needs batch key(s) {missing}; the batch has {sorted(batch)} '
                       '(see the batch contract in train/data/__init__.py).')


def build_loss_fn(cfg_or_arch: Union[ModelConfig, str], objectives: Mapping[str, float], *,
                  heads: Optional[Sequence[str]] = None, **options: Any) -> LossFn:
  """One loss over the params pytree for a weighted set of objectives, e.g. {'mlm': 1.0, 'nsp': 1.0}.

  Validates now (ValueError naming objective, arch and fix) and returns
  `loss_fn(params, batch, rng, *, model, deterministic=False) -> (loss, metrics)`, for
  `jax.value_and_grad(loss_fn, has_aux=True)`. `model` is train/core/resolve.py build_model's: a LanguageModel with
  `heads_for(objectives)`, or the record's own (Electra for 'rtd'); `rng` feeds dropout and ELECTRA's sampling (it may
  be None with deterministic=True, except for 'rtd', which samples even in evaluation). options are LossOptions'
  fields (config.loss). loss = sum_name weight * loss_name; metrics are '<name>/<metric>' per objective plus 'loss'.
  heads: the model's heads when they are not heads_for(objectives) (a prompt-based run).
  """
  registry.validate_objectives(cfg_or_arch, objectives)
  arch = registry._arch(cfg_or_arch)  # pylint: disable=protected-access
  objectives = dict(objectives)
  opts = LossOptions(**options)
  heads = tuple(heads) if heads is not None else registry.heads_for(objectives, arch)
  records = {n: registry.for_arch(registry.REGISTRY[n], arch) for n in objectives}
  own = registry.own_model(objectives)

  def loss_fn(params, batch, rng, *, model, deterministic: bool = False):
    if own is not None:
      _check_batch(batch, records)
      loss, m = own.own.step_loss(params, batch, rng, model=model, deterministic=deterministic, opts=opts)
      total = objectives[own.name] * loss
      return total, {'loss': total, **{f'{own.name}/{k}': v for k, v in m.items()}}
    _check_model(model, objectives, heads)
    _check_batch(batch, records)
    # rng may be None for deterministic evaluation of non-sampling objectives.
    out = model.apply({'params': params}, batch, deterministic=deterministic,
                      rngs={} if rng is None else {'dropout': rng})
    total = jnp.zeros((), jnp.float32)
    metrics = {}
    for name, weight in objectives.items():
      loss, m = records[name].loss(out, batch, opts)
      total = total + weight * loss
      metrics.update({f'{name}/{k}': v for k, v in m.items()})
    metrics['loss'] = total
    return total, metrics

  return loss_fn
